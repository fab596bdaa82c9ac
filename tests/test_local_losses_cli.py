"""The issue-5 rules and local losses learn on real data, through the command line.

Each case is a run of ``run.py``'s ``main`` on the shared CIFAR-10 copy, in this
process (the script's own process is tested in test_cli.py), tested on 1,000
test images. Chance is 0.1; on 1,000 images its standard error is about 0.01,
so 0.14 is four standard errors above it. The losses are what is tested, so the
three layer-wise losses train the MLP backbone (ff_mlp), which learns in
seconds on a CPU (measured on 2,000 images for 2 epochs at batch 32, one thread:
predsim 0.226 in 36 s, supcon 0.274 in 12 s, nhsic 0.247 in 10 s); InfoPro's
decoder rebuilds images from convolutional features, so it trains resnet18
(1,000 images, 2 epochs: 0.189, 0.182 and 0.170 for seeds 0 to 2, about 45 s).
The JPEGs are decoded once (conftest's ``image_cache``).
"""

import json

import pytest

MLP = ["--model", "ff_mlp", "--train-subset", "2000", "--batch-size", "32"]
CASES = {
    "infopro": ["--rule", "infopro", "--model", "resnet18", "--blocks", "2",
                "--train-subset", "1000", "--batch-size", "32"],
    "predsim": ["--rule", "layerwise", *MLP, "--rule-opt", "loss=predsim"],
    "supcon": ["--rule", "layerwise", *MLP, "--rule-opt", "loss=supcon"],
    "nhsic": ["--rule", "layerwise", *MLP, "--rule-opt", "nhsic_lambda=0.1"],
    # Forward-forward learns slowly per step: small batches and Adam give it 750 steps.
    "forward_forward": ["--rule", "forward_forward", "--model", "ff_mlp", "--train-subset",
                        "3000", "--batch-size", "8", "--optimizer", "adamw", "--lr", "1e-3"],
}


@pytest.mark.parametrize("case", CASES)
def test_learns_on_the_cifar10_copy(case, tmp_path, cifar10_path, image_cache, capsys):
    from locallearn.cli import main

    status = main([*CASES[case], "--dataset", f"imagefolder:{cifar10_path}",
                   "--test-subset", "1000", "--epochs", "2", "--no-plane", "--no-progress",
                   "--output", str(tmp_path), "--cache-dir", str(image_cache)])
    assert status == 0, capsys.readouterr().err[-3000:]
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["status"] == "complete"
    subset = int(CASES[case][CASES[case].index("--train-subset") + 1])
    assert record["config"]["train_subset"] == subset and len(record["history"]) == 2
    assert record["test_acc"] > 0.14, record["block_acc"]
    if case == "forward_forward":
        gaps = record["history"][-1]["rule_metrics"]["goodness_gap"]
        assert all(gap > 0 for gap in gaps.values()), gaps  # every layer tells them apart
    if case == "infopro":
        assert len(record["parts"]) == 2
