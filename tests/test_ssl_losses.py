"""The self-supervised two-view losses: barlow, vicreg, simclr.

Reference values: the loss bodies of the authors' code run on the input of
:func:`views` (``torch.manual_seed(0)``; ``z1 = randn(8, 16)``,
``z2 = z1 + 0.5 * randn(8, 16)``), on CPU, float32, one process (no all_reduce or
gather, the projector left out):

- Barlow Twins: shoaibahmed/blockwise_ssl at commit
  ``b3bb94432424b0ba370b0976a3d80859ab1dff8f``, ``main.py`` ``BarlowTwins.forward``
  and ``off_diagonal``, with its defaults ``--lambd 3.9e-3 --scale-loss 1/32`` and
  ``nn.BatchNorm1d(16, affine=False)`` in training mode.
- VICReg: facebookresearch/vicreg at commit
  ``4e12602fd495af83efd1631fbe82523e6db092e0``, ``main_vicreg.py`` ``VICReg.forward``
  and ``off_diagonal``, with its defaults 25 / 25 / 1.

SimCLR's reference code is TensorFlow (google-research/simclr); it is checked
against a hand-written NT-Xent and against supervised contrastive with every image
its own class instead.
"""

import pytest
import torch
import torch.nn.functional as F

from locallearn.errors import ConfigError
from locallearn.losses import (
    LOSSES,
    LossInput,
    barlow_loss,
    build_loss,
    list_losses,
    simclr_loss,
    supcon_loss,
    vicreg_loss,
)
from locallearn.step import Step

BARLOW_REFERENCE = 0.007444784045219421  # blockwise_ssl b3bb944, see the module docstring
VICREG_REFERENCE = 12.009293556213379  # facebookresearch/vicreg 4e12602


def views() -> torch.Tensor:
    torch.manual_seed(0)
    z1 = torch.randn(8, 16)
    z2 = z1 + 0.5 * torch.randn(8, 16)
    return torch.cat([z1, z2])


def test_barlow_equals_the_blockwise_reference():
    assert barlow_loss(views()).item() == pytest.approx(BARLOW_REFERENCE, abs=1e-5)


def test_vicreg_equals_the_authors_code():
    assert vicreg_loss(views()).item() == pytest.approx(VICREG_REFERENCE, abs=1e-5)


def test_barlow_formula():
    z = views()
    z1, z2 = z[:8], z[8:]
    n1 = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + 1e-5)
    n2 = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + 1e-5)
    c = n1.t() @ n2 / 8
    eye = torch.eye(16)
    want = ((c - eye) ** 2 * (eye + 0.01 * (1 - eye))).sum() * 0.5
    assert barlow_loss(z, lambda_offdiag=0.01, scale=0.5).item() == pytest.approx(
        want.item(), rel=1e-5)


def test_vicreg_formula():
    z = views()
    parts = [F.mse_loss(z[:8], z[8:])]
    std = cov = 0.0
    for v in (z[:8], z[8:]):
        d = v - v.mean(0)
        std += F.relu(1 - (d.pow(2).sum(0) / 7 + 1e-4).sqrt()).mean() / 2
        c = d.t() @ d / 7
        cov += (c.pow(2).sum() - c.diagonal().pow(2).sum()) / 16
    want = 2 * parts[0] + 3 * std + 4 * cov
    assert vicreg_loss(z, 2.0, 3.0, 4.0).item() == pytest.approx(want.item(), rel=1e-5)


def test_simclr_formula_and_supcon_with_each_image_its_own_class():
    z = views()
    t = 0.5
    u = F.normalize(z, dim=1)
    sim = torch.exp(u @ u.t() / t)
    terms = []
    for i in range(16):
        j = (i + 8) % 16
        terms.append(-torch.log(sim[i, j] / (sim[i].sum() - sim[i, i])))
    want = torch.stack(terms).mean()
    assert simclr_loss(z, t).item() == pytest.approx(want.item(), rel=1e-5)
    own_class = torch.arange(8).repeat(2)
    assert simclr_loss(z, t).item() == pytest.approx(
        supcon_loss(z, own_class, t).item(), rel=1e-5)


def test_identical_views_score_low():
    torch.manual_seed(1)
    z1 = torch.randn(64, 8)
    same, other = torch.cat([z1, z1]), torch.cat([z1, torch.randn(64, 8)])
    # Barlow: identical views make the diagonal exactly 1 (up to BN's eps).
    assert barlow_loss(same, scale=1.0) < 0.1 * barlow_loss(other, scale=1.0)
    # VICReg: the invariance term vanishes; the rest does not depend on the pairing.
    assert vicreg_loss(same, std=0, cov=0).item() == 0.0
    assert vicreg_loss(same) < vicreg_loss(other)
    # SimCLR: the positive is the most similar row, so the loss is below a random pairing's.
    assert simclr_loss(same) < simclr_loss(other)


@pytest.mark.parametrize("name", ["barlow", "vicreg", "simclr"])
def test_registered_two_view_self_supervised_and_differentiable(name):
    assert name in list_losses()
    meta = LOSSES.get(name).meta
    assert (meta["views"], meta["out"], meta["head"]) == (2, "proj_dim", "classifier")
    assert meta["train_only"] and meta["paper"]
    z = views().requires_grad_()
    step = Step(torch.arange(8) % 3, torch.zeros(16, 1), views=2, num_classes=3)
    loss = build_loss(name)(LossInput(z, z, z, step))
    other = Step(torch.arange(8) % 2, torch.zeros(16, 1), views=2, num_classes=3)
    assert loss.item() == build_loss(name)(LossInput(z, z, z, other)).item()  # labels unused
    loss.backward()
    assert z.grad.abs().sum() > 0


@pytest.mark.parametrize("name, options, says", [
    ("barlow", {"lambda_offdiag": -1.0}, "barlow lambda_offdiag must be > 0"),
    ("barlow", {"scale": 0.0}, "barlow scale must be > 0"),
    ("vicreg", {"std": -1.0}, "vicreg std must be >= 0"),
    ("simclr", {"temperature": 0.0}, "simclr temperature must be > 0"),
])
def test_bad_options_are_one_line_config_errors(name, options, says):
    with pytest.raises(ConfigError, match=says) as err:
        build_loss(name, **options)
    assert "\n" not in str(err.value)


def test_listed_by_the_command_line(run_main):
    listed = run_main("--list-losses")
    assert listed.returncode == 0
    for name, author in (("barlow", "Zbontar"), ("vicreg", "Bardes"), ("simclr", "Chen")):
        assert name in listed.stdout and author in listed.stdout
