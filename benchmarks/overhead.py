"""Overhead of the trainer: the ``e2e`` rule's training step against a hand-written loop.

Both train identical copies of the same model on the same batch with the same
SGD optimizer; steps are timed interleaved (plain, trainer, plain, ...) so
drifts in machine load hit both alike, and the ratio of medians is printed.

    python benchmarks/overhead.py                    # resnet18_cifar, batch 64, 20 repeats
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F

import locallearn
from locallearn.bench import random_data, timed, trainer_for


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18_cifar")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()

    data = random_data(args.batch_size, 32)
    torch.manual_seed(0)
    trainer = trainer_for("e2e", args.model, data, args.batch_size, None)
    device = trainer.accelerator.device
    # The plain loop trains its own copy of the very same weights.
    plain = copy.deepcopy(trainer.stack).to(device)
    plain_model = torch.nn.Sequential(*plain.blocks, plain.head)
    cfg = trainer.config
    opt = torch.optim.SGD(plain_model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    x, step = trainer.make_step(data.train_images.to(device), data.train_labels.to(device),
                                trainer.eval_transform)
    y = step.labels
    trained = [0]

    def plain_step():
        loss = F.cross_entropy(plain_model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def trainer_step():
        trainer.train_step(x, step, trained)

    times = {"plain": [], "trainer": []}
    for i in range(args.warmup + args.repeats):
        for name, step in (("plain", plain_step), ("trainer", trainer_step)):
            seconds = timed(step, device)
            if i >= args.warmup:
                times[name].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model}, batch {args.batch_size}, {device}, {args.repeats} interleaved repeats "
          f"(locallearn {locallearn.__version__})")
    print(f"plain loop   median step {med['plain'] * 1e3:8.2f} ms")
    print(f"e2e trainer  median step {med['trainer'] * 1e3:8.2f} ms")
    print(f"ratio trainer / plain = {med['trainer'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
