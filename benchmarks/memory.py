"""Activation memory of local learning: peak bytes saved for backward in one training step.

Prints the peak under ``e2e`` and under ``layerwise`` with the network cut into
K parts balanced by activation memory, and their ratio. Bytes saved for
backward are counted with ``torch.autograd.graph.saved_tensors_hooks``: the
same number on any device, and what per-part backward is meant to save.

    python benchmarks/memory.py                      # resnet18_cifar, batch 256, K = 4
    python benchmarks/memory.py --model vgg11_cifar --blocks 8
"""

from __future__ import annotations

import argparse

import torch

from locallearn.bench import random_data, trainer_for
from locallearn.measure import step_peak_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18_cifar")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    args = p.parse_args()

    data = random_data(args.batch_size, args.image_size)
    x, y = data.train_images, data.train_labels
    peaks = {}
    for rule, blocks in (("e2e", None), ("layerwise", args.blocks)):
        torch.manual_seed(0)
        trainer = trainer_for(rule, args.model, data, args.batch_size, blocks)
        peaks[rule] = step_peak_bytes(trainer, x, y)
        parts = ", ".join(p.part_name for p in trainer.parts)
        print(f"{rule:10s} parts [{parts}]: peak saved for backward {peaks[rule] / 2**20:9.1f} MiB")
    ratio = peaks["layerwise"] / peaks["e2e"]
    print(f"{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}: "
          f"layerwise (K={args.blocks}) / e2e = {ratio:.3f}")


if __name__ == "__main__":
    main()
