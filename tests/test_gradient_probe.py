"""The gradient probe observer: it records the rule's measurement after every epoch and
leaves training exactly as it was (buffers, random state, gradients)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from locallearn import split
from locallearn.analysis.gradients import GradientProbe
from locallearn.rules.e2e import EndToEnd
from locallearn.trainer import TrainConfig, Trainer


class Probed(EndToEnd):
    """e2e whose probe runs a training-mode forward (moving BatchNorm statistics), draws
    random numbers from the global generator and its own, and reports the gradient norm."""

    name = "probed"

    def gradient_probe(self, parts, x, step, generator):
        torch.randn(3)  # the global random state: restored by the probe
        h, scored = parts[0](x, step)
        grads = torch.autograd.grad(scored.loss, list(parts[0].parameters()))
        norm = torch.cat([g.flatten() for g in grads]).norm().item()
        return {"grad_norm": {"e2e": norm},
                "draw": {"e2e": torch.rand(1, generator=generator).item()}}


@pytest.fixture(scope="module")
def data(tiny_data):
    return tiny_data


def _fit(data, rule, observers=()):
    torch.manual_seed(0)
    net = timm.create_model("resnet32_cifar", num_classes=10, widths=(4, 8, 8))
    stack = split(net, "block", 3, input_size=(3, 8, 8))
    cfg = TrainConfig(progress=False, batch_size=16, epochs=2, lr=0.05)
    trainer = Trainer(copy.deepcopy(stack), rule, data, cfg, observers=observers)
    trainer.fit()
    return trainer


def test_the_probe_records_every_epoch_and_changes_nothing(data):
    plain = _fit(data, Probed())
    probed = _fit(data, Probed(), (GradientProbe(size=20),))
    for entry in probed.history:
        assert entry["gradient_probe"]["grad_norm"]["e2e"] > 0
    draws = [e["gradient_probe"]["draw"]["e2e"] for e in probed.history]
    assert draws[0] != draws[1]  # one generator per epoch
    for a, b in zip(plain.stack.state_dict().values(), probed.stack.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)  # weights, and BatchNorm statistics, as without the probe
    assert all(p.grad is None for p in probed.stack.parameters())
    assert [e["test_acc"] for e in plain.history] == [e["test_acc"] for e in probed.history]
    assert "gradient_probe" not in plain.history[0]
