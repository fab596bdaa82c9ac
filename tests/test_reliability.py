"""Crash, resume, divergence and damaged files, through the real command line (the
killed run in a process of its own; the others through run.py's main in this process)."""

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

RUN = [sys.executable, str(ROOT / "benchmarks" / "run.py")]
BASE = ["--rule", "sequential", "--model", "resnet32_cifar", "--dataset", "synthetic",
        "--epochs", "4", "--blocks", "2", "--batch-size", "32", "--probe-size", "64",
        "--no-progress"]
TIMING = {"seconds", "images_per_s", "eval_seconds", "started", "path", "plane_config",
          "seconds_per_epoch", "run_id"}  # run_id: each run has its own


def run(*args, **kw):
    return subprocess.run([*RUN, *map(str, args)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, **kw)


def results(record):
    """A record without what depends on the clock or the paths it was written to."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in TIMING}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    out = clean(record)
    del out["config"]["output"], out["config"]["checkpoint_dir"], out["config"]["resume"]
    del out["argv"]  # names the output folders
    return out


def killed_after_first_checkpoint(args, runs, ckpt):
    """Start run.py with ``args`` in a process of its own and SIGKILL it once its first
    checkpoint is complete (or let it be, if it ends first)."""
    proc = subprocess.Popen([*RUN, *map(str, args), "--output", runs, "--checkpoint-dir", ckpt],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (ckpt / "epoch0001" / "meta.json").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def record_of(folder):
    return json.loads(next(folder.glob("*.json")).read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run that is never stopped, by run.py's main in this process (the killed run
    is a process of its own)."""
    from locallearn.cli import main

    folder = tmp_path_factory.mktemp("whole")
    assert main([*BASE, "--output", str(folder / "runs"), "--checkpoint-dir",
                 str(folder / "ckpt")]) == 0
    return folder


def test_killed_and_resumed_run_gives_the_same_record(tmp_path, uninterrupted):
    ckpt, runs = tmp_path / "ckpt", tmp_path / "runs"
    killed_after_first_checkpoint(BASE, runs, ckpt)
    assert record_of(runs)["status"] == "running"  # the record says the run did not finish
    out = run(*BASE, "--output", runs, "--checkpoint-dir", ckpt, "--resume")
    assert out.returncode == 0, out.stderr
    assert "resuming after epoch" in out.stdout
    resumed, whole = record_of(runs), record_of(uninterrupted / "runs")
    assert resumed["status"] == "complete"
    events = resumed.pop("resumed")  # the record says it was resumed, and after which epoch
    assert len(events) == 1 and 1 <= events[0]["after_epoch"] < 4, events
    assert "resumed" not in whole
    assert results(resumed) == results(whole)


def test_same_seed_same_record(tmp_path, uninterrupted, run_main):
    out = run_main(*BASE, "--output", tmp_path / "runs", "--checkpoint-dir", tmp_path / "ckpt")
    assert out.returncode == 0, out.stderr
    record = record_of(tmp_path / "runs")
    assert record["seed"] == 0 and record["deterministic"] is False
    assert results(record) == results(record_of(uninterrupted / "runs"))


def test_old_checkpoints_are_pruned_and_half_written_ones_ignored(uninterrupted, tmp_path):
    from locallearn import checkpoint

    names = [p.name for p in checkpoint.complete(uninterrupted / "ckpt")]
    assert names == ["epoch0003", "epoch0004"]  # --keep-checkpoints defaults to 2
    (tmp_path / ".tmp-epoch0009-123").mkdir()
    (tmp_path / "epoch0010").mkdir()  # no meta.json: incomplete
    assert checkpoint.complete(tmp_path) == []


def _copy_checkpoints(src, dst):
    import shutil

    shutil.copytree(src / "ckpt", dst / "ckpt")
    return dst / "ckpt"


def _fails_cleanly(out, message):
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert message in lines[0]


def test_corrupted_checkpoint_is_a_clean_error(tmp_path, uninterrupted, run_main):
    ckpt = _copy_checkpoints(uninterrupted, tmp_path)
    weights = ckpt / "epoch0004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = run_main(*BASE, "--output", tmp_path / "runs", "--checkpoint-dir", ckpt, "--resume")
    _fails_cleanly(out, "is damaged")


def test_checkpoint_of_another_model_is_refused(tmp_path, uninterrupted, run_main):
    ckpt = _copy_checkpoints(uninterrupted, tmp_path)
    out = run_main(*BASE, "--model", "resnet18", "--output", tmp_path / "runs",
                   "--checkpoint-dir", ckpt, "--resume")
    _fails_cleanly(out, "is from another run: model is 'resnet32_cifar' there, 'resnet18' here")


def test_truncated_or_foreign_records_are_clean_errors(tmp_path, uninterrupted):
    text = next((uninterrupted / "runs").glob("*.json")).read_text()
    (tmp_path / "truncated.json").write_text(text[: len(text) // 2])
    future = json.loads(text) | {"version": 99}
    (tmp_path / "future.json").write_text(json.dumps(future))
    plane = [sys.executable, str(ROOT / "benchmarks" / "plane.py")]
    for name, message in (("truncated", "truncated"), ("future", "record version 99")):
        out = subprocess.run([*plane, tmp_path / f"{name}.json", "-o", tmp_path / "x.png"],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        _fails_cleanly(out, message)
        assert not (tmp_path / "x.png").exists()


def test_resume_needs_a_checkpoint_dir(tmp_path, run_main):
    out = run_main(*BASE, "--resume", "--output", tmp_path)
    _fails_cleanly(out, "--resume needs --checkpoint-dir")


@pytest.mark.parametrize("rule", [["fa"], ["dfa"], ["forward_gradient"],
                                  ["forward_gradient", "--rule-opt", "perturb=weight"]],
                         ids=["fa", "dfa", "forward_gradient", "forward_gradient-weight"])
def test_a_backprop_free_rule_killed_and_resumed_gives_the_same_record(tmp_path, rule):
    """The random feedback (fa, dfa) and the random directions (forward_gradient) come back
    with the checkpoint: the resumed record, gradient probe included, is the uninterrupted one."""
    base = ["--rule", *rule, "--model", "ff_mlp", "--model-opt", "widths=32,32",
            "--dataset", "synthetic", "--epochs", "3", "--batch-size", "32",
            "--train-subset", "256", "--test-subset", "64", "--probe-size", "64",
            "--no-progress"]
    whole = run(*base, "--output", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    ckpt, runs = tmp_path / "ckpt", tmp_path / "runs"
    killed_after_first_checkpoint(base, runs, ckpt)
    out = run(*base, "--output", runs, "--checkpoint-dir", ckpt, "--resume")
    assert out.returncode == 0, out.stderr
    resumed, uninterrupted = record_of(runs), record_of(tmp_path / "whole")
    if resumed.pop("resumed", None) is None:
        pytest.skip("the run finished before it could be killed")
    assert all("gradient_probe" in e for e in uninterrupted["history"])
    assert results(resumed) == results(uninterrupted)
