"""The linear probe: how much of the label a linear classifier reads from each block.

A rule that learns without labels (blockwise self-supervision, Hebbian layers) gives no
prediction of its own, and a rule's own heads say little about what a block holds. The
measure the label-free literature reports is a linear classifier trained on the frozen
representation (Siddiqui et al. 2023's and Journé et al. 2023's linear evaluation). This
observer trains one per block, on the same fixed training images every run, before training
(the randomly initialised network: the floor that shows a rule learned anything) and after
every epoch, and records each classifier's accuracy on the run's test split. For a label-free
rule (:attr:`~locallearn.rules.base.Rule.label_free`) that accuracy is the record's
``test_acc`` and ``block_acc``.

Like the information plane it sees only the blocks: the probe images run through them in eval
mode, without autograd or autocast, and training is untouched (no buffer, no random state
changes; the classifiers draw their batches from their own generator).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import balanced_subset
from ..errors import ConfigError
from ..observers import Observer

if TYPE_CHECKING:
    from ..trainer import Trainer

__all__ = ["LinearProbe", "fit_linear", "pooled"]


def pooled(h: Tensor, size: int = 2) -> Tensor:
    """A block output as one row per sample: feature maps ``(B, C, H, W)`` averaged to
    ``size x size`` cells (so early blocks keep some of where things are), tokens
    ``(B, N, D)`` averaged over ``N``, vectors as they are."""
    if h.ndim == 4:
        return F.adaptive_avg_pool2d(h, size).flatten(1)
    if h.ndim == 3:
        return h.mean(1)
    return h.flatten(1)


def fit_linear(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor,
               classes: int, epochs: int, generator: torch.Generator, lr: float = 1e-3,
               weight_decay: float = 5e-4, batch_size: int = 256) -> tuple[float, float]:
    """Train a softmax-regression classifier on ``train`` features and return its accuracy on
    ``train`` and on ``test``.

    The features are standardised by the training features' mean and standard deviation;
    the classifier starts at zero (the problem is convex, so only the budget matters) and
    trains by AdamW on mini-batches drawn from ``generator``.
    """
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    train, test = (train - mean) / std, (test - mean) / std
    weight = torch.zeros(classes, train.shape[1], device=train.device, requires_grad=True)
    bias = torch.zeros(classes, device=train.device, requires_grad=True)
    opt = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=generator).to(train.device)
            for start in range(0, len(train), batch_size):
                rows = order[start:start + batch_size]
                loss = F.cross_entropy(train[rows] @ weight.T + bias, train_labels[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    with torch.no_grad():
        def accuracy(x: Tensor, y: Tensor) -> float:
            return (x @ weight.T + bias).argmax(1).eq(y).float().mean().item()

        return accuracy(train, train_labels), accuracy(test, test_labels)


class LinearProbe(Observer):
    """Trains a linear classifier on every block's frozen, pooled output and records its test
    accuracy: before training (epoch 0) and after every epoch.

    Each epoch's accuracies go into the epoch's history entry as ``probe_acc`` (one per block)
    and, with the training accuracy, into :attr:`entries` (the record's ``probe``); where the
    rule gives no accuracy of its own (a label-free rule) they are also the entry's
    ``test_acc`` (the last block's) and ``block_acc``.

    Args:
        images: training images the classifiers learn from: class-balanced, un-augmented and
            the same in every run (drawn with the fixed ``seed``, as the plane's probe set).
        epochs: passes of each classifier over them (AdamW, ``lr``, batch ``batch_size``).
        pool: feature maps are averaged to ``pool x pool`` cells (:func:`pooled`).
        batch: images per forward pass through the blocks.
    """

    probes_blocks = True

    def __init__(self, images: int = 5000, epochs: int = 30, lr: float = 3e-3,
                 weight_decay: float = 5e-4, batch_size: int = 256, pool: int = 2,
                 seed: int = 0, batch: int = 250):
        if min(images, epochs, batch_size, pool, batch) < 1 or not lr > 0:
            raise ConfigError("the linear probe's images, epochs, batch sizes, pool and lr "
                              "must be positive")
        self.images, self.epochs, self.lr, self.weight_decay = images, epochs, lr, weight_decay
        self.batch_size, self.pool, self.seed, self.batch = batch_size, pool, seed, batch
        self.entries: list[dict[str, Any]] = []
        self.seconds: list[float] = []
        self.log = False
        self._set: tuple[Tensor, Tensor, int] | None = None  # images, labels, training rows
        self._counts: tuple[int, int | None] = (images, None)  # training and test images

    def describe(self) -> dict[str, Any]:
        """The settings for the run record's ``probe_config``."""
        rows, tests = self._counts
        return {"train_images": rows, "test_images": tests, "seed": self.seed,
                "epochs": self.epochs, "optimizer": "adamw", "lr": self.lr,
                "weight_decay": self.weight_decay, "batch_size": self.batch_size,
                "features": f"block output averaged to {self.pool}x{self.pool} cells "
                            "(tokens: their mean), standardised by the training features",
                "seconds": [round(s, 3) for s in self.seconds]}

    def state_dict(self) -> dict[str, Any]:
        return {"entries": self.entries, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries[:] = state["entries"]
        self.seconds[:] = state["seconds"]

    def on_fit_start(self, trainer: Trainer) -> None:
        data = trainer.data
        self.log = trainer.accelerator.is_main_process
        rows = min(self.images, len(data.train_labels))
        index = balanced_subset(data.train_labels, rows, self.seed)
        self._set = (torch.cat([data.train_images[index].cpu(), data.test_images.cpu()]),
                     torch.cat([data.train_labels[index].cpu(), data.test_labels.cpu()]), rows)
        self._counts = (rows, len(data.test_labels))
        if trainer.start_epoch == 0:  # a resumed run has its epoch 0
            self._record(trainer, 0)

    def on_epoch_end(self, trainer: Trainer, entry: dict[str, Any]) -> None:
        epoch = entry["epoch"]
        self._record(trainer, epoch)
        acc: list[float | None] = [None] * len(trainer.stack.blocks)
        for e in self.entries:
            if e["epoch"] == epoch:
                acc[e["block"]] = e["acc"]
        entry["probe_acc"] = acc
        if entry["test_acc"] is None:  # a label-free rule: the probe is its accuracy
            entry["test_acc"], entry["block_acc"] = acc[-1], acc

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        self._set = None

    def _record(self, trainer: Trainer, epoch: int) -> None:
        start = time.perf_counter()
        entries = trainer.executor.run_probe(
            lambda blocks, inputs: self.measure_range(trainer, epoch, blocks, inputs))
        self.seconds.append(time.perf_counter() - start)
        self.entries.extend(entries)
        if self.log:
            shown = " ".join(f"{e['acc']:.3f}" for e in entries)
            tqdm.write(f"linear probe, epoch {epoch}: test acc per block {shown} "
                       f"({self.seconds[-1]:.1f} s)")
        trainer.accelerator.wait_for_everyone()

    def measure_range(self, trainer: Trainer, epoch: int, blocks: range,
                      inputs: Tensor | None = None) -> tuple[list[dict[str, Any]], Tensor | None]:
        """The entries of the consecutive ``blocks`` and the probe set's output of the last of
        them (for the next pipeline stage; None where no block follows). ``inputs``: the
        previous stage's output for the probe set, None for the images (block 0)."""
        stack, device = trainer.stack, trainer.accelerator.device
        images, labels, rows = self._set
        feats, out = self._features(stack, blocks, images, inputs, device, trainer)
        generator = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
        labels = labels.to(device)
        entries = []
        for k in blocks:
            x = feats.pop(k).to(device)
            train_acc, acc = fit_linear(x[:rows], labels[:rows], x[rows:], labels[rows:],
                                        trainer.data.num_classes, self.epochs, generator,
                                        self.lr, self.weight_decay, self.batch_size)
            entries.append({"epoch": epoch, "block": k, "name": stack.names[k],
                            "dim": x.shape[1], "acc": acc, "train_acc": train_acc})
        return entries, out

    def _features(self, stack: nn.Module, blocks: range, images: Tensor, inputs: Tensor | None,
                  device: torch.device, trainer: Trainer
                  ) -> tuple[dict[int, Tensor], Tensor | None]:
        """Each block's pooled output for the probe set (float32, CPU), and the last block's
        whole output where a later block needs it."""
        feats: dict[int, list[Tensor]] = {k: [] for k in blocks}
        outs: list[Tensor] | None = [] if blocks[-1] < len(stack.blocks) - 1 else None
        modes = [(module, module.training) for module in stack.modules()]
        stack.eval()
        try:
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                for start in range(0, len(images), self.batch):
                    if inputs is None:
                        h = trainer.layout(trainer.eval_transform(
                            images[start:start + self.batch].to(device)))
                    else:
                        h = inputs[start:start + self.batch].to(device)
                    for k in blocks:
                        h = stack.blocks[k](h)
                        feats[k].append(pooled(h.float(), self.pool).cpu())
                    if outs is not None:
                        outs.append(h.float().cpu())
        finally:
            for module, mode in modes:
                module.train(mode)
        return ({k: torch.cat(v) for k, v in feats.items()},
                torch.cat(outs) if outs is not None else None)
