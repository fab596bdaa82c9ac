"""Leaderboard tables built from run records: one table per (dataset, backbone, budget).

Every number comes from the records (DESIGN principle 9). A row is one setting (rule, its
options, ``--blocks K`` and whatever else differs) averaged over its seeds; only complete
records are averaged, the rest (and those :func:`~locallearn.records.read_record` refuses)
are listed apart with the reason. Records are read in sorted order and every number has a
fixed precision, so the same records give byte-identical files (figures included:
:func:`~locallearn.analysis.plots.save_figure` strips the varying metadata).
"""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
import statistics
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError
from .outputs import check_folder
from .records import RecordError, read_record, replacing
from .settings import BY_NAME, FLAGS, IDENTITY, SETTING, build_parser

__all__ = ["INTRO", "Row", "Table", "build_tables", "collect", "render_csv", "render_markdown",
           "write_all"]

# Config keys that do not make a row: the flags that are not part of a row (outputs,
# commands, the table, the seed, what changes no trained number; see settings.Flag.row),
# the loop's settings again as one dict ("train") and the --plugin list ("plugins").
_NOT_SETTING = {f.dest for f in FLAGS if not f.in_row} | {"train", "plugins"}
# A flag's value in a record made before the flag existed: its default.
_DEFAULTS = {f.dest: (False if f.kind == "switch" else f.default) for f in FLAGS}
_ROW_DEFAULTS = {f.dest: _DEFAULTS[f.dest] for f in FLAGS if f.in_row and f.recorded}
_DEPTHS_SHOWN = 8
# The columns of leaderboard.csv that say which row a line is (its "options" text is
# left out: it names what differs between a table's rows, so it changes as rows come).
_ROW_KEY = ("dataset", "model", "epochs", "train_subset", "test_subset", "rule", "blocks",
            "rule_options", "hardware")

INTRO = """\
One table per (dataset, backbone, budget); a row per setting and machine,
averaged over its seeds. Columns: **test acc %**: mean ± sample standard deviation over the
seeds; **acc % by depth**: the accuracy of the prediction at each depth that
has one (auxiliary heads, shallow to deep; e2e has only the last); **params**:
the backbone's and the auxiliary parts' (heads, decoders); **img/s** and
**s/epoch**: training throughput, mean over epochs; **saved MiB**: activation
memory, the peak bytes saved for backward during the first training step of
each epoch (max over epochs; device-independent), and **× e2e** its ratio to
the table's e2e row; **CUDA MiB**: `torch.cuda.max_memory_allocated` on GPUs;
**nHSIC(X;Z)**, **nHSIC(Y;Z)**: the last block's information-plane position
after the last epoch ([information_plane.md](information_plane.md)); **Δ e2e**:
the test accuracy less that of the table's e2e row made by the same preset (any
e2e row where the preset made none), in percentage points (blank for that row and
in a table without one); **recipe**: epochs, optimizer, peak
learning rate and batch size; **options**: rule options and whatever else
differs between the table's rows. **(probe)**: a label-free rule (no prediction
of its own), whose accuracies are its linear probes' (`--probe linear`,
[records.md](records.md#probe_config)). Under each table, the command that made each
row, with the seed varying over the row's seeds, and how it is known: recorded
by the run, rebuilt from an older record's config (only where the rebuilt
command gives the same config again), or not recorded
([records.md](records.md#commands)). Runs that are
not complete (running, interrupted, diverged) are listed apart at the end and
never averaged in. Accuracies on `imagefolder:cifar10` are on the CIFAR-10
JPEG copy: close to, not identical with, published CIFAR-10 numbers.
"""


@dataclass
class Row:
    """One setting of a table, averaged over its seeds."""

    rule: str
    blocks: int | None
    setting: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""
    options: str = ""

    @property
    def seeds(self) -> list[int]:
        return [r.get("seed", 0) for r in self.records]

    def acc(self) -> tuple[float, float | None]:
        """Test accuracy: mean and sample standard deviation over seeds (None for one seed)."""
        accs = [float(r["test_acc"]) for r in self.records]
        return sum(accs) / len(accs), statistics.stdev(accs) if len(accs) > 1 else None

    @property
    def preset(self) -> str | None:
        """The preset that made the row's first record (None: none)."""
        return self.records[0]["config"].get("preset") if self.records else None

    def probed(self) -> bool:
        """Whether the accuracies are the linear probe's (a label-free rule's records)."""
        return all(r.get("probe") and r["history"] and
                   r["history"][-1].get("probe_acc") == r["block_acc"] for r in self.records)

    def block_acc(self) -> list[float]:
        """Mean accuracy at each depth that has a prediction, shallow to deep."""
        lists = [r["block_acc"] for r in self.records]
        n = min(len(b) for b in lists)
        means = [_mean([b[i] for b in lists]) for i in range(n)]
        return [m for m in means if m is not None]

    def value(self, key: str) -> float | None:
        """Mean over seeds of one per-record measurement (see :func:`measure`)."""
        return _mean([measure(r, key) for r in self.records])

    def hardware(self) -> str:
        return "; ".join(sorted({_hardware(r) for r in self.records}))


def _mean(values: list[float | None]) -> float | None:
    """Mean of the values present (None if none is)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


@dataclass
class Table:
    """The rows of one (dataset, backbone, budget)."""

    dataset: str
    model: str
    epochs: int
    train_subset: int | None
    test_subset: int | None
    rows: list[Row] = field(default_factory=list)

    @property
    def title(self) -> str:
        train = f"{self.train_subset:,}" if self.train_subset else "all"
        test = f"{self.test_subset:,}" if self.test_subset else "all"
        epochs = f"{self.epochs} epoch" + ("" if self.epochs == 1 else "s")
        return (f"{self.dataset} · {self.model} · {epochs} · "
                f"{train} train / {test} test images")

    @property
    def slug(self) -> str:
        text = f"{self.dataset}_{self.model}_{self.epochs}ep_{self.train_subset or 'all'}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)

    def baselines(self, row: Row) -> list[Row]:
        """The ``e2e`` rows ``row`` is compared with: those its preset made, where it made
        any (two presets of one budget each compare with their own e2e), else all."""
        e2e = [r for r in self.rows if r.rule == "e2e"]
        same = [r for r in e2e if r.preset == row.preset]
        return same or e2e

    def delta(self, row: Row) -> float | None:
        """``row``'s mean test accuracy less that of its first baseline (:meth:`baselines`;
        None for that row itself and in a table without one)."""
        e2e = next(iter(self.baselines(row)), None)
        return None if e2e is None or e2e is row else row.acc()[0] - e2e.acc()[0]

    def saved_ratio(self, row: Row) -> float | None:
        """``row``'s saved bytes over those of its first baseline that has them."""
        e2e = [r.value("saved_bytes_peak") for r in self.baselines(row)]
        saved, e2e = row.value("saved_bytes_peak"), next(filter(None, e2e), None)
        return saved / e2e if saved is not None and e2e else None


def dataset_label(dataset: str) -> str:
    """``imagefolder:/some/path/cifar10`` -> ``imagefolder:cifar10``: the same data anywhere."""
    kind, sep, path = dataset.partition(":")
    return f"{kind}:{Path(path).name}" if sep and kind == "imagefolder" else dataset


def measure(record: dict[str, Any], key: str) -> float | None:
    """One measurement of a complete record: ``images_per_s`` (mean over epochs),
    ``seconds_per_epoch``, ``saved_bytes_peak``, ``cuda_max_memory`` (max over epochs),
    ``nhsic_x`` / ``nhsic_y`` (last block, last measured epoch), ``params_backbone``,
    ``params_auxiliary``."""
    if key == "images_per_s":
        return _mean([e.get("images_per_s") for e in record["history"]])
    if key in ("nhsic_x", "nhsic_y"):
        plane = record.get("plane")
        return max(plane, key=lambda e: (e["epoch"], e["block"]))[key] if plane else None
    if key.startswith("params_"):
        return record["params"].get(key.removeprefix("params_"))
    return record["memory"][key] if key in ("saved_bytes_peak", "cuda_max_memory") else record[key]


def _hardware(record: dict[str, Any]) -> str:
    hw = record["hardware"]
    return f"{hw['device_name']} ({hw['device']}) x{hw['num_processes']}"


def collect(root: str | Path) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]]]:
    """Read every ``*.json`` under ``root``, in sorted order, by
    :func:`~locallearn.records.read_record`.

    Returns:
        ``(file, record)`` of every complete run, and one entry per record kept
        apart (running, interrupted, diverged, unreadable, malformed, without a test
        accuracy).
    """
    root = Path(root)
    complete, apart = [], []
    for path in sorted(root.rglob("*.json")):
        name = path.relative_to(root).as_posix()
        try:
            record = read_record(path)
        except RecordError as err:
            status = "unreadable" if err.record is None else "malformed"
            apart.append({"file": name, "status": status,
                          "why": str(err).replace(str(path), name)})  # no machine's own path
            continue
        status = record["status"]
        if status == "complete" and record.get("test_acc") is not None:
            complete.append((name, record))
            continue
        config = record.get("config") or {}
        apart.append({
            "file": name, "status": status, "rule": record["rule"],
            "model": record["model"], "seed": record.get("seed"),
            "epochs": f"{len(record.get('history') or [])} of {config.get('epochs', '?')}",
            "why": record.get("error") or ("no test accuracy" if status == "complete" else ""),
        })
    return complete, apart


def build_tables(runs: list[tuple[str, dict[str, Any]]]) -> list[Table]:
    """Group complete runs into tables and rows, sorted; rows get labels and option texts."""
    tables: dict[tuple, Table] = {}
    for name, record in runs:
        c = record["config"]
        key = (dataset_label(record["dataset"]), record["model"], c["epochs"],
               c.get("train_subset"), c.get("test_subset"))
        table = tables.setdefault(key, Table(*key))
        setting = _ROW_DEFAULTS | {k: v for k, v in c.items() if k not in _NOT_SETTING}
        setting["hardware"] = _hardware(record)  # never average speeds over machines
        row = next((r for r in table.rows if r.setting == setting), None)
        if row is None:
            row = Row(record["rule"], record["stack"]["num_blocks"], setting)
            table.rows.append(row)
        row.records.append({**record, "file": name})
    for table in tables.values():
        _label(table)
    order = sorted(tables, key=lambda k: json.dumps(k, default=str))
    return [tables[k] for k in order]


def _label(table: Table) -> None:
    varying = sorted(
        k for k in {k for r in table.rows for k in r.setting}
        - {"rule", "blocks", "rule_options", "hardware"}  # its own column says the hardware
        if len({json.dumps(r.setting.get(k), sort_keys=True) for r in table.rows}) > 1
    )
    for row in table.rows:
        row.label = row.rule + (f" K={row.blocks}" if row.blocks else "")
        # Rule options that tell this row from the rule's other rows (all of them: the CSV).
        same_rule = [r.setting.get("rule_options") or {} for r in table.rows if r.rule == row.rule]
        mine = row.setting.get("rule_options") or {}
        opts = {k: mine[k] for k in sorted(mine)
                if len({json.dumps(o.get(k), sort_keys=True) for o in same_rule}) > 1}
        opts.update({k: row.setting.get(k) for k in varying})
        row.options = ", ".join(f"{k}={_plain(v)}" for k, v in opts.items())
        row.records.sort(key=lambda r: (r.get("seed", 0), r["file"]))
    table.rows.sort(key=lambda r: (r.rule != "e2e", r.rule, r.blocks or 0, r.options))


def _plain(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_plain(v) for v in value)
    return str(value)


def _cell(text: Any) -> str:
    """Text as one Markdown table cell: on one line, its pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _fmt(value: float | None, spec: str, scale: float = 1.0, none: str = "—") -> str:
    return none if value is None else format(value * scale, spec)


def depth_text(accs: list[float]) -> str:
    """Accuracy (%) at each depth; more than 8 depths are sampled evenly, first and last kept."""
    n = len(accs)
    if n <= _DEPTHS_SHOWN:
        return " ".join(f"{100 * a:.1f}" for a in accs)
    picks = sorted({round(i * (n - 1) / (_DEPTHS_SHOWN - 1)) for i in range(_DEPTHS_SHOWN)})
    return " ".join(f"{100 * accs[i]:.1f}" for i in picks) + f" ({n} depths)"


def _count(n: float) -> str:
    """A parameter count in millions, or thousands below 10k (a small head is not 0.00M)."""
    return f"{n / 1e6:.2f}M" if n >= 1e4 else f"{n / 1e3:.1f}k"


def _presets_line(table: Table) -> str:
    """Which preset made which rows: one name when it made all of them, else per row."""
    used: dict[str, list[str]] = {}
    for row in table.rows:
        for name in sorted({str(r["config"].get("preset") or "") for r in row.records}):
            used.setdefault(name, []).append(row.label)
    if not used or set(used) == {""}:
        return ""
    link = " ([presets.md](presets.md))."
    if len(used) == 1:
        return f"Preset: `{next(iter(used))}`{link}"
    named = [f"`{name}` made {', '.join(rows)}" if name else f"no preset: {', '.join(rows)}"
             for name, rows in sorted(used.items(), key=lambda kv: kv[0] == "")]
    return "Presets: " + "; ".join(named) + link


def _cells(table: Table, row: Row) -> list[str]:
    mean, std = row.acc()
    acc = f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}") + (
        " (probe)" if row.probed() else "")
    aux = row.value("params_auxiliary")  # below 0 when a rule leaves the model's head unused
    params = f"{_fmt(row.value('params_backbone'), '.2f', 1e-6)}M + " + (
        "0" if not aux or aux < 0 else _count(aux))
    return [
        row.label, str(len(row.records)), acc, _fmt(table.delta(row), "+.2f", 100, ""),
        depth_text(row.block_acc()), params,
        _fmt(row.value("images_per_s"), ".0f"), _fmt(row.value("seconds_per_epoch"), ".1f"),
        _fmt(row.value("saved_bytes_peak"), ".1f", 2 ** -20), _fmt(table.saved_ratio(row), ".2f"),
        _fmt(row.value("cuda_max_memory"), ".0f", 2 ** -20),
        _fmt(row.value("nhsic_x"), ".3f"), _fmt(row.value("nhsic_y"), ".3f"),
        recipe(row), row.hardware(), row.options or "—",
    ]


HEADER = ["rule", "seeds", "test acc %", "Δ e2e", "acc % by depth", "params (backbone + aux)",
          "img/s", "s/epoch", "saved MiB", "× e2e", "CUDA MiB", "nHSIC(X;Z)", "nHSIC(Y;Z)",
          "recipe", "hardware", "options"]
# The recipe's settings (a record older than a flag: its default), as the CSV names them.
_RECIPE = ("epochs", "optimizer", "lr", "batch_size")


def _recipe(row: Row) -> dict[str, Any]:
    """Epochs, optimizer, peak learning rate and batch size of the row (of its first
    record: a row's records share them)."""
    c = row.records[0]["config"]
    return {k: c.get(k, _DEFAULTS[k]) for k in _RECIPE}


def recipe(row: Row) -> str:
    """The row's recipe in a few words: ``5 ep · sgd lr 0.1 · batch 128``."""
    r = _recipe(row)
    return f"{r['epochs']} ep · {r['optimizer']} lr {r['lr']:g} · batch {r['batch_size']}"


def render_markdown(tables: list[Table], apart: list[dict[str, Any]], source: str,
                    figures: dict[str, str]) -> str:
    """The leaderboard page: :data:`INTRO`, one section per table (with its figure in
    ``figures``, by the table's slug), the runs apart."""
    count = sum(len(r.records) for t in tables for r in t.rows)
    lines = ["# Leaderboard", "",
             f"Generated by `python benchmarks/leaderboard.py` from the run records under "
             f"`{source}` ({count} complete runs, {len(apart)} kept apart). Do not edit by hand: "
             "change or add records and run it again.", "", INTRO.rstrip(), ""]
    for table in tables:
        lines += [f"## {_cell(table.title)}", ""]
        if presets := _presets_line(table):
            lines += [presets, ""]
        lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(map(_cell, _cells(table, row))) + " |" for row in table.rows]
        lines += ["", "How to run each row again ([records.md](records.md#commands)):", ""]
        machines = len({row.hardware() for row in table.rows}) > 1
        lines += [f"- **{_cell(row.label)}**{f' ({row.options})' if row.options else ''}"
                  f"{f' on {row.hardware()}' if machines else ''}: {_commands_text(row)}"
                  for row in table.rows]
        lines.append("")
        if table.slug in figures:
            lines += [f"![information plane: {table.title}]({figures[table.slug]})", ""]
    if apart:
        lines += ["## Runs kept out of the means", "",
                  "| record | status | rule | model | seed | epochs done | why |",
                  "|---|---|---|---|---|---|---|"]
        for a in apart:
            cells = [f"`{a['file']}`", a.get("status"), a.get("rule", "—"), a.get("model", "—"),
                     a.get("seed", "—"), a.get("epochs", "—"), a.get("why") or "—"]
            lines.append("| " + " | ".join(map(_cell, cells)) + " |")
        lines.append("")
    return "\n".join(lines)


# The measurements in leaderboard.csv, each with its format (counts as integers).
_CSV_MEASURES = {"images_per_s": ".6f", "seconds_per_epoch": ".6f", "saved_bytes_peak": ".0f",
                 "cuda_max_memory": ".0f", "nhsic_x": ".6f", "nhsic_y": ".6f",
                 "params_backbone": ".0f", "params_auxiliary": ".0f"}


def render_csv(tables: list[Table]) -> str:
    """One line per row of every table, full precision (6 decimals)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["dataset", "model", "epochs", "train_subset", "test_subset", "rule", "blocks",
                     "options", "rule_options", "seeds", "test_acc_mean", "test_acc_std",
                     "delta_e2e", "block_acc", *_CSV_MEASURES, "saved_ratio_e2e", "hardware",
                     *_RECIPE[1:], "command", "command_source"])
    for table in tables:
        for row in table.rows:
            commands = row_commands(row)
            writer.writerow([
                table.dataset, table.model, table.epochs, table.train_subset or "",
                table.test_subset or "", row.rule, row.blocks or "", row.options,
                json.dumps(row.setting.get("rule_options") or {}, sort_keys=True),
                " ".join(map(str, row.seeds)), *(_fmt(v, ".6f", none="") for v in row.acc()),
                _fmt(table.delta(row), ".6f", none=""),
                " ".join(f"{a:.6f}" for a in row.block_acc()),
                *(_fmt(row.value(k), spec, none="") for k, spec in _CSV_MEASURES.items()),
                _fmt(table.saved_ratio(row), ".6f", none=""), row.hardware(),
                *(_recipe(row)[k] for k in _RECIPE[1:]), "; ".join(t for t, _ in commands if t),
                "; ".join(sorted({source for _, source in commands})),
            ])
    return out.getvalue()


def write_all(results: str | Path, docs: str | Path, source: str | None = None,
              figures: bool = True, force: bool = False,
              warn: Callable[[str], Any] | None = None) -> list[Path]:
    """Write ``docs/leaderboard.md``, ``docs/leaderboard.csv`` and ``docs/figures/leaderboard_*``
    from the records under ``results`` (searched recursively); returns the files written.

    Everything is checked before anything is written.

    Args:
        source: how the page names ``results`` (default: as given).
        figures: draw the common information plane of each table.
        force: replace ``docs/leaderboard.csv`` even with fewer rows or runs.
        warn: called, once the files are written, with one line per record kept
            apart as unreadable or malformed.

    Raises:
        DataError: no complete record under ``results``; or the new CSV would drop
            rows or runs of the existing one (and not ``force``).
        ConfigError: ``docs`` (or a file in it) cannot be written: a file where a
            folder goes, or the other way round.
    """
    from .analysis.plots import draw, save_figure

    docs = Path(docs)
    source = source or str(results)
    runs, apart = collect(results)
    bad = [a["why"] for a in apart if a["status"] in ("unreadable", "malformed")]
    if not runs:
        raise DataError(_nothing(source, apart, bad))
    tables = build_tables(runs)
    table_csv = render_csv(tables)
    names = [f"leaderboard_{t.slug}.png" for t in tables] if figures else []
    _check_outputs(docs, [docs / "figures" / n for n in names])
    if not force:
        _check_loss(docs / "leaderboard.csv", table_csv, bad)
    drawn = {}  # by table slug: the figure of each row's lowest seed with plane entries
    for table in tables if figures else []:
        records = [{**rs[0], "rule": row.label, "dataset": dataset_label(rs[0]["dataset"])}
                   for row in table.rows if (rs := [r for r in row.records if r.get("plane")])]
        with suppress(ConfigError):  # measured differently: no common axes, no figure
            if records:
                drawn[table.slug] = draw(records, "compare")
    links = {slug: f"figures/leaderboard_{slug}.png" for slug in drawn}
    text = render_markdown(tables, apart, source, links)
    written = [save_figure(drawn[slug], docs / link) for slug, link in links.items()]
    for name, content in (("leaderboard.md", text), ("leaderboard.csv", table_csv)):
        with replacing(docs / name) as tmp:
            tmp.write_text(content)
        written.append(docs / name)
    for why in bad if warn else []:
        warn(f"{why}; kept apart")
    return written


def _nothing(source: str, apart: list[dict[str, Any]], bad: list[str]) -> str:
    """Why there is no table: no record at all, or none complete."""
    if not apart:
        return f"no run records (*.json) under {source!r}; nothing written"
    counts = Counter(str(a["status"]) for a in apart)
    kinds = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    example = f"; e.g. {bad[0]}" if bad else ""
    return (f"no complete run record under {source!r} ({len(apart)} kept apart: {kinds}"
            f"{example}); nothing written")


def _check_outputs(docs: Path, figures: list[Path]) -> None:
    """Every output can be written: folders where folders go, files where files go."""
    check_folder(docs, "output folder")
    folder = docs / "figures"
    if figures and (folder.exists() or folder.is_symlink()) and not folder.is_dir():
        raise ConfigError(f"{str(folder)!r} is a file, not a folder for the figures")
    for path in [docs / "leaderboard.md", docs / "leaderboard.csv", *figures]:
        if path.is_dir():
            raise ConfigError(f"{str(path)!r} is a folder; cannot write the file there")


def _runs(text: str) -> Counter:
    """The runs (seeds) of a ``leaderboard.csv``, counted by what makes a row."""
    runs = Counter()
    for line in csv.DictReader(io.StringIO(text)):
        runs[tuple(line[k] for k in _ROW_KEY)] += len(line["seeds"].split())
    return runs


def _check_loss(path: Path, new: str, bad: list[str]) -> None:
    """Refuse to replace ``path`` by ``new`` when runs of ``path`` would be lost (rows merged
    because their options no longer differ lose no run)."""
    if not path.is_file():
        return
    try:
        old = _runs(path.read_text())
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, AttributeError):
        raise DataError(f"{str(path)!r} is not a leaderboard CSV to compare with; pass --force "
                        "to replace it") from None
    if lost := sum((old - _runs(new)).values()):
        why = f"; unreadable or malformed records: {len(bad)}, e.g. {bad[0]}" if bad else ""
        raise DataError(f"the new leaderboard would drop {lost} of the {sum(old.values())} runs "
                        f"of {str(path)!r}{why}; pass --force to replace it anyway")


# ---- How to reproduce a row: the run.py command of each record ----------------------------

# The flags a shown command keeps: what is trained and how (identity, setting, and the
# executor's rows), the preset and plugins that supply them; not where things go.
_KEPT = [f for f in FLAGS if f.role in (IDENTITY, SETTING) or f.in_row
         or f.name in ("preset", "plugin")]
# The config keys a command must give again to train the same thing (the seed apart).
_SAME = [f.dest for f in FLAGS if f.recorded and f.role in (IDENTITY, SETTING)
         and f.dest != "seed"]
# Resolved by the run from the data where not given: the record holds what was used.
_RESOLVED = ("augment", "norm_mean", "norm_std")


def run_config(argv: list[str]) -> dict[str, Any]:
    """What ``run.py argv`` records of what it trains: the identity and setting flags of
    its config (the seed apart), its rule options resolved and its ``--model-opt``s, as
    JSON gives them back. Raises LocallearnError where ``run.py`` refuses ``argv``."""
    from .cli import _literal, parse_args
    from .config import parse_assignments
    from .rules import create_rule

    args = parse_args(argv)
    out = {k: getattr(args, k) for k in _SAME}
    out["rule_options"] = create_rule(args.rule, **parse_assignments(args.rule_opt)).describe()
    out["model_options"] = {k: _literal(v) for k, v in
                            parse_assignments(args.model_opt, "--model-opt").items()}
    return json.loads(json.dumps(out))


def _recorded_config(record: dict[str, Any]) -> dict[str, Any]:
    """The record's side of :func:`run_config` (a flag newer than the record: its default)."""
    c = record["config"]
    out = {k: c.get(k, _DEFAULTS[k]) for k in _SAME}
    out |= {"rule_options": c.get("rule_options") or {},
            "model_options": c.get("model_options") or {}}
    return json.loads(json.dumps(out))


def same_config(argv: list[str], record: dict[str, Any]) -> bool:
    """Whether ``run.py argv`` records the config ``record`` has; a value the run resolves
    from the data (augmentation, normalisation) counts as the same where ``argv`` leaves it
    to the run."""
    if (mine := _given(argv)) is None:
        return False
    want = _recorded_config(record)
    return all(mine[k] == want[k] for k in want if not (k in _RESOLVED and mine[k] is None))


def _flags(values: dict[str, Any]) -> list[str]:
    """``run.py`` flags for ``values`` (by dest), in ``--help`` order, the seed last."""
    from .presets import to_flags

    order = [*(f for f in _KEPT if f.dest != "seed"), BY_NAME["seed"]]
    return to_flags({f.name: values[f.dest] for f in order if f.dest in values})


def _given(argv: list[str]) -> dict[str, Any] | None:
    """What ``run.py argv`` records (:func:`run_config`); None where run.py refuses it."""
    from .errors import LocallearnError

    try:
        return run_config(argv)
    except LocallearnError:
        return None


def _rebuilt(record: dict[str, Any]) -> list[str] | None:
    """A command rebuilt from the record's config that records the same config again: the
    rule (with its preset, where it had one and that still fits) and each setting that
    differs from what these give; None where no such command comes out."""
    c, sources = record["config"], record.get("config_sources")
    want = _recorded_config(record)
    base = {"rule": record["rule"], "plugin": c.get("plugins") or []}
    for start in ([{**base, "preset": c["preset"]}] if c.get("preset") else []) + [base]:
        if (got := _given(_flags(start))) is None:
            continue
        values = dict(start)
        for k in _SAME:
            # A value the run resolves from the data is given where it was given (a record
            # without config_sources cannot say which: there it is given).
            left = k in _RESOLVED and got[k] is None and sources is not None and k not in sources
            if want[k] != got[k] and not left:
                values[k] = want[k]
        values["rule_opt"] = {k: v for k, v in want["rule_options"].items()
                              if k not in got["rule_options"] or got["rule_options"][k] != v}
        values["model_opt"] = want["model_options"]
        values["seed"] = record.get("seed", 0)
        if same_config(argv := _flags(values), record):
            return argv
    return None


def command(record: dict[str, Any]) -> tuple[list[str] | None, str]:
    """The ``run.py`` arguments that made ``record``, where it writes left out and the seed
    last, and where they come from: ``"recorded"`` (the record's ``argv``), ``"reconstructed"``
    (from its config, by :func:`_rebuilt`, where that records the same config again) or
    ``"not recorded"`` (None)."""
    from .errors import LocallearnError

    if record.get("argv") is not None:
        with suppress(LocallearnError):  # a flag run.py no longer has: rebuild it instead
            given = vars(build_parser(defaults=False).parse_args(record["argv"]))
            return _flags(given | {"seed": record.get("seed", 0)}), "recorded"
    argv = _rebuilt(record)
    return argv, "reconstructed" if argv else "not recorded"


def row_commands(row: Row) -> list[tuple[str | None, str]]:
    """The shell command(s) of a row and how each is known (see :func:`command`): one whose
    seed varies where the seeds' commands differ only in it, else one per record; None
    (``"not recorded"``) for records without one."""
    made: dict[tuple, list[int]] = {}
    for r in row.records:
        argv, source = command(r)
        n = r["hardware"]["num_processes"]
        launch = "python" if n == 1 else f"torchrun --nproc_per_node {n}"
        key = (launch, tuple(argv[:-2]) if argv else None, source)
        made.setdefault(key, []).append(r.get("seed", 0))
    out = []
    for (launch, argv, source), seeds in made.items():
        text = None
        if argv is not None:
            text = f"{launch} benchmarks/run.py {shlex.join(argv)} --seed "
            text = (f"{text}{seeds[0]}" if len(seeds) == 1 else
                    f"for seed in {' '.join(map(str, seeds))}; do {text}$seed; done")
        out.append((text, source))
    return out


def _commands_text(row: Row) -> str:
    """The row's commands for the page: each in a code span, with how it is known."""
    return "; ".join(f"`{text}` ({source})" if text else "not recorded"
                     for text, source in row_commands(row))
