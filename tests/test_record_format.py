"""docs/records.md against real records and the reader: every field documented, every
documented field there, and every field the reader checks documented with the type it checks.

The page's tables are the list of fields: each `## ` section whose heading
starts with a code span (`record`, `config.train`, `history[]`) has a table
whose first column is the field and whose `when` column is `always` or a
condition from the page's legend. The runs below make a record for each
condition that is cheap to produce.
"""

import re
import shutil

import pytest
from conftest import ROOT

from locallearn import settings
from locallearn.cli import EXIT_DIVERGED, main
from locallearn.records import FIELDS as CHECKED
from locallearn.records import STATUSES, read_record

PAGE = ROOT / "docs" / "records.md"
TINY = ["--dataset", "synthetic", "--model", "ff_mlp", "--model-opt", "img_size=16",
        "--epochs", "1", "--train-subset", "64", "--test-subset", "32", "--no-progress"]


def tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Each table of the page, by the first code span of its section's heading (or, for the
    legend nested in a list, by its first column's header): a list of rows as dicts."""
    out, section, rows = {}, None, None
    for raw in text.splitlines():
        line = raw.strip()
        if raw.startswith("## "):
            match = re.match(r"## `([^`]+)`", raw)
            section = match.group(1) if match else None
        if not line.startswith("|"):
            rows = None
            continue
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        if rows is None:  # the header
            header, rows = cells, []
            out[section if header[0] == "field" else header[0]] = rows
        elif not set(line) <= set("|-: "):
            rows.append(dict(zip(header, cells, strict=True)))
    return out


DOC = tables(PAGE.read_text())
FIELDS = {path: {row["field"]: row for row in rows}
          for path, rows in DOC.items() if rows and "when" in rows[0]}
# What the page's wildcard rows stand for, read from the flags' one declaration.
EXPANDS = {
    "<flag>": {f.dest for f in settings.FLAGS if f.recorded},
    "<loop flag>": {f.dest for f in settings.FLAGS if f.identity_key == settings.TRAIN},
}


def documented(path: str) -> dict[str, dict[str, str]]:
    rows = {}
    for name, row in FIELDS[path].items():
        rows |= dict.fromkeys(EXPANDS.get(name, {name}), row)
    return rows


def child(path: str, key: str) -> str:
    return key if path == "record" else f"{path}.{key}"


def objects(record: dict, path: str) -> list[dict]:
    """Every object of ``record`` at ``path`` (``history[]``: each entry)."""
    found = [record]
    for step in [] if path == "record" else path.split("."):
        key, each = step.removesuffix("[]"), step.endswith("[]")
        found = [o[key] for o in found if isinstance(o.get(key), (dict, list))]
        if each:
            found = [item for items in found for item in items]
    return found


def undocumented(value: dict, path: str) -> list[str]:
    """The fields of ``value`` (at ``path``) and of what it holds that the page lacks."""
    rows, missing = documented(path), []
    for key, item in value.items():
        if key not in rows:
            missing.append(child(path, key))
            continue
        if rows[key]["type"].startswith("map"):
            continue  # keys named by the run (parts, flags, metrics)
        sub = child(path, key)
        if isinstance(item, dict):
            missing += undocumented(item, sub) if sub in FIELDS else [f"{sub} (no table)"]
        elif isinstance(item, list) and any(isinstance(i, dict) for i in item):
            if f"{sub}[]" not in FIELDS:
                missing.append(f"{sub}[] (no table)")
            for entry in item:
                missing += undocumented(entry, f"{sub}[]")
    return missing


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """One record per condition the page names that a CPU can make in seconds."""
    tmp = tmp_path_factory.mktemp("records")
    made = {}

    def run(*argv, status=0):
        out = tmp / f"run{len(made)}"
        assert main([*TINY, *argv, "--output", str(out)]) == status
        (path,) = out.glob("*.json")
        return read_record(path), out  # the reader's checks pass on what runs write

    # forward-forward: the plane, and rule metrics (its goodness gap)
    made["plane"], folder = run("--rule", "forward_forward", "--probe-size", "32",
                                "--checkpoint-dir", str(tmp / "ckpt"))
    made["rule-metrics"] = made["plane"]
    shutil.copytree(folder, tmp / f"run{len(made)}")  # the resume continues this record
    made["resumed"], _ = run("--rule", "forward_forward", "--probe-size", "32",
                             "--checkpoint-dir", str(tmp / "ckpt"), "--resume")
    made["diverged"], _ = run("--rule", "e2e", "--no-plane", "--max-loss", "1e-9",
                              status=EXIT_DIVERGED)
    made["probe"], _ = run("--rule", "e2e", "--no-plane", "--probe", "linear",
                           "--probe-images", "16", "--probe-epochs", "1")
    import torch

    if torch.cuda.is_available():
        made["cuda"] = made["plane"]
    return made


def test_the_page_parses_into_its_tables():
    assert {"record", "config", "history[]", "plane[]", "resumed[]"} <= FIELDS.keys()
    for path, rows in FIELDS.items():
        for name, row in rows.items():
            assert row["when"] in {"always"} | {r["condition"] for r in DOC["condition"]}, \
                (path, name)


def test_the_reader_checks_each_field_as_the_page_documents_it():
    """The page and the reader agree: a field the reader checks has a row whose type is the
    type checked (a ``map`` row is an object), or that type without null where older records
    may hold null; a field it requires always is there always."""
    for field in CHECKED:
        if field.path.endswith("[]"):
            continue  # its list's row gives the type of the items
        where, _, key = field.path.rpartition(".")
        row = documented(where or "record").get(key)
        assert row, f"the reader checks {field.path}, which docs/records.md lacks"
        if row["field"].startswith("<"):
            continue  # a flag's value: "as the flag"
        doc = row["type"].split(":")[0]
        assert field.type in (doc, f"{doc} or null"), (field.path, field.type, row["type"])
        assert field.when != "always" or row["when"] == "always", field.path


def test_the_status_values_are_the_ones_records_take():
    assert [row["status"] for row in DOC["status"]] == list(STATUSES)


def test_every_field_of_a_record_is_documented(records):
    for condition, record in records.items():
        assert undocumented(record, "record") == [], condition
        assert record["status"] in STATUSES


def test_every_documented_field_is_in_the_records_it_should_be_in(records):
    conditions = {row["condition"] for row in DOC["condition"]}
    # only a GPU makes a cuda record; a pipelined one (asynchronous or not) needs torchrun:
    # test_pipeline.py checks its record against this page
    uncovered = conditions - records.keys() - {"cuda", "parallel", "replay"}
    assert not uncovered, f"the page names conditions no test run makes: {uncovered}"
    for path in FIELDS:
        for name, row in documented(path).items():
            when = row["when"]
            wanted = records.values() if when == "always" else (
                [records[when]] if when in records else [])
            for record in wanted:
                found = objects(record, path)
                if path != "record" and not found:
                    continue  # the parent is conditional (plane rows without the plane)
                assert found and all(name in o for o in found), f"{path}: {name} ({when})"


def test_a_resumed_run_says_so(records):
    resumed, first = records["resumed"], records["plane"]
    assert [e["after_epoch"] for e in resumed["resumed"]] == [1]
    assert resumed["run_id"] == first["run_id"] and resumed["started"] == first["started"]
    assert "resumed" not in first and resumed["history"] == first["history"]


def test_a_record_keeps_its_command_line(records):
    """``argv`` is the command line as given: the one the fixture's run passed, and the
    resumed run's own (with ``--resume``), not the first run's."""
    first, resumed = records["plane"], records["resumed"]
    assert first["argv"][:len(TINY)] == TINY and "--resume" not in first["argv"]
    assert first["argv"][len(TINY):len(TINY) + 2] == ["--rule", "forward_forward"]
    assert "--resume" in resumed["argv"]
