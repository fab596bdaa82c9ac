"""Kernel dependence measures on samples: normalized HSIC and centred kernel alignment.

Every function takes samples as tensors of shape ``(m, ...)`` (one row per
sample, flattened to dimension ``d``), works in float64 with autocast off, and
never builds an ``(m, m, d)`` tensor: squared distances come from the inner
products ``||u||^2 + ||v||^2 - 2 u.v``, accumulated over chunks of features.

Normalized HSIC (Fukumizu, Gretton, Sun & Schölkopf 2007, "Kernel measures of
conditional dependence", NeurIPS) is

    nHSIC(A; B) = Tr[R_A R_B],   R = K~ (K~ + eps m I)^-1,   K~ = H K H,

with ``K`` the Gram matrix of a kernel and ``H = I - 11^T/m`` the centring
matrix. ``R`` is a *soft projector*: with ``K~ = U diag(lam) U^T`` it is
``U diag(lam / (lam + eps m)) U^T``, so its eigenvalues lie in ``[0, 1)``.
That is how it is computed here (a symmetric eigendecomposition, eigenvalues
clamped at zero, never an explicit inverse), once per sample set; a
:class:`SoftProjector` can be passed instead of samples, so the input and the
labels of a probe set are decomposed once and reused for every block and
epoch. Raw nHSIC has a chance level, ``Tr R_A Tr R_B / (m - 1)``
(:func:`nhsic_chance`), that grows with the effective ranks ``Tr R``;
:func:`nhsic_adjusted` takes it out (0 is chance, 1 the Cauchy-Schwarz bound).

Kernels (``kernel=``), with ``D(u, v)`` the *squared* distance ``||u - v||^2``:
``"gaussian"`` ``exp(-D / (2 sigma^2 d))``, ``"median"`` ``exp(-D / (2 s))`` with ``s``
the median pairwise ``D`` (Gretton et al. 2005), ``"linear"`` ``u.v`` and ``"delta"``
(1 where two samples are equal; for 1-D integer labels or one-hot rows it is the
label-equality kernel). Defaults follow the HSIC-bottleneck code (Ma, Lewis &
Kleijn 2020, "The HSIC Bottleneck", AAAI): Gaussian, ``sigma = 5``, ``eps = 1e-5``,
labels one-hot. ``distance="euclidean"`` makes ``D`` the *unsquared* distance
``||u - v||`` in the two Gaussian kernels, as the seed paper's released code does
(Sakamoto & Sato 2024, TMLR); the two can order representations differently
(docs/information_plane.md, "The kernel's distance").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .errors import ConfigError

Kernel = Literal["gaussian", "median", "linear", "delta"]
KERNELS: tuple[str, ...] = ("gaussian", "median", "linear", "delta")
Distance = Literal["sqeuclidean", "euclidean"]
DISTANCES: tuple[str, ...] = ("sqeuclidean", "euclidean")
DEFAULT_DISTANCE = "sqeuclidean"
DEFAULT_SIGMA = 5.0
DEFAULT_EPS = 1e-5
# float64 bytes per feature chunk of the inner products: the extra memory stays
# small whatever the feature dimension, and a chunk this size stays in cache
# between its conversion and its product (~25% faster than one big conversion).
_CHUNK_BYTES = 2 * 2**20
_MIN_CHUNK = 256
_DOUBLE_EPS = torch.finfo(torch.float64).eps
# Below this fraction of the Cauchy-Schwarz bound, the bound and the chance level count as
# equal: their float64 sums carry relative rounding of about m u, far smaller than this.
_SPAN_TOL = 1e-9


def _exact(device: torch.device) -> torch.autocast:
    """Autocast off: a float16 Gram matrix would make the measures meaningless."""
    return torch.autocast(device.type, enabled=False)


def _flat(x: Tensor) -> Tensor:
    if x.ndim == 0:
        raise ValueError("samples must have shape (m, ...); got a scalar")
    return x.reshape(len(x), -1)


def inner_products(x: Tensor, *, chunk: int | None = None,
                   device: torch.device | str | None = None) -> Tensor:
    """The ``(m, m)`` float64 Gram matrix ``x x^T`` of the flattened samples ``x`` (any dtype).

    Accumulated over chunks of ``chunk`` features (default: about 2 MiB of float64, at
    least 256), so only one float64 chunk exists beside ``x``; ``x`` may live on the CPU
    while the products run on ``device`` (default: ``x``'s).
    """
    flat = _flat(x)
    m, d = flat.shape
    device = torch.device(device) if device is not None else flat.device
    chunk = chunk or max(_MIN_CHUNK, _CHUNK_BYTES // (8 * max(m, 1)))
    gram = torch.zeros(m, m, dtype=torch.float64, device=device)
    with _exact(device):
        for start in range(0, d, chunk):
            part = flat[:, start:start + chunk].to(device=device, dtype=torch.float64)
            gram.addmm_(part, part.T)
    return gram


def _median_scale(dist: Tensor) -> Tensor:
    """Median pairwise distance (off the diagonal), or 1 if all samples coincide."""
    m = len(dist)
    if m < 2:
        return dist.new_ones(())
    i, j = torch.triu_indices(m, m, 1, device=dist.device)
    med = dist[i, j].median()
    return torch.where(med > 0, med, med.new_ones(()))


def _delta(x: Tensor) -> Tensor:
    """1 where two samples are equal: ids are the labels, or one id per distinct row."""
    ids = x if x.ndim == 1 else torch.unique(_flat(x), dim=0, return_inverse=True)[1]
    return (ids[:, None] == ids[None, :]).to(torch.float64)


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choices: {', '.join(KERNELS)}")


def check_distance(distance: str) -> None:
    """Raise a one-line :class:`~locallearn.errors.ConfigError` unless ``distance`` is one of
    :data:`DISTANCES`."""
    if distance not in DISTANCES:
        raise ConfigError(f"unknown distance {distance!r}; choices: {', '.join(DISTANCES)}")


def kernel_from_inner_products(gram: Tensor, dim: int, kernel: Kernel = "gaussian",
                               sigma: float = DEFAULT_SIGMA, *,
                               distance: Distance = DEFAULT_DISTANCE) -> Tensor:
    """The Gram matrix of ``kernel`` (see the module docstring; ``"delta"`` needs the
    samples) from the inner products ``gram`` (float64) of flattened samples of dimension
    ``dim``; ``sigma`` is the Gaussian width in units of ``sqrt(d)``. Differentiable in
    ``gram`` (:func:`differentiable_nhsic`): the median bandwidth is taken as a constant,
    and the gradient of a zero distance (the diagonal, two equal samples) as zero."""
    _check_kernel(kernel)
    check_distance(distance)
    if kernel == "linear":
        return gram
    if kernel == "delta":
        raise ValueError("the delta kernel compares samples; use kernel_matrix(x, 'delta')")
    # ||u||^2 + ||v||^2 - 2 u.v; rounding can make it slightly negative: clamped at zero,
    # with an exactly zero diagonal (masked, which keeps its rounding out of a gradient).
    norms = gram.diagonal()
    off = 1 - torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    dist = (norms[:, None] + norms[None, :] - 2 * gram).clamp_min(0) * off
    if distance == "euclidean":
        # sqrt has an infinite slope at 0: take it only where the distance is positive,
        # so a zero one gets a zero gradient rather than nan.
        positive = dist > 0
        dist = torch.where(positive, dist.where(positive, 1.0).sqrt(), 0.0)
    # sigma is scaled by sqrt(d) so that, with the squared distance, the width does not
    # depend on the layer's size (with the unsquared one it does).
    scale = _median_scale(dist.detach()) if kernel == "median" else sigma**2 * max(dim, 1)
    return torch.exp(-dist / (2 * scale))


def kernel_matrix(x: Tensor, kernel: Kernel = "gaussian", sigma: float = DEFAULT_SIGMA, *,
                  distance: Distance = DEFAULT_DISTANCE) -> Tensor:
    """The ``(m, m)`` float64 Gram matrix of ``kernel`` on samples ``x`` of shape ``(m, ...)``."""
    _check_kernel(kernel)
    check_distance(distance)
    if kernel == "delta":
        return _delta(x)
    flat = _flat(x)
    return kernel_from_inner_products(
        inner_products(flat), flat.shape[1], kernel, sigma, distance=distance
    )


def centre(k: Tensor) -> Tensor:
    """``H K H``: the doubly centred Gram matrix (rows and columns of mean zero)."""
    k = k - k.mean(0, keepdim=True)
    k = k - k.mean(1, keepdim=True)
    return (k + k.T) / 2  # exactly symmetric, as eigh assumes


@dataclass(frozen=True)
class SoftProjector:
    """``R = K~ (K~ + eps m I)^-1`` of one sample set, from the eigendecomposition of ``K~``.

    Attributes:
        matrix: ``R``, ``(m, m)`` float64, symmetric.
        ratios: its eigenvalues ``lam / (lam + eps m)`` in ``[0, 1)``, ascending.
        eps: the regulariser it was built with.
    """

    matrix: Tensor
    ratios: Tensor
    eps: float

    @property
    def size(self) -> int:
        """The number of samples ``m``."""
        return len(self.matrix)

    def self_nhsic(self) -> float:
        """``nHSIC(A; A) = Tr[R^2] = sum(r_i^2)``."""
        return float(self.ratios.square().sum())

    def effective_rank(self) -> float:
        """``Tr[R] = sum(r_i)``: the largest ``nHSIC(A; B)`` can be for any ``B``,
        since ``R_B`` has eigenvalues below 1."""
        return float(self.ratios.sum())

    def dot(self, other: SoftProjector) -> float:
        """``Tr[R_self R_other]``; both are symmetric, so it is their elementwise product's sum."""
        if other.size != self.size:
            raise ValueError(f"sample counts differ: {self.size} vs {other.size}")
        return float((self.matrix * other.matrix.to(self.matrix.device)).sum())


def soft_projector(k: Tensor, eps: float = DEFAULT_EPS) -> SoftProjector:
    """Centre a Gram matrix and decompose it into a :class:`SoftProjector`.

    Eigenvalues of ``K~`` below the rounding level of ``K`` (``4 m u max|K|``, ``u``
    the float64 unit roundoff) are set to zero: they are rounding noise, and
    without this a constant representation would get a tiny random ``R``
    instead of zero.

    Args:
        k: an ``(m, m)`` symmetric positive semi-definite Gram matrix.
        eps: the regulariser; must be positive (``eps m`` keeps ``R`` bounded).
    """
    if not eps > 0:
        raise ValueError(f"eps must be positive; got {eps}")
    k = k.to(torch.float64)
    m = len(k)
    with _exact(k.device):
        lam, vecs = torch.linalg.eigh(centre(k))
        noise = 4 * m * _DOUBLE_EPS * float(k.abs().max()) if m else 0.0
        lam = torch.where(lam > noise, lam, lam.new_zeros(()))
        ratios = lam / (lam + eps * m)
        matrix = (vecs * ratios) @ vecs.T
    return SoftProjector((matrix + matrix.T) / 2, ratios, eps)


def _projectors(a: Tensor | SoftProjector, b: Tensor | SoftProjector, *,
                kernel_a: Kernel = "gaussian", kernel_b: Kernel = "gaussian",
                sigma: float = DEFAULT_SIGMA, eps: float = DEFAULT_EPS,
                distance: Distance = DEFAULT_DISTANCE) -> tuple[SoftProjector, SoftProjector]:
    check_distance(distance)
    return tuple(  # type: ignore[return-value]
        x if isinstance(x, SoftProjector)
        else soft_projector(kernel_matrix(x, kernel, sigma, distance=distance), eps)
        for x, kernel in ((a, kernel_a), (b, kernel_b)))


def nhsic(a: Tensor | SoftProjector, b: Tensor | SoftProjector, **options: Any) -> float:
    """Normalized HSIC ``Tr[R_a R_b]`` (Fukumizu, Gretton, Sun & Schölkopf 2007).

    It lies between 0 and ``min(Tr R_a, Tr R_b)`` and grows with ``m`` (the
    effective rank of a rich representation is close to ``m - 1``), so compare
    values only at equal ``m``, or use :func:`nhsic_adjusted`.

    Args:
        a, b: samples of shape ``(m, ...)``, or precomputed :func:`soft_projector` s
            (then their kernel, sigma, eps and distance are the ones they were built with).
        **options: ``kernel_a``, ``kernel_b`` (each one of :data:`KERNELS`, default
            ``"gaussian"``), ``sigma``, ``eps``, ``distance`` (see the module docstring).
    """
    pa, pb = _projectors(a, b, **options)
    return pa.dot(pb)


def nhsic_chance(trace_a: float, trace_b: float, m: int) -> float:
    """``Tr R_a Tr R_b / (m - 1)``: the mean of ``nHSIC(a; b)`` over every pairing of
    ``b``'s samples with ``a``'s, exactly (0 for ``m < 2``; derived in
    docs/information_plane.md, "Chance level"). The traces are sums of the projectors'
    ``ratios`` (:meth:`SoftProjector.effective_rank`).
    """
    return trace_a * trace_b / (m - 1) if m > 1 else 0.0


def adjust_for_chance(ab: float, aa: float, bb: float, trace_a: float, trace_b: float,
                      m: int) -> float:
    """``(ab - chance) / (sqrt(aa bb) - chance)``, from stored parts (see :func:`nhsic_adjusted`).

    Args:
        ab: ``nHSIC(a; b)``; aa, bb: ``nHSIC(a; a)``, ``nHSIC(b; b)``.
        trace_a, trace_b: ``Tr R_a``, ``Tr R_b``; m: the number of samples.
    """
    chance = nhsic_chance(trace_a, trace_b, m)
    top = (aa * bb) ** 0.5
    span = top - chance
    return (ab - chance) / span if span > _SPAN_TOL * top else 0.0


def nhsic_adjusted(a: Tensor | SoftProjector, b: Tensor | SoftProjector,
                   **options: Any) -> float:
    """nHSIC adjusted for chance, as the adjusted Rand index is (Hubert & Arabie 1985):

        (nHSIC(a; b) - chance) / (sqrt(nHSIC(a; a) nHSIC(b; b)) - chance),

    with ``chance`` from :func:`nhsic_chance` and the Cauchy-Schwarz bound as the most it
    can be. It averages exactly 0 over random pairings of the samples, is 1 when ``R_a``
    and ``R_b`` are proportional (``a = b``, for one) and negative below chance; where the
    bound equals chance (``R`` zero, or a multiple of the centring matrix) there is no
    dependence to measure: 0 (docs/information_plane.md). Arguments as :func:`nhsic`.
    """
    pa, pb = _projectors(a, b, **options)
    return adjust_for_chance(pa.dot(pb), pa.self_nhsic(), pb.self_nhsic(),
                             pa.effective_rank(), pb.effective_rank(), pa.size)


def kernel_alignment(ka: Tensor, kb: Tensor) -> float:
    """Centred kernel alignment ``<K~a, K~b> / (|K~a| |K~b|)`` of two Gram matrices, in [0, 1].

    With linear kernels (:func:`inner_products`) it is linear CKA (Kornblith, Norouzi, Lee &
    Hinton 2019, ICML). Zero if a side is constant up to rounding.
    """
    ca, cb = centre(ka), centre(kb)
    na, nb = ca.norm(), cb.norm()
    # A constant representation centres to rounding noise; its alignment is undefined.
    tiny = 4 * len(ka) * _DOUBLE_EPS
    if na <= tiny * ka.abs().max() or nb <= tiny * kb.abs().max():
        return 0.0
    return float((ca * cb).sum() / (na * nb))


def differentiable_nhsic(a: Tensor, b: Tensor | SoftProjector, *, kernel_a: Kernel = "gaussian",
                         kernel_b: Kernel = "gaussian", sigma: float = DEFAULT_SIGMA,
                         eps: float = DEFAULT_EPS,
                         distance: Distance = DEFAULT_DISTANCE) -> Tensor:
    """``nHSIC(a; b)`` as a float64 scalar tensor with gradients to ``a`` (and ``b``).

    The training-time regulariser of the seed code (a block's local loss minus
    ``lambda * nHSIC(Z; X)``; Sakamoto & Sato 2024, keitaroskmt/E2E-info,
    ``src/models/layer_wise_loss.py``, which uses ``distance="euclidean"``) is built
    on it. Gradients through an eigendecomposition are undefined at repeated
    eigenvalues, which a centred Gram matrix always has, so ``R`` is instead
    ``(K~ + eps m I)^-1 K~`` by a Cholesky solve (``K~ + eps m I`` is positive
    definite); ``R_a`` and ``K~ + eps m I`` commute, so it is the same ``R``.

    Args:
        a: samples ``(m, ...)``, e.g. a block's auxiliary output.
        b: samples ``(m, ...)`` (e.g. the network input) or a precomputed projector.
        kernel_a, kernel_b, sigma, eps, distance: as in :func:`nhsic`.
    """
    check_distance(distance)
    ra = _differentiable_projector(a, kernel_a, sigma, eps, distance)
    if isinstance(b, SoftProjector):
        rb = b.matrix.to(ra.device)
    else:
        rb = _differentiable_projector(b, kernel_b, sigma, eps, distance)
    if rb.shape != ra.shape:
        raise ValueError(f"sample counts differ: {len(ra)} vs {len(rb)}")
    return (ra * rb.T).sum()  # Tr[Ra Rb] without forming the product


def _differentiable_projector(x: Tensor, kernel: Kernel, sigma: float, eps: float,
                              distance: Distance) -> Tensor:
    _check_kernel(kernel)
    if not eps > 0:
        raise ValueError(f"eps must be positive; got {eps}")
    with _exact(x.device):
        if kernel == "delta":
            k = _delta(x.detach())
        else:
            flat = _flat(x).to(torch.float64)
            k = kernel_from_inner_products(flat @ flat.T, flat.shape[1], kernel, sigma,
                                           distance=distance)
        kc = k - k.mean(0, keepdim=True)
        kc = kc - kc.mean(1, keepdim=True)
        m = len(kc)
        reg = kc + eps * m * torch.eye(m, dtype=kc.dtype, device=kc.device)
        chol = torch.linalg.cholesky((reg + reg.T) / 2)
        return torch.cholesky_solve(kc, chol)
