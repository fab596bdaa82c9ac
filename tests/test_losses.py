"""Each local loss against a naive implementation of its formula."""

import math

import torch
import torch.nn.functional as F

from locallearn.losses import ff_loss, goodness, predsim_loss, similarity_matrix, supcon_loss


def test_similarity_matrix_is_pearson_correlation():
    z = torch.randn(5, 7, dtype=torch.float64)
    naive = torch.tensor([[float(torch.corrcoef(torch.stack([a, b]))[0, 1]) for b in z]
                          for a in z])
    assert torch.allclose(similarity_matrix(z).double(), naive.double(), atol=1e-5)


def test_predsim_matches_its_formula():
    torch.manual_seed(0)
    logits, feats, y = torch.randn(6, 4), torch.randn(6, 9), torch.tensor([0, 1, 2, 3, 0, 1])
    onehot = F.one_hot(y, 4).float()
    sim = ((similarity_matrix(feats) - similarity_matrix(onehot)) ** 2).mean()
    naive = 0.01 * F.cross_entropy(logits, y) + 0.99 * sim
    assert torch.allclose(predsim_loss(logits, feats, y, 4, 0.99), naive)


def test_supcon_matches_a_loop_over_anchors():
    torch.manual_seed(0)
    z, y, t = torch.randn(8, 5), torch.tensor([0, 1, 0, 2, 1, 0, 3, 2]), 0.5
    zn = F.normalize(z, dim=1)
    total, anchors = 0.0, 0
    for i in range(8):
        positives = [p for p in range(8) if p != i and y[p] == y[i]]
        if not positives:
            continue
        denom = sum(math.exp(float(zn[i] @ zn[a]) / t) for a in range(8) if a != i)
        total += -sum(math.log(math.exp(float(zn[i] @ zn[p]) / t) / denom)
                      for p in positives) / len(positives)
        anchors += 1
    assert abs(float(supcon_loss(z, y, t)) - total / anchors) < 1e-5


def test_ff_loss_and_goodness_match_their_formulas():
    h = torch.randn(4, 3)
    assert torch.allclose(goodness(h), (h ** 2).sum(1))
    assert torch.allclose(goodness(h, "mean"), (h ** 2).sum(1) / h.shape[1])
    gp, gn = torch.tensor([1.0, 3.0]), torch.tensor([0.5, 4.0])
    naive = 0.5 * (sum(math.log1p(math.exp(2 - g)) for g in gp) / 2
                   + sum(math.log1p(math.exp(g - 2)) for g in gn) / 2)
    assert abs(float(ff_loss(gp, gn, 2.0)) - naive) < 1e-6
