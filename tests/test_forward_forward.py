"""forward_forward: wrong negatives, the label code, prediction by summed goodness, the record."""

import json

import pytest
import timm
import torch

from locallearn import cli, create_rule, split
from locallearn.bench import random_data
from locallearn.errors import ConfigError
from locallearn.losses import goodness
from locallearn.models import rms_normalize
from locallearn.rules.forward_forward import embed_labels, wrong_labels
from locallearn.trainer import TrainConfig, Trainer


def _trainer(data, **cfg):
    torch.manual_seed(0)
    net = timm.create_model("ff_mlp", num_classes=10, img_size=8, widths=(64, 64, 64))
    stack = split(net, "stage", input_size=(3, 8, 8))
    config = TrainConfig(progress=False, batch_size=32, optimizer="adamw", lr=0.01,
                         weight_decay=0.0, **cfg)
    return Trainer(stack, create_rule("forward_forward"), data, config)


def test_negative_labels_are_never_the_true_label():
    y = torch.arange(10).repeat(1000)
    neg = wrong_labels(y, 10, torch.Generator().manual_seed(0))
    assert not (neg == y).any()
    assert set(neg.tolist()) == set(range(10))


def test_embedding_writes_a_one_hot_over_the_first_pixels():
    x = torch.randn(2, 3, 4, 4)
    out = embed_labels(x, torch.tensor([3, 0]), 10)
    assert out.flatten(1)[0, :10].tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert torch.equal(out.flatten(1)[:, 10:], x.flatten(1)[:, 10:])


def test_prediction_is_the_accumulated_goodness_over_layers_after_the_first():
    data = random_data(16, 8)
    trainer = _trainer(data)
    for part in trainer.parts:
        part.eval()
    x, y = data.test_images, data.test_labels
    inputs, step = trainer.make_step(x, y, trainer.eval_transform, None, train=False)
    h, logits = inputs, []
    with torch.no_grad():
        for part in trainer.parts:
            h, scored = part(h, step)
            logits.append(scored.logits)
    logits = trainer.rule.predictions(logits)
    with torch.no_grad():
        layers = [trainer.stack.blocks[k] for k in range(len(trainer.stack.blocks))]
        a = inputs
        direct = []
        for block in layers:
            a = block(a)
            direct.append(goodness(a, "mean").view(-1, 10))
    assert torch.allclose(logits[-1], direct[2] + direct[3])
    assert torch.allclose(logits[0], direct[1])


def test_record_has_per_layer_goodness_gap_and_accuracy():
    trainer = _trainer(random_data(32, 8))
    result = trainer.fit()
    entry = result["history"][-1]
    assert set(entry["rule_metrics"]["goodness_gap"]) == {"layers.0", "layers.1", "layers.2"}
    assert [a is not None for a in result["block_acc"]] == [False, True, True, True]
    assert entry["train_acc"] is None  # its training steps give no logits


@pytest.mark.parametrize("rule", ["forward_forward", "e2e"])
def test_the_record_has_no_train_accuracy_where_training_gives_no_logits(rule, tmp_path):
    # Forward-forward's training batches (positives and negatives) give no logits: its
    # records once said train_acc 0.0. The same backbone under e2e has a train accuracy.
    argv = ["--rule", rule, "--model", "ff_mlp", "--model-opt", "img_size=16",
            "--dataset", "synthetic", "--train-subset", "64", "--test-subset", "32",
            "--batch-size", "32", "--epochs", "1", "--no-plane", "--no-progress",
            "--output", str(tmp_path)]
    assert cli.main(argv) == 0
    (path,) = tmp_path.glob("*.json")
    (entry,) = json.loads(path.read_text())["history"]
    if rule == "forward_forward":
        assert entry["train_acc"] is None
    else:
        assert isinstance(entry["train_acc"], float) and 0.0 <= entry["train_acc"] <= 1.0


def test_convolutional_backbones_are_refused():
    data = random_data(8, 32)
    stack = split(timm.create_model("resnet18_cifar", num_classes=10), "stage", 2)
    refusal = r"fully connected backbones.*'stem\+layer1\.0\+layer1\.1' outputs a 4-D"
    with pytest.raises(ConfigError, match=refusal):
        Trainer(stack, create_rule("forward_forward"), data, TrainConfig(progress=False))


def test_layers_see_only_the_direction_of_the_previous_layer():
    layer = timm.create_model("ff_mlp", num_classes=0, img_size=8, widths=(16,)).layers[0]
    x = torch.randn(4, 192)
    assert torch.allclose(layer(x), layer(7.5 * x), atol=1e-6)
    assert torch.allclose(rms_normalize(x).pow(2).mean(1), torch.ones(4))


def test_sequential_variant_trains_one_layer_per_phase():
    torch.manual_seed(0)
    net = timm.create_model("ff_mlp", num_classes=10, img_size=8, widths=(32, 32))
    stack = split(net, "stage", input_size=(3, 8, 8))
    rule = create_rule("forward_forward", sequential=True, epochs_per_part=(1, 2))
    before = [p.detach().clone() for p in net.layers[0].parameters()]
    config = TrainConfig(progress=False, batch_size=16, epochs=3, optimizer="adamw", lr=0.01)
    result = Trainer(stack, rule, random_data(32, 8), config).fit()
    trained = [entry["trained_parts"] for entry in result["history"]]
    assert trained == [["layers.0"], ["layers.1"], ["layers.1"]]
    gaps = result["history"][-1]["rule_metrics"]["goodness_gap"]
    assert gaps["layers.0"] is None and gaps["layers.1"] is not None
    after = net.layers[0].parameters()
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # phase 0


def test_sequential_variant_needs_an_epoch_per_layer():
    rule = create_rule("forward_forward", sequential=True)
    with pytest.raises(ConfigError, match="needs --epochs >= 3"):
        rule.trained_parts(0, 2, 3)


def test_loss_goes_down_on_a_fixed_batch_with_summed_goodness():
    # The default (mean) goodness learns in test_rules.py; the summed one is shown here.
    torch.manual_seed(0)
    data = random_data(32, 8)
    net = timm.create_model("ff_mlp", num_classes=10, img_size=8, widths=(64, 64, 64))
    rule = create_rule("forward_forward", goodness="sum")
    trainer = Trainer(split(net, "stage", input_size=(3, 8, 8)), rule, data,
                      TrainConfig(progress=False, batch_size=32, optimizer="adamw", lr=0.01))
    totals = []
    for _ in range(8):
        inputs, step = trainer.make_step(data.train_images, data.train_labels,
                                         trainer.eval_transform, torch.Generator().manual_seed(1))
        losses, _, _ = trainer.train_step(inputs, step, [0, 1, 2])
        totals.append(sum(float(v) for v in losses.values()))
    assert totals[-1] < totals[0], totals
