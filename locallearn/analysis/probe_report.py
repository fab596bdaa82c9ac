"""The linear probes of several runs: a table and a figure of accuracy by depth, over seeds.

Records that differ only in their seed are one run (a row, a line): its probes' test accuracy
at each block after the last epoch, mean ± standard deviation over the seeds, beside the same
network's before training (epoch 0: the randomly initialised network, the floor that shows a
rule learned anything). Runs that are not complete (running, interrupted, diverged) are left
out and named. ``python benchmarks/probes.py RECORDS... [-o FIGURE]``.
"""

from __future__ import annotations

import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, LocallearnError
from ..records import read_record
from ..settings import Parser

__all__ = ["by_run", "figure", "main", "table"]


def by_run(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The records grouped by run: records whose file names differ only in the seed
    (``RUN__...__seedN.json``, as run.py and the grid runner name them) are one run, labelled
    by its run id (the name's first field: ``blockwise_ssl-e2e``), or by the whole name
    where two runs share a run id."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        name = Path(str(record.get("file") or record.get("path") or "run")).name
        groups.setdefault(re.sub(r"__seed\d+(\.json)?$", "", name), []).append(record)
    ids = [key.split("__")[0] for key in groups]
    return {(i if ids.count(i) == 1 else key): group
            for i, (key, group) in zip(ids, groups.items(), strict=True)}


def accuracy(record: dict[str, Any], epoch: int | None = None) -> list[float]:
    """The probes' test accuracy per block after ``epoch`` (None: the last)."""
    if not record.get("probe"):
        raise DataError(f"{record.get('file', 'record')}: the record has no linear probe "
                        "(run it with --probe linear)")
    epoch = max(e["epoch"] for e in record["probe"]) if epoch is None else epoch
    rows = sorted((e["block"], e["acc"]) for e in record["probe"] if e["epoch"] == epoch)
    return [acc for _, acc in rows]


def _short(name: str) -> str:
    """A grouped block's name (``stem+layer1.0+...+layer3.4``) as its ends."""
    ends = name.split("+")
    return name if len(ends) < 3 else f"{ends[0]}+…+{ends[-1]}"


def _spread(values: list[list[float]]) -> list[tuple[float, float]]:
    """Per block: mean and standard deviation over the seeds (0 for one seed)."""
    per_block = list(zip(*values, strict=True))
    return [(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for v in per_block]


def table(records: Sequence[dict[str, Any]]) -> str:
    """A markdown table: a row per run, the probes' accuracy (%) per block after the last
    epoch and before training, mean ± sd over the seeds."""
    lines = []
    for record in records:
        accuracy(record)  # a record without probes: one line naming it
    for label, group in by_run(records).items():
        names = group[0]["stack"]["blocks"]
        seeds = sorted((r.get("config") or {}).get("seed") for r in group)
        epochs = {max(e["epoch"] for e in r["probe"]) for r in group}
        for when, epoch in ((f"after epoch {max(epochs)}", None), ("before training", 0)):
            cells = [f"{_short(names[k])} {100 * m:.1f} ± {100 * s:.1f}"
                     for k, (m, s) in enumerate(_spread([accuracy(r, epoch) for r in group]))]
            lines.append(f"| {label} | {len(seeds)} | {when} | " + " · ".join(cells) + " |")
    head = ["| run | seeds | probes | test accuracy %, per block (mean ± sd over seeds) |",
            "|---|---|---|---|"]
    return "\n".join(head + lines)


def figure(records: Sequence[dict[str, Any]]):
    """Accuracy by depth, a panel per model: a line per run after the last epoch (mean, bars:
    ± sd over seeds), dashed in the same colour before training. Depth runs from the first
    block (0) to the last (1), so a run cut into fewer blocks (``--blocks 1``: the whole
    network, at 1) sits beside the others."""
    from matplotlib.figure import Figure

    from .plots import STYLE

    groups = by_run(records)
    models = sorted({g[0].get("model", "?") for g in groups.values()})
    with _style(STYLE):
        fig = Figure(figsize=(4.6 * len(models) + 0.6, 3.9), layout="constrained")
        axes = fig.subplots(1, len(models), squeeze=False)[0]
        for ax, model in zip(axes, models, strict=True):
            runs = {k: g for k, g in groups.items() if g[0].get("model", "?") == model}
            for label, group in runs.items():
                color = f"C{list(groups).index(label) % 10}"
                for epoch, style in ((None, "o-"), (0, "s--")):
                    mean, sd = zip(*_spread([accuracy(r, epoch) for r in group]), strict=True)
                    depth = [k / max(len(mean) - 1, 1) if len(mean) > 1 else 1.0
                             for k in range(len(mean))]
                    ax.errorbar(depth, [100 * m for m in mean], [100 * s for s in sd],
                                fmt=style, ms=4, capsize=2, color=color,
                                alpha=1.0 if epoch is None else 0.5,
                                label=label if epoch is None else None)
            names = max((g[0]["stack"]["blocks"] for g in runs.values()), key=len)
            ax.set_xticks([k / max(len(names) - 1, 1) for k in range(len(names))],
                          [_short(n) for n in names], rotation=30, fontsize=7)
            ax.set_xlabel(f"block of {model}")
            ax.set_ylabel("linear-probe test accuracy (%)")
            ax.plot([], [], "s--", color="0.5", alpha=0.5, label="before training")
            ax.legend(fontsize=7, loc="best")
        seeds = sorted({len(g) for g in groups.values()})
        fig.suptitle(f"linear probes by depth after the last epoch; mean ± sd over "
                     f"{'/'.join(map(str, seeds))} seeds", fontsize=9)
    return fig


def _style(style: dict[str, Any]):
    from matplotlib import rc_context

    return rc_context(style)


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/probes.py RECORDS... [-o FIGURE]``; returns the exit status."""
    p = Parser(prog="probes.py", description="Tabulate (and draw) the linear probes of runs.")
    p.add_argument("records", nargs="+", metavar="RECORD", help="run record JSON files")
    p.add_argument("-o", "--output", metavar="FILE", help="also draw the figure (.png, .pdf "
                   "or .svg)")
    try:
        args = p.parse_args(argv)
        if args.output and Path(args.output).suffix.lower() not in (".png", ".pdf", ".svg"):
            raise ConfigError(f"output must end in .png, .pdf or .svg; got {args.output!r}")
        records = [read_record(path) | {"file": path} for path in args.records]
        apart = [r["file"] for r in records if r.get("status") != "complete"]
        records = [r for r in records if r.get("status") == "complete"]
        if not records:
            raise DataError("no complete run among the records")
        text = table(records)
        if args.output:
            from .plots import save_figure

            path = save_figure(figure(records), args.output)
    except (LocallearnError, OSError) as err:
        print("probes.py: error: " + " ".join(str(err).splitlines()), file=sys.stderr)
        return 2
    print(text)
    if apart:  # running, interrupted or diverged: never averaged in
        print("left out (not complete): " + ", ".join(map(str, apart)))
    if args.output:
        print(f"wrote {path}")
    return 0
