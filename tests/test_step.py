"""The step context: every part and objective sees the batch it is working on, on every path.

The regression these guard against (issue 11): ``sequential`` with an nHSIC
term read the network input from a memo that part 0 wrote, which the trainer
skipped for frozen and cached parts and which evaluation overwrote with a test
batch. Phase 2 then crashed ("sample counts differ: 64 vs 128") or silently
used a stale batch as every step's target.
"""

import json
import subprocess
import sys

import pytest
import timm
import torch
from conftest import ROOT

import locallearn.losses
from locallearn import create_rule, split
from locallearn.data import load_dataset
from locallearn.step import Step
from locallearn.trainer import TrainConfig, Trainer


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("target", ["input", "block_input"])
def test_every_phase_two_nhsic_target_is_that_steps_own_input(monkeypatch, cache, target):
    torch.manual_seed(0)
    data = load_dataset("synthetic")
    stack = split(timm.create_model("resnet32_cifar", num_classes=10), "stage", 2,
                  input_size=data.image_size)
    rule = create_rule("sequential", nhsic_lambda=0.1, nhsic_target=target,
                       cache_features=cache)
    # Evaluation batches of another size: a leftover test batch could not go unnoticed.
    cfg = TrainConfig(epochs=2, batch_size=32, eval_batch_size=48, progress=False)
    trainer = Trainer(stack, rule, data, cfg)

    seen: list[tuple[Step, torch.Tensor]] = []  # (the step, its part-1 input) per phase-2 step
    targets: list[torch.Tensor] = []
    train_step = trainer.train_step

    def spy_step(x, step, trained, start=0):
        if trained[0] == 1:
            h = x if start == 1 else trainer.parts[0].run_blocks(x)
            seen.append((step, h.detach().clone()))
        return train_step(x, step, trained, start)

    nhsic = locallearn.losses.differentiable_nhsic

    def spy_nhsic(a, b, **kw):
        targets.append(b.detach().clone())
        return nhsic(a, b, **kw)

    monkeypatch.setattr(trainer, "train_step", spy_step)
    monkeypatch.setattr(locallearn.losses, "differentiable_nhsic", spy_nhsic)
    trainer.fit()  # evaluates after epoch 1, between the phases

    phase2 = targets[-len(seen):]
    assert len(seen) == len(trainer.train_loader) and len(phase2) == len(seen)
    for (step, part_input), got in zip(seen, phase2, strict=True):
        want = step.network_input if target == "input" else part_input
        assert got.shape[0] == len(step.labels) == 32
        assert torch.equal(got, want.flatten(1).float())


def test_cached_steps_carry_the_images_their_features_came_from():
    torch.manual_seed(0)
    data = load_dataset("synthetic")
    stack = split(timm.create_model("resnet32_cifar", num_classes=10), "stage", 2,
                  input_size=data.image_size)
    trainer = Trainer(stack, create_rule("sequential", cache_features=True), data,
                      TrainConfig(epochs=2, batch_size=32, progress=False))
    trainer._train_epoch(0)
    loader = trainer.executor.cached_inputs(1)
    features, images, labels = next(iter(loader))
    _, step = trainer.make_step(images, labels, trainer.eval_transform)
    with torch.no_grad():
        trainer.parts[0].eval()
        again = trainer.parts[0].run_blocks(step.network_input)
    assert torch.allclose(again, features, atol=1e-5)


def test_sequential_with_nhsic_runs_to_the_end_through_the_cli(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--rule", "sequential",
         "--rule-opt", "nhsic_lambda=0.1", "--blocks", "2", "--epochs", "2",
         "--dataset", "synthetic", "--batch-size", "64", "--eval-batch-size", "128",
         "--model", "resnet32_cifar", "--no-plane", "--no-progress", "--output", tmp_path],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["status"] == "complete" and len(record["history"]) == 2
    assert len(record["history"][1]["trained_parts"]) == 2  # the second block part and the head
