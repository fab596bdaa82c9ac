"""Two CPU processes under torchrun (gloo): ranks agree, and 2 x B equals 1 x 2B."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

WORKER = str(ROOT / "tests" / "distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rule, batch, out, processes):
    out.mkdir()
    if processes == 1:
        cmd = [sys.executable, WORKER, rule, str(batch), str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               WORKER, rule, str(batch), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(processes)]


@pytest.mark.parametrize("rule", ["e2e", "layerwise"])
def test_two_processes_match_one_process_with_twice_the_batch(tmp_path, rule):
    rank0, rank1 = _run(rule, 16, tmp_path / "two", 2)
    (single,) = _run(rule, 32, tmp_path / "one", 1)
    assert rank0["num_processes"] == 2 and "MULTI_CPU" in rank0["distributed_type"]
    # DDP keeps the replicas identical: same bits on both ranks.
    assert torch.equal(rank0["params"], rank1["params"])
    assert not torch.equal(rank0["params"], torch.zeros_like(rank0["params"]))
    # Averaging gradients of two half batches is the gradient of the whole batch.
    torch.testing.assert_close(rank0["params"], single["params"], rtol=1e-4, atol=1e-5)
    assert rank0["test_acc"] == single["test_acc"]
    assert rank0["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)


def test_infopro_heads_recomputed_in_backward_work_under_ddp(tmp_path):
    # The recomputed decoder and auxiliary head are autograd functions with the heads'
    # parameters as inputs: DDP must see each parameter's gradient once, on every rank.
    rank0, rank1 = _run("infopro", 16, tmp_path / "two", 2)
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["train_loss"] == rank1["train_loss"]


def test_frozen_blocks_in_training_mode_keep_process_0s_statistics(tmp_path):
    # sequential, frozen_mode=train: in phase 2 the frozen first part is no DDP module,
    # and each rank's BatchNorm statistics follow its own shard until they are shared.
    rank0, rank1 = _run("sequential", 16, tmp_path / "two", 2)
    assert torch.equal(rank0["params"], rank1["params"])
    assert torch.equal(rank0["first_part_buffers"], rank1["first_part_buffers"])
