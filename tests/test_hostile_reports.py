"""Hostile input to leaderboard.py and plane.py: one line on stderr, exit status 2, nothing
written; a malformed record is kept apart from the leaderboard and refused by plane.py.

Every case goes through the scripts' ``main(argv)`` on copies of the committed records.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil

import pytest
from conftest import ROOT

from locallearn.analysis import plots
from locallearn.leaderboard import HEADER
from locallearn.records import FIELDS, read_record

RESULTS = ROOT / "benchmarks" / "results"
VICTIM = "e2e__resnet18__imagefolder__seed0.json"  # cpu-smoke: plane, memory, seed, all of it
OTHERS = ["layerwise__resnet18__imagefolder__seed0.json",  # the same table
          "e2e-ff_mlp__ff_mlp__imagefolder__seed0.json"]  # another table
PLANE_RECORD = RESULTS / "plane-cifar10" / (
    "e2e__resnet18__imagefolder__granularity-block__train-subset-10000__test-subset-2000__"
    "epochs-8__lr-0.05__seed0.json")
DELETE = object()


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


board = _script("leaderboard")


def _files(folder) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes ({} if there is no folder)."""
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(err: str, prog: str, kind: str = "error") -> str:
    assert "Traceback" not in err
    assert err.startswith(f"{prog}: {kind}: ") and err.count("\n") == 1, err
    return err


def _set(record: dict, path: tuple, value) -> dict:
    """A copy of ``record`` with ``value`` at ``path`` (keys and list indices), or deleted."""
    record = copy.deepcopy(record)
    *parents, last = path
    target = record
    for key in parents:
        target = target[key]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return record


def _name(path: tuple) -> str:
    """``("plane", 0, "epoch")`` -> ``plane[0].epoch``, as the messages name fields."""
    text = ""
    for key in path:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else key)
    return text


def _generated(required: tuple[str, ...]) -> list[tuple[tuple, object]]:
    """For each field the reader checks: a value of the wrong type, and no value where a
    record must have it (``required``: the fields' ``when``s that apply; but test_acc: a
    complete record without one is kept apart as such, not as malformed)."""
    cases = []
    for field in FIELDS:
        path = tuple(int(p) if p.isdigit() else p
                     for p in field.path.replace("[]", ".0").split("."))
        wrong = {"wrong": 1} if field.type.startswith("string") else "x"
        if field.path.endswith("[]"):  # a list's item: the list may be absent (argv is optional)
            path, wrong = path[:-1], [wrong]
        cases.append((path, wrong))
        if field.when in required and "[]" not in field.path and field.path != "test_acc":
            cases.append((path, DELETE))
    return cases


# The fields the hostile probe found, then every checked field in turn.
LEADERBOARD_CASES = [
    (("history",), 5), (("test_acc",), "high"), (("test_acc",), True), (("test_acc",), 1.5),
    (("test_acc",), float("nan")), (("block_acc",), None), (("block_acc", 0), "a"),
    (("config",), []), (("config", "epochs"), "5"), (("config", "epochs"), 0),
    (("stack",), {}), (("stack", "num_blocks"), "4"), (("hardware",), DELETE),
    (("hardware", "num_processes"), 0), (("seed",), "zero"), (("seed",), 1.5),
    (("history", 0, "images_per_s"), None), (("history", 0, "seconds"), "x"),
    (("memory",), []), (("params", "backbone"), "11M"), (("seconds_per_epoch",), "slow"),
    (("dataset",), DELETE), (("rule",), 5), (("model",), ["resnet18"]),
    (("plane",), [{"epoch": "x"}]), (("plane",), 5), (("plane",), {}), (("plane", 0), 5),
    (("plane", 0, "epoch"), "x"), (("plane", 0, "epoch"), 1.5), (("plane", 0, "epoch"), -1),
    (("plane", 0, "block"), None), (("plane", 0, "block"), 10**30),
    (("plane", 0, "nhsic_x"), "high"), (("plane", 0, "nhsic_x"), 1e300),
    (("plane", 0, "nhsic_x"), float("inf")), (("plane", 0, "nhsic_y"), DELETE),
    (("plane", 0, "name"), 5), (("plane_config",), []),
    *_generated(("always", "complete", "result")),
]


def _ids(cases):
    return [f"{_name(path)}={'deleted' if value is DELETE else repr(value)[:20]}"
            for path, value in cases]


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    for name in [VICTIM, *OTHERS]:
        shutil.copy(RESULTS / "cpu-smoke" / name, folder / name)
    return folder


# Linear probes, valid, for the cases that corrupt them (the victim ran without any).
PROBED = {"probe_config": {"train_images": 100},
          "probe": [{"epoch": 0, "block": 0, "name": "stem", "acc": 0.2, "train_acc": 0.3}]}


def _corrupt(folder, path: tuple, value, **changes) -> None:
    victim = folder / VICTIM
    record = {**json.loads(victim.read_text()), **changes}
    if path[0].startswith("probe"):
        record |= PROBED
    victim.write_text(json.dumps(_set(record, path, value)))


def test_every_committed_record_passes_the_checks():
    paths = sorted(RESULTS.rglob("*.json"))
    # complete, or diverged: a finished run (the leaderboard lists it apart)
    assert paths and all(read_record(path)["status"] in ("complete", "diverged")
                         for path in paths)


@pytest.mark.parametrize("path, value", LEADERBOARD_CASES, ids=_ids(LEADERBOARD_CASES))
def test_a_malformed_record_is_kept_apart_and_the_tables_still_written(
        results, tmp_path, capsys, path, value):
    _corrupt(results, path, value)
    docs = tmp_path / "docs"
    drawn = path[0] in ("plane", "plane_config")  # the figures read these: draw them
    flags = [] if drawn else ["--no-figures"]
    assert board.main(["--results", str(results), "--docs", str(docs), *flags]) == 0
    err = _one_line(capsys.readouterr().err, "leaderboard.py", "warning")
    assert VICTIM in err and _name(path) in err
    text = (docs / "leaderboard.md").read_text()
    assert "| layerwise | 1 |" in text and "ff_mlp · 5 epochs" in text  # the others' tables
    kept_apart = text.split("## Runs kept out of the means")[1]
    assert VICTIM in kept_apart and "| malformed |" in kept_apart and _name(path) in kept_apart
    assert len((docs / "leaderboard.csv").read_text().splitlines()) == 1 + 2
    assert (docs / "figures").is_dir() == drawn


@pytest.mark.parametrize("path, value", _generated(("always",)), ids=_ids(_generated(("always",))))
def test_a_malformed_unfinished_record_is_kept_apart_too(results, tmp_path, capsys, path, value):
    _corrupt(results, path, value, status="running", test_acc=None)
    docs = tmp_path / "docs"
    assert board.main(["--results", str(results), "--docs", str(docs), "--no-figures"]) == 0
    err = _one_line(capsys.readouterr().err, "leaderboard.py", "warning")
    assert VICTIM in err and _name(path) in err
    assert "| layerwise | 1 |" in (docs / "leaderboard.md").read_text()


def _refused(capsys, argv: list[str], folder, message: str) -> str:
    """``argv`` exits 2 with one line holding ``message``, and ``folder`` is left as it was."""
    before = _files(folder)
    assert board.main(argv) == 2
    err = _one_line(capsys.readouterr().err, "leaderboard.py")
    assert message in err, err
    assert _files(folder) == before
    return err


@pytest.mark.parametrize("setup, message", [
    ("empty", "no run records (*.json) under"),
    ("other files", "no run records (*.json) under"),
    ("running only", "no complete run record under"),
    ("unreadable only", "1 unreadable; e.g. a.json: not a JSON run record"),
])
def test_no_complete_record_refuses_and_keeps_the_old_leaderboard(tmp_path, capsys, setup,
                                                                   message):
    folder = tmp_path / "results"
    folder.mkdir()
    if setup == "other files":
        (folder / "notes.txt").write_text("hello")
    elif setup == "running only":
        record = json.loads((RESULTS / "cpu-smoke" / VICTIM).read_text())
        (folder / "a.json").write_text(json.dumps({**record, "status": "running"}))
    elif setup == "unreadable only":
        (folder / "a.json").write_text('{"rule": ')
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "leaderboard.md").write_text("# the old leaderboard\n")
    err = _refused(capsys, ["--results", str(folder), "--docs", str(docs)], docs, message)
    assert "nothing written" in err


def test_a_smaller_leaderboard_needs_force(results, tmp_path, capsys):
    docs = tmp_path / "docs"
    argv = ["--results", str(results), "--docs", str(docs), "--no-figures"]
    assert board.main(argv) == 0
    assert board.main(argv) == 0  # the same rows again: nothing lost
    capsys.readouterr()
    (results / OTHERS[0]).unlink()
    _refused(capsys, argv, docs,
             "would drop 1 of the 3 runs of ")
    assert board.main([*argv, "--force"]) == 0
    assert "| layerwise |" not in (docs / "leaderboard.md").read_text()


def test_a_lost_seed_or_a_malformed_record_needs_force_too(results, tmp_path, capsys):
    second = "e2e__resnet18__imagefolder__seed1.json"
    shutil.copy(RESULTS / "cpu-smoke" / second, results / second)
    docs = tmp_path / "docs"
    argv = ["--results", str(results), "--docs", str(docs), "--no-figures"]
    assert board.main(argv) == 0
    capsys.readouterr()
    _corrupt(results, ("test_acc",), "high")  # the e2e row keeps its other seed
    err = _refused(capsys, argv, docs, "would drop 1 of the 4 runs of ")
    assert "unreadable or malformed records: 1, e.g. " in err and "test_acc" in err
    assert "--force" in err


def test_a_file_that_is_no_leaderboard_csv_needs_force(results, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "leaderboard.csv").write_text("name,score\nme,1\n")
    argv = ["--results", str(results), "--docs", str(docs), "--no-figures"]
    _refused(capsys, argv, docs, "is not a leaderboard CSV to compare with; pass --force")
    assert board.main([*argv, "--force"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unrecognized arguments: --bogus; usage: leaderboard.py [-h] "
                  "[--results DIR] [--docs DIR] [--no-figures] [--force]"),
    (["--docs"], "argument --docs: expected one argument"),
    (["--no-figures=yes"], "ignored explicit argument 'yes'"),
    (["--results", ""], "--results needs a folder; got ''"),
    (["--docs", ""], "--docs needs a folder; got ''"),
    (["--results", "{tmp}/missing"], "no folder '{tmp}/missing' of run records: it does not"),
    (["--results", "{tmp}/a_file"], "of run records: it is a file, not a folder"),
    (["--docs", "{tmp}/a_file"], "output folder '{tmp}/a_file' is a file; give a folder"),
    (["--docs", "{tmp}/a_file/sub"], "cannot be made or written: Not a directory"),
    (["--docs", "{tmp}/docs_md_folder"], "leaderboard.md' is a folder"),
    (["--docs", "{tmp}/docs_figures_file"], "figures' is a file, not a folder for the figures"),
])
def test_bad_arguments_are_one_line_and_write_nothing(results, tmp_path, capsys, args, message):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "docs_md_folder" / "leaderboard.md").mkdir(parents=True)
    (tmp_path / "docs_figures_file").mkdir()
    (tmp_path / "docs_figures_file" / "figures").write_text("not a folder")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--results" not in args:
        args += ["--results", str(results)]
    _refused(capsys, args, tmp_path, message.format(tmp=tmp_path))


def test_text_from_records_cannot_break_the_markdown_tables(results, tmp_path, capsys):
    record = json.loads((results / VICTIM).read_text())
    record["hardware"]["device_name"] = "odd | gpu\nname"
    (results / VICTIM).write_text(json.dumps(record))
    docs = tmp_path / "docs"
    assert board.main(["--results", str(results), "--docs", str(docs), "--no-figures"]) == 0
    (row,) = [line for line in (docs / "leaderboard.md").read_text().splitlines()
              if "odd" in line and line.startswith("|")]  # the table's row, not its command
    assert "| odd \\| gpu name (cpu) x1 |" in row
    assert row.replace("\\|", "").count("|") == len(HEADER) + 1


def test_a_too_deeply_nested_record_is_unreadable_not_a_crash(results, tmp_path, capsys):
    (results / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    docs = tmp_path / "docs"
    assert board.main(["--results", str(results), "--docs", str(docs), "--no-figures"]) == 0
    err = _one_line(capsys.readouterr().err, "leaderboard.py", "warning")
    assert "deep.json: not a JSON run record" in err and "recursion" in err


# plane.py: it draws exactly the records it is given, so a bad one refuses the command.
PLANE_CASES = [
    (("plane",), [{"epoch": "x"}]), (("plane",), 5), (("plane",), {}), (("plane", 0), 5),
    (("plane", 0, "epoch"), "x"), (("plane", 0, "epoch"), True), (("plane", 0, "block"), -2),
    (("plane", 0, "block"), 10**30), (("plane", 0, "name"), ["stem"]),
    (("plane", 0, "nhsic_y"), float("nan")), (("plane", 0, "cka_x"), 1e300),
    (("plane_config",), []), (("config",), "x"), (("rule",), ["e2e"]),
    (("model",), {"name": "resnet18"}), (("dataset",), 10),
    *[(("plane", 0, key), DELETE) for key in ("epoch", "block", "nhsic_x", "nhsic_y",
                                              "nhsic_x_scaled", "nhsic_y_scaled", "cka_x",
                                              "cka_y")],
    *[(("plane", 0, key), "x") for key in ("nhsic_x", "nhsic_y", "nhsic_x_scaled",
                                           "nhsic_y_scaled", "cka_x", "cka_y")],
]


def _plane_refused(capsys, argv: list[str], out, message: str) -> str:
    assert plots.main([*map(str, argv), "-o", str(out)]) == 2
    err = _one_line(capsys.readouterr().err, "plane.py")
    assert message in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
    return err


@pytest.mark.parametrize("path, value", PLANE_CASES, ids=_ids(PLANE_CASES))
def test_plane_refuses_a_malformed_record_naming_the_file_and_the_field(
        tmp_path, capsys, path, value):
    record = _set(json.loads(PLANE_RECORD.read_text()), path, value)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(record))
    message = f"{bad}: {_name(path)}"
    _plane_refused(capsys, [bad], tmp_path / "fig.png", message)
    _plane_refused(capsys, [PLANE_RECORD, bad], tmp_path / "fig.png", message)  # not skipped


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: RECORD, -o/--output"),
    (["-o", "{tmp}/fig.png"], "the following arguments are required: RECORD"),
    (["{tmp}", "-o", "{tmp}/fig.png"], "{tmp}: cannot read: Is a directory"),
    (["{tmp}/missing.json", "-o", "{tmp}/fig.png"], "missing.json: cannot read: No such file"),
    (["{tmp}/deep.json", "-o", "{tmp}/fig.png"], "deep.json: not a JSON run record"),
    (["{record}", "-o", "{tmp}/missing/fig.png"],
     "output folder '{tmp}/missing' does not exist; create it first"),
    (["{record}", "-o", "{tmp}/a_file/fig.png"],
     "output folder '{tmp}/a_file' is a file, not a folder"),
    (["{record}", "-o", "{tmp}/a_folder.png"], "output '{tmp}/a_folder.png' is a folder"),
    (["{record}", "-o", "{tmp}/fig.txt"], "output must end in .png, .pdf or .svg"),
])
def test_plane_bad_paths_are_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder.png").mkdir()
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    argv = [a.format(tmp=tmp_path, record=PLANE_RECORD) for a in argv]
    before = _files(tmp_path)
    assert plots.main(argv) == 2
    err = _one_line(capsys.readouterr().err, "plane.py")
    assert message.format(tmp=tmp_path) in err, err
    assert _files(tmp_path) == before and not (tmp_path / "missing").exists()


def test_plane_draws_names_as_text_not_formulas(tmp_path, capsys):
    record = json.loads(PLANE_RECORD.read_text())
    record["rule"] = r"$\frac$ | a_$^$"
    for entry in record["plane"]:
        entry["name"] = "$" + entry["name"]
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(record))
    assert plots.main([str(path), "-o", str(tmp_path / "fig.png")]) == 0
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().err == ""
