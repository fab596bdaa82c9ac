"""The issue-5 rules and local losses learn on real data, through the real CLI.

Each case is a run of ``benchmarks/run.py`` on the shared CIFAR-10 copy: 2
epochs on 3,000 balanced training images, tested on 1,000 test images.
Chance is 0.1; on 1,000 images its standard error is about 0.01, so 0.14 is
four standard errors above it. The JPEGs are decoded once (conftest's ``image_cache``).
"""

import json

import pytest
from test_cli import run_cli

CASES = {
    "infopro": ["--rule", "infopro", "--model", "resnet18", "--blocks", "2"],
    "predsim": ["--rule", "layerwise", "--model", "resnet18", "--rule-opt", "loss=predsim"],
    "supcon": ["--rule", "layerwise", "--model", "resnet18", "--rule-opt", "loss=supcon"],
    "nhsic": ["--rule", "layerwise", "--model", "resnet18", "--rule-opt", "nhsic_lambda=0.1"],
    # Forward-forward learns slowly per step: small batches and Adam give it 750 steps.
    "forward_forward": ["--rule", "forward_forward", "--model", "ff_mlp", "--batch-size", "8",
                        "--optimizer", "adamw", "--lr", "1e-3"],
}


@pytest.mark.parametrize("case", CASES)
def test_learns_on_the_cifar10_copy(case, tmp_path, cifar10_path, image_cache):
    out = run_cli(*CASES[case], "--dataset", f"imagefolder:{cifar10_path}", "--train-subset",
                  "3000", "--test-subset", "1000", "--epochs", "2", "--no-plane",
                  "--no-progress", "--output", tmp_path, "--cache-dir", image_cache)
    assert out.returncode == 0, out.stderr
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["status"] == "complete"
    assert record["config"]["train_subset"] == 3000 and len(record["history"]) == 2
    assert record["test_acc"] > 0.14, record["block_acc"]
    if case == "forward_forward":
        gaps = record["history"][-1]["rule_metrics"]["goodness_gap"]
        assert all(gap > 0 for gap in gaps.values()), gaps  # every layer tells them apart
    if case == "infopro":
        assert len(record["parts"]) == 2
