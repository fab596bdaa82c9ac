"""Small helpers shared by the benchmark scripts and their tests."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator

from .blocks import split
from .data import ImageData
from .measure import step_peak_bytes
from .rules import create_rule
from .trainer import TrainConfig, Trainer, held_bytes


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
    accelerator: Accelerator | None = None, rule_options: dict | None = None,
    model_options: dict | None = None, **config,
) -> Trainer:
    """A trainer of ``rule`` (and its ``rule_options``) on timm ``model`` (built with
    ``model_options``) in ``blocks`` parts."""
    import timm

    net = timm.create_model(model, num_classes=data.num_classes, **(model_options or {}))
    stack = split(net, "stage", blocks, input_size=data.image_size)
    cfg = TrainConfig(**{"batch_size": batch_size, "progress": False, **config})
    return Trainer(stack, create_rule(rule, **(rule_options or {})), data, cfg, accelerator)


def timed(step: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``step`` takes, device work included (queued GPU work waited for)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t0


def median_time(step: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls of ``step``."""
    return statistics.median(timed(step, device) for _ in range(repeats))


def state_bytes(trainer: Trainer) -> int:
    """Bytes of the trainer's weights (backbone and auxiliary nets) and optimizer state, each
    storage once (:func:`~locallearn.trainer.held_bytes`): what a step starts from and leaves
    behind. Optimizers fill their state in their first step: count after one."""
    return held_bytes(trainer.parts, [opt for opt in trainer.optimizers if opt is not None])


def step_memory(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor,
                trained: list[int] | None = None) -> tuple[int, int | None]:
    """Peak bytes saved for backward in one step and, on CUDA, the step's peak allocation.

    On CUDA one step runs first (optimizer state, cuDNN's choices), then
    ``torch.cuda.max_memory_allocated`` over a second step is counted from what
    was allocated just before it, so weights, optimizer state and anything
    else already there are left out: see :func:`state_bytes` for this
    trainer's share of them. Elsewhere the second number is None.
    """
    device = trainer.accelerator.device
    if device.type != "cuda":
        return step_peak_bytes(trainer, images, labels, trained), None
    step_peak_bytes(trainer, images, labels, trained)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    saved = step_peak_bytes(trainer, images, labels, trained)
    torch.cuda.synchronize(device)
    return saved, torch.cuda.max_memory_allocated(device) - before
