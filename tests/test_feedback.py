"""Feedback alignment (``fa``) and direct feedback alignment (``dfa``) against the formulas and
the reference code.

The reference is BioTorch, github jsalbert/biotorch at commit
74fad0dd32529e754e4bba8298d4e0fd0a06a886, run on CPU (its files imported directly): its FA
``LinearGrad`` and ``Conv2dGrad`` (``biotorch/autograd/fa``) on the tensors of :func:`wave`
below, given the output gradient ``dy``; and ``BioModule(net, mode="dfa", output_dim=3)``
on ``Linear(3,4) Tanh Linear(4,4) Tanh Linear(4,3)`` (layer i: weight ``wave(.., 0.9+i,
0.3i)``, bias ``wave(.., 1.9+i, 0.7i)``, weight_backward ``wave(.., 0.6+i, 1+i)``), input
``wave((2,3), 1.1, 0.2)``, targets ``[0, 2]``, ``CrossEntropyLoss``, ``loss.backward()``.
The numbers below are its printed gradients (7 decimals).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from locallearn import create_rule, split
from locallearn.blocks import BlockStack
from locallearn.checkpoint import load, save
from locallearn.errors import ConfigError
from locallearn.models import CifarResNet
from locallearn.pipeline import check_rule
from locallearn.rules.feedback import FAConv2d, FALinear, feedback_layers
from locallearn.step import Step
from locallearn.trainer import TrainConfig, Trainer

LIN_DX = [0.2906784, -0.1350424, -0.458566, 0.247323, 0.5752115, 0.4677914]
LIN_DW = [0.5849865, 0.4409558, 0.0895366, 0.2716344, 0.6191646, 0.6754919, -0.1082233,
          0.6457803, 1.0960634, -0.4615841, 0.5142865, 1.2482802]
LIN_DB = [1.0648816, 1.0225762, 0.7299086, 0.258534]
CONV_DX = [0.5426459, 0.8445375, 0.1467857, -0.0699068, -0.3381127, 0.5817543, -0.0853418,
           -0.4879299, -1.9731684, -1.2616426, -0.6179165, -1.2426143, -0.5229005, -0.7895287,
           -0.1107, -1.2700596, -1.7390211, -0.5080757, 0.2409225, 0.5621002, 0.3686496,
           0.9880544, 0.6243812, 1.2342939, 0.5013717]
CONV_DW = [-0.8704848, 0.6097979, 0.6330593, 3.373003, 3.8178897, 1.4155543, 1.8090345,
           1.3077207, 0.7681348, -1.9009531, -1.6939486, -1.0659399, 3.0858154, 4.448204,
           3.5018349, 1.6451235, 2.6451211, 1.8766789]
CONV_DB = [0.6952925, 1.1363515]
DFA_LOSS = 1.2637145519256592
DFA_GRADS = {  # layer: (weight gradient, bias gradient); layer 2 is the head
    0: ([-0.0049577, -0.0146457, -0.0083287, -0.005577, -0.0205076, -0.0130274, 0.0129139,
         0.039566, 0.02298, 0.0132588, 0.0417852, 0.0246484],
        [0.0117826, -0.0025071, -0.0251531, -0.0212808]),
    1: ([-0.0504072, 0.0423983, -0.0262557, -0.0308182, 0.1248418, -0.0704277, 0.0314007,
         0.0359983, -0.1588583, 0.0800766, -0.0306785, -0.0346796, 0.3866094, -0.3749477,
         0.2497673, 0.2944058],
        [0.0303159, 0.0016268, -0.0232358, -0.342912]),
    2: ([0.3420658, -0.4234689, -0.4052746, 0.2142838, 0.0534888, -0.024832, -0.0294755,
         -0.0022783, -0.3955546, 0.4483008, 0.4347501, -0.2120055],
        [0.3458168, 0.059746, -0.4055628]),
}


def wave(shape, a, b):
    """Deterministic test values: sin(a * i + b) over the flat index i (as the reference run)."""
    n = math.prod(shape)
    return torch.sin(torch.arange(n, dtype=torch.float64) * a + b).view(shape).float()


def close(t, values, tol=2e-6):
    return torch.allclose(t.flatten(), torch.tensor(values), atol=tol, rtol=0)


def _fa(module):
    """``module`` turned into its FA layer, as the rule does it."""
    stack = BlockStack([module], nn.Identity(), ["m"])
    return feedback_layers(stack)["m"]


def test_fa_linear_sends_the_error_through_the_feedback_matrix():
    m = _fa(nn.Linear(3, 4))
    assert type(m) is FALinear and set(m.state_dict()) == {"weight", "bias", "feedback"}
    with torch.no_grad():
        m.weight.copy_(wave((4, 3), 1.3, 0.2))
        m.bias.copy_(wave((4,), 2.1, 0.3))
        m.feedback.copy_(wave((4, 3), 0.9, 1.1))
    x = wave((2, 3), 0.7, 0.1).requires_grad_()
    dy = wave((2, 4), 0.5, 0.4)
    y = m(x)
    assert torch.allclose(y, F.linear(x, m.weight, m.bias))
    y.backward(dy)
    assert torch.allclose(x.grad, dy @ m.feedback, atol=1e-6)  # dx = dy B, not dy W
    assert not torch.allclose(x.grad, dy @ m.weight, atol=1e-3)
    assert torch.allclose(m.weight.grad, dy.t() @ x.detach(), atol=1e-6)  # exact dW
    assert close(x.grad, LIN_DX) and close(m.weight.grad, LIN_DW) and close(m.bias.grad, LIN_DB)


def test_fa_conv_sends_the_error_through_a_transposed_convolution_with_the_feedback():
    m = _fa(nn.Conv2d(1, 2, 3, stride=2, padding=1))
    assert type(m) is FAConv2d
    with torch.no_grad():
        m.weight.copy_(wave((2, 1, 3, 3), 1.7, 0.0))
        m.bias.copy_(wave((2,), 1.0, 0.0))
        m.feedback.copy_(wave((2, 1, 3, 3), 0.4, 2.0))
    x = wave((1, 1, 5, 5), 0.3, 0.5).requires_grad_()
    dy = wave((1, 2, 3, 3), 0.8, 0.6)
    m(x).backward(dy)
    want_dx = F.conv_transpose2d(dy, m.feedback, stride=2, padding=1)
    w = m.weight.detach().clone().requires_grad_()
    F.conv2d(x.detach(), w, m.bias.detach(), stride=2, padding=1).backward(dy)
    assert torch.allclose(x.grad, want_dx, atol=1e-5)
    assert torch.allclose(m.weight.grad, w.grad, atol=1e-5)  # the exact weight gradient
    assert close(x.grad, CONV_DX, 1e-5) and close(m.weight.grad, CONV_DW, 1e-5)
    assert close(m.bias.grad, CONV_DB, 1e-5)


@pytest.mark.parametrize("options", [{"padding": "same"}, {"padding": 1, "padding_mode": "reflect"},
                                     {"padding": "valid", "groups": 2}])
def test_fa_conv_computes_what_the_conv_computed(options):
    torch.manual_seed(0)
    plain = nn.Conv2d(2, 4, 3, **options)
    m, x = _fa(copy.deepcopy(plain)), torch.randn(2, 2, 6, 6)
    assert torch.allclose(m(x), plain(x), atol=1e-6)


def _tiny_stack(blocks=2):
    widths = [3, 4, 4][: blocks + 1]
    pairs = zip(widths[:-1], widths[1:], strict=True)
    layers = [nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in pairs]
    return BlockStack(layers, nn.Linear(widths[-1], 3), [f"b{i}" for i in range(blocks)])


def _dfa_reference_part():
    stack = _tiny_stack()
    x = wave((2, 3), 1.1, 0.2)
    part = create_rule("dfa").parts(stack, 3, x)[0]
    linears = [stack.blocks[0][0], stack.blocks[1][0], stack.head]
    with torch.no_grad():
        for i, m in enumerate(linears):
            m.weight.copy_(wave(tuple(m.weight.shape), 0.9 + i, 0.3 * i))
            m.bias.copy_(wave(tuple(m.bias.shape), 1.9 + i, 0.7 * i))
        # B_k feeds block k's output, which the reference's layer k + 1 reads
        for k in range(2):
            part.feedback(k).copy_(wave((3, 4), 1.6 + k, 2.0 + k))
    return part, linears, x, Step(torch.tensor([0, 2]), x, True, 1, 3)


def test_dfa_gradients_are_the_formula_and_the_reference():
    part, linears, x, step = _dfa_reference_part()
    h, scored = part(x, step)
    scored.loss.backward()
    assert scored.loss.item() == pytest.approx(DFA_LOSS, abs=1e-6)
    # By hand: e = (softmax - onehot) / N; block k: delta_k = (e B_k) * tanh'(a_k).
    h0 = torch.tanh(F.linear(x, linears[0].weight, linears[0].bias)).detach()
    h1 = torch.tanh(F.linear(h0, linears[1].weight, linears[1].bias)).detach()
    logits = F.linear(h1, linears[2].weight, linears[2].bias).detach()
    e = (logits.softmax(1) - F.one_hot(step.labels, 3)) / 2
    for k, (inp, out) in enumerate([(x, h0), (h0, h1)]):
        delta = (e @ part.feedback(k)) * (1 - out**2)
        assert torch.allclose(linears[k].weight.grad, delta.t() @ inp, atol=1e-6), k
        assert torch.allclose(linears[k].bias.grad, delta.sum(0), atol=1e-6), k
    assert torch.allclose(linears[2].weight.grad, e.t() @ h1, atol=1e-6)  # the head: exact
    for i, (w, b) in DFA_GRADS.items():
        assert close(linears[i].weight.grad, w) and close(linears[i].bias.grad, b), i


def test_dfa_evaluates_with_a_plain_forward():
    part, linears, x, step = _dfa_reference_part()
    with torch.no_grad():
        h, scored = part(x, dataclasses.replace(step, train=False))
    assert torch.allclose(scored.logits, part.objective.heads["head"](part.run_blocks(x)))


def test_the_fa_probe_angle_is_zero_at_the_head_and_where_feedback_is_the_weight():
    torch.manual_seed(0)
    stack, rule = _tiny_stack(), create_rule("fa")
    part = rule.parts(stack, 3, torch.zeros(1, 3))[0]
    x = torch.randn(8, 3)
    step = Step(torch.arange(8) % 3, x, True, 1, 3)
    probe = rule.gradient_probe([part], x, step, torch.Generator())
    angles = probe["angle"]
    assert set(angles) == set(probe["weight_angle"]) == {"b0.0", "b1.0", "head"}
    assert all(a > 1 for a in probe["weight_angle"].values())
    assert angles["head"] < 1e-3 and angles["b0.0"] > 1 and angles["b1.0"] > 1
    for m in part.modules():
        if isinstance(m, FALinear):
            m.feedback.copy_(m.weight.detach())
    probe = rule.gradient_probe([part], x, step, torch.Generator())
    assert all(a < 1e-3 for a in probe["angle"].values()), probe
    assert all(a < 1e-3 for a in probe["weight_angle"].values()), probe
    assert all(p.grad is None for p in part.parameters())


def test_the_dfa_probe_angle_is_zero_where_feedback_is_the_head_weight():
    torch.manual_seed(0)
    stack, rule = _tiny_stack(1), create_rule("dfa")
    part = rule.parts(stack, 3, torch.zeros(1, 3))[0]
    x = torch.randn(8, 3)
    step = Step(torch.arange(8) % 3, x, True, 1, 3)
    assert rule.gradient_probe([part], x, step, torch.Generator())["angle"]["b0"] > 1
    part.feedback(0).copy_(stack.head.weight.detach())  # e B = e W: backprop's signal
    assert rule.gradient_probe([part], x, step, torch.Generator())["angle"]["b0"] < 1e-3


@pytest.fixture(scope="module")
def data(tiny_data):
    return tiny_data


def _stack(model):
    torch.manual_seed(0)
    if model == "ff_mlp":
        net = timm.create_model("ff_mlp", num_classes=10, img_size=8, widths=(32, 32))
    else:  # a resnet of 3 basic blocks (resnet32_cifar's are 15)
        net = CifarResNet(blocks=1, widths=(4, 8, 8), num_classes=10)
    return split(net, "block", 3, input_size=(3, 8, 8))


def _trainer(data, stack, rule, seed=0):
    torch.manual_seed(seed)
    cfg = TrainConfig(progress=False, batch_size=16, epochs=2, lr=0.05)
    return Trainer(copy.deepcopy(stack), create_rule(rule), data, cfg)


def _feedback(trainer):
    return {k: v.clone() for k, v in trainer.parts[0].state_dict().items() if "feedback" in k}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("rule,model", [("fa", "resnet"), ("dfa", "ff_mlp")])
def test_the_rule_learns_and_resumes_exactly(data, tmp_path, rule, model):
    stack = _stack(model)
    whole = _trainer(data, stack, rule)
    feedback = _feedback(whole)
    assert feedback and not _same(feedback, _feedback(_trainer(data, stack, rule, seed=1)))
    whole.history.append(whole._train_epoch(0))
    path = save(whole, tmp_path, 1, {}, 1, "run")
    whole.history.append(whole._train_epoch(1))
    assert whole.history[1]["part_loss"][rule] < whole.history[0]["part_loss"][rule]
    assert _same(feedback, _feedback(whole))  # fixed through training
    resumed = _trainer(data, stack, rule, seed=1)  # another draw, until the checkpoint loads
    assert load(resumed, path, {}, "run") == 1
    assert _same(feedback, _feedback(resumed))
    resumed._train_epoch(1)
    for (name, a), b in zip(whole.parts[0].state_dict().items(),
                            resumed.parts[0].state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_bf16_autocast_runs_forward_and_backward(data, rule):
    # (tests/test_bf16.py also trains every registered rule one step under bf16)
    part = create_rule(rule).parts(_stack("resnet"), 10, torch.zeros(1, 3, 8, 8))[0]
    x = data.train_images[:8].float() / 255
    step = Step(data.train_labels[:8], x, True, 1, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, scored = part(x, step)
    assert h.dtype == torch.bfloat16
    grads = torch.autograd.grad(scored.loss, list(part.parameters()))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_fa_refuses_a_stack_without_linear_or_conv_layers():
    stack = BlockStack([nn.Flatten()], nn.Identity(), ["flat"])
    with pytest.raises(ConfigError, match="needs nn.Linear or nn.Conv2d") as err:
        create_rule("fa").parts(stack, 3, torch.zeros(1, 3))
    assert "\n" not in str(err.value)


def test_fa_refuses_a_linear_subclass_it_cannot_replace():
    stack = BlockStack([nn.modules.linear.NonDynamicallyQuantizableLinear(3, 3)],
                       nn.Identity(), ["attn"])
    with pytest.raises(ConfigError, match="NonDynamicallyQuantizableLinear"):
        create_rule("fa").parts(stack, 3, torch.zeros(1, 3))


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_parallel_parts_refuses_the_rule_in_one_line(rule):
    with pytest.raises(ConfigError, match=f"rule '{rule}' cannot run under --parallel parts: "
                                          "a single part holds every block") as err:
        check_rule(create_rule(rule), 2, 2)
    assert "\n" not in str(err.value)
