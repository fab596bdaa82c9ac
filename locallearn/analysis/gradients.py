"""The gradient probe: how far a rule's update is from backprop's, after every epoch.

Rules that do without backprop (feedback alignment, direct feedback alignment, forward
gradients) are judged by how well their update follows the true gradient: the alignment
angle of each layer (Lillicrap et al. 2016; BioTorch's metric) or the cosine and variance
of a forward-gradient estimate. The rule computes them
(:meth:`~locallearn.rules.base.Rule.gradient_probe`); this observer gives it the same
fixed batch every epoch and keeps training untouched: the parts' buffers (BatchNorm
statistics) and the random state are restored afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import balanced_subset
from ..observers import Observer, Trainer
from ..recompute import kept_buffers


class GradientProbe(Observer):
    """Writes ``entry["gradient_probe"]`` (metric -> name -> value) after every epoch.

    Args:
        size: images in the probe batch, class-balanced from the training split, normalised
            and not augmented (the run's seed picks them).
    """

    def __init__(self, size: int = 128):
        self.size = size
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        labels = trainer.data.train_labels
        index = balanced_subset(labels, min(self.size, len(labels)), trainer.config.seed)
        self._batch = trainer.data.train_images[index], labels[index]

    def on_epoch_end(self, trainer: Trainer, entry: dict[str, Any]) -> None:
        result = self.measure(trainer, entry["epoch"])
        if result is not None:
            entry["gradient_probe"] = result
            if trainer.accelerator.is_main_process:
                tqdm.write(probe_line(entry["epoch"], result))

    def measure(self, trainer: Trainer, epoch: int) -> dict[str, dict[str, float]] | None:
        """The rule's probe on the fixed batch, the parts in training mode, nothing kept."""
        device = trainer.accelerator.device
        images, labels = (t.to(device) for t in self._batch)
        x, step = trainer.make_step(images, labels, trainer.eval_transform)
        parts = trainer.parts
        modes = [p.training for p in parts]
        generator = torch.Generator(device).manual_seed(trainer.config.seed * 1_009 + epoch)
        try:
            with kept_buffers(*parts), torch.random.fork_rng(
                    devices=[device] if device.type == "cuda" else []):
                for p in parts:
                    p.train()
                with trainer.autocast():
                    return trainer.rule.gradient_probe(parts, x, step, generator)
        finally:
            for p, mode in zip(parts, modes, strict=True):
                p.train(mode)


def probe_line(epoch: int, result: dict[str, dict[str, float]]) -> str:
    """One log line: each metric's values, in the order the rule gave them."""
    shown = "; ".join(f"{metric} " + " ".join(f"{v:.3g}" for v in values.values())
                      for metric, values in result.items())
    return f"  gradient probe, epoch {epoch}: {shown}"
