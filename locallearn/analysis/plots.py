"""Information-plane figures drawn from run records (``record["plane"]``).

Three kinds (``plane``: one run; ``compare``: runs side by side on shared axes; ``depth``:
each measure against depth at the last epoch), after Sakamoto & Sato (2024, TMLR), in four
forms (``raw`` nHSIC, ``scaled``, ``adjusted``, linear ``cka``): docs/information_plane.md,
"Reading the figures". Every form depends on the probe set (``m``, the kernels and their
widths), so a figure only puts together records measured alike. Figures are built on a bare
:class:`~matplotlib.figure.Figure` (no pyplot state) under fixed settings and saved without
version metadata, so the same records give the same file.

``plane.py`` draws exactly the records it is given, so it refuses the whole command in one
line naming the file and the field, writing nothing, when any of them cannot be drawn
(:func:`~locallearn.records.read_record` refuses it, or it has no ``plane`` entries), when
they were measured differently, or when the output is not a ``.png``/``.pdf``/``.svg`` file
in an existing folder.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps, rc_context
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..errors import ConfigError, DataError, LocallearnError, unknown_name
from ..hsic import adjust_for_chance
from ..records import read_record, replacing
from ..settings import Parser

__all__ = ["FORMS", "KINDS", "draw", "main", "save_figure", "with_adjusted"]

KINDS = ("plane", "compare", "depth", "gradients")
#: Gradient-probe metric -> its axis label (``history[*]["gradient_probe"]``).
PROBED = {"angle": "angle to backprop's gradient (°)",
          "weight_angle": "angle of feedback B to W (°)",
          "cosine": "cosine with backprop's gradient",
          "variance": "‖ĝ − g‖² / ‖g‖²"}
#: form -> (entry key on x, entry key on y, x label, y label)
FORMS: dict[str, tuple[str, str, str, str]] = {
    "raw": ("nhsic_x", "nhsic_y", "nHSIC(X; Z)", "nHSIC(Y; Z)"),
    "scaled": (
        "nhsic_x_scaled", "nhsic_y_scaled",
        "nHSIC(X; Z) / √(nHSIC(X; X) nHSIC(Z; Z))", "nHSIC(Y; Z) / √(nHSIC(Y; Y) nHSIC(Z; Z))",
    ),
    "adjusted": (
        "nhsic_x_adj", "nhsic_y_adj",
        "nHSIC(X; Z) adjusted for chance (0 = chance)",
        "nHSIC(Y; Z) adjusted for chance (0 = chance)",
    ),
    "cka": ("cka_x", "cka_y", "linear CKA(X, Z)", "linear CKA(Y, Z)"),
}
#: What the adjusted form is computed from: per side, the entry's raw value and the
#: probe set's self term and trace (``plane_config``); each entry's ``nhsic_self`` and
#: ``rank`` (``Tr R_Z``) and the probe size ``m`` serve both sides.
_ADJUSTED_FROM = {"nhsic_x_adj": ("nhsic_x", "nhsic_xx", "rank_x"),
                  "nhsic_y_adj": ("nhsic_y", "nhsic_yy", "rank_y")}
#: plane_config keys that must agree for records to share axes.
MEASURED_ALIKE = ("m", "split", "kernel", "label_kernel", "distance", "sigma", "eps")
#: The value a key had before records stated it: records made before the Gaussian
#: kernel's distance was an option used the squared distance.
MEASURED_BEFORE = {"distance": "sqeuclidean"}
STYLE = {"font.family": "DejaVu Sans",  # ships with matplotlib: the same glyphs everywhere
         "font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8, "axes.grid": True,
         "grid.alpha": 0.3, "figure.dpi": 100, "savefig.dpi": 150, "savefig.facecolor": "white",
         "text.parse_math": False}  # names from records are text: a "$" is no formula
CMAP = "viridis"
_NAMED_TICKS = 16  # at most this many blocks get their names on the colour bar


def with_adjusted(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with ``nhsic_x_adj`` and ``nhsic_y_adj`` in every ``plane`` entry.

    An entry that lacks them (a record made before the form was stored) gets them
    computed, exactly as the observer would, from its ``nhsic_x``, ``nhsic_y``,
    ``nhsic_self``, ``rank`` and the ``plane_config``'s ``m``, ``nhsic_xx``, ``nhsic_yy``,
    ``rank_x``, ``rank_y`` (whose types :func:`~locallearn.records.read_record` checks).
    The record is not changed; a new one is returned.

    Raises:
        DataError: a field the form needs is missing, named in one line.
    """
    config, entries = record.get("plane_config") or {}, []
    for i, entry in enumerate(record["plane"]):
        entry = dict(entry)
        for key, (raw, self_term, trace) in _ADJUSTED_FROM.items():
            if key in entry:
                continue
            needed = [f"plane_config.{k}" for k in ("m", self_term, trace) if k not in config]
            needed += [f"plane[{i}].{k}" for k in ("nhsic_self", "rank") if k not in entry]
            if needed:
                raise DataError(f"{record.get('file', 'record')}: {needed[0]} is missing, and "
                                f"--form adjusted needs it (or {key} in every entry); draw this "
                                "record with --form raw, scaled or cka")
            entry[key] = adjust_for_chance(entry[raw], config[self_term], entry["nhsic_self"],
                                           config[trace], entry["rank"], config["m"])
        entries.append(entry)
    return {**record, "plane": entries}


def _measured(config: dict[str, Any], key: str) -> Any:
    return config.get(key, MEASURED_BEFORE.get(key)) if config else None


def _check_alike(records: Sequence[dict[str, Any]]) -> None:
    first = records[0].get("plane_config") or {}
    for record in records[1:]:
        other = record.get("plane_config") or {}
        for key in MEASURED_ALIKE:
            a, b = _measured(first, key), _measured(other, key)
            if a != b:
                raise ConfigError(
                    f"{records[0]['file']} and {record['file']} were measured differently "
                    f"({key}: {a} vs {b}); every form of the measure "
                    "depends on the probe set, so only records measured alike share axes"
                )


def _labels(records: Sequence[dict[str, Any]]) -> list[str]:
    """Short run names: the rule, then what tells runs apart (model, seed, file)."""
    labels = [str(r.get("rule", "?")) + _differing_options(r, records) for r in records]
    for key in ("model", "dataset"):
        if len({r.get(key) for r in records}) > 1:
            labels = [f"{lab} · {r.get(key)}" for lab, r in zip(labels, records, strict=True)]
    if len(set(labels)) < len(labels):
        seeds = [(r.get("config") or {}).get("seed") for r in records]
        labels = [f"{lab} · seed {s}" for lab, s in zip(labels, seeds, strict=True)]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} · {Path(r['file']).stem}" for lab, r in zip(labels, records, strict=True)]
    return labels


def _differing_options(record: dict[str, Any], records: Sequence[dict[str, Any]]) -> str:
    """`` man=0.995``: the rule options by which ``record`` differs from another record of
    its rule (a run with an option against one without: dgl and dgl + MAN)."""
    def options(r: dict[str, Any]) -> dict[str, Any]:
        return (r.get("config") or {}).get("rule_options") or {}

    mine = options(record)
    others = [options(r) for r in records if r.get("rule") == record.get("rule")]
    keys = sorted({k for o in others for k in {*o, *mine} if o.get(k) != mine.get(k)})
    return "".join(f" {k}={mine[k]}" for k in keys if k in mine)


def _shared(records: Sequence[dict[str, Any]], keys: Sequence[str] = ("model", "dataset"),
            plane: bool = True) -> str:
    """A title of what every run has in common (the panels' labels name what differs),
    with the plane's settings unless ``plane`` is False."""
    parts = []
    for key in keys:
        values = {str(r.get(key, "?")) for r in records}
        if len(values) == 1:
            parts.append(values.pop())
    if not plane:
        return " · ".join(parts)
    settings = {_setting(r) for r in records}
    parts.append(settings.pop() if len(settings) == 1 else "plane settings differ between runs")
    return " · ".join(filter(None, parts))


def _trajectories(record: dict[str, Any], form: str) -> dict[int, list[tuple[int, float, float]]]:
    kx, ky = FORMS[form][:2]
    out: dict[int, list[tuple[int, float, float]]] = {}
    for e in record["plane"]:
        out.setdefault(int(e["block"]), []).append((int(e["epoch"]), float(e[kx]), float(e[ky])))
    return {k: sorted(v) for k, v in sorted(out.items())}


def _shared_blocks(records: Sequence[dict[str, Any]]) -> list[str] | None:
    """The block names, in depth order, when every run has the same (else None)."""
    names = []
    for record in records:
        by_block = {int(e["block"]): str(e.get("name", e["block"])) for e in record["plane"]}
        names.append([by_block[k] for k in sorted(by_block)])
    return names[0] if all(n == names[0] for n in names) else None


def _setting(record: dict[str, Any]) -> str:
    c = record.get("plane_config") or {}
    if not c:
        return ""
    # The default distance goes unnamed, so figures of earlier records stay as they were.
    distance = c.get("distance", "sqeuclidean")
    kernel = f"{c.get('kernel')}{'' if distance == 'sqeuclidean' else f' ({distance})'} kernel"
    return (f"m = {c.get('m')} {c.get('split', '')} samples, {kernel}, "
            f"σ = {c.get('sigma')}, ε = {c.get('eps')}")


# Dashed lines at 0 on the chance-adjusted axes: the chance level.
CHANCE = {"color": "0.5", "lw": 0.8, "ls": "--", "zorder": 0}


def _draw_plane(ax, record: dict[str, Any], form: str) -> None:
    if form == "adjusted":
        ax.axvline(0, **CHANCE)
        ax.axhline(0, **CHANCE)
    cmap = colormaps[CMAP]
    paths = _trajectories(record, form)
    last = len(paths) - 1
    for k, points in paths.items():
        color = cmap(k / max(last, 1))  # relative depth: first block dark, last bright
        _, xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, "-", color=color, lw=1.2, alpha=0.9)
        ax.plot(xs[0], ys[0], "o", mfc="white", mec=color, ms=5, mew=1.2)
        ax.plot(xs[-1], ys[-1], "s", color=color, mec="black", ms=5, mew=0.6)
    ax.set_xlabel(FORMS[form][2])
    ax.set_ylabel(FORMS[form][3])


def _markers_legend(ax, records: Sequence[dict[str, Any]]) -> None:
    firsts = {min(int(e["epoch"]) for e in r["plane"]) for r in records}
    lasts = {max(int(e["epoch"]) for e in r["plane"]) for r in records}
    first = f"epoch {firsts.pop()}" if len(firsts) == 1 else "first measured epoch"
    last = f"epoch {lasts.pop()}" if len(lasts) == 1 else "last measured epoch"
    handles = [
        Line2D([], [], ls="", marker="o", mfc="white", mec="0.3", label=first),
        Line2D([], [], ls="", marker="s", color="0.3", mec="black", label=last),
    ]
    ax.legend(handles=handles, loc="best", frameon=True)


def _depth_colorbar(fig: Figure, axes, records: Sequence[dict[str, Any]]) -> None:
    names = _shared_blocks(records)
    if names:
        norm = Normalize(0, max(len(names) - 1, 1))
        bar = fig.colorbar(ScalarMappable(norm, CMAP), ax=axes, label="block (depth)")
        if len(names) <= _NAMED_TICKS:
            bar.set_ticks(range(len(names)), labels=names)
    else:
        fig.colorbar(ScalarMappable(Normalize(0, 1), CMAP), ax=axes,
                     label="relative depth (0 = first block, 1 = last)")


def compare_figure(records: Sequence[dict[str, Any]], form: str = "raw") -> Figure:
    """Figures (a) and (b): each run's trajectory per block over epochs, side by side on
    shared axes."""
    n = len(records)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    size = (6.4, 4.8) if n == 1 else (3.4 * cols + 1.2, 3.2 * rows + 0.6)
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    for ax, record, label in zip(axes.flat, records, _labels(records), strict=False):
        _draw_plane(ax, record, form)
        ax.set_title(label)
        ax.label_outer()
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    _markers_legend(axes.flat[0], records)
    _depth_colorbar(fig, axes, records)
    fig.suptitle(_shared(records), wrap=True)  # one run's title is wider than its panel
    return fig


def depth_figure(records: Sequence[dict[str, Any]], form: str = "raw") -> Figure:
    """Figure (c): each measure against depth at the last epoch, one line per run."""
    fig = Figure(figsize=(9.6, 4.0), layout="constrained")
    ax_x, ax_y = fig.subplots(1, 2)
    names = _shared_blocks(records)
    for record, label in zip(records, _labels(records), strict=True):
        paths = _trajectories(record, form)
        last = len(paths) - 1
        depth = [k if names else k / max(last, 1) for k in paths]
        final = [points[-1] for points in paths.values()]
        epoch = max(p[0] for p in final)
        for ax, i in ((ax_x, 1), (ax_y, 2)):
            ax.plot(depth, [p[i] for p in final], "o-", ms=4, label=f"{label} (epoch {epoch})")
    for ax, i in ((ax_x, 2), (ax_y, 3)):
        ax.set_ylabel(FORMS[form][i])
        if form == "adjusted":  # below 0 is below chance: show it, and where 0 is
            ax.axhline(0, **CHANCE)
        else:
            ax.set_ylim(bottom=0)  # these forms are >= 0; a floor at 0 keeps gaps in proportion
        if names:
            ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
            ax.set_xlabel("block")
        else:
            ax.set_xlabel("relative depth (0 = first block, 1 = last)")
    ax_y.legend(loc="best")
    fig.suptitle(" · ".join(filter(None, ["last epoch, by depth", _shared(records, ())])))
    return fig


def gradients_figure(records: Sequence[dict[str, Any]]) -> Figure:
    """The gradient probe over epochs: a panel per run and metric it measured (up to 4 in
    a row), one line per layer or part (darker: deeper), e.g. fa's angle to backprop."""
    panels = []
    for record, label in zip(records, _labels(records), strict=True):
        entries = [e for e in record["history"] if "gradient_probe" in e]
        panels += [(label, metric, entries) for metric in PROBED
                   if entries and entries[-1]["gradient_probe"].get(metric)]
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.4 * cols + 0.4, 2.9 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    cmap = colormaps[CMAP]
    for ax, (label, metric, entries) in zip(axes.flat, panels, strict=False):
        names = list(entries[-1]["gradient_probe"][metric])
        for k, name in enumerate(names):
            points = [(e["epoch"], e["gradient_probe"][metric].get(name)) for e in entries]
            xs, ys = zip(*[(x, y) for x, y in points if y is not None], strict=True)
            ax.plot(xs, ys, "o-", ms=3, label=name,
                    color=cmap(0.9 * k / max(len(names) - 1, 1)))
        ax.set_title(label, fontsize=8)
        ax.set_ylabel(PROBED[metric])
        ax.set_xlabel("epoch")
        if len(names) <= _NAMED_TICKS:
            ax.legend(loc="best", fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(" · ".join(filter(None, ["gradient probe", _shared(records, plane=False)])),
                 wrap=True)
    return fig


def draw(records: Sequence[dict[str, Any]], kind: str | None = None, form: str = "raw"
         ) -> Figure:
    """Build a figure of ``kind`` (default: ``plane`` for one record, else ``compare``)."""
    if form not in FORMS:
        raise unknown_name("form", form, FORMS)
    kind = kind or ("plane" if len(records) == 1 else "compare")
    if kind not in KINDS:
        raise unknown_name("kind", kind, KINDS)
    if not records:
        raise ConfigError("no records given")
    if kind == "gradients":
        for record in records:
            if not any("gradient_probe" in e for e in record.get("history", [])):
                raise DataError(f"{record.get('file', 'record')}: the record has no gradient "
                                "probe (its rule measures none: fa, dfa, forward_gradient do)")
        with rc_context(STYLE):
            return gradients_figure(records)
    for record in records:
        if not record.get("plane"):
            raise DataError(f"{record.get('file', 'record')}: the record has no 'plane' entries "
                            "(was it run with --no-plane?)")
    _check_alike(records)
    if form == "adjusted":
        records = [with_adjusted(r) for r in records]
    if kind == "plane" and len(records) != 1:
        raise ConfigError(f"--kind plane draws one record; got {len(records)} "
                          "(use --kind compare or depth)")
    with rc_context(STYLE):
        return (depth_figure if kind == "depth" else compare_figure)(records, form)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save under the fixed style, without the version metadata that would vary the bytes.

    The folder is created if needed. The figure goes to a temp file in that
    folder, renamed over ``path`` once whole: a failure leaves no partial file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    metadata = {".png": {"Software": None}, ".pdf": {"Creator": None, "Date": None},
                ".svg": {"Date": None}}.get(suffix, {})
    with replacing(path) as tmp, rc_context(STYLE):
        fig.savefig(tmp, format=suffix[1:], metadata=metadata)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/plane.py RECORDS... -o FILE``; returns the exit status."""
    p = Parser(prog="plane.py", description="Draw information-plane figures from run records.")
    p.add_argument("records", nargs="+", metavar="RECORD", help="run record JSON files")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="figure file (.png, .pdf or .svg)")
    p.add_argument("--kind", help="plane (one run), compare (runs side by side), depth, or "
                                  "gradients (the gradient probe over epochs; default: plane "
                                  "for one record, compare for several)")
    p.add_argument("--form", default="raw",
                   help="raw nHSIC (default), scaled (nHSIC / sqrt of the self terms), "
                        "adjusted (the scaled form with chance taken out) or cka")
    try:
        args = p.parse_args(argv)
        out, folder = Path(args.output), Path(args.output).parent
        if out.suffix.lower() not in (".png", ".pdf", ".svg"):
            raise ConfigError(f"output must end in .png, .pdf or .svg; got {args.output!r}")
        if out.is_dir():
            raise ConfigError(f"output {str(out)!r} is a folder; give a file name")
        if not folder.is_dir():
            what = ("is a file, not a folder" if folder.exists()
                    else "does not exist; create it first")
            raise ConfigError(f"output folder {str(folder)!r} {what}")
        records = [read_record(p) | {"file": p} for p in args.records]  # "file": for messages
        fig = draw(records, args.kind, args.form)
        path = save_figure(fig, args.output)
    except (LocallearnError, OSError) as err:  # OSError: the figure file cannot be written
        print("plane.py: error: " + " ".join(str(err).splitlines()), file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
