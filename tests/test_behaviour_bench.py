"""benchmarks/behaviour.py: two records are the same within the tolerance, or their
differences are named."""

from __future__ import annotations

import copy
import importlib.util
import json

from conftest import ROOT

spec = importlib.util.spec_from_file_location("behaviour", ROOT / "benchmarks" / "behaviour.py")
behaviour = importlib.util.module_from_spec(spec)
spec.loader.exec_module(behaviour)

RECORD = {"rule": "e2e", "seconds": 3.0, "history": [{"train_loss": 2.25, "seconds": 1.5,
                                                      "block_acc": [None, 0.25]}]}


def test_numbers_within_the_tolerance_and_clocks_are_the_same():
    other = copy.deepcopy(RECORD)
    other["seconds"] = 9.0  # a clock, never compared
    other["history"][0]["seconds"] = 0.1
    other["history"][0]["train_loss"] *= 1 + 1e-7
    assert behaviour.differences(RECORD, other, 1e-6) == []


def test_a_number_beyond_the_tolerance_a_missing_field_and_a_null_are_named():
    other = copy.deepcopy(RECORD)
    other["history"][0]["train_loss"] *= 1 + 1e-5
    other["history"][0]["block_acc"][0] = 0.5
    del other["rule"]
    found = behaviour.differences(RECORD, other, 1e-6)
    assert [line.split(":")[0] for line in found] == [
        ".history[0].block_acc[0]", ".history[0].train_loss", ".rule"]


def test_compare_exits_1_on_a_difference_and_0_on_the_same(tmp_path, capsys):
    from locallearn.records import read_record

    real = sorted((ROOT / "benchmarks" / "results" / "cpu-smoke").glob("*.json"))[0]
    record = read_record(real)
    for name in ("old", "same", "new"):
        (tmp_path / name).mkdir()
    (tmp_path / "old" / "r.json").write_text(json.dumps(record))
    (tmp_path / "same" / "r.json").write_text(json.dumps(record))
    record["test_acc"] += 0.01
    (tmp_path / "new" / "r.json").write_text(json.dumps(record))
    assert behaviour.compare(tmp_path / "old", tmp_path / "same", 1e-6) == 0
    assert behaviour.compare(tmp_path / "old", tmp_path / "new", 1e-6) == 1
    assert ".test_acc" in capsys.readouterr().out
