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
from .settings import FLAGS

__all__ = ["INTRO", "Row", "Table", "build_tables", "collect", "render_csv", "render_markdown",
           "write_all"]

# Config keys that do not make a row: the flags that are not part of a row (outputs,
# commands, the table, the seed, what changes no trained number; see settings.Flag.row),
# the loop's settings again as one dict ("train") and the --plugin list ("plugins").
_NOT_SETTING = {f.dest for f in FLAGS if not f.in_row} | {"train", "plugins"}
# A row flag's value in a record made before the flag existed: its default.
_ROW_DEFAULTS = {f.dest: (False if f.kind == "switch" else f.default) for f in FLAGS
                 if f.in_row and f.recorded}
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
after the last epoch ([information_plane.md](information_plane.md)); **options**:
rule options and whatever else differs between the table's rows. Runs that are
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

    def saved_ratio(self, row: Row) -> float | None:
        """``row``'s saved bytes over those of the table's first ``e2e`` row that has them."""
        e2e = [r.value("saved_bytes_peak") for r in self.rows if r.rule == "e2e"]
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
    acc = f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")
    epochs = sorted({str(r["config"]["epochs"]) for r in row.records})
    aux = row.value("params_auxiliary")  # below 0 when a rule leaves the model's head unused
    params = f"{_fmt(row.value('params_backbone'), '.2f', 1e-6)}M + " + (
        "0" if not aux or aux < 0 else _count(aux))
    return [
        row.label, str(len(row.records)), acc, depth_text(row.block_acc()), params,
        _fmt(row.value("images_per_s"), ".0f"), _fmt(row.value("seconds_per_epoch"), ".1f"),
        _fmt(row.value("saved_bytes_peak"), ".1f", 2 ** -20), _fmt(table.saved_ratio(row), ".2f"),
        _fmt(row.value("cuda_max_memory"), ".0f", 2 ** -20),
        _fmt(row.value("nhsic_x"), ".3f"), _fmt(row.value("nhsic_y"), ".3f"),
        "/".join(epochs), row.hardware(), row.options or "—",
    ]


HEADER = ["rule", "seeds", "test acc %", "acc % by depth", "params (backbone + aux)", "img/s",
          "s/epoch", "saved MiB", "× e2e", "CUDA MiB", "nHSIC(X;Z)", "nHSIC(Y;Z)", "epochs",
          "hardware", "options"]


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
                     "block_acc", *_CSV_MEASURES, "saved_ratio_e2e", "hardware"])
    for table in tables:
        for row in table.rows:
            writer.writerow([
                table.dataset, table.model, table.epochs, table.train_subset or "",
                table.test_subset or "", row.rule, row.blocks or "", row.options,
                json.dumps(row.setting.get("rule_options") or {}, sort_keys=True),
                " ".join(map(str, row.seeds)), *(_fmt(v, ".6f", none="") for v in row.acc()),
                " ".join(f"{a:.6f}" for a in row.block_acc()),
                *(_fmt(row.value(k), spec, none="") for k, spec in _CSV_MEASURES.items()),
                _fmt(table.saved_ratio(row), ".6f", none=""), row.hardware(),
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
