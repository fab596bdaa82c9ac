"""The pipelined executor (``--parallel parts``) gives the serial run's weights.

Pipelining changes when a stage works, not what it computes: stage k's forward
of batch t uses its weights after t updates in both executors, on the same
batch, so every part's final parameters and buffers equal the serial run's.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

WORKER = str(ROOT / "tests" / "pipeline_worker.py")
MODELS = "vit,cnn"  # layer norm, and batch norm (whose buffers must match too)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode, processes, out):
    out.mkdir()
    cmd = [sys.executable, WORKER, mode, MODELS, str(out)]
    if processes > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(processes)]


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    (single,) = _run("serial", 1, tmp_path_factory.mktemp("serial") / "out")
    return single


@pytest.mark.parametrize("stages", [2, 3])
def test_pipelined_stages_give_the_serial_weights(serial, tmp_path, stages):
    ranks = _run("parts", stages, tmp_path / "parts")
    for model in MODELS.split(","):
        expected = serial[model]
        got = {}
        for rank in ranks:
            assert rank[model]["parts"], "every stage holds at least one part"
            assert not set(got) & set(rank[model]["parts"]), "a part is on one stage only"
            got.update(rank[model]["parts"])
        assert sorted(got) == list(range(expected["num_parts"]))
        for i, weights in expected["parts"].items():
            # Same operations on the same inputs in the same order with one thread per
            # process, and the transport copies bits: equal to the bit is expected. The
            # tolerance (1e-6 relative, in float64 of float32 weights) only admits a
            # kernel that reduces in another order for a received (contiguous) tensor.
            torch.testing.assert_close(got[i], weights, rtol=1e-6, atol=1e-7)
            assert not torch.equal(weights, torch.zeros_like(weights))
        # The record's numbers: accuracy at each depth, gathered from the stages.
        assert ranks[0][model]["block_acc"] == expected["block_acc"]
        assert ranks[0][model]["test_acc"] == expected["test_acc"]
        assert all(r[model]["block_acc"] == expected["block_acc"] for r in ranks)
        last, serial_last = ranks[0][model]["history"][-1], expected["history"][-1]
        assert last["part_loss"] == pytest.approx(serial_last["part_loss"], rel=1e-6)
        assert last["train_acc"] == serial_last["train_acc"]
        assert len(last["stages"]) == stages


REFUSED = [  # (processes, arguments, what the one line says)
    (1, ["--rule", "layerwise", "--no-plane"], "start run.py with torchrun --nproc_per_node P"),
    (2, ["--rule", "sequential", "--no-plane"], "rule 'sequential' does not train all its parts"),
    (2, ["--rule", "forward_forward", "--no-plane"], "combines every part's output"),
    (2, ["--rule", "layerwise"], "information plane yet"),
    (2, ["--rule", "layerwise", "--no-plane", "--checkpoint-dir", "ckpt"], "checkpoints yet"),
    (2, ["--rule", "layerwise", "--no-plane", "--mixed-precision", "fp16"], "fp16"),
]


@pytest.mark.parametrize("processes, args, message", REFUSED,
                         ids=[" ".join(a) for _, a, _ in REFUSED])
def test_what_cannot_be_pipelined_is_one_line_exit_2_and_nothing_written(
        tmp_path, capsys, monkeypatch, processes, args, message):
    from locallearn.cli import main

    # The checks read torchrun's WORLD_SIZE before any process group exists.
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    monkeypatch.chdir(tmp_path)
    status = main(["--dataset", "synthetic", "--parallel", "parts", *args,
                   "--output", str(tmp_path / "runs")])
    out = capsys.readouterr()
    assert status == 2 and out.out == "" and "Traceback" not in out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run.py: error: ")
    assert message in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_a_rule_with_fewer_parts_than_stages_is_refused():
    from locallearn.errors import ConfigError
    from locallearn.pipeline import check_rule
    from locallearn.rules import create_rule

    with pytest.raises(ConfigError, match="rule 'e2e' has 1 part, fewer than the 2 stages"):
        check_rule(create_rule("e2e"), 1, 2, num_parts=1)
    check_rule(create_rule("layerwise"), 3, 2, num_parts=3)  # enough parts: accepted


@pytest.mark.parametrize("costs, stages, starts", [
    ([1, 1, 1, 1], 2, [0, 2]),
    ([5, 1, 1, 1], 2, [0, 1]),
    ([1, 1, 1, 5], 2, [0, 3]),
    ([3, 1, 1, 1, 3], 3, [0, 1, 4]),
    ([1, 2], 2, [0, 1]),
])
def test_stages_are_contiguous_nonempty_and_minimise_the_slowest(costs, stages, starts):
    from locallearn.pipeline import balance

    assert balance(costs, stages) == starts


def test_a_pipelined_run_writes_a_normal_record(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(ROOT / "benchmarks" / "run.py"), "--parallel", "parts", "--rule", "layerwise",
           "--model", "resnet32_cifar", "--blocks", "2", "--dataset", "synthetic",
           "--train-subset", "64", "--test-subset", "40", "--epochs", "1", "--batch-size", "16",
           "--no-plane", "--no-progress", "--output", str(tmp_path / "runs")]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (tmp_path / "runs").glob("*.json")  # one record, by the first process
    record = json.loads(path.read_text())
    assert record["status"] == "complete" and record["config"]["parallel"] == "parts"
    assert record["hardware"]["num_processes"] == 2
    names = [p["name"] for p in record["parts"]]
    assert len(names) == 3 and all(p["params"] > 0 for p in record["parts"])
    (entry,) = record["history"]
    # Both stages' parts are in the record: losses of every part, accuracy at every depth.
    assert sorted(entry["part_loss"]) == sorted(names)
    assert sum(entry["stages"], []) == names
    assert len(record["block_acc"]) == 2 and all(0 <= a <= 1 for a in record["block_acc"])
    assert record["test_acc"] == entry["test_acc"] and 0 <= record["test_acc"] <= 1
    assert done.stdout.count("accuracy at each depth") == 1  # the summary: first process only
