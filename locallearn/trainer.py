"""One training loop under Hugging Face Accelerate for every rule.

The loop runs a rule's parts in order on each batch. Each part gets the
detached output of the part before it, and its loss is backpropagated and its
optimizer stepped *before* the next part runs, so only one part's autograd
graph (and one part's gradients) is alive at a time: that is where local
learning saves memory. Each part is prepared separately, since DDP expects one
forward and one backward per wrapped module and step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from .data import BatchTransform, ImageData, make_loaders
from .errors import LocallearnError
from .rules.base import LocalPart, Rule


@dataclass
class TrainConfig:
    """Options of the loop shared by every rule.

    Attributes:
        milestones: epochs (as fractions of ``epochs``) where ``multistep`` multiplies
            the learning rate by ``gamma``.
        log_every: steps between progress updates (each costs a device sync).
    """

    epochs: int = 1
    batch_size: int = 128
    eval_batch_size: int = 0
    lr: float = 0.1
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    seed: int = 0
    progress: bool = True
    log_every: int = 10


class Diverged(LocallearnError):
    """A local loss became non-finite."""


class Observer:
    """Hooks the trainer calls; subclass and override what you need."""

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_epoch_end(self, trainer: Trainer, entry: dict[str, Any]) -> None: ...

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any]) -> None: ...


def make_optimizer(params, config: TrainConfig, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    lr = config.lr * lr_scale
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params, lr=lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0,
        weight_decay=config.weight_decay,
    )


def lr_factor(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier after ``step`` optimizer steps."""
    if config.schedule == "cosine":
        total = max(1, config.epochs * steps_per_epoch)
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if config.schedule == "multistep":
        epoch = step // max(1, steps_per_epoch)
        passed = sum(epoch >= round(m * config.epochs) for m in config.milestones)
        return config.gamma**passed
    return 1.0


class Trainer:
    """Trains a BlockStack by a rule.

    Args:
        stack: the network, split into blocks.
        rule: partitions the stack into parts with local objectives.
        data: the data set, in memory.
        config: the loop's options.
        accelerator: an Accelerator (one is created if None).
        observers: called at fit start, epoch end and fit end.
    """

    def __init__(
        self,
        stack: nn.Module,
        rule: Rule,
        data: ImageData,
        config: TrainConfig,
        accelerator: Accelerator | None = None,
        observers: tuple[Observer, ...] = (),
    ):
        self.stack, self.rule, self.data, self.config = stack, rule, data, config
        self.accelerator = accelerator or Accelerator()
        self.observers = observers
        self.train_transform = BatchTransform(data.mean, data.std, data.augment)
        self.eval_transform = BatchTransform(data.mean, data.std, "none")
        example = self.eval_transform(data.train_images[:2])
        self.parts: list[LocalPart] = rule.parts(stack, data.num_classes, example)
        self._check_parts()
        stack.to(self.accelerator.device)
        self.optimizers = [
            make_optimizer(list(p.parameters()), config, p.lr_scale) if _trainable(p) else None
            for p in self.parts
        ]
        train_loader, test_loader = make_loaders(
            data, config.batch_size, config.seed, config.eval_batch_size or None
        )
        acc = self.accelerator
        self.models = [acc.prepare(p) for p in self.parts]
        self.optimizers = [acc.prepare(o) if o is not None else None for o in self.optimizers]
        self.train_loader, self.test_loader = acc.prepare(train_loader, test_loader)
        self.schedulers = [
            torch.optim.lr_scheduler.LambdaLR(
                o, lambda s: lr_factor(config, s, len(self.train_loader))
            ) if o is not None else None
            for o in self.optimizers
        ]
        self.history: list[dict[str, Any]] = []

    def _check_parts(self) -> None:
        owner: dict[int, str] = {}
        for part in self.parts:
            for p in part.parameters():
                if id(p) in owner:
                    raise RuntimeError(
                        f"rule {self.rule.name!r}: parts {owner[id(p)]!r} and {part.part_name!r} "
                        "share a parameter; each parameter must belong to one part"
                    )
                owner[id(p)] = part.part_name

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, trained: list[int]
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """One batch: forward part by part, each trained part's backward and step at once.

        Returns:
            The detached loss of every trained part, and the logits of the last trained part.
        """
        trained_set = set(trained)
        losses: dict[int, torch.Tensor] = {}
        logits = None
        h = x
        for i in range(trained[-1] + 1):
            model = self.models[i]
            if i not in trained_set:
                with torch.no_grad():
                    h, _, _ = model(h, y)
                continue
            h, loss, logits = model(h.detach(), y)
            optimizer = self.optimizers[i]
            if optimizer is not None and loss.requires_grad:
                self.accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                self.schedulers[i].step()
            losses[i] = loss.detach()
        return losses, logits

    @torch.no_grad()
    def evaluate(self) -> tuple[float, list[float | None]]:
        """Test accuracy of the final prediction and of the prediction at each block's depth."""
        for model in self.models:
            model.eval()
        correct, total, has_logits = None, 0, []
        for x, y in self.test_loader:
            h = self.eval_transform(x)
            preds, has_logits = [], []
            for model in self.models:
                h, _, logits = model(h, y)
                has_logits.append(logits is not None)
                preds.append(logits.argmax(1) if logits is not None else torch.full_like(y, -1))
            preds, y = self.accelerator.gather_for_metrics((torch.stack(preds, 1), y))
            hits = (preds == y[:, None]).sum(0)
            correct = hits if correct is None else correct + hits
            total += len(y)
        if not has_logits or not has_logits[-1]:
            raise RuntimeError(f"rule {self.rule.name!r}: the last part gives no logits")
        acc = (correct.double() / total).tolist()
        block_acc: list[float | None] = [None] * len(self.stack.blocks)
        for i, part in enumerate(self.parts):
            if part.block_ids and has_logits[i]:
                block_acc[part.block_ids[-1]] = acc[i]
        return acc[-1], block_acc

    def fit(self) -> dict[str, Any]:
        """Train for ``config.epochs`` epochs; returns the results for the run record."""
        cfg, acc = self.config, self.accelerator
        for obs in self.observers:
            obs.on_fit_start(self)
        start = time.perf_counter()
        for epoch in range(cfg.epochs):
            entry = self._train_epoch(epoch)
            t0 = time.perf_counter()
            entry["test_acc"], entry["block_acc"] = self.evaluate()
            entry["eval_seconds"] = round(time.perf_counter() - t0, 3)
            self.history.append(entry)
            for obs in self.observers:
                obs.on_epoch_end(self, entry)
            if acc.is_main_process and cfg.progress:
                blocks = " ".join(f"{a:.3f}" for a in entry["block_acc"] if a is not None)
                tqdm.write(
                    f"epoch {epoch + 1}/{cfg.epochs}: loss {entry['train_loss']:.4f} "
                    f"test acc {entry['test_acc']:.4f} | per depth {blocks}"
                )
        last = self.history[-1]
        result = {
            "test_acc": last["test_acc"],
            "block_acc": last["block_acc"],
            "history": self.history,
            "seconds": round(time.perf_counter() - start, 3),
        }
        for obs in self.observers:
            obs.on_fit_end(self, result)
        return result

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, acc = self.config, self.accelerator
        trained = self.rule.trained_parts(epoch, cfg.epochs, len(self.parts))
        for i, model in enumerate(self.models):
            model.train(i in trained)
        # One generator per epoch and process: augmentation is reproducible and not shared.
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 101 + acc.process_index)
        sums = {i: torch.zeros((), device=acc.device) for i in trained}
        hits = torch.zeros((), device=acc.device)
        seen = 0
        bar = tqdm(
            self.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
            disable=not (cfg.progress and acc.is_main_process), leave=False, dynamic_ncols=True,
        )
        start = time.perf_counter()
        for step, (x, y) in enumerate(bar):
            losses, logits = self.train_step(self.train_transform(x, gen), y, trained)
            for i, loss in losses.items():
                sums[i] += loss
            if logits is not None:
                hits += (logits.argmax(1) == y).sum()
            seen += len(y)
            if (step + 1) % cfg.log_every == 0:
                self._check_finite(sums, epoch, step)
                bar.set_postfix(
                    loss=f"{sums[trained[-1]].item() / (step + 1):.3f}",
                    acc=f"{hits.item() / seen:.3f}",
                    img_s=f"{seen * acc.num_processes / (time.perf_counter() - start):.0f}",
                )
        seconds = time.perf_counter() - start
        bar.close()
        steps = max(1, len(self.train_loader))
        self._check_finite(sums, epoch, steps - 1)
        part_loss = {self.parts[i].part_name: sums[i].item() / steps for i in trained}
        return {
            "epoch": epoch + 1,
            "trained_parts": [self.parts[i].part_name for i in trained],
            "train_loss": part_loss[self.parts[trained[-1]].part_name],
            "part_loss": part_loss,
            "train_acc": hits.item() / max(seen, 1),
            "seconds": round(seconds, 3),
            "images_per_s": round(seen * acc.num_processes / max(seconds, 1e-9), 1),
        }

    def _check_finite(self, sums: dict[int, torch.Tensor], epoch: int, step: int) -> None:
        for i, total in sums.items():
            if not torch.isfinite(total):
                raise Diverged(
                    f"rule {self.rule.name!r} diverged: part {self.parts[i].part_name!r} has a "
                    f"non-finite loss by epoch {epoch + 1}, step {step + 1}"
                )


def _trainable(part: nn.Module) -> bool:
    return any(p.requires_grad for p in part.parameters())
