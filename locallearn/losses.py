"""Local objectives as plain functions of features, logits and labels.

Each function is pure (no parameters, no state) and differentiable; the
rules' objective modules own the heads that produce their inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def similarity_matrix(z: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the row-centred samples of ``z`` (flattened to ``(B, D)``).

    Each sample is centred over its features and scaled to unit length, so the
    entries are Pearson correlations between samples, as in Nøkland & Eidnes
    (2019)'s similarity-matching loss.
    """
    z = z.flatten(1).float()
    z = z - z.mean(dim=1, keepdim=True)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return z @ z.t()


def predsim_loss(
    logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
    beta: float = 0.99,
) -> torch.Tensor:
    """The "predsim" local loss of Nøkland & Eidnes 2019.

    Nøkland & Eidnes, "Training Neural Networks with Local Error Signals"
    (ICML 2019): ``(1 - beta) * CE(logits, y) + beta * MSE(S(features), S(onehot(y)))``,
    where ``S`` is :func:`similarity_matrix`.

    Args:
        logits: ``(B, num_classes)`` predictions of the auxiliary classifier.
        features: ``(B, ...)`` the similarity branch's output.
        labels: ``(B,)`` integer labels.
        num_classes: number of labels.
        beta: weight of the similarity-matching term.
    """
    onehot = F.one_hot(labels, num_classes).float()
    sim = F.mse_loss(similarity_matrix(features), similarity_matrix(onehot))
    return (1 - beta) * F.cross_entropy(logits, labels) + beta * sim


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, the ``L_out`` form).

    Khosla, Teterwak, Wang, Sarna, Tian, Isola, Maschinot, Liu & Krishnan,
    "Supervised Contrastive Learning" (NeurIPS 2020). With ``z`` L2-normalised,
    every anchor ``i`` averages ``-log softmax_a(z_i . z_a / t)[p]`` over its
    positives ``p`` (other samples of its label), the softmax running over all
    samples but ``i``; anchors without a positive are left out. Two augmented
    views of each image, stacked, give every anchor at least one positive.

    Args:
        z: ``(N, D)`` projections (normalised here).
        labels: ``(N,)`` their labels.
        temperature: the softmax temperature ``t``.
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
    return -mean_log.mean()


def bce_reconstruction(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of a sigmoid decoder output against an image in [0, 1] (InfoPro)."""
    return F.binary_cross_entropy(decoded.float(), target.float())


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
