"""Every rule trains under bf16 mixed precision: one CPU step per case, finite, learning.

Each case builds a tiny Trainer on an ``Accelerator(cpu=True,
mixed_precision="bf16")``, so its steps run under the trainer's own autocast,
and trains until every part has taken a step (one step for most rules; one per
phase for a rule that trains parts in turn). The rules come from the registry,
so a new rule is covered without editing this file; the main loss and head
variants are added by hand.

CPU autocast accepts ``binary_cross_entropy``, which CUDA autocast refuses
(``torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to
autocast``: the one op on its refused list). The fixture below refuses it the
same way under any autocast, so these CPU steps fail where a GPU's would.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from locallearn import create_rule, list_rules, split
from locallearn.data import load_dataset
from locallearn.trainer import TrainConfig, Trainer

BATCH, SIDE = 8, 8  # bf16 convolutions on CPU are slow: few, small images, narrow models

# Rules made for one kind of backbone; others train a narrow resnet32_cifar.
MODEL_OF = {"forward_forward": ("ff_mlp", {"img_size": SIDE, "widths": (16, 16, 16)})}
OTHERS = ("resnet32_cifar", {"widths": (8, 16, 16)})

# name: (rule, rule options): the main loss and head variants.
VARIANTS: dict[str, tuple[str, dict]] = {
    "layerwise-ce": ("layerwise", {"loss": "ce"}),
    "layerwise-predsim": ("layerwise", {"loss": "predsim"}),
    "layerwise-supcon": ("layerwise", {"loss": "supcon"}),
    "layerwise-nhsic": ("layerwise", {"nhsic_lambda": 0.1}),
    "layerwise-nhsic-block": ("layerwise", {"nhsic_lambda": 0.1,
                                            "nhsic_target": "block_input"}),
    "layerwise-conv": ("layerwise", {"head": "conv"}),
    "layerwise-mlp": ("layerwise", {"head": "mlp"}),
    "dgl-cnn": ("dgl", {"aux": "cnn"}),
    "dgl-mlp_sr": ("dgl", {"aux": "mlp_sr"}),
    "dgl-linear": ("dgl", {"aux": "linear"}),
    "dgl-man": ("dgl", {"man": 0.995}),
    "infopro-man": ("infopro", {"man": 0.995, "aux_loss": "ce"}),
    "infopro-ce": ("infopro", {"aux_loss": "ce"}),
    "infopro-contrast": ("infopro", {"aux_loss": "contrast"}),
    "infopro-kept-heads": ("infopro", {"recompute_heads": False}),
}


def _is_default(rule: str, options: dict) -> bool:
    return create_rule(rule, **options).config == create_rule(rule).config


# Every registered rule with its defaults, and each variant that is not a rule's default.
CASES = {rule: (rule, {}) for rule in list_rules()}
CASES.update({name: case for name, case in VARIANTS.items() if not _is_default(*case)})


@pytest.fixture(scope="module")
def bf16():
    """A CPU accelerator in bf16; Accelerate's shared state is reset around this module.

    Accelerate keeps one process-wide state and refuses a second mixed-precision
    setting in the same process, so the state is cleared first (others made it
    with ``"no"``) and again after (later modules make theirs afresh).
    """
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield Accelerator(cpu=True, mixed_precision="bf16")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def refuse_bce_under_autocast(monkeypatch):
    """Refuse ``binary_cross_entropy`` under autocast on any device, as CUDA autocast does."""
    bce = F.binary_cross_entropy

    def refused(input, *args, **kwargs):
        if torch.is_autocast_enabled(input.device.type):
            raise RuntimeError("torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss "
                               "are unsafe to autocast (refused here as CUDA autocast does)")
        return bce(input, *args, **kwargs)

    monkeypatch.setattr(F, "binary_cross_entropy", refused)


@pytest.fixture(scope="module")
def tiny():
    """One batch of the synthetic set, cropped to SIDE x SIDE."""
    data = load_dataset("synthetic")
    return dataclasses.replace(
        data, train_images=data.train_images[:BATCH, :, :SIDE, :SIDE].contiguous(),
        train_labels=data.train_labels[:BATCH],
        test_images=data.test_images[:BATCH, :, :SIDE, :SIDE].contiguous(),
        test_labels=data.test_labels[:BATCH])


def test_autocast_refusal_is_emulated():
    x = torch.rand(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="unsafe"):
        F.binary_cross_entropy(x, x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_step_under_bf16_is_finite_and_learns(name, bf16, tiny):
    rule, options = CASES[name]
    model, kwargs = MODEL_OF.get(rule, OTHERS)
    torch.manual_seed(0)
    net = timm.create_model(model, num_classes=tiny.num_classes, **kwargs)
    stack = split(net, "stage", 2, input_size=tiny.image_size)
    epochs = 3  # enough phases for a rule that trains its two blocks' parts in turn
    cfg = TrainConfig(epochs=epochs, batch_size=BATCH, lr=0.05, progress=False)
    trainer = Trainer(stack, create_rule(rule, **options), tiny, cfg, accelerator=bf16)
    assert trainer.accelerator.mixed_precision == "bf16"
    before = [[p.detach().clone() for p in part.parameters()] for part in trainer.parts]

    dtypes = set()
    hooks = [block.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
             for block in stack.blocks]
    trained: set[int] = set()
    try:
        for epoch in range(epochs):  # one step per epoch: the data is one batch
            entry = trainer._train_epoch(epoch)
            assert math.isfinite(entry["train_loss"]), (name, entry)
            assert all(math.isfinite(v) for v in entry["part_loss"].values()), (name, entry)
            trained |= set(trainer.schedule[epoch])
            if len(trained) == len(trainer.parts):
                break
    finally:
        for hook in hooks:
            hook.remove()

    assert trained == set(range(len(trainer.parts))), f"{name}: parts never trained"
    assert torch.bfloat16 in dtypes, f"{name}: no block ran in bf16 ({dtypes})"
    for part, old in zip(trainer.parts, before, strict=True):
        new = list(part.parameters())
        assert any(not torch.equal(a, b.detach()) for a, b in zip(old, new, strict=True)), (
            f"{name}: part {part.part_name!r} did not change")
