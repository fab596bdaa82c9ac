"""Optimizers and learning-rate schedules, built per trainable part."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

# The keyword that picks an optimizer's kernels (``auto``: torch's choice, foreach on GPUs).
IMPLS = {"auto": {}, "foreach": {"foreach": True}, "fused": {"fused": True},
         "loop": {"foreach": False}}


def make_optimizer(params: Iterable[torch.nn.Parameter], config: Any, lr_scale: float = 1.0):
    """SGD (momentum, optional Nesterov) or AdamW for one part's ``params``, with the
    settings of ``config`` (a TrainConfig) and ``config.lr`` times ``lr_scale``."""
    lr = config.lr * lr_scale
    impl = IMPLS[config.optimizer_impl]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay, **impl)
    return torch.optim.SGD(
        params, lr=lr, momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay,
        **impl,
    )


def lr_factor(config: Any, step: int, steps_per_epoch: int, epochs: int | None = None) -> float:
    """Learning-rate multiplier after ``step`` optimizer steps (``steps_per_epoch`` an
    epoch) of ``config``'s schedule, ``epochs`` long (``config.epochs`` by default; a
    part's own epochs where the rule restarts the schedule for each part)."""
    epochs = config.epochs if epochs is None else epochs
    if config.schedule == "cosine":
        total = max(1, epochs * steps_per_epoch)
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if config.schedule == "multistep":
        epoch = step // max(1, steps_per_epoch)
        return config.gamma ** sum(epoch >= round(m * epochs) for m in config.milestones)
    return 1.0


def scaled_step(loss: torch.Tensor, scaler: torch.amp.GradScaler,
                optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler,
                reduce: Callable[[], None]) -> None:
    """One fp16 step of a part with its own gradient scaler: backward of the scaled loss,
    ``reduce()`` (the pipeline's replicas average the scaled gradients, as DDP does inside
    backward), the step of the bare ``optimizer`` (a fused one unscales on the device)
    unless this part's gradients overflowed (then only its scale halves), gradients
    dropped, and the schedule ticked, skipped step or not.
    """
    scaler.scale(loss).backward()
    reduce()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # torch warns of a schedule ticked after a skipped step
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler")
        scheduler.step()
