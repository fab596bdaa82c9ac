"""SoftHebb (``--rule softhebb``): the update's formula, parity with the reference code, no
label in the Hebbian layers, learning towards the fixed point, exact resume, refusals."""

from __future__ import annotations

import dataclasses
import math

import pytest
import timm
import torch
from conftest import resumes_exactly
from torch import nn

from locallearn import create_rule, split
from locallearn.cli import main
from locallearn.data import load_dataset
from locallearn.errors import ConfigError
from locallearn.rules.softhebb import neuron_rate, softhebb_delta
from locallearn.trainer import TrainConfig, Trainer

SIDE = 8


@pytest.fixture(scope="module")
def data():
    """64 synthetic images cropped to 8x8."""
    d = load_dataset("synthetic")
    return dataclasses.replace(
        d, train_images=d.train_images[:64, :, :SIDE, :SIDE].contiguous(),
        train_labels=d.train_labels[:64],
        test_images=d.test_images[:32, :, :SIDE, :SIDE].contiguous(),
        test_labels=d.test_labels[:32])


def _trainer(data, model="softhebb_cnn", epochs=3, **options):
    torch.manual_seed(0)
    kwargs = {"softhebb_cnn": {"width": 0.05, "img_size": SIDE},
              "resnet32_cifar": {"widths": (4, 8, 8)}}.get(model, {})
    stack = split(timm.create_model(model, num_classes=10, **kwargs), "stage",
                  input_size=(3, SIDE, SIDE))
    cfg = TrainConfig(progress=False, batch_size=16, epochs=epochs, lr=1.0, momentum=0.0,
                      weight_decay=0.0, schedule="constant")
    return Trainer(stack, create_rule("softhebb", **options), data, cfg)


def test_the_update_is_its_formula_by_hand():
    # One 1x1 conv, two neurons w = (0.5, 2), one pixel x = 1: u = (0.5, 2); with
    # t_invert 1, y = softmax(u) = (1, e^1.5) / (1 + e^1.5), neuron 1 wins so y_0 is negated;
    # dw_i = y_i (x - u_i w_i) = (-y_0 * 0.75, y_1 * (1 - 4)), divided by max |dw|.
    conv = nn.Conv2d(1, 2, 1, bias=False)
    conv.weight.data = torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    y1 = math.exp(1.5) / (1 + math.exp(1.5))
    dw = torch.tensor([-(1 - y1) * 0.75, y1 * -3.0])
    got = softhebb_delta(conv, torch.ones(1, 1, 1, 1), 1.0).flatten()
    torch.testing.assert_close(got, dw / dw.abs().max())
    # the per-neuron rate: hebb_lr |‖w_i‖ - 1| ** 0.5
    rate = neuron_rate(conv.weight, 0.1, 0.5).flatten()
    torch.testing.assert_close(rate, torch.tensor([0.1 * math.sqrt(0.5), 0.1]))


# demo.py's SoftHebbConv2d(2, 3, 3, padding=1, t_invert=0.5) of NeuromorphicComputing/SoftHebb,
# commit f425230, weight = 0.5 * randn(3, 2, 3, 3), x = randn(2, 2, 4, 4) from one
# torch.Generator seeded 0, in training mode: its weight.grad (the normalised update),
# rounded to 6 decimals.
REFERENCE_DELTA = [
    0.484706, 0.353755, 0.00257, 0.175253, -0.207208, -0.280156, 0.183189, 0.8117, -0.092341,
    0.271127, -0.326874, -0.30039, 0.125981, -0.388989, -0.203966, -0.194716, 0.4593, 0.506149,
    0.121335, -0.265971, -0.350303, 1.0, 0.250204, -0.841875, -0.229052, 0.354478, 0.058894,
    0.21059, -0.516351, -0.572214, -0.419118, 0.405647, 0.252124, 0.508895, 0.680919, 0.343834,
    -0.220476, -0.018826, -0.033793, 0.008076, -0.128541, -0.020717, -0.027662, 0.103885,
    -0.103715, -0.084616, -0.16907, 0.049843, -0.002774, 0.075814, -0.056161, -0.008572,
    0.070678, -0.056449]


def test_the_update_equals_the_reference_codes():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=False)
    conv.weight.data = torch.randn(3, 2, 3, 3, generator=g) * 0.5
    x = torch.randn(2, 2, 4, 4, generator=g)
    got = softhebb_delta(conv, x, 0.5).flatten()
    torch.testing.assert_close(got, torch.tensor(REFERENCE_DELTA), atol=2e-6, rtol=0)


def _hebbian_weights(trainer):
    return [p.detach().clone() for part in trainer.parts for p in part.parameters()]


@pytest.mark.parametrize("model", ["softhebb_cnn", "resnet32_cifar", "resnet18_cifar"])
def test_a_step_is_the_rule_and_reads_no_label(data, model):
    trainer = _trainer(data, model)
    first = trainer.parts[0]
    conv = next(iter(first.convs.values()))
    x, step = trainer.make_step(data.train_images[:16], data.train_labels[:16],
                                trainer.eval_transform)
    # the first conv's input is the part's input through what precedes the conv
    seen = []
    hook = conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    first.eval()
    with torch.no_grad():
        first.run_blocks(x)
    hook.remove()
    first.train()
    rate = neuron_rate(conv.weight, first.settings[next(iter(first.convs))][1], 0.5)
    want = conv.weight.detach() + rate * softhebb_delta(conv, seen[0], first.settings[
        next(iter(first.convs))][0]) if model != "softhebb_cnn" else None
    shuffled = _trainer(data, model)
    trainer.train_step(x, step, trainer.schedule[0])
    labels = step.labels[torch.randperm(len(step.labels))]
    shuffled.train_step(x, dataclasses.replace(step, labels=labels), shuffled.schedule[0])
    for a, b in zip(_hebbian_weights(trainer), _hebbian_weights(shuffled), strict=True):
        assert torch.equal(a, b)  # no label reached a Hebbian layer
    head = trainer.stack.head
    assert all(not p.requires_grad for p in head.parameters())  # nothing trains the head
    assert not any(p is q for part in trainer.parts for p in part.parameters()
                   for q in head.parameters())
    if want is not None:  # resnet's conv runs in train mode, no BN before it: same input
        torch.testing.assert_close(conv.weight.detach(), want, rtol=1e-5, atol=1e-6)


def test_the_weights_go_to_the_fixed_point_and_resume_exactly(data, tmp_path):
    whole = _trainer(data)
    norms = [[(c.weight.detach().flatten(1).norm(dim=1) - 1).abs().mean().item()
              for c in part.convs.values()] for part in whole.parts]
    resumes_exactly(whole, lambda: _trainer(data), tmp_path)
    for part, before in zip(whole.parts, norms, strict=True):
        after = [(c.weight.detach().flatten(1).norm(dim=1) - 1).abs().mean().item()
                 for c in part.convs.values()]
        assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)
    metrics = [h["rule_metrics"]["norm_distance"]["stem"] for h in whole.history]
    assert metrics[2] < metrics[0]


def test_every_epoch_trains_every_block_and_nothing_predicts(data):
    trainer = _trainer(data, epochs=2)
    assert trainer.schedule == [[0, 1, 2], [0, 1, 2]]
    assert create_rule("softhebb").label_free  # its accuracy is the linear probe's
    x, step = trainer.make_step(data.test_images[:8], data.test_labels[:8],
                                trainer.eval_transform)
    with torch.no_grad():
        for part in trainer.parts:
            x, scored = part.eval()(x, step)
            assert scored.logits is None


def _refused(capsys, argv):
    status = main([*argv, "--check"])
    out = capsys.readouterr()
    assert status == 2 and out.out == "" and "Traceback" not in out.err, out
    (line,) = out.err.strip().splitlines()
    assert line.startswith("run.py: error: ")
    return line


def test_check_passes_and_refusals_are_one_line(capsys):
    base = ["--rule", "softhebb", "--dataset", "synthetic"]
    assert main([*base, "--model-opt", "width=0.1", "--check"]) == 0
    assert capsys.readouterr().out.startswith("arguments ok")
    vgg = split(timm.create_model("vgg11_cifar"), "stage")
    with pytest.raises(ConfigError, match="has a bias.*valid: bias-free nn.Conv2d"):
        create_rule("softhebb").parts(vgg, 10, torch.zeros(2, 3, 32, 32))
    line = _refused(capsys, [*base, "--model", "ff_mlp"])
    assert "is a Linear" in line or "has no nn.Conv2d" in line
    line = _refused(capsys, [*base, "--rule-opt", "hebb_lr=-1"])
    assert "hebb_lr, norm_power >= 0" in line
    line = _refused(capsys, [*base, "--probe", "none"])
    assert "learns without labels" in line
    with pytest.raises(ConfigError, match="width of softhebb_cnn"):
        timm.create_model("softhebb_cnn", width=0)
