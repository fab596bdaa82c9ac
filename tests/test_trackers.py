"""--log-with: a run's epochs go to an experiment tracker, the same numbers as its record."""

import pytest

from locallearn.cli import main
from locallearn.records import read_record

TINY = ["--rule", "layerwise", "--model", "resnet18", "--dataset", "synthetic", "--epochs", "1",
        "--train-subset", "64", "--test-subset", "32", "--batch-size", "32", "--probe-size", "32",
        "--no-progress", "--probe", "linear", "--probe-images", "32", "--probe-epochs", "1"]


def scalars(folder):
    """Every scalar of the TensorBoard event files under ``folder``: {tag: {step: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)}
            for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_the_records_numbers(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="pip install tensorboard (the test extra) to run")
    runs, project = tmp_path / "runs", tmp_path / "tb"
    assert main([*TINY, "--output", str(runs), "--log-with", "tensorboard",
                 "--project-dir", str(project)]) == 0
    (path,) = runs.glob("*.json")
    record = read_record(path)
    logged = scalars(project / path.stem)  # one folder per run, named as its record
    entry = record["history"][0]
    assert logged["test_acc"] == {1: pytest.approx(record["test_acc"])}
    for key in ("train_loss", "train_acc", "images_per_s", "seconds", "saved_bytes_peak"):
        assert logged[key] == {1: pytest.approx(entry[key])}, key
    for part, loss in entry["part_loss"].items():
        assert logged[f"part_loss/{part}"] == {1: pytest.approx(loss)}
    names = record["stack"]["blocks"]
    for name, acc in zip(names, record["block_acc"], strict=True):
        assert logged[f"block_acc/{name}"] == {1: pytest.approx(acc)}
    for name, acc in zip(names, entry["probe_acc"], strict=True):  # --probe linear
        assert logged[f"probe_acc/{name}"] == {1: pytest.approx(acc)}
    assert {row["epoch"] for row in record["plane"]} == {0, 1}
    for row in record["plane"]:  # before training (step 0) and after the epoch
        for key in ("nhsic_x", "nhsic_y", "cka_y"):
            assert logged[f"plane/{key}/{row['name']}"][row["epoch"]] == pytest.approx(row[key])
    hparams = next(project.rglob("hparams.yml")).read_text()  # the run's resolved settings
    assert "rule: layerwise" in hparams and "rule_options/head: reduced_linear" in hparams


def test_bad_or_missing_trackers_are_one_line_errors(tmp_path, capsys):
    from locallearn.trackers import check_tracker, tracker_names

    assert main([*TINY, "--output", str(tmp_path), "--log-with", "tensorbord"]) == 2
    assert capsys.readouterr().err.strip() == (
        "run.py: error: unknown --log-with tracker 'tensorbord'; did you mean tensorboard?")
    assert main([*TINY, "--output", str(tmp_path), "--project-dir", str(tmp_path)]) == 2
    assert "give --log-with NAME too" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main([*TINY, "--output", str(tmp_path / "runs"), "--log-with", "tensorboard",
                 "--project-dir", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "--project-dir" in err and "is a file; give a folder" in err
    (tmp_path / "file").unlink()
    missing = []
    for name in tracker_names():
        try:
            check_tracker(name)
        except Exception:  # noqa: BLE001 - its package is not installed here
            missing.append(name)
    if not missing:
        pytest.skip("every tracker's package is installed here")
    assert main([*TINY, "--output", str(tmp_path), "--log-with", missing[0]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"run.py: error: --log-with {missing[0]} needs the {missing[0]} package, "
                   f"which is not installed: pip install {missing[0]}"]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_docs_name_every_tracker_accelerate_supports():
    from conftest import ROOT

    from locallearn.trackers import tracker_names

    text = (ROOT / "docs" / "records.md").read_text().split("## Trackers")[1]
    assert [n for n in tracker_names() if f"`{n}`" not in text] == []
