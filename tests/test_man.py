"""MAN (``--rule-opt man=M`` of dgl and infopro) against the reference code.

The reference is JunhaoSu0/MAN at commit a6d20c55e6921fbe205f5f02f8ca4cd3a6133de2
(``Exp on CIFAR-SVHN-STL/networks/resnetInfoPro_MAN.py``, ``auxiliary_nets.py``,
``config.py``), run on CPU with its ``.cuda()`` calls removed, models built under
``torch.manual_seed(0)`` with the README's arguments (``--aux_net_config 2c2f``,
``--local_loss_mode cross_entropy``, ``--momentum 0.995``):

- ``tests/fixtures/man_ema.pt``: ``EMA_Net[0]`` of resnet32 K=16 (the average of
  layer1.1) before and after one training forward of the whole model, and layer1.1's
  parameters (the reference steps its optimizer after the forward returns).
- ``tests/fixtures/man_r32_K16_part0.pt`` / ``..._part4_stage_cross.pt``: the state of
  ``LB[i]``, ``EMA_Net[i]``, the decoder (and for part 0 the aux classifier) of parts 0
  (after layer1.0: the average of layer1.1) and 4 (after layer1.4: of layer2.0, which
  changes stage), and the losses of the reference's lines ``y = LB[i](x) + EMA_Net[i](x);
  loss = ixx_r * decoder(y, img) + ixy_r * aux_classifier(y, target)`` on the inputs
  the fixture names; REFERENCE_LOSSES copies them.
- REFERENCE_SIZES: trainable auxiliary parameters (LB + decoder + aux classifier) and
  EMA parameters summed over the parts the reference uses, at each split it ships.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import timm
import torch
from conftest import every_part_loss_fell, resumes_exactly
from timm.models.resnet import BasicBlock
from torch import nn

from locallearn import create_rule, split
from locallearn.blocks import BlockStack
from locallearn.errors import ConfigError
from locallearn.objectives import Objective, Term
from locallearn.pipeline import check_rule
from locallearn.rules.local import Momentum
from locallearn.step import Step
from locallearn.trainer import TrainConfig, Trainer

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"
MEAN = torch.tensor([x / 255.0 for x in [125.3, 123.0, 113.9]]).view(1, 3, 1, 1)
STD = torch.tensor([x / 255.0 for x in [63.0, 62.1, 66.7]]).view(1, 3, 1, 1)

# part: (ixx_r, ixy_r, BCE, CE, loss, |d loss / d x|), from the reference (see above).
REFERENCE_LOSSES = {
    0: (4.642857142857143, 0.4642857142857143, 1.1010607481002808, 2.2438344955444336,
        6.153847694396973, 0.04088301584124565),
    4: (4.2857142857142865, 0.4285714285714286, 0.9651822447776794, 2.3408305644989014,
        5.139708518981934, 0.0565924197435379),
}
FILES = {0: "man_r32_K16_part0.pt", 4: "man_r32_K16_part4_stage_cross.pt"}

# (arch, K): (split after, trainable aux parameters, EMA parameters) over the parts used.
R32_K16 = [f"layer{s}.{j}" for s in (1, 2, 3) for j in range(5)][:-1]
R110_K55 = [f"layer{s}.{j}" for s in (1, 2, 3) for j in range(18)][:-1]
REFERENCE_SIZES = {
    ("resnet32", 8): (["layer1.0", "layer1.2", "layer1.4", "layer2.1", "layer2.3", "layer3.0",
                       "layer3.2"], 640_755, 208_960),
    ("resnet32", 16): (R32_K16, 1_346_598, 461_120),
    ("resnet110", 55): (R110_K55, 4_968_697, 1_724_928),
}


def man_rule(name="infopro", **options):
    """The reference's composition: 2c2f heads, cross-entropy, both terms on every part."""
    if name == "infopro":
        options = {"aux_loss": "ce", "aux_depth": 2, "lambda_first": "5,0.5",
                   "lambda_last": "1,1", **options}
    return create_rule(name, man=0.995, **options)


def test_the_ema_update_is_the_momentum_average():
    torch.manual_seed(0)
    source = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    front = Momentum(source, 0.9)
    assert [n for n, _ in front.named_parameters()] == [
        "learned.0.weight", "learned.0.bias", "learned.1.weight", "learned.1.bias"]
    before = {k: v.clone() for k, v in front.ema.state_dict().items()}
    learned = {k: v.clone() for k, v in front.learned.state_dict().items()}
    with torch.no_grad():
        source[1].weight.fill_(3.0)
        source[1].running_mean.fill_(7.0)
    front.after_backward()
    after = front.ema.state_dict()
    for name, p in source.named_parameters():
        torch.testing.assert_close(after[name], before[name] * 0.9 + p * 0.1, rtol=0, atol=0)
    assert not torch.equal(after["0.weight"], before["0.weight"])
    assert torch.equal(after["1.running_mean"], before["1.running_mean"])  # buffers: its own
    assert all(torch.equal(v, learned[k]) for k, v in front.learned.state_dict().items())


def test_the_ema_update_matches_the_reference():
    ref = torch.load(FIXTURES / "man_ema.pt")
    assert ref["commit"] == "a6d20c55e6921fbe205f5f02f8ca4cd3a6133de2"
    source = BasicBlock(16, 16)
    source.load_state_dict(ref["source"], strict=False)
    front = Momentum(source, ref["momentum"])
    front.ema.load_state_dict(ref["ema_before"], strict=False)
    front.after_backward()
    for name, value in ref["ema_after"].items():
        torch.testing.assert_close(front.ema.state_dict()[name], value, rtol=0, atol=1e-7)
    assert not torch.equal(ref["ema_after"]["conv1.weight"], ref["ema_before"]["conv1.weight"])


def _reference_inputs(channels: int, side: int):
    torch.manual_seed(0)
    x = torch.randn(4, channels, side, side)
    img = (torch.rand(4, 3, 32, 32) - MEAN) / STD
    target = torch.randint(0, 10, (4,))
    return x, img, target


# The reference's module names -> ours (LB and EMA_Net are timm's BasicBlock names already).
KEY_MAP = {"decoder.": "net.", "head.0.": "convs.0.", "head.1.": "convs.1.",
           "head.3.": "convs.3.", "head.4.": "convs.4.", "head.8.": "fc.fc.0.",
           "head.10.": "fc.fc.2."}


def _mapped(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for a, b in KEY_MAP.items():
            if key.startswith(a):
                key = b + key[len(a):]
        out[key] = value
    return out


@pytest.mark.parametrize("part", sorted(REFERENCE_LOSSES))
def test_one_loss_equals_the_reference(part):
    ref = torch.load(FIXTURES / FILES[part])
    assert ref["commit"] == "a6d20c55e6921fbe205f5f02f8ca4cd3a6133de2"
    ixx, ixy, bce, ce, total, grad = REFERENCE_LOSSES[part]
    assert (ref["ixx_r"], ref["ixy_r"], float(ref["loss"])) == (ixx, ixy, total)
    torch.manual_seed(0)
    stack = split(timm.create_model("resnet32_cifar", num_classes=10), split_after=R32_K16)
    parts = man_rule().parts(stack, 10, torch.zeros(2, 3, 32, 32))
    assert len(parts) == 15  # MAN's K = 16 merges the stem into part 0
    objective = parts[part].objective
    states = ref["state_dicts"]
    objective.front.learned.load_state_dict(states["LB"])
    objective.front.ema.load_state_dict(states["EMA"])
    objective.heads["decoder"].load_state_dict(_mapped(states["decoder"]))
    if "aux_classifier" in states:  # part 0: the whole loss
        objective.heads["aux"].load_state_dict(_mapped(states["aux_classifier"]))
        objective.terms = [dataclasses.replace(t, weight=w)
                           for t, w in zip(objective.terms, (ixx, ixy), strict=True)]
        want = total
    else:  # part 4 (its classifier is not stored): the reconstruction term
        objective = Objective({"decoder": objective.heads["decoder"]},
                              [Term("reconstruction", ixx, "decoder")], front=objective.front)
        want = ixx * bce
    x, img, target = _reference_inputs(*stack_shape(part))
    assert torch.equal(x.flatten()[:4], ref["x_head"])  # the same inputs as the reference's
    x.requires_grad_(True)
    step = Step(target, img, True, 1, 10, MEAN, STD)
    objective.train()
    loss = objective(x, step, img).loss
    torch.testing.assert_close(loss.item(), want, rtol=1e-6, atol=0)
    loss.backward()
    if part == 0:
        torch.testing.assert_close(x.grad.norm().item(), grad, rtol=1e-5, atol=0)


def stack_shape(part: int) -> tuple[int, int]:
    """Channels and side of the output of part ``part`` of resnet32 K=16."""
    return (16, 32) if part < 5 else (32, 16) if part < 10 else (64, 8)


@pytest.mark.parametrize("arch, k", sorted(REFERENCE_SIZES))
def test_auxiliary_sizes_equal_the_reference(arch, k):
    after, trainable, ema = REFERENCE_SIZES[(arch, k)]
    stack = split(timm.create_model(f"{arch}_cifar", num_classes=10), split_after=after,
                  verify=False)
    parts = man_rule().parts(stack, 10, torch.zeros(2, 3, 32, 32))
    local = [p.objective for p in parts if p.objective.front is not None]
    assert len(local) == len(parts) - 1  # the last part has no MAN
    assert sum(p.numel() for o in local for p in o.parameters()) == trainable
    learned = [dict(o.front.learned.named_parameters()) for o in local]
    assert sum(b.numel() for o, names in zip(local, learned, strict=True)
               for n, b in o.front.ema.named_buffers() if n in names) == ema


def _stack(blocks=3):
    torch.manual_seed(0)
    net = timm.create_model("resnet32_cifar", num_classes=10, widths=(8, 16, 16))
    return split(net, "block", blocks, input_size=(3, 8, 8))


@pytest.fixture(scope="module")
def data(tiny_data):
    return tiny_data


def _trainer(data, stack, rule):
    torch.manual_seed(0)
    cfg = TrainConfig(progress=False, batch_size=16, epochs=3, lr=0.05)
    return Trainer(copy.deepcopy(stack), rule, data, cfg)


@pytest.mark.parametrize("rule", ["dgl", "infopro"])
def test_the_option_learns_and_resumes_exactly(data, tmp_path, rule):
    stack = _stack()
    options = {"man": 0.5} if rule == "dgl" else {"man": 0.5, "aux_loss": "ce"}
    whole = _trainer(data, stack, create_rule(rule, **options))
    front = whole.parts[0].objective.front
    source = dict(whole.parts[1].blocks[0][0].named_parameters())
    gap = {n: (b - source[n]).norm().item() for n, b in front.ema.named_buffers() if n in source}
    learned = [p.detach().clone() for p in front.learned.parameters()]
    resumes_exactly(whole, lambda: _trainer(data, stack, create_rule(rule, **options)), tmp_path)
    # The average closed on the weights it follows; the learned block trained.
    for n, b in front.ema.named_buffers():
        if n in source and gap[n] > 0:
            assert (b - source[n]).norm().item() < 0.5 * gap[n], n
    assert not any(torch.equal(a, b) for a, b in zip(learned, front.learned.parameters(),
                                                      strict=True))
    every_part_loss_fell(whole)


def test_the_update_reads_the_next_part_before_its_step(data):
    # As the reference: the average takes in part k + 1's weights of the previous step
    # (its optimizer steps after the whole forward, after every update).
    trainer = _trainer(data, _stack(), create_rule("dgl", man=0.5))
    front = trainer.parts[0].objective.front
    source = trainer.parts[1].blocks[0][0]
    ema = dict(front.ema.named_buffers())
    want = {n: ema[n] * 0.5 + p.detach() * (1 - 0.5) for n, p in source.named_parameters()}
    stepped = {n: p.detach().clone() for n, p in source.named_parameters()}
    x, step = trainer.make_step(data.train_images[:16], data.train_labels[:16],
                                trainer.train_transform, torch.Generator().manual_seed(0))
    trainer.train_step(x, step, trainer.schedule[0])
    assert not torch.equal(stepped["conv1.weight"], source.conv1.weight)  # part 1 stepped
    for name, value in want.items():
        assert torch.equal(ema[name], value), name


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_out_of_range_momentum_is_refused(value):
    for rule in ("dgl", "infopro"):
        with pytest.raises(ConfigError, match=r"option 'man' .* in \(0, 1\]") as e:
            create_rule(rule, man=value)
        assert "\n" not in str(e.value)


def test_a_rule_without_man_refuses_it():
    with pytest.raises(ConfigError, match="man"):
        create_rule("layerwise", man="0.9")


def test_a_single_part_or_a_block_without_weights_is_refused():
    with pytest.raises(ConfigError, match="single part"):
        create_rule("dgl", man=0.9).parts(_stack(1), 10, torch.zeros(2, 3, 8, 8))
    stack = BlockStack([nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(nn.MaxPool2d(1)),
                        nn.Conv2d(4, 4, 3, padding=1)], nn.Flatten(), ["a", "b", "c"])
    with pytest.raises(ConfigError, match="block 'a'.* MaxPool2d has none"):
        create_rule("dgl", man=0.9).parts(stack, 10, torch.zeros(2, 3, 8, 8))


def test_the_pipelined_executor_refuses_man():
    check_rule(create_rule("dgl"), epochs=1, stages=2)
    with pytest.raises(ConfigError, match="man.*next stage"):
        check_rule(create_rule("dgl", man=0.9), epochs=1, stages=2)


def test_check_refuses_bad_values_in_one_line(capsys):
    from test_check import SMALL, refused

    line = refused(capsys, [*SMALL, "--rule", "dgl", "--rule-opt", "man=2"])
    assert "option 'man' of rule 'dgl'" in line
    line = refused(capsys, [*SMALL, "--rule", "sequential", "--rule-opt", "man=0.9"])
    assert "man" in line
