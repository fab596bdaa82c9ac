"""Local losses: pure functions of tensors, and the registry of loss terms built on them.

The functions (:func:`predsim_loss`, :func:`supcon_loss`, ...) are pure (no
parameters, no state) and differentiable. A *loss term* is what an objective
sums: a registered factory that takes the term's options and returns a
callable of one :class:`LossInput` (its head's output, the part's input and
output, the step). Its metadata says what it needs, so an objective builds the
right heads and a rule refuses what cannot work before training::

    @register_loss("ce", head="classifier", logits=True, paper="...", summary="...")
    def cross_entropy():
        return lambda inp: F.cross_entropy(inp.out, inp.labels)

Metadata: ``head`` (the role of the head it scores, see
:data:`locallearn.heads.ROLES`, or None for a loss on the part's output
itself), ``out`` (``classes`` or ``proj_dim``: the classifier head's
output size), ``logits`` (its head's output is the prediction at this depth),
``views`` (stacked augmented views it needs), ``similarity`` (it also needs a
similarity head), ``train_only`` (skipped at evaluation), ``input`` (it reads
the network input), ``zero_init`` (its classifier head's last linear layer
starts from zero weights). The options a loss takes are its factory's parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .hsic import check_distance, differentiable_nhsic
from .registry import Registry
from .step import Scored, Step, zero_loss


def similarity_matrix(z: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the row-centred samples of ``z`` (flattened to ``(B, D)``).

    Each sample is centred over its features and divided by ``1e-8`` plus its
    length, and the products are clamped to [-1, 1]: Pearson correlations
    between samples, computed as Nøkland & Eidnes' code computes them
    (anokland/local-loss, ``train.py``, ``similarity_matrix``; the standard
    deviation over space it takes of feature maps is the similarity head's
    job here, :class:`~locallearn.heads.SpatialStd`).
    """
    z = z.flatten(1).float()
    z = z - z.mean(dim=1, keepdim=True)
    z = z / (1e-8 + z.norm(dim=1, keepdim=True))
    return (z @ z.t()).clamp(-1, 1)


def predsim_loss(
    logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
    beta: float = 0.99,
) -> torch.Tensor:
    """The "predsim" local loss of Nøkland & Eidnes 2019.

    Nøkland & Eidnes, "Training Neural Networks with Local Error Signals"
    (ICML 2019): ``(1 - beta) * CE(logits, y) + beta * MSE(S(features), S(onehot(y)))``,
    where ``S`` is :func:`similarity_matrix`, as their code combines the two
    (anokland/local-loss, ``train.py``, ``loss_sup == 'predsim'``). ``logits`` are the
    auxiliary classifier's ``(B, num_classes)``, ``features`` the similarity branch's output.
    """
    onehot = F.one_hot(labels, num_classes).float()
    sim = F.mse_loss(similarity_matrix(features), similarity_matrix(onehot))
    return (1 - beta) * F.cross_entropy(logits, labels) + beta * sim


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1,
                base_temperature: float | None = None) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, the ``L_out`` form).

    Khosla, Teterwak, Wang, Sarna, Tian, Isola, Maschinot, Liu & Krishnan,
    "Supervised Contrastive Learning" (NeurIPS 2020). With ``z`` L2-normalised,
    every anchor ``i`` averages ``-log softmax_a(z_i . z_a / t)[p]`` over its
    positives ``p`` (other samples of its label), the softmax running over all
    samples but ``i``; anchors without a positive are left out. Two augmented
    views of each image, stacked, give every anchor at least one positive.
    With ``base_temperature``, the mean is scaled by ``t / base_temperature``,
    as the authors' code (HobbitLong/SupContrast, ``losses.py``) and the seed
    paper's (keitaroskmt/E2E-info, ``src/models/layer_wise_loss.py``) do.
    """
    z = F.normalize(z.flatten(1).float(), dim=1)
    n = len(z)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.t() / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    count = pos.sum(1)
    has = count > 0
    if not has.any():
        return z.sum() * 0.0
    mean_log = log_prob.masked_fill(~pos, 0.0).sum(1)[has] / count[has]
    scale = 1.0 if base_temperature is None else temperature / base_temperature
    return -scale * mean_log.mean()


def contrast_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """InfoPro's contrastive auxiliary loss: :func:`supcon_loss` on one view, over all anchors.

    Wang, Ni, Song, Yang & Huang, "Revisiting Locally Supervised Learning"
    (ICLR 2021). Their code (blackfeather-wang/InfoPro-Pytorch,
    ``networks/losses.py``, ``SupConLoss`` called with one view at temperature
    0.07) averages over every anchor of the batch, an anchor without a positive
    counting 0, where :func:`supcon_loss` leaves such anchors out; the two agree
    when every label occurs twice or more in the batch.
    """
    has_positive = (labels[:, None] == labels[None, :]).sum(1) > 1
    return supcon_loss(z, labels, temperature) * has_positive.float().mean()


def _views(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two stacked views of ``z`` (``2B`` rows, view 1 then view 2), flattened, float32."""
    if len(z) % 2:
        raise ValueError(f"two stacked views need an even number of rows; got {len(z)}")
    z1, z2 = z.flatten(1).float().chunk(2)
    return z1, z2


def _off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    return c[~torch.eye(len(c), dtype=torch.bool, device=c.device)]


def barlow_loss(z: torch.Tensor, lambda_offdiag: float = 3.9e-3,
                scale: float = 1 / 32) -> torch.Tensor:
    """Barlow Twins' redundancy-reduction loss of two stacked views.

    Zbontar, Jing, Misra, LeCun & Deny, "Barlow Twins: Self-Supervised Learning
    via Redundancy Reduction" (ICML 2021). Each view is batch-normalised over
    the batch (no affine); ``c`` is their ``(D, D)`` cross-correlation, and the
    loss ``scale * (sum_i (1 - c_ii)^2 + lambda_offdiag * sum_{i != j} c_ij^2)``.
    The defaults (3.9e-3, 1/32) are those of the blockwise code of Siddiqui,
    Krueger, LeCun & Deny 2023 (shoaibahmed/blockwise_ssl, ``main.py``), whose
    per-block loss this equals; the paper's 5.1e-3 with scale 1 is the other choice.
    """
    z1, z2 = _views(z)
    c = F.batch_norm(z1, None, None, training=True).t() @ F.batch_norm(z2, None, None,
                                                                       training=True)
    c = c / len(z1)
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    return scale * (on_diag + lambda_offdiag * _off_diagonal(c).pow(2).sum())


def vicreg_loss(z: torch.Tensor, sim: float = 25.0, std: float = 25.0,
                cov: float = 1.0) -> torch.Tensor:
    """VICReg's variance-invariance-covariance loss of two stacked views.

    Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance
    Regularization for Self-Supervised Learning" (ICLR 2022), as their code
    computes it (facebookresearch/vicreg, ``main_vicreg.py``):
    ``sim * MSE(z1, z2) + std * mean over views and dims of relu(1 - sqrt(var + 1e-4))
    + cov * sum over views of (sum of squared off-diagonal covariances) / D``.
    """
    z1, z2 = _views(z)
    repr_loss = F.mse_loss(z1, z2)
    std_loss = cov_loss = 0.0
    for v in (z1, z2):
        v = v - v.mean(0)
        std_loss = std_loss + F.relu(1 - torch.sqrt(v.var(0) + 1e-4)).mean() / 2
        c = v.t() @ v / (len(v) - 1)
        cov_loss = cov_loss + _off_diagonal(c).pow(2).sum() / v.shape[1]
    return sim * repr_loss + std * std_loss + cov * cov_loss


def simclr_loss(z: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two stacked views.

    Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive
    Learning of Visual Representations" (ICML 2020): with ``z`` L2-normalised,
    each of the ``2B`` rows takes cross-entropy over the ``2B - 1`` others of
    ``z_i . z_a / temperature``, its other view the positive; the mean over rows.
    This is :func:`supcon_loss` with every image its own class. The default
    temperature 0.1 is supcon's here; the paper tunes it per setting, and it was
    not checked against their code (google-research/simclr, TensorFlow).
    """
    n = len(_views(z)[0])
    z = F.normalize(z.flatten(1).float(), dim=1)
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = (z @ z.t() / temperature).masked_fill(self_mask, float("-inf"))
    positive = torch.arange(2 * n, device=z.device).roll(n)
    return F.cross_entropy(logits, positive)


def goodness(h: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Forward-forward goodness of each sample (Hinton 2022).

    ``reduce="sum"``: the sum of squared activities, as in the paper;
    ``"mean"``: their mean, the same quantity divided by the layer's width, so
    one threshold suits layers of any width.
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"goodness reduce must be 'sum' or 'mean', not {reduce!r}")
    squares = h.flatten(1).float().pow(2)
    return squares.mean(1) if reduce == "mean" else squares.sum(1)


def ff_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, theta: float) -> torch.Tensor:
    """Forward-forward logistic loss (Hinton 2022, "The Forward-Forward Algorithm").

    ``p(positive) = sigmoid(goodness - theta)``: the loss is the mean of
    ``softplus(theta - g_pos)`` (positives should be good) and
    ``softplus(g_neg - theta)`` (negatives should not).
    """
    return 0.5 * (F.softplus(theta - g_pos).mean() + F.softplus(g_neg - theta).mean())


LOSSES = Registry("loss", required=("summary",), defaults={
    "head": None, "out": "classes", "logits": False, "views": 1, "similarity": False,
    "train_only": False, "input": False, "zero_init": False})
#: Register a loss-term factory ``f(**options) -> callable(LossInput)`` (the module docstring).
register_loss = LOSSES.register


def list_losses() -> list[str]:
    """Names of the registered loss terms, sorted."""
    return LOSSES.names()


def build_loss(name: str, **options: Any) -> Callable[[LossInput], torch.Tensor | Scored]:
    """The loss term ``name``, given the options it takes (others are not passed)."""
    return LOSSES.build(name, **options)


@dataclass
class LossInput:
    """What a loss term is computed from.

    Attributes:
        out: its head's output (None for a loss on the part's output itself).
        h: the part's output.
        part_input: the part's input.
        step: the batch's :class:`~locallearn.step.Step`.
        similarity: the similarity head's output, for losses that need one.
    """

    out: torch.Tensor | None
    h: torch.Tensor
    part_input: torch.Tensor
    step: Step
    similarity: torch.Tensor | None = None

    @property
    def labels(self) -> torch.Tensor:
        """Labels of the rows of the part's output (repeated over stacked views)."""
        return self.step.labels_for(len(self.h))


@register_loss("ce", head="classifier", logits=True,
               summary="cross-entropy of the head's class scores")
def cross_entropy():
    return lambda inp: F.cross_entropy(inp.out, inp.labels)


@register_loss("predsim", head="classifier", logits=True, similarity=True, zero_init=True,
               paper="Nøkland & Eidnes 2019, Training Neural Networks with Local Error Signals "
                     "(ICML)",
               summary="(1 - beta) cross-entropy + beta similarity matching of a second "
                       "branch; the classifier's last linear layer starts at zero")
def predsim(beta: float = 0.99):
    return lambda inp: predsim_loss(inp.out, inp.similarity, inp.labels,
                                    inp.step.num_classes, beta)


@register_loss("supcon", head="classifier", out="proj_dim", views=2,
               paper="Khosla et al. 2020, Supervised Contrastive Learning (NeurIPS)",
               summary="supervised contrastive loss of the head's projections, two views, "
                       "scaled by temperature / base_temperature")
def supcon(temperature: float = 0.1, base_temperature: float = 0.07):
    if base_temperature <= 0:
        raise ConfigError(f"supcon base_temperature must be > 0; got {base_temperature}")
    return lambda inp: supcon_loss(inp.out, inp.labels, temperature, base_temperature)


def _positive(loss: str, **options: float) -> None:
    for name, value in options.items():
        if not value > 0:
            raise ConfigError(f"{loss} {name} must be > 0; got {value}")


_SSL = "two views, labels unused; training only (Siddiqui et al. 2023 use it blockwise)"


@register_loss("barlow", head="classifier", out="proj_dim", views=2, train_only=True,
               paper="Zbontar, Jing, Misra, LeCun & Deny 2021, Barlow Twins: Self-Supervised "
                     "Learning via Redundancy Reduction (ICML)",
               summary="Barlow Twins: the batch-normalised views' cross-correlation of the "
                       "head's projections pulled to the identity; " + _SSL)
def barlow(lambda_offdiag: float = 3.9e-3, scale: float = 1 / 32):
    _positive("barlow", lambda_offdiag=lambda_offdiag, scale=scale)
    return lambda inp: barlow_loss(inp.out, lambda_offdiag, scale)


@register_loss("vicreg", head="classifier", out="proj_dim", views=2, train_only=True,
               paper="Bardes, Ponce & LeCun 2022, VICReg: Variance-Invariance-Covariance "
                     "Regularization for Self-Supervised Learning (ICLR)",
               summary="VICReg: sim * invariance + std * variance + cov * covariance of the "
                       "head's projections; " + _SSL)
def vicreg(sim: float = 25.0, std: float = 25.0, cov: float = 1.0):
    for name, value in (("sim", sim), ("std", std), ("cov", cov)):
        if not value >= 0:
            raise ConfigError(f"vicreg {name} must be >= 0; got {value}")
    return lambda inp: vicreg_loss(inp.out, sim, std, cov)


@register_loss("simclr", head="classifier", out="proj_dim", views=2, train_only=True,
               paper="Chen, Kornblith, Norouzi & Hinton 2020, A Simple Framework for "
                     "Contrastive Learning of Visual Representations (ICML), NT-Xent",
               summary="SimCLR's NT-Xent of the head's projections at temperature; " + _SSL)
def simclr(temperature: float = 0.1):
    _positive("simclr", temperature=temperature)
    return lambda inp: simclr_loss(inp.out, temperature)


@register_loss("contrast", head="classifier", out="proj_dim",
               paper="Wang, Ni, Song, Yang & Huang 2021, Revisiting Locally Supervised "
                     "Learning (ICLR), contrastive auxiliary loss",
               summary="supervised contrastive loss of the head's projections, one view, "
                       "averaged over all anchors (InfoPro's code)")
def contrast(temperature: float = 0.07):
    return lambda inp: contrast_loss(inp.out, inp.labels, temperature)


@register_loss("reconstruction", head="decoder", train_only=True, input=True,
               paper="Wang, Ni, Song, Yang & Huang 2021, Revisiting Locally Supervised "
                     "Learning (ICLR)",
               summary="binary cross-entropy of a decoder's image against the input in [0, 1]")
def reconstruction():
    def term(inp: LossInput) -> torch.Tensor:
        # float32 with autocast off: CUDA autocast refuses binary_cross_entropy outright
        # (unsafe in half precision), and in float32 training it is the same computation.
        target = inp.step.image()
        with torch.autocast(inp.out.device.type, enabled=False):
            return F.binary_cross_entropy(inp.out.float(), target.float())

    return term


@register_loss("nhsic", head="classifier", train_only=True, input=True,
               paper="Sakamoto & Sato 2024, End-to-End Training Induces Information "
                     "Bottleneck through Layer-Role Differentiation (TMLR)",
               summary="minus nHSIC of the head's output with the network input "
                       "(target=input) or the part's input (target=block_input)")
def nhsic(target: str = "input", distance: str = "sqeuclidean"):
    """``distance`` of the Gaussian kernel: the seed's code (``src/hsic/hsic.py``) uses
    ``euclidean``; ``sqeuclidean`` is the HSIC-bottleneck form the analyzer defaults to."""
    if target not in ("input", "block_input"):
        raise ConfigError(f"nhsic target must be input or block_input; got {target!r}")
    check_distance(distance)

    def term(inp: LossInput) -> torch.Tensor:
        x = inp.step.network_input if target == "input" else inp.part_input
        # nHSIC is float64; the other terms are float32, as the sum should stay.
        return -differentiable_nhsic(inp.out.float(), x.flatten(1).float(),
                                     distance=distance).float()

    return term


@register_loss("goodness", paper="Hinton 2022, The Forward-Forward Algorithm",
               summary="forward-forward: goodness above theta on positives, below on "
                       "negatives; predicts the label whose embedding is best")
def goodness_loss(theta: float = 2.0, reduce: str = "mean"):
    def term(inp: LossInput) -> Scored:
        g = goodness(inp.h, reduce)
        step = inp.step
        if step.train:  # positives, then the same images with wrong labels
            g_pos, g_neg = g[: len(step.labels)], g[len(step.labels):]
            gap = (g_pos.mean() - g_neg.mean()).detach()
            return Scored(ff_loss(g_pos, g_neg, theta), None, {"goodness_gap": gap})
        # Evaluation: each image with every label embedded, image-major.
        return Scored(zero_loss(inp.h), g.view(-1, step.num_classes))

    return term
