"""The Gaussian kernel's distance: squared (the default) or not (the seed paper's code).

Sakamoto & Sato (2024, TMLR) released one HSIC implementation,
keitaroskmt/E2E-info ``src/hsic/hsic.py`` (``NormalizedHSIC``), whose
``_gaussian_kernel`` puts the unsquared Euclidean distance over ``2 sigma^2 d``
in the exponent; ``distance="euclidean"`` reproduces it.
"""

import json

import pytest
import torch

from locallearn import cli
from locallearn import hsic as H
from locallearn.analysis import InformationPlane
from locallearn.analysis.plots import _check_alike
from locallearn.errors import ConfigError

SIGMA, EPS = 5.0, 1e-5


def naive_distances(x, distance):
    """Every pairwise difference written out, ``(m, m, d)``, float64."""
    x = x.reshape(len(x), -1).double()
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return sq if distance == "sqeuclidean" else sq.sqrt()


def naive_gram(x, kernel, distance, sigma=SIGMA):
    dist = naive_distances(x, distance)
    if kernel == "median":
        i, j = torch.triu_indices(len(x), len(x), 1)
        return torch.exp(-dist / (2 * dist[i, j].median()))
    return torch.exp(-dist / (2 * sigma**2 * x.reshape(len(x), -1).shape[1]))


def naive_nhsic(a, b, kernel, distance, eps=EPS):
    """``Tr[R_a R_b]``, ``R = K~ (K~ + eps m I)^-1``, ``K~ = H K H``, by an explicit inverse."""
    m = len(a)
    eye = torch.eye(m, dtype=torch.float64)
    h = eye - 1.0 / m

    def r(x):
        kc = h @ naive_gram(x, kernel, distance) @ h
        return kc @ torch.linalg.inv(kc + eps * m * eye)

    return float(torch.trace(r(a) @ r(b)))


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def random_samples(m=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2, 3, 4, generator=g, dtype=torch.float64)
    z = torch.tanh(x.flatten(1)[:, :5]) + 0.5 * torch.randn(m, 5, generator=g, dtype=torch.float64)
    return x, z


def seed_inputs():
    """The fixed input the reference numbers below were computed on (no random numbers)."""
    i = torch.arange(10, dtype=torch.float64)[:, None]
    j = torch.arange(24, dtype=torch.float64)[None, :]
    x = 0.2 * torch.sin(0.9 * i + 0.37 * j + 0.05 * i * j)
    k = torch.arange(6, dtype=torch.float64)[None, :]
    z = 0.2 * torch.tanh(torch.sin(0.9 * i + 0.37 * k + 0.05 * i * k)
                         + torch.cos(1.1 * i * (k + 1)))
    return x.reshape(10, 2, 3, 4), z


# nHSIC of seed_inputs() computed by the seed paper's own code: keitaroskmt/E2E-info at
# commit 88473c310e9adcc8ba3dcda08318873c211a48b7, src/hsic/hsic.py,
# NormalizedHSIC().calc_loss(a, b) (which calls _gaussian_kernel with its default
# sigma = 5.0, and eps = 1e-5), run on the CPU with torch 2.14 after
# torch.set_default_dtype(torch.float64) (the code builds its identity and centring
# matrices in the default dtype) on the float64 tensors of seed_inputs(). Under the
# default float32, on float32 copies, it gives 7.158044338226318, 6.916701316833496 and
# 7.439968109130859.
SEED_CODE_NHSIC = {
    ("x", "z"): 7.158025159314936,
    ("x", "x"): 6.916739195142666,
    ("z", "z"): 7.4399350511260804,
}


def test_euclidean_gaussian_kernel_is_the_direct_formula():
    x, _ = random_samples()
    d = x[0].numel()
    u, v = x.reshape(len(x), -1)[:, None, :], x.reshape(len(x), -1)[None, :, :]
    direct = torch.exp(-torch.linalg.vector_norm(u - v, dim=-1) / (2 * SIGMA**2 * d))
    assert torch.allclose(H.kernel_matrix(x, distance="euclidean"), direct, rtol=0, atol=1e-13)
    gram = H.inner_products(x)
    assert torch.allclose(H.kernel_from_inner_products(gram, d, distance="euclidean"), direct,
                          rtol=0, atol=1e-13)


def test_euclidean_median_kernel_takes_the_median_of_the_distance():
    x, _ = random_samples()
    expected = naive_gram(x, "median", "euclidean")
    assert torch.allclose(H.kernel_matrix(x, "median", distance="euclidean"), expected,
                          rtol=0, atol=1e-13)


def test_default_is_the_squared_distance_unchanged():
    x, z = random_samples()
    d = x[0].numel()
    flat = x.reshape(len(x), -1)
    direct = torch.exp(-((flat[:, None] - flat[None]) ** 2).sum(-1) / (2 * SIGMA**2 * d))
    assert torch.allclose(H.kernel_matrix(x), direct, rtol=0, atol=1e-13)
    for kernel in ("gaussian", "median", "linear"):
        assert torch.equal(H.kernel_matrix(x, kernel),
                           H.kernel_matrix(x, kernel, distance="sqeuclidean"))
    assert H.nhsic(x, z) == H.nhsic(x, z, distance="sqeuclidean")
    assert InformationPlane().describe()["distance"] == "sqeuclidean"


@pytest.mark.parametrize("distance", H.DISTANCES)
@pytest.mark.parametrize("kernel", ["gaussian", "median"])
def test_nhsic_matches_the_naive_float64_formula(distance, kernel):
    x, z = random_samples()
    expected = naive_nhsic(x, z, kernel, distance)
    assert rel(H.nhsic(x, z, kernel_a=kernel, kernel_b=kernel, distance=distance),
               expected) <= 1e-8
    got = H.differentiable_nhsic(x, z, kernel_a=kernel, kernel_b=kernel, distance=distance)
    assert rel(float(got), expected) <= 1e-8


def test_euclidean_nhsic_matches_the_seed_papers_code():
    x, z = seed_inputs()
    samples = {"x": x, "z": z}
    for (a, b), expected in SEED_CODE_NHSIC.items():
        ours = H.nhsic(samples[a], samples[b], distance="euclidean")
        assert rel(ours, expected) <= 1e-10, (a, b, ours, expected)
        grad = H.differentiable_nhsic(samples[a], samples[b], distance="euclidean")
        assert rel(float(grad), expected) <= 1e-10, (a, b)
    # The squared distance is another measure: far from the seed code's numbers here.
    assert rel(H.nhsic(x, z), SEED_CODE_NHSIC["x", "z"]) > 0.1


def test_the_naive_formula_agrees_with_the_seed_code_too():
    # The seed code centres on one side (K H) where the naive formula centres on both
    # (H K H); both give the same trace (see docs/information_plane.md).
    x, z = seed_inputs()
    assert rel(naive_nhsic(x, z, "gaussian", "euclidean"), SEED_CODE_NHSIC["x", "z"]) <= 1e-10


def test_euclidean_gradients_are_finite_and_correct():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 2, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda t: H.differentiable_nhsic(t, b, sigma=0.5, distance="euclidean"), (a,))
    # Two equal samples: a zero distance off the diagonal, where sqrt has no slope.
    dup = torch.randn(3, 4, generator=g, dtype=torch.float64).repeat(2, 1).requires_grad_()
    H.differentiable_nhsic(dup, torch.randn(6, 2, dtype=torch.float64),
                           distance="euclidean").backward()
    assert torch.isfinite(dup.grad).all()


@pytest.mark.parametrize("call", [
    lambda x, z: H.kernel_matrix(x, distance="manhattan"),
    lambda x, z: H.kernel_matrix(x, "linear", distance="manhattan"),
    lambda x, z: H.kernel_from_inner_products(H.inner_products(x), 24, distance="manhattan"),
    lambda x, z: H.nhsic(x, z, distance="manhattan"),
    lambda x, z: H.nhsic_adjusted(x, z, distance="manhattan"),
    lambda x, z: H.differentiable_nhsic(x, z, distance="manhattan"),
    lambda x, z: InformationPlane(distance="manhattan"),
])
def test_an_unknown_distance_is_a_one_line_config_error(call):
    x, z = random_samples()
    with pytest.raises(ConfigError) as info:
        call(x, z)
    message = str(info.value)
    assert message == "unknown distance 'manhattan'; choices: sqeuclidean, euclidean"


def test_plane_distance_flag_reaches_the_record(tmp_path, capsys):
    argv = ["--dataset", "synthetic", "--epochs", "1", "--train-subset", "64",
            "--test-subset", "32", "--batch-size", "32", "--probe-size", "32",
            "--model", "resnet32_cifar", "--rule", "e2e", "--no-progress",
            "--output", str(tmp_path), "--plane-distance", "euclidean"]
    assert cli.main(argv) == 0
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    assert record["plane_config"]["distance"] == "euclidean"
    assert record["config"]["plane_distance"] == "euclidean"
    assert record["plane"] and all(e["nhsic_x"] > 0 for e in record["plane"])


def test_an_unknown_plane_distance_flag_is_one_line_exit_2(capsys):
    assert cli.main(["--plane-distance", "manhattan", "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--plane-distance" in err and "euclidean" in err


def test_records_of_different_distances_do_not_share_axes():
    config = InformationPlane().describe()
    old = {k: v for k, v in config.items() if k != "distance"}  # made before the option
    euclidean = config | {"distance": "euclidean"}

    def records(*configs):
        return [{"file": f"r{i}.json", "plane_config": c} for i, c in enumerate(configs)]

    _check_alike(records(config, old))  # an earlier record was measured with the default
    with pytest.raises(ConfigError, match=r"measured differently \(distance: sqeuclidean vs "
                                          r"euclidean\)"):
        _check_alike(records(old, euclidean))


def test_the_nhsic_loss_term_takes_the_distance():
    from types import SimpleNamespace

    from locallearn.hsic import differentiable_nhsic
    from locallearn.losses import LossInput, build_loss
    from locallearn.rules import create_rule

    g = torch.Generator().manual_seed(0)
    out, x = torch.randn(16, 10, generator=g), torch.randn(16, 3, 4, 4, generator=g)
    step = SimpleNamespace(network_input=x)
    inp = LossInput(out=out, h=out, part_input=x, step=step)
    for distance in ("sqeuclidean", "euclidean"):
        term = build_loss("nhsic", target="input", distance=distance)
        expected = -differentiable_nhsic(out.double(), x.flatten(1).double(), distance=distance)
        assert torch.allclose(term(inp).double(), expected, rtol=1e-5)
    with pytest.raises(ConfigError, match="unknown distance 'manhattan'"):
        build_loss("nhsic", distance="manhattan")
    rule = create_rule("layerwise", nhsic_lambda=0.1, nhsic_distance="euclidean")
    assert rule.describe()["nhsic_distance"] == "euclidean"
