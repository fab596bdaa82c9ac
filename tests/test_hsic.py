"""Dependence measures against naive float64 formulas, and the properties they must have."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from locallearn import hsic as H

SIGMA, EPS = 5.0, 1e-5


def naive_gram(x, kernel, sigma=SIGMA):
    """The kernel written out: (m, m, d) differences, no tricks."""
    x = x.reshape(len(x), -1).double()
    if kernel == "linear":
        return (x[:, None, :] * x[None, :, :]).sum(-1)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    if kernel == "delta":
        return (dist == 0).double()
    if kernel == "median":
        i, j = torch.triu_indices(len(x), len(x), 1)
        return torch.exp(-dist / (2 * dist[i, j].median()))
    return torch.exp(-dist / (2 * sigma**2 * x.shape[1]))


def naive_r(x, kernel, eps=EPS):
    m = len(x)
    eye = torch.eye(m, dtype=torch.float64)
    h = eye - 1.0 / m
    kc = h @ naive_gram(x, kernel) @ h
    return kc @ torch.linalg.inv(kc + eps * m * eye)


def naive_nhsic(a, b, kernel_a="gaussian", kernel_b="gaussian", eps=EPS):
    return float(torch.trace(naive_r(a, kernel_a, eps) @ naive_r(b, kernel_b, eps)))


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def scaled(a, b, **options):
    """The scale-free form, ``nHSIC(a; b) / sqrt(nHSIC(a; a) nHSIC(b; b))``."""
    norm = math.sqrt(H.nhsic(a, a, **options) * H.nhsic(b, b, **options))
    return H.nhsic(a, b, **options) / norm if norm > 0 else 0.0


def data(m=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 3, 4, 5, generator=g)
    z = x.flatten(1)[:, :6] ** 2 + 0.5 * torch.randn(m, 6, generator=g)  # depends on x
    labels = torch.arange(m) % 4
    return x, z, labels, g


@pytest.mark.parametrize("kernel_a, kernel_b", [
    ("gaussian", "gaussian"), ("median", "gaussian"), ("linear", "median"),
    ("gaussian", "delta"), ("linear", "linear"),
])
def test_nhsic_matches_the_naive_formula(kernel_a, kernel_b):
    x, z, labels, _ = data()
    b = torch.nn.functional.one_hot(labels).double() if kernel_b == "delta" else z
    ours = H.nhsic(x, b, kernel_a=kernel_a, kernel_b=kernel_b)
    assert rel(ours, naive_nhsic(x, b, kernel_a, kernel_b)) <= 1e-8


@settings(max_examples=25, deadline=None)
@given(m=st.integers(3, 24), d=st.integers(1, 12), scale=st.floats(1e-2, 1e2),
       kernel=st.sampled_from(["gaussian", "median"]), seed=st.integers(0, 2**31 - 1))
def test_nhsic_matches_the_naive_formula_on_random_shapes(m, d, scale, kernel, seed):
    g = torch.Generator().manual_seed(seed)
    a = scale * torch.randn(m, d, generator=g, dtype=torch.float64)
    b = torch.tanh(a[:, :1]) + torch.randn(m, 2, generator=g, dtype=torch.float64)
    assert rel(H.nhsic(a, b, kernel_a=kernel), naive_nhsic(a, b, kernel)) <= 1e-8


def linear_cka(a, b):
    return H.kernel_alignment(H.inner_products(a), H.inner_products(b))


def test_linear_kernel_alignment_matches_the_textbook_cka():
    x, z, _, _ = data()
    # Kornblith et al. 2019, eq. for linear CKA on centred features.
    fx = x.flatten(1).double()
    fz = z.double()
    fx, fz = fx - fx.mean(0), fz - fz.mean(0)
    cka = (fz.T @ fx).norm() ** 2 / ((fx.T @ fx).norm() * (fz.T @ fz).norm())
    assert rel(linear_cka(x, z), float(cka)) <= 1e-10
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert rel(linear_cka(x, 3.0 * z.double() @ q), linear_cka(x, z)) <= 1e-10


def test_nhsic_is_symmetric_and_scale_free_form_is_bounded():
    x, z, _, _ = data()
    assert rel(H.nhsic(x, z), H.nhsic(z, x)) <= 1e-12
    s = scaled(x, z)
    assert 0 < s < 1
    assert rel(scaled(x, x), 1.0) <= 1e-12


def test_self_dependence_is_the_maximum():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 200, generator=g)
    p = H.soft_projector(H.kernel_matrix(x))
    rank = p.effective_rank()  # Tr R: R_Z's eigenvalues are below 1, so nHSIC(X; Z) <= Tr R_X
    assert rel(H.nhsic(x, x), p.self_nhsic()) <= 1e-12
    # sum(r^2) is close to sum(r) when the eigenvalues of K~ sit far from eps m, as here.
    assert 0.9 * rank <= H.nhsic(x, x) <= rank
    for z in (x**2, torch.randn(100, 3, generator=g), torch.cat([x, torch.randn(100, 50)], 1)):
        assert H.nhsic(p, z) <= rank + 1e-9


def test_independent_samples_sit_at_the_permutation_baseline():
    g = torch.Generator().manual_seed(2)
    x, z = torch.randn(200, 2, generator=g), torch.randn(200, 2, generator=g)
    px, pz = (H.soft_projector(H.kernel_matrix(v)) for v in (x, z))
    assert H.nhsic(px, pz) < 0.1 * H.nhsic(px, px)
    # Averaged over row permutations of Z, E[R_Z] = Tr R_Z H / (m - 1), so the mean of
    # nHSIC under independence is exactly Tr R_X Tr R_Z / (m - 1).
    m = len(x)
    baseline = px.effective_rank() * pz.effective_rank() / (m - 1)
    draws = []
    for _ in range(300):
        perm = torch.randperm(m, generator=g)
        draws.append(float((px.matrix * pz.matrix[perm][:, perm]).sum()))
    draws = torch.tensor(draws, dtype=torch.float64)
    stderr = draws.std() / math.sqrt(len(draws))
    assert abs(draws.mean() - baseline) < 4 * stderr


def test_gaussian_nhsic_is_invariant_to_feature_permutation_rotation_and_shift():
    x, z, _, g = data()
    flat = x.flatten(1).double()
    base = H.nhsic(flat, z)
    perm = torch.randperm(flat.shape[1], generator=g)
    q, _ = torch.linalg.qr(torch.randn(flat.shape[1], flat.shape[1], generator=g,
                                       dtype=torch.float64))
    assert rel(H.nhsic(flat[:, perm], z), base) <= 1e-12
    assert rel(H.nhsic(flat @ q, z), base) <= 1e-9
    assert rel(H.nhsic(flat + 3.0, z), base) <= 1e-9


def _ratio(c, lam, eps, m):
    """r(c lam) / r(lam) for r(lam) = lam / (lam + eps m)."""
    return c * (lam + eps * m) / (c * lam + eps * m)


def test_one_hot_labels_gaussian_versus_delta_kernel():
    # One-hot rows are at squared distance 0 or 2, so with C classes the Gaussian kernel is
    # a + (1 - a) delta, a = exp(-1 / (sigma^2 C)), and K~ = c K~_delta with c = 1 - a.
    # Each eigenvalue lam of K~_delta turns into c lam: R keeps its eigenvectors and each
    # ratio r(lam) = lam / (lam + eps m) becomes r(c lam), i.e. r(lam) * rho(lam) with
    # rho(lam) = c (lam + eps m) / (c lam + eps m) < 1. Since <u, R_Z u> >= 0, the
    # Gaussian value is the delta value times a factor between rho(lam_min) and rho(lam_max)
    # over the nonzero eigenvalues. Balanced classes (n = m / C each) have the single
    # eigenvalue n, so the factor is exactly c (1 + eps C) / (c + eps C): 0.9756 for
    # CIFAR-10's C = 10 at sigma = 5, eps = 1e-5. The scale-free forms are then equal.
    x, z, _, g = data(m=60)
    classes = 6
    c = 1 - math.exp(-1 / (SIGMA**2 * classes))
    balanced = torch.arange(60) % classes
    onehot = torch.nn.functional.one_hot(balanced, classes).double()
    gauss, delta = H.nhsic(x, onehot), H.nhsic(x, onehot, kernel_b="delta")
    assert rel(gauss / delta, c * (1 + EPS * classes) / (c + EPS * classes)) <= 1e-9
    px = H.soft_projector(H.kernel_matrix(x))
    pg, pd = (H.soft_projector(H.kernel_matrix(onehot, k)) for k in ("gaussian", "delta"))
    assert rel(scaled(px, pg), scaled(px, pd)) <= 1e-9
    assert H.nhsic(x, balanced, kernel_b="delta") == delta  # integer labels work too

    skewed = torch.multinomial(torch.tensor([0.4, 0.3, 0.1, 0.1, 0.05, 0.05]), 60, True,
                               generator=g)
    onehot = torch.nn.functional.one_hot(skewed, classes).double()
    lam = torch.linalg.eigvalsh(H.centre(H.kernel_matrix(onehot, "delta")))
    lam = lam[lam > 1e-9]
    low, high = (_ratio(c, float(v), EPS, 60) for v in (lam.min(), lam.max()))
    factor = H.nhsic(z, onehot) / H.nhsic(z, onehot, kernel_b="delta")
    assert low - 1e-12 <= factor <= high + 1e-12


@pytest.mark.parametrize("name", ["duplicates", "constant", "zeros"])
def test_degenerate_inputs_give_finite_values(name):
    g = torch.Generator().manual_seed(3)
    y = torch.randn(30, 4, generator=g)
    x = {
        "duplicates": torch.randn(10, 5, generator=g).repeat(3, 1),
        "constant": torch.full((30, 5), 0.7),
        "zeros": torch.zeros(30, 2, 3),
    }[name]
    values = [H.nhsic(x, y), H.nhsic_adjusted(x, y), H.nhsic(x, x), linear_cka(x, y),
              H.nhsic(x, y, kernel_a="median"), H.nhsic(x, y, kernel_a="linear")]
    assert all(math.isfinite(v) for v in values)
    if name == "duplicates":
        assert rel(H.nhsic_adjusted(x, x), 1.0) <= 1e-12
    else:  # a constant representation carries no information: exactly zero, not noise
        assert values[0] == values[1] == values[2] == values[3] == 0.0


def test_inner_products_in_chunks_equal_one_product():
    x = torch.randn(9, 100)
    full = x.double() @ x.double().T
    torch.testing.assert_close(H.inner_products(x, chunk=7), full, rtol=1e-12, atol=1e-12)


def test_autocast_does_not_change_the_measure():
    x, z, _, _ = data()
    base = H.nhsic(x, z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert H.nhsic(x, z) == base
        assert H.differentiable_nhsic(x, z).dtype == torch.float64


@pytest.mark.parametrize("kernel", ["gaussian", "median", "linear"])
def test_differentiable_nhsic_equals_nhsic(kernel):
    x, z, _, _ = data()
    value = H.differentiable_nhsic(x, z, kernel_a=kernel)
    assert rel(float(value), H.nhsic(x, z, kernel_a=kernel)) <= 1e-9
    projector = H.soft_projector(H.kernel_matrix(z))
    assert rel(float(H.differentiable_nhsic(x, projector, kernel_a=kernel)),
               H.nhsic(x, z, kernel_a=kernel)) <= 1e-9


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_differentiable_nhsic_gradients(kernel):
    g = torch.Generator().manual_seed(4)
    a = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    # Larger eps than the default keeps the finite differences well conditioned.
    fn = lambda a, b: H.differentiable_nhsic(a, b, kernel_a=kernel, eps=1e-2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b))
    dup = torch.randn(3, 4, generator=g, dtype=torch.float64).repeat(2, 1).requires_grad_()
    H.differentiable_nhsic(dup, torch.randn(6, 2, dtype=torch.float64)).backward()
    assert torch.isfinite(dup.grad).all()


def test_bad_arguments_are_value_errors():
    x, z, _, _ = data()
    with pytest.raises(ValueError, match="unknown kernel 'rbf'"):
        H.nhsic(x, z, kernel_a="rbf")
    with pytest.raises(ValueError, match="eps must be positive"):
        H.nhsic(x, z, eps=0.0)
    with pytest.raises(ValueError, match="sample counts differ"):
        H.nhsic(x, z[:10])


def naive_adjusted(a, b, kernel_a="gaussian", kernel_b="gaussian"):
    """The chance-adjusted form written out from its definition, with explicit inverses."""
    ra, rb = naive_r(a, kernel_a), naive_r(b, kernel_b)
    m = len(ra)
    chance = float(torch.trace(ra) * torch.trace(rb)) / (m - 1)
    top = math.sqrt(float(torch.trace(ra @ ra) * torch.trace(rb @ rb)))
    return (float(torch.trace(ra @ rb)) - chance) / (top - chance)


@pytest.mark.parametrize("kernel_a, kernel_b", [
    ("gaussian", "gaussian"), ("median", "gaussian"), ("linear", "delta"),
])
def test_adjusted_nhsic_matches_the_naive_formula(kernel_a, kernel_b):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    z = x[:, :3] + 0.5 * torch.randn(40, 3, generator=g, dtype=torch.float64)
    labels = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()  # 4 classes read off x
    b = torch.nn.functional.one_hot(labels).double() if kernel_b == "delta" else z
    ours = H.nhsic_adjusted(x, b, kernel_a=kernel_a, kernel_b=kernel_b)
    expected = naive_adjusted(x, b, kernel_a, kernel_b)
    assert 0.05 < expected < 1  # b depends on x
    assert abs(ours - expected) <= 1e-8 * abs(expected)
    # It is the scaled form with its own chance level taken out.
    pa = H.soft_projector(H.kernel_matrix(x, kernel_a))
    pb = H.soft_projector(H.kernel_matrix(b, kernel_b))
    top = math.sqrt(pa.self_nhsic() * pb.self_nhsic())
    c = H.nhsic_chance(pa.effective_rank(), pb.effective_rank(), len(x)) / top
    assert abs(ours - (scaled(pa, pb) - c) / (1 - c)) <= 1e-12


def test_chance_and_the_adjusted_form_are_exact_means_over_every_pairing():
    # m = 6: all 720 permutations of b's samples, so the mean is exact, not estimated.
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 3, generator=g, dtype=torch.float64)
    b = a[:, :1] ** 2 + 0.3 * torch.randn(6, 2, generator=g, dtype=torch.float64)
    pa, pb = (H.soft_projector(H.kernel_matrix(v, "median")) for v in (a, b))
    raw, adjusted = [], []
    for perm in itertools.permutations(range(6)):
        shuffled = b[list(perm)]
        raw.append(naive_nhsic(a, shuffled, "median", "median"))
        adjusted.append(H.nhsic_adjusted(pa, H.soft_projector(H.kernel_matrix(shuffled, "median"))))
    chance = H.nhsic_chance(pa.effective_rank(), pb.effective_rank(), 6)
    assert chance > 0.05 * max(raw)  # at m = 6 chance is a large part of the raw value
    assert rel(math.fsum(raw) / len(raw), chance) <= 1e-9
    assert abs(math.fsum(adjusted) / len(adjusted)) <= 1e-9
    assert min(adjusted) < 0 < max(adjusted) <= 1 + 1e-12  # below chance is negative


def test_adjusted_nhsic_is_one_for_proportional_projectors_and_zero_without_dependence():
    x, z, _, _ = data()
    assert abs(H.nhsic_adjusted(x, x) - 1) <= 1e-12
    same = H.nhsic_adjusted(x, 3 * x + 1, kernel_a="median", kernel_b="median")
    assert abs(same - 1) <= 1e-9  # the median kernel ignores scale and shift
    assert H.nhsic_adjusted(x, torch.ones(len(x), 2)) == 0.0  # a constant: R = 0
    # Two samples: every varying R is a multiple of the centring matrix, so all pairings
    # give the same value, and there is no dependence to measure.
    assert H.nhsic_adjusted(x[:2], z[:2]) == 0.0
    assert H.nhsic_adjusted(x[:1], z[:1]) == 0.0
