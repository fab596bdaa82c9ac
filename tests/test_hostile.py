"""What a careless or hostile user does to ``run.py``, its records and its checkpoints.

Each case checks the exit status, that stderr is one line naming the problem
(no traceback), and that no file was lost or left misleading. Cases of the
data (image folders, the last batch) are in ``test_hostile_data.py``; those of
``leaderboard.py`` and ``plane.py`` in ``test_hostile_reports.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT

from locallearn import checkpoint
from locallearn.cli import main
from locallearn.records import Lock, RecordWriter, git_commit, read_record, side_file

TINY = ["--rule", "e2e", "--model", "resnet32_cifar", "--dataset", "synthetic",
        "--batch-size", "32", "--train-subset", "64", "--test-subset", "32", "--no-plane",
        "--no-progress"]


def fails(capsys, argv, message, status=2):
    """Run ``run.py argv`` in this process; it must fail with one line holding ``message``."""
    capsys.readouterr()
    assert main([*map(str, argv)]) == status
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    return lines[0]


def files(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` and its bytes (lock files aside)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished 3-epoch run: its record in ``runs/`` and its checkpoints in ``ckpt/``."""
    folder = tmp_path_factory.mktemp("done")
    argv = [*TINY, "--epochs", "3", "--output", folder / "runs", "--checkpoint-dir",
            folder / "ckpt", "--keep-checkpoints", "3"]
    assert main([*map(str, argv)]) == 0
    return folder


def copy(done: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(done / "runs", tmp_path / "runs")
    shutil.copytree(done / "ckpt", tmp_path / "ckpt")
    return tmp_path / "runs", tmp_path / "ckpt"


def resume(tmp_path, *extra):
    return [*TINY, "--epochs", "3", "--output", tmp_path / "runs", "--checkpoint-dir",
            tmp_path / "ckpt", "--resume", *extra]


# 1. A checkpoint folder belongs to one run.

def test_a_new_run_refuses_a_folder_of_another_runs_checkpoints(done, tmp_path, capsys):
    _, ckpt = copy(done, tmp_path)
    before = files(ckpt)
    fails(capsys, [*TINY, "--epochs", "3", "--output", tmp_path / "new", "--checkpoint-dir",
                   ckpt], "holds another run's checkpoints (epoch0001, epoch0002, epoch0003); "
                          "pass --resume")
    assert files(ckpt) == before and not (tmp_path / "new").exists()


def _saved_trainer(history):
    """The least a checkpoint saves: a serial trainer's state (of no parts) and its weights."""
    from locallearn.trainer import SerialExecutor

    executor = SerialExecutor()
    executor.stack, executor.writes = torch.nn.Linear(2, 2), True
    executor.saved_modules = lambda: [("stack", executor.stack)]
    state = {"optimizers": {}, "schedulers": {}, "scalers": {}, "seconds": 1.0,
             "observers": []}
    return SimpleNamespace(executor=executor, history=history,
                           state_dict=lambda: state | {"history": history})


def test_pruning_only_removes_the_runs_own_checkpoints(tmp_path):
    trainer = _saved_trainer([])
    for epoch in (7, 8):
        checkpoint.save(trainer, tmp_path, epoch, {}, 1, "other")
    for epoch in (1, 2, 3):
        trainer.history.append({"epoch": epoch})
        checkpoint.save(trainer, tmp_path, epoch, {}, 2, "mine")
    kept = {p.name: checkpoint.run_of(p) for p in checkpoint.complete(tmp_path)}
    assert kept == {"epoch0002": "mine", "epoch0003": "mine", "epoch0008": "other"}


def test_a_folder_or_record_in_use_is_refused(done, tmp_path, capsys):
    runs, ckpt = copy(done, tmp_path)
    held = Lock(ckpt / checkpoint.LOCK, "test")
    try:
        fails(capsys, resume(tmp_path), f"checkpoint folder {str(ckpt)!r} is in use by a "
                                        f"running run (pid {os.getpid()})")
    finally:
        held.release()
    (record,) = runs.glob("*.json")
    held = Lock(runs / f".{record.name}.lock", "test")
    try:  # a running run's record is refused even when asked to overwrite
        fails(capsys, [*TINY, "--epochs", "3", "--output", runs, "--overwrite"],
              "is in use by a running run")
    finally:
        held.release()


def test_an_interrupted_save_leaves_no_temporary_folder(tmp_path, monkeypatch):
    trainer = _saved_trainer([{"epoch": 1}])

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(trainer, tmp_path, 1, {}, 2, "mine")
    assert list(tmp_path.iterdir()) == []
    stale = tmp_path / ".tmp-epoch0004-99999"  # another (killed) process's
    stale.mkdir()
    checkpoint.lock_folder(tmp_path).release()
    assert not stale.exists()


# 2. A record belongs to one run.

def test_a_finished_record_is_not_replaced_unless_asked(done, tmp_path, capsys):
    runs, _ = copy(done, tmp_path)
    before = files(runs)
    (record,) = runs.glob("*.json")
    fails(capsys, [*TINY, "--epochs", "3", "--output", runs],
          f"{str(record)!r} holds another run's record (complete); pass --overwrite to replace")
    assert files(runs) == before
    assert main([*map(str, TINY), "--epochs", "1", "--output", str(runs), "--name", record.name,
                 "--overwrite"]) == 0  # a 1-epoch run's own default name differs (epochs-1)
    assert len(read_record(record)["history"]) == 1


def test_an_overwriting_run_keeps_the_old_record_until_it_has_finished(done, tmp_path, capsys,
                                                                       monkeypatch):
    """A user's finding: Ctrl-C seconds into an --overwrite run left an empty interrupted
    record, and the finished run's record was gone."""
    runs, _ = copy(done, tmp_path)
    (record,) = runs.glob("*.json")
    old = record.read_bytes()
    argv = [*TINY, "--epochs", "3", "--output", runs, "--overwrite"]
    real = RecordWriter.on_epoch_end

    def ctrl_c(self, trainer, entry):  # Ctrl-C once the new run has recorded an epoch
        real(self, trainer, entry)
        raise KeyboardInterrupt

    monkeypatch.setattr(RecordWriter, "on_epoch_end", ctrl_c)
    fails(capsys, argv, "run.py: interrupted", status=130)
    assert record.read_bytes() == old  # the finished run's record, as it was
    unfinished = read_record(side_file(record))  # the new run's, beside it
    assert unfinished["status"] == "interrupted" and len(unfinished["history"]) == 1
    monkeypatch.undo()
    assert main([*map(str, argv)]) == 0  # a run that finishes replaces it
    new = read_record(record)
    assert new["status"] == "complete" and new["run_id"] != json.loads(old)["run_id"]
    assert not side_file(record).exists()


def test_an_unfinished_record_is_continued_only_by_resuming(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main([*map(str, TINY), "--epochs", "1", "--output", str(runs)]) == 0
    (record,) = runs.glob("*.json")
    data = read_record(record) | {"status": "interrupted"}
    record.write_text(json.dumps(data))
    fails(capsys, [*TINY, "--epochs", "1", "--output", runs],
          "holds another run's record (interrupted)")
    # --resume with nothing saved to resume from: that unfinished run starts again.
    argv = [*TINY, "--epochs", "1", "--output", runs, "--checkpoint-dir", tmp_path / "ck",
            "--resume"]
    assert main([*map(str, argv)]) == 0
    assert read_record(record)["status"] == "complete"


def test_a_file_that_is_not_a_record_is_not_replaced_unless_asked(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "notes.json").write_text("my notes")
    argv = [*TINY, "--epochs", "1", "--output", runs, "--name", "notes.json"]
    for extra in ([], ["--checkpoint-dir", tmp_path / "ck", "--resume"]):
        fails(capsys, [*argv, *extra], "holds a file that is not a run record; pass --overwrite")
    assert (runs / "notes.json").read_text() == "my notes"


def test_resuming_another_runs_checkpoints_does_not_take_this_record(done, tmp_path, capsys):
    runs, _ = copy(done, tmp_path)
    (record,) = runs.glob("*.json")
    data = read_record(record) | {"status": "interrupted", "run_id": "someone"}
    record.write_text(json.dumps(data))
    fails(capsys, resume(tmp_path), "another run's record (interrupted); pass --overwrite")


def test_resuming_keeps_the_run_and_its_seconds(done, tmp_path):
    runs, _ = copy(done, tmp_path)
    (record,) = runs.glob("*.json")
    before = read_record(record)
    assert main([*map(str, resume(tmp_path))]) == 0  # its own record: resumed, not refused
    after = read_record(record)
    assert after["run_id"] == before["run_id"] and after["history"] == before["history"]
    # The fit's seconds count the earlier process too, not only this one's (none: it was done).
    assert after["seconds"] >= sum(e["seconds"] for e in after["history"]) > 0


# 3. Checkpoint metadata is validated against itself and the saved state.

def _edit_meta(ckpt: Path, name: str, edit) -> None:
    path = ckpt / name / "meta.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(edit(meta)))


DAMAGED_META = "is damaged: its meta.json is not one this run wrote"


@pytest.mark.parametrize("edit, message", [
    (lambda m: m | {"epoch": 99}, DAMAGED_META),
    (lambda m: m | {"history": m["history"][:1]}, DAMAGED_META),
    (lambda m: m | {"epoch": "2"}, DAMAGED_META),
    (lambda m: m | {"history": {"a": 1}}, DAMAGED_META),
    (lambda m: m | {"observers": "x"}, DAMAGED_META),
    (lambda m: {k: v for k, v in m.items() if k != "run_id"}, DAMAGED_META),
    (lambda m: [m], DAMAGED_META),
    (lambda m: m | {"format": "two"}, "has format 'two'"),
], ids=["epoch-99", "short-history", "epoch-str", "history-dict", "observers-str", "no-run-id",
        "a-list", "format"])
def test_edited_metadata_is_refused(done, tmp_path, capsys, edit, message):
    _, ckpt = copy(done, tmp_path)
    _edit_meta(ckpt, "epoch0003", edit)
    line = fails(capsys, resume(tmp_path), message)
    assert "epoch0003" in line


@pytest.mark.parametrize("damage, message", [
    ("pickle", "cannot be loaded safely into this run (UnpicklingError)"),
    ("no-keys", "cannot be loaded safely into this run (KeyError)"),
    ("weights", "cannot be loaded safely into this run (SafetensorError)"),
])
def test_damaged_state_files_are_one_line(done, tmp_path, capsys, damage, message):
    _, ckpt = copy(done, tmp_path)
    last = ckpt / "epoch0003"
    if damage == "pickle":  # an arbitrary object, which only the unsafe load would build
        import pickle

        (last / "state.pt").unlink()
        with open(last / "state.pt", "wb") as f:
            pickle.dump(SimpleNamespace(x=1), f)
    elif damage == "no-keys":
        torch.save({"optimizers": {}}, last / "state.pt")
    else:
        (last / "model.safetensors").write_bytes(b"\x00" * 16)
    line = fails(capsys, resume(tmp_path), message)
    assert "weights_only" not in line and "is damaged" in line


# 4. Everything that changes results is part of the identity.

@pytest.mark.parametrize("flag, value, expected", [
    ("--probe-size", "32", "probe_size is 1000 there, 32 here"),
    ("--probe-split", "test", "probe_split is 'train' there, 'test' here"),
    ("--mixed-precision", "bf16", "mixed_precision is 'no' there, 'bf16' here"),
    ("--lr", "0.05", "train.lr is 0.1 there, 0.05 here"),
])
def test_resuming_with_other_settings_names_each_difference(done, tmp_path, capsys, flag,
                                                            value, expected):
    copy(done, tmp_path)
    line = fails(capsys, resume(tmp_path, flag, value), f"is from another run: {expected}")
    assert len(line) < 250


def test_several_differences_are_listed_briefly(done, tmp_path, capsys):
    copy(done, tmp_path)
    line = fails(capsys, resume(tmp_path, "--probe-size", "32", "--seed", "3", "--gamma", "0.5"),
                 "probe_size is 1000 there, 32 here")
    assert "train.seed is 0 there, 3 here" in line and "train.gamma is 0.1 there, 0.5 here" in line
    assert len(line) < 400


# 6. Every path is checked before any work (--check runs the same checks).

@pytest.mark.parametrize("case, message", [
    ("output-file", "--output '{f}' is a file; give a folder"),
    ("output-below-file", "cannot be made or written: Not a directory"),
    ("checkpoint-file", "--checkpoint-dir '{f}' is a file; give a folder"),
    ("name-dot", "--name must be a plain file name; got '.'"),
    ("name-dotdot", "--name must be a plain file name; got '..'"),
    ("name-slash", "--name must be a plain file name; got 'a/b.json'"),
    ("name-long", "--name is 300 bytes long; at most 200"),
    ("name-folder", "would replace a folder; give another --name"),
    ("output-long-name", "cannot be made or written: File name too long"),
    ("output-nul", "cannot be made or written: embedded null byte"),
])
def test_bad_paths_fail_at_check_time(tmp_path, capsys, case, message):
    f = tmp_path / "a-file"
    f.write_text("x")
    out = ["--output", tmp_path / "runs"]
    extra = {
        "output-file": ["--output", f],
        "output-below-file": ["--output", f / "runs"],
        "checkpoint-file": [*out, "--checkpoint-dir", f],
        "name-dot": [*out, "--name", "."],
        "name-dotdot": [*out, "--name", ".."],
        "name-slash": [*out, "--name", "a/b.json"],
        "name-long": [*out, "--name", "a" * 300],
        "name-folder": ["--output", tmp_path, "--name", "runs-as-name"],
        "output-long-name": ["--output", tmp_path / "new" / ("x" * 300)],
        "output-nul": ["--output", tmp_path / "a\0b"],
    }[case]
    (tmp_path / "runs-as-name").mkdir()
    for check in (["--check"], []):
        fails(capsys, [*TINY, *extra, *check], message.format(f=f))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "runs-as-name"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_folder_fails_at_check_time(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    fails(capsys, [*TINY, "--output", locked / "runs", "--check"],
          "cannot be made or written: Permission denied")


@pytest.mark.parametrize("flag, folder", [("--output", "/proc/x"), ("--output", "/sys/x"),
                                          ("--checkpoint-dir", "/proc/x")])
def test_a_folder_the_system_refuses_fails_at_check_time(run_main, tmp_path, flag, folder):
    """A user's finding: as root, os.access says /proc and /sys are writable, --check passed
    and the run ended in a traceback. The check now makes a folder there and removes it."""
    if not Path(folder).parent.is_dir():
        pytest.skip(f"no {Path(folder).parent} here")
    for check in (["--check"], []):
        out = run_main(*TINY, "--output", tmp_path / "runs", flag, folder, *check)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith(f"run.py: error: {flag} {folder!r} cannot be made or "
                                     "written: "), out.stderr
        assert len(out.stderr.splitlines()) == 1
    assert not Path(folder).exists() and not (tmp_path / "runs").exists()


# 7. Signals.

def _start(tmp_path):
    argv = [sys.executable, str(ROOT / "benchmarks" / "run.py"), *TINY, "--epochs", "50",
            "--output", str(tmp_path / "runs"), "--checkpoint-dir", str(tmp_path / "ckpt")]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 240
    while not (tmp_path / "ckpt" / "epoch0001" / "meta.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


def test_sigterm_records_an_interrupted_run(tmp_path):
    proc = _start(tmp_path)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "run.py: terminated" and "Traceback" not in err
    (record,) = (tmp_path / "runs").glob("*.json")
    assert read_record(record)["status"] == "interrupted"
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))


@pytest.mark.parametrize("signum, status, word", [(None, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated")])
def test_an_interrupt_in_the_loop_records_an_interrupted_run(tmp_path, capsys, monkeypatch,
                                                             signum, status, word):
    """Ctrl-C (KeyboardInterrupt) or SIGTERM (this process's handler) in the middle of an epoch."""
    from locallearn.trainer import Trainer

    real = Trainer.train_step

    def interrupted(self, *args, **kw):
        if self.history:  # in epoch 2, after a checkpoint exists
            if signum is None:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
        return real(self, *args, **kw)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    argv = [*TINY, "--epochs", "3", "--output", tmp_path / "runs", "--checkpoint-dir",
            tmp_path / "ckpt"]
    fails(capsys, argv, f"run.py: {word}", status=status)
    (record,) = (tmp_path / "runs").glob("*.json")
    assert read_record(record)["status"] == "interrupted"
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["epoch0001"]


def test_the_memory_meter_runs_no_code_when_autograd_frees_a_tensor():
    """A ``__del__`` there swallowed Ctrl-C; the meter sweeps weak references instead."""
    from locallearn import measure

    assert not hasattr(measure._Saved, "__del__")
    x = torch.randn(8, 16, requires_grad=True)
    with measure.SavedTensorMeter() as meter:
        y = (x * 2).sin()
        alive = meter.current
        y.sum().backward()
        del y
    assert alive == 8 * 16 * 4 and meter.current == 0 and meter.peak == alive


# One line, not a traceback: numbers and model options.

@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "-1", "argument --lr: must be in (0, inf); got '-1'"),
    ("--lr", "0", "argument --lr: must be in (0, inf)"),
    ("--momentum", "-5", "argument --momentum: must be in [0, 1); got '-5'"),
    ("--seed", "-1", "argument --seed: must be in [0, 2**32); got '-1'"),
    ("--weight-decay", "-0.1", "argument --weight-decay: must be in [0, inf)"),
    ("--gamma", "-2", "argument --gamma: must be in (0, inf)"),
    ("--max-loss", "-3", "argument --max-loss: must be in [0, inf)"),
])
def test_out_of_range_numbers_fail_at_check_time(capsys, flag, value, message):
    fails(capsys, [*TINY, flag, value, "--check"], message)


@pytest.mark.parametrize("option, message", [
    ("in_chans=1", "with --model-opt in_chans=1 fails on the data's 3x16x16 images"),
    ("drop_rate=abc", "with --model-opt drop_rate='abc' fails on the data's 3x16x16 images"),
])
def test_model_options_that_break_the_model_are_blamed(tmp_path, capsys, option, message):
    line = fails(capsys, [*TINY, "--model", "resnet18", "--model-opt", option, "--output",
                          tmp_path], message)
    assert "cannot split" not in line and not list(tmp_path.iterdir())


def test_pretrained_weights_offline_are_one_line(tmp_path, capsys, monkeypatch):
    from locallearn import preflight

    monkeypatch.setattr(preflight, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    fails(capsys, [*TINY, "--model", "resnet18", "--model-opt", "pretrained=True", "--output",
                   tmp_path / "runs"], "the Hugging Face Hub is unreachable")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*.json"))


# Smaller: file modes follow the umask; the commit is the package's own.

def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        argv = [*TINY, "--epochs", "1", "--output", tmp_path / "runs", "--checkpoint-dir",
                tmp_path / "ckpt"]
        assert main([*map(str, argv)]) == 0
    finally:
        os.umask(old)
    written = [*(tmp_path / "runs").glob("*.json"), *(tmp_path / "ckpt" / "epoch0001").iterdir()]
    assert len(written) == 4
    assert {p.name: p.stat().st_mode & 0o777 for p in written} == {p.name: 0o640
                                                                   for p in written}


def test_the_commit_is_the_packages_own(tmp_path):
    assert git_commit() != "unknown"  # this checkout
    other = tmp_path / "other"  # a copy of the package inside another repository
    shutil.copytree(ROOT / "locallearn", other / "vendor" / "locallearn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    assert git_commit(other / "vendor") == "unknown"
    shutil.copy(ROOT / "pyproject.toml", other / "vendor")  # a checkout, but not git's root
    assert git_commit(other / "vendor") == "unknown"
    assert git_commit(tmp_path / "nowhere") == "unknown"
