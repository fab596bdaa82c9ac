"""forward_gradient: the estimate, its surrogate loss, the rule in the training loop.

Formula tests on a tiny network (47 parameters) built by hand: the forward-mode
directional derivative equals ``grad . v``; the estimate is unbiased (the mean of many
single-direction estimates is the backprop gradient within a tolerance derived from the
estimator's own variance); the surrogate's value is the loss and its gradient the estimate.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import timm
import torch
from conftest import every_part_loss_fell, resumes_exactly
from torch import nn

from locallearn import create_rule, split
from locallearn.errors import ConfigError
from locallearn.objectives import classifier
from locallearn.pipeline import check_rule
from locallearn.rules import forward_gradient
from locallearn.rules.base import LocalPart
from locallearn.rules.forward_gradient import ForwardGradientPart, estimate_of, flat
from locallearn.step import Step
from locallearn.trainer import TrainConfig, Trainer


def _part(perturb: str, directions: int = 1, width: int = 3) -> ForwardGradientPart:
    """Two blocks (one with BatchNorm in training mode) and a linear head: 47 parameters
    (32 with ``width=2``)."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(3, width + 1), nn.BatchNorm1d(width + 1), nn.Tanh()),
              nn.Sequential(nn.Linear(width + 1, width), nn.Tanh())]
    plain = LocalPart("tiny", blocks, [0, 1], classifier(nn.Linear(width, 2)))
    return ForwardGradientPart(plain, perturb, directions)


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g)
    y = torch.randint(0, 2, (6,), generator=g)
    return x, Step(y, x, True, 1, 2)


def _exact(part, x, step):
    """The backprop gradient of the part's loss for the estimated parameters."""
    kept = [b.clone() for b in part.buffers()]
    g = flat(part.estimated(), part(x, step, plain=True)[1].loss)
    with torch.no_grad():
        for b, k in zip(part.buffers(), kept, strict=True):
            b.copy_(k)
    return g


def _estimates(part, x, step, count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        _, _, pairs = part.estimate(x, step, gen, 1)
        out.append(estimate_of(part.estimated(), pairs, part.perturb))
    return torch.stack(out)


@pytest.mark.parametrize("perturb", ["weight", "activity"])
def test_the_mean_estimate_converges_to_the_backprop_gradient(perturb):
    part, (x, step) = _part(perturb, width=2), _batch()
    exact = _exact(part, x, step)
    samples = _estimates(part, x, step, 800)
    # The mean of M independent estimates has E|mean - g|^2 = tr(Cov)/M, Cov the
    # estimator's covariance (estimated from the same samples). For weight perturbation
    # with v ~ N(0, I), tr(Cov) = (n + 1)|g|^2 (n = 32 here). We allow three times the
    # expected squared error, which stays below (0.35 |g|)^2: a bias of 35 % of |g|
    # (an estimate scaled by 1.35 or 0.65) would exceed it.
    error = (samples.mean(0) - exact).square().sum()
    allowed = 3 * samples.var(0).sum() / len(samples)
    assert error < allowed, (error, allowed)
    assert allowed < (0.35 * exact.norm()) ** 2
    if perturb == "weight":  # the variance itself is the formula's (within sampling error)
        n = exact.numel()
        torch.testing.assert_close(samples.var(0).sum(), (n + 1) * exact.square().sum(),
                                   rtol=0.25, atol=0)


def test_the_directional_derivative_is_grad_dot_v():
    part, (x, step) = _part("weight"), _batch()
    exact = _exact(part, x, step)
    gen = torch.Generator().manual_seed(3)
    _, _, pairs = part.estimate(x, step, gen, 1)
    gen.manual_seed(3)  # the same directions again, in the parameters' order
    v = torch.cat([torch.randn(p.shape, generator=gen).flatten() for p in part.estimated()])
    torch.testing.assert_close(estimate_of(part.estimated(), pairs, "weight"),
                               (exact @ v) * v, rtol=1e-5, atol=1e-7)


def test_the_activity_estimate_is_the_sum_of_the_blocks_directional_derivatives():
    part, (x, step) = _part("activity"), _batch()
    kept = [b.clone() for b in part.buffers()]
    z1 = part.blocks[0](x)
    z2 = part.blocks[1](z1)
    dz1, dz2 = torch.autograd.grad(part.objective(z2, step, x).loss, [z1, z2])
    with torch.no_grad():
        for b, k in zip(part.buffers(), kept, strict=True):
            b.copy_(k)
    gen = torch.Generator().manual_seed(4)
    _, _, pairs = part.estimate(x, step, gen, 1)
    gen.manual_seed(4)
    u1, u2 = torch.randn(z1.shape, generator=gen), torch.randn(z2.shape, generator=gen)
    d = (dz1 * u1).sum() + (dz2 * u2).sum()  # one pass, both blocks perturbed
    torch.testing.assert_close(pairs[0][1], d * u1, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pairs[1][1], d * u2, rtol=1e-5, atol=1e-7)


# Ren et al.'s activity-perturbed estimate on one block (linear + ReLU, no layer norm, one
# image), from a few-line JAX transcription of their estimator (NOT their code run whole:
# it needs TF datasets and its flag set): tests/fixtures/forward_gradient_ren_jax.py, after
# google-research/google-research at commit 35a5be244885197babac12954c71274ff76b27b7,
# local_forward_gradient/train_mixer_supervised.py, update_forward_grad_activations: noise
# dz on the pre-activation, g = jvp of the block's local loss (per example / B) w.r.t. the
# noise, grad_z = g * dz * relu_mask, grad_w = einsum(pre_act, grad_z); the local head by
# its exact gradient (local_classif_grad). Run with jax 0.10.2 in float64. Every unit here
# is active (mask 1), where perturbing after the ReLU, as this rule does, gives the same.
REN_G = 0.46746420797478844
REN_BLOCK = {"0.weight": [[0.08414355743546192, -0.2103588935886548, 0.1262153361531929],
                          [-0.12154069407344499, 0.30385173518361247, -0.18231104111016747]],
             "0.bias": [0.4207177871773096, -0.6077034703672249]}
REN_HEAD = {"weight": [[0.642145631678757, 0.2505934172404906],
                       [0.22651589489248808, 0.08839644678731243],
                       [-0.8686615265712453, -0.33898986402780307]],
            "bias": [0.522069619251022, 0.1841592641402342, -0.7062288833912563]}


def test_the_activity_estimate_matches_ren_et_al(monkeypatch):
    block, head = nn.Sequential(nn.Linear(3, 2), nn.ReLU()).double(), nn.Linear(2, 3).double()
    with torch.no_grad():
        block[0].weight.copy_(torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.4, -0.6]]))
        block[0].bias.copy_(torch.tensor([1.0, 0.8]))
        head.weight.copy_(torch.tensor([[0.7, -0.1], [-0.3, 0.5], [0.2, 0.4]]))
        head.bias.copy_(torch.tensor([0.1, 0.0, -0.1]))
    part = ForwardGradientPart(LocalPart("one", [block], [0], classifier(head)), "activity", 1)
    dz = torch.tensor([[0.9, -1.3]], dtype=torch.float64)
    monkeypatch.setattr(forward_gradient, "randn_like", lambda t, generator: dz)
    x = torch.tensor([[0.2, -0.5, 0.3]], dtype=torch.float64)
    _, scored = part(x, Step(torch.tensor([2]), x, True, 1, 3))
    scored.loss.backward()
    _, _, pairs = part.estimate(x, Step(torch.tensor([2]), x, True, 1, 3), None, 1)
    torch.testing.assert_close(pairs[0][1], REN_G * dz)
    for module, want in ((block, REN_BLOCK), (head, REN_HEAD)):
        for name, p in module.named_parameters():
            torch.testing.assert_close(p.grad, torch.tensor(want[name], dtype=torch.float64))


@pytest.mark.parametrize("perturb", ["weight", "activity"])
def test_the_surrogate_is_the_loss_in_value_and_the_estimate_in_gradient(perturb):
    part, (x, step) = _part(perturb, directions=2), _batch()
    twin = copy.deepcopy(part)
    loss = twin(x, step, plain=True)[1].loss
    head_grad = torch.autograd.grad(loss, list(twin.objective.parameters()))
    torch.manual_seed(5)
    _, scored = part(x, step)
    torch.testing.assert_close(scored.loss, loss)
    scored.loss.backward()
    torch.manual_seed(5)  # the training forward draws from the global generator
    again = copy.deepcopy(twin)
    _, _, pairs = again.estimate(x, step, None, 2)
    want = estimate_of(again.estimated(), pairs, perturb)
    got = torch.cat([p.grad.flatten() for p in part.estimated()])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    if perturb == "activity":  # the heads: their exact gradient
        for p, g in zip(part.objective.parameters(), head_grad, strict=True):
            torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("perturb", ["weight", "activity"])
def test_directions_average_that_many_estimates_and_move_batch_norm_once(perturb):
    part, (x, step) = _part(perturb), _batch()
    once = copy.deepcopy(part)
    once(x, step, plain=True)  # one backprop step's BatchNorm update
    separate = _estimates(copy.deepcopy(part), x, step, 3, seed=6)
    _, _, pairs = part.estimate(x, step, torch.Generator().manual_seed(6), 3)
    torch.testing.assert_close(estimate_of(part.estimated(), pairs, perturb),
                               separate.mean(0), rtol=1e-5, atol=1e-6)
    for a, b in zip(part.buffers(), once.buffers(), strict=True):
        assert torch.equal(a, b)


def test_evaluation_is_a_plain_forward():
    part, (x, step) = _part("activity"), _batch()
    part.eval()
    evaluation = dataclasses.replace(step, train=False)
    with torch.no_grad():
        h, scored = part(x, evaluation)
        plain = LocalPart.forward(part, x, evaluation)
    assert torch.equal(h, plain[0]) and torch.equal(scored.loss, plain[1].loss)


# --- the rule in the training loop --------------------------------------------------------


@pytest.fixture(scope="module")
def data(tiny_data):
    return tiny_data


def _trainer(data, rule, model="ff_mlp"):
    torch.manual_seed(0)
    kwargs = {"img_size": 8, "widths": (32, 32)} if model == "ff_mlp" else {"widths": (4, 8, 8)}
    net = timm.create_model(model, num_classes=10, **kwargs)
    stack = split(net, "block", 2 if model == "ff_mlp" else 3, input_size=(3, 8, 8))
    cfg = TrainConfig(progress=False, batch_size=16, epochs=3, lr=0.05)
    return Trainer(copy.deepcopy(stack), rule, data, cfg)


def test_activity_local_learns_and_resumes_exactly(data, tmp_path):
    whole = _trainer(data, create_rule("forward_gradient"))
    assert [p.part_name for p in whole.parts] == ["stem+layers.0", "layers.1", "head"]
    resumes_exactly(whole, lambda: _trainer(data, create_rule("forward_gradient")), tmp_path)
    every_part_loss_fell(whole)


@pytest.mark.parametrize("model, options", [
    ("resnet32_cifar", {"perturb": "weight"}), ("resnet32_cifar", {}), ("ff_mlp", {"local": False}),
    ("ff_mlp", {"local": False, "perturb": "weight", "directions": 2})])
def test_every_mode_trains_a_step_and_probes(data, model, options):
    trainer = _trainer(data, create_rule("forward_gradient", **options), model)
    before = [[p.detach().clone() for p in part.parameters()] for part in trainer.parts]
    x, step = trainer.make_step(data.train_images[:16], data.train_labels[:16],
                                trainer.train_transform, torch.Generator().manual_seed(0))
    losses, _, _ = trainer.train_step(x, step, trainer.schedule[0])
    assert all(torch.isfinite(v) for v in losses.values())
    for part, old in zip(trainer.parts, before, strict=True):
        assert any(not torch.equal(a, b) for a, b in zip(old, part.parameters(), strict=True))
    probe = trainer.rule.gradient_probe(trainer.parts, x, step, torch.Generator().manual_seed(0))
    assert set(probe) == {"cosine", "variance"}
    assert set(probe["cosine"]) <= {p.part_name for p in trainer.parts}
    assert all(-1 <= c <= 1 for c in probe["cosine"].values())
    assert all(v > 0 for v in probe["variance"].values())
    assert all(p.grad is None for part in trainer.parts for p in part.parameters())


def test_the_probe_measures_the_estimate_against_backprop():
    # The mean of N directions has relative variance (n + 1) / N (n = 47 parameters):
    # about 48 with one direction, 2.4 with 20, so the cosine rises from about
    # 1 / sqrt(49) to about 1 / sqrt(3.4).
    part, (x, step) = _part("weight"), _batch()
    rule = create_rule("forward_gradient", perturb="weight")
    one = rule.gradient_probe([part], x, step, torch.Generator().manual_seed(0))
    rule.config.directions = 20
    many = rule.gradient_probe([part], x, step, torch.Generator().manual_seed(0))
    assert many["cosine"]["tiny"] > 0.4 > 0.3 > one["cosine"]["tiny"]
    assert 20 < one["variance"]["tiny"] < 100
    assert 1 < many["variance"]["tiny"] < 5


@pytest.mark.parametrize("options, match", [
    ({"directions": "0"}, r"option 'directions' .* >= 1; got 0"),
    ({"perturb": "weights"}, r"perturb"),
    ({"local": "false", "loss": "predsim"}, r"local=false"),
    ({"head": "nope"}, r"head"),
])
def test_bad_options_are_refused_in_one_line(options, match):
    with pytest.raises(ConfigError, match=match) as e:
        create_rule("forward_gradient", **options)
    assert "\n" not in str(e.value)


def test_pipelining_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="random directions") as e:
        check_rule(create_rule("forward_gradient"), 2, 2, 3)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("perturb", ["weight", "activity"])
def test_bf16_autocast_gives_a_finite_estimate_in_bf16(perturb):
    # (tests/test_bf16.py trains the default rule under an Accelerate bf16 run.)
    part, (x, step) = _part(perturb, directions=2), _batch()
    dtypes = set()
    part.blocks[1].register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, scored = part(x, step)
    scored.loss.backward()
    assert dtypes == {torch.bfloat16}
    grads = torch.cat([p.grad.flatten() for p in part.estimated()])
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0
