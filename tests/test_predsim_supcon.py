"""predsim and supcon against the reference code, run on fixed inputs.

predsim: anokland/local-loss @ 7b3b40b941b2db305c59b56888a1165aefbfc178,
``train.py``: ``LocalLossBlockConv(8, 8, 1, 1, 0, 3, 4)`` and
``LocalLossBlockLinear(16, 16, 3)`` with ``--loss-sup predsim
--dim-in-decoder 32 --no-batch-norm`` (the classes and ``similarity_matrix``
taken from a copy in /tmp and run on CPU). Their encoders were set to the
identity, so each block's output is the input below; ``conv_loss`` /
``linear_loss`` and ``decoder_y``'s bias were set by :func:`fixed`, and
``decoder_y``'s weight left at its zero initialisation or set by :func:`fixed`.
The numbers are the loss each block's forward returned.

supcon: keitaroskmt/E2E-info @ 88473c310e9adcc8ba3dcda08318873c211a48b7,
``src/models/layer_wise_loss.py``, ``LayerWiseLoss._supervised_contrastive_loss``
run on CPU from a copy in /tmp. As released it reads ``self.temperature`` and
``self.base_temperature``, which ``LayerWiseLoss`` never sets (an
AttributeError), so it was called with a stand-in ``self`` holding the two.
"""

import math

import pytest
import torch
from torch import nn

from locallearn import create_rule
from locallearn.errors import ConfigError
from locallearn.heads import SpatialStd
from locallearn.losses import LossInput, build_loss, supcon_loss
from locallearn.step import Step

# (beta, decoder_y weight) -> (conv block, linear block) losses from local-loss's train.py
PREDSIM = {
    (0.99, "zero"): (1.4909766912460327, 1.4926844835281372),
    (0.99, "set"): (1.5058262348175049, 1.5020976066589355),
    (0.5, "zero"): (1.3062663078308105, 1.3071287870407104),
    (0.5, "set"): (2.0487465858459473, 1.7777836322784424),
}
# (temperature, base_temperature) -> the seed's _supervised_contrastive_loss
SUPCON = {(0.1, 0.07): 14.388758659362793, (0.5, 0.07): 23.435346603393555,
          (0.07, 0.07): 13.831269264221191}
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


def fixed(shape, a: float, scale: float) -> torch.Tensor:
    """``scale * sin(a * i)`` over the flat index ``i``: the same values on any machine."""
    n = math.prod(shape)
    return (torch.sin(torch.arange(n, dtype=torch.float32) * a) * scale).reshape(shape)


def _last_linear(head: nn.Module) -> nn.Linear:
    return [m for m in head.modules() if isinstance(m, nn.Linear)][-1]


@pytest.mark.parametrize(("key", "expected"), PREDSIM.items(), ids=str)
def test_predsim_equals_local_loss(key, expected):
    beta, weight = key
    inputs = (fixed((6, 8, 4, 4), 0.37, 1.0).abs(), fixed((6, 16), 0.53, 1.0).abs())
    for x, want in zip(inputs, expected, strict=True):
        rule = create_rule("layerwise", head="reduced_linear", loss="predsim",
                           aux_features=32, beta=beta)
        objective = rule.objective(0, 1, x.shape, 3, x, "test").eval()
        fc, sim = _last_linear(objective.heads["aux"]), objective.heads["sim"]
        assert not fc.weight.any()  # zero at the start, as decoder_y
        branch = sim.conv if isinstance(sim, SpatialStd) else sim.fc
        with torch.no_grad():
            branch.weight.copy_(fixed(branch.weight.shape, 0.7, 0.2))
            fc.bias.copy_(fixed((3,), 1.3, 0.5))
            if weight == "set":
                fc.weight.copy_(fixed(fc.weight.shape, 0.11, 0.3))
            loss = objective(x, Step(LABELS, x, train=False, num_classes=3), x).loss
        assert abs(float(loss) - want) < 1e-5, (x.shape, float(loss), want)


@pytest.mark.parametrize(("rule", "options"), [
    ("layerwise", {"head": "reduced_linear"}), ("layerwise", {"head": "linear", "aux_hidden": 8}),
    ("dgl", {"aux": "cnn"}), ("dgl", {"aux": "mlp_sr"}),
])
def test_predsim_starts_its_classifier_at_zero_and_ce_does_not(rule, options):
    shape = torch.Size((2, 8, 4, 4))
    example = torch.zeros(2, 3, 16, 16)
    for loss, zero in (("predsim", True), ("ce", False)):
        objective = create_rule(rule, loss=loss, **options).objective(0, 2, shape, 10, example, "")
        fc = _last_linear(objective.heads["aux"])
        assert (not fc.weight.any()) == zero
        assert fc.bias.any()  # the bias keeps its initialisation


def test_similarity_branch_takes_the_std_only_where_local_loss_does():
    torch.manual_seed(0)
    for shape, want in [((2, 8, 4, 4), (2, 8)), ((2, 3, 4, 4), (2, 48)), ((2, 8, 1, 4), (2, 32))]:
        # 3 channels or one row: flattened
        assert SpatialStd(shape)(torch.randn(shape)).shape == want


def _supcon_input() -> LossInput:
    """Two views of six images, stacked (rows i and i + 6 are image i); label 3 has one image."""
    z = fixed((12, 5), 0.61, 1.0)
    return LossInput(z, z, z, Step(torch.tensor([0, 1, 2, 0, 1, 3]), z, views=2, num_classes=4))


@pytest.mark.parametrize(("key", "expected"), SUPCON.items(), ids=str)
def test_supcon_equals_the_seed(key, expected):
    temperature, base = key
    inp = _supcon_input()
    assert abs(float(supcon_loss(inp.out, inp.labels, temperature, base)) - expected) < 1e-5
    term = build_loss("supcon", temperature=temperature, base_temperature=base)
    assert abs(float(term(inp)) - expected) < 1e-5


def test_supcon_defaults_to_the_seed_scale_and_contrast_is_unscaled():
    inp = _supcon_input()
    assert abs(float(build_loss("supcon", temperature=0.1)(inp)) - SUPCON[(0.1, 0.07)]) < 1e-5
    # InfoPro's contrast is the same loss without the scale: at t = 0.07 the scale is 1
    assert abs(float(build_loss("contrast", temperature=0.07)(inp)) - SUPCON[(0.07, 0.07)]) < 1e-5
    contrast = float(build_loss("contrast", temperature=0.1)(inp))
    assert abs(contrast * 0.1 / 0.07 - SUPCON[(0.1, 0.07)]) < 1e-4
    with pytest.raises(ConfigError, match="base_temperature must be > 0"):
        build_loss("supcon", base_temperature=0.0)
