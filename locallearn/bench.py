"""Small helpers shared by the benchmark scripts and their tests."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator

from .blocks import split
from .data import ImageData
from .rules import create_rule
from .trainer import TrainConfig, Trainer


def random_data(n: int, size: int, num_classes: int = 10, seed: int = 0) -> ImageData:
    """A batch of ``n`` random uint8 images with labels, as an in-memory data set."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n) % num_classes
    return ImageData(
        name="random", train_images=images, train_labels=labels, test_images=images,
        test_labels=labels, classes=[str(c) for c in range(num_classes)],
        mean=(0.5, 0.5, 0.5), std=(0.29, 0.29, 0.29), augment="none",
    )


def trainer_for(
    rule: str, model: str, data: ImageData, batch_size: int, blocks: int | None,
    accelerator: Accelerator | None = None, rule_options: dict | None = None, **config,
) -> Trainer:
    """A trainer of ``rule`` (and its ``rule_options``) on timm ``model`` in ``blocks`` parts."""
    import timm

    net = timm.create_model(model, num_classes=data.num_classes)
    stack = split(net, "stage", blocks, input_size=data.image_size)
    cfg = TrainConfig(**{"batch_size": batch_size, "progress": False, **config})
    return Trainer(stack, create_rule(rule, **(rule_options or {})), data, cfg, accelerator)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``step`` takes, device work included."""
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t0


def median_time(step: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls of ``step``."""
    return statistics.median(timed(step, device) for _ in range(repeats))
