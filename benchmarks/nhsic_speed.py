"""Speed of nHSIC: locallearn's against the naive formulation, and one whole probe of a ResNet.

The naive formulation is what public HSIC code commonly does: pairwise
differences by broadcasting into an ``(m, m, d)`` tensor, summed to squared
distances, and ``R = K~ inverse(K~ + eps m I)`` with an explicit inverse, in
float32 (torch's default dtype, which public code uses; in float64 the
``(m, m, d)`` tensor at m = 256, d = 16384 would take 8.6 GB, twice over
while it is squared). locallearn's :func:`~locallearn.analysis.nhsic` is float64,
takes squared distances from inner products and decomposes ``K~`` by ``eigh``.
Both compute ``nHSIC(a; b)`` of two fresh sample sets; calls are interleaved
(naive, ours, naive, ...) and the ratio of medians is printed.

Then the whole observer path (:class:`~locallearn.analysis.InformationPlane`)
measures every block of ``resnet18_cifar`` (block granularity) on a probe set
of m = 1000 random 32x32 images: forward, features to the CPU, Gram matrices,
eigendecompositions.

    python benchmarks/nhsic_speed.py                    # m = 256, d = 16384; probe m = 1000
    python benchmarks/nhsic_speed.py --probe-size 0     # skip the ResNet probe
    python benchmarks/nhsic_speed.py --skip-compare --model vit_tiny_patch16_224 \
        --model-opt img_size=32 --model-opt patch_size=4  # the probe of another backbone
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import locallearn
from locallearn import split
from locallearn.analysis import InformationPlane, nhsic
from locallearn.bench import random_data
from locallearn.data import BatchTransform


def naive_nhsic(a: torch.Tensor, b: torch.Tensor, sigma: float = 5.0, eps: float = 1e-5
                ) -> torch.Tensor:
    """nHSIC as public HSIC code writes it: (m, m, d) differences, an explicit inverse."""
    m = len(a)
    eye = torch.eye(m, dtype=a.dtype)
    h = eye - 1.0 / m

    def r_matrix(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(m, -1)
        dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        k = torch.exp(-dist / (2 * sigma**2 * x.shape[1]))
        kc = h @ k @ h
        return kc @ torch.inverse(kc + eps * m * eye)

    return torch.trace(r_matrix(a) @ r_matrix(b))


def compare(m: int, d: int, repeats: int, warmup: int) -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, d, generator=gen)
    b = a[:, : d // 2].repeat(1, 2) + torch.randn(m, d, generator=gen)  # dependent on a
    times: dict[str, list[float]] = {"naive": [], "locallearn": []}
    values = {}
    for i in range(warmup + repeats):
        for name, fn in (("naive", lambda: float(naive_nhsic(a, b))),
                         ("locallearn", lambda: nhsic(a, b))):
            t0 = time.perf_counter()
            values[name] = fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rel = abs(values["naive"] - values["locallearn"]) / abs(values["locallearn"])
    print(f"nHSIC(a; b), m = {m}, d = {d}, CPU, {torch.get_num_threads()} threads, "
          f"{repeats} interleaved repeats after {warmup} warm-up (locallearn "
          f"{locallearn.__version__}, torch {torch.__version__})")
    print(f"naive (float32, (m, m, d) tensor, inverse)  median {med['naive']:9.4f} s  "
          f"value {values['naive']:.6f}")
    print(f"locallearn (float64, inner products, eigh)   median {med['locallearn']:9.4f} s  "
          f"value {values['locallearn']:.6f}")
    print(f"ratio naive / locallearn = {med['naive'] / med['locallearn']:.1f}x "
          f"(values differ by {rel:.1e}, relative: float32 rounding in the naive version)")


def probe_resnet(m: int, model: str, options: dict | None = None, granularity: str = "block"
                 ) -> None:
    data = random_data(m, 32)
    torch.manual_seed(0)
    net = timm.create_model(model, num_classes=10, **(options or {}))
    stack = split(net, granularity, input_size=(3, 32, 32))
    plane = InformationPlane(probe_size=m)
    t0 = time.perf_counter()
    plane.prepare(data, BatchTransform(data.mean, data.std), torch.device("cpu"))
    prepared = time.perf_counter() - t0
    t0 = time.perf_counter()
    entries = plane.measure(stack, 0)
    seconds = time.perf_counter() - t0
    dims = sum(e["dim"] for e in entries)
    print(f"{model}, {granularity} granularity: {len(entries)} blocks, {dims} features per sample, "
          f"probe m = {m}, CPU, {torch.get_num_threads()} threads")
    print(f"prepare (probe set, X and Y decomposed once)  {prepared:7.2f} s")
    print(f"measure all blocks (one plane point each)     {seconds:7.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--d", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--probe-size", type=int, default=1000, help="0 skips the ResNet probe")
    p.add_argument("--model", default="resnet18_cifar")
    p.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="timm.create_model keyword, e.g. img_size=32 for a ViT; repeatable")
    p.add_argument("--granularity", default="block", choices=("stage", "block"))
    p.add_argument("--skip-compare", action="store_true", help="time only the probe")
    args = p.parse_args()
    options = {}
    for item in args.model_opt:
        key, _, value = item.partition("=")
        options[key] = int(value) if value.isdigit() else value
    if not args.skip_compare:
        compare(args.m, args.d, args.repeats, args.warmup)
    if args.probe_size:
        probe_resnet(args.probe_size, args.model, options, args.granularity)


if __name__ == "__main__":
    main()
