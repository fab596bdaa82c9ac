"""The information-plane observer: nHSIC of every block with the input and the labels.

Sakamoto & Sato (2024, "End-to-End Training Induces Information Bottleneck
through Layer-Role Differentiation", TMLR) compare training rules by where each
layer's representation ``Z`` sits on the plane ``(nHSIC(X; Z), nHSIC(Y; Z))``
as training goes on. :class:`InformationPlane` measures that plane for any
rule, because it sees only the :class:`~locallearn.blocks.BlockStack`: a fixed
probe set goes through the stack's blocks in eval mode, without autograd, on
the main process, and each block's output is copied out.

Memory: each measured block's ``m`` feature rows are kept together on the CPU in
float32, in several passes over the probe set when all blocks' would exceed
``memory_budget`` (why: docs/information_plane.md, "The observer").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import BatchTransform, ImageData, balanced_subset
from ..errors import ConfigError, unknown_name
from ..hsic import (
    DEFAULT_DISTANCE,
    DEFAULT_EPS,
    DEFAULT_SIGMA,
    KERNELS,
    SoftProjector,
    adjust_for_chance,
    check_distance,
    inner_products,
    kernel_alignment,
    kernel_from_inner_products,
    kernel_matrix,
    soft_projector,
)
from ..observers import Observer

if TYPE_CHECKING:
    from ..trainer import Trainer

__all__ = ["InformationPlane"]

SPLITS = ("train", "test")


@dataclass
class _Probe:
    """The fixed probe set and everything about it computed once."""

    images: Tensor  # uint8 (m, C, H, W), CPU
    transform: BatchTransform
    device: torch.device  # where the blocks run
    gram_device: torch.device  # where the float64 matrices live
    x: SoftProjector
    y: SoftProjector
    x_linear: Tensor  # inner products of the inputs and of the labels, for CKA
    y_linear: Tensor


class InformationPlane(Observer):
    """Measures ``nHSIC(X; Z_k)`` and ``nHSIC(Y; Z_k)`` of every block ``k`` during training.

    Measured before training (epoch 0), after every ``every``-th epoch and after
    the last. ``X`` is the normalised input image, ``Y`` the one-hot label, ``Z_k``
    the flattened output of block ``k``. Each measurement appends one entry per
    block to :attr:`entries`, and :meth:`describe` gives the probe set's reference
    values, so each form can be recomputed from a record (docs/information_plane.md
    lists the fields).

    Args:
        probe_size: ``m``, the number of probe samples (fewer if the split is smaller).
            nHSIC grows with ``m``: compare raw values only at equal ``m``.
        split: ``"train"`` (default, without augmentation) or ``"test"``.
        seed: draws the seeded, class-balanced probe set. Fixed by default, not
            the run's seed, so every run measures the same samples.
        sigma: Gaussian width in units of ``sqrt(d)`` (Ma, Lewis & Kleijn 2020).
        eps: regulariser of ``R = K~ (K~ + eps m I)^-1`` (Fukumizu et al. 2007).
        kernel, label_kernel: on inputs and block outputs, and on the one-hot labels
            (``"delta"``: label equality); see :mod:`locallearn.hsic`.
        distance: in the exponent of the Gaussian kernels: ``"sqeuclidean"`` (default,
            as Ma, Lewis & Kleijn 2020) or ``"euclidean"`` (as the seed paper's code,
            keitaroskmt/E2E-info ``src/hsic/hsic.py``).
        memory_budget: bytes of CPU features held at once (see the module docstring).
    """

    probes_blocks = True

    def __init__(
        self,
        probe_size: int = 1000,
        every: int = 1,
        split: str = "train",
        seed: int = 0,
        sigma: float = DEFAULT_SIGMA,
        eps: float = DEFAULT_EPS,
        kernel: str = "gaussian",
        label_kernel: str = "gaussian",
        distance: str = DEFAULT_DISTANCE,
        batch_size: int = 200,
        memory_budget: int = 2 * 2**30,
    ):
        if probe_size < 2:
            raise ConfigError(f"probe size must be at least 2; got {probe_size}")
        if every < 1 or batch_size < 1 or memory_budget < 1:
            raise ConfigError("every, batch_size and memory_budget must be positive")
        if split not in SPLITS:
            raise unknown_name("probe split", split, SPLITS)
        for name in (kernel, label_kernel):
            if name not in KERNELS:
                raise unknown_name("kernel", name, KERNELS)
        if kernel == "delta":
            raise ConfigError("the delta kernel is for labels; use it as label_kernel")
        check_distance(distance)
        if not (sigma > 0 and eps > 0):
            raise ConfigError(f"sigma and eps must be positive; got {sigma} and {eps}")
        self.probe_size, self.every, self.split, self.seed = probe_size, every, split, seed
        self.sigma, self.eps, self.kernel, self.label_kernel = sigma, eps, kernel, label_kernel
        self.distance = distance
        self.batch_size, self.memory_budget = batch_size, memory_budget
        self.entries: list[dict[str, Any]] = []
        self.seconds: list[float] = []  # wall time of each measurement
        self.m: int | None = None
        self.progress = False  # a bar per measurement (set from the trainer)
        self.log = False  # a line per measurement, with its time (on the main process)
        self._probe: _Probe | None = None
        self._reference: dict[str, float] = {}

    def describe(self) -> dict[str, Any]:
        """The settings for the run record's ``plane_config``; ``m`` is the size actually used."""
        return {
            "m": self.m if self.m is not None else self.probe_size,
            "probe_size": self.probe_size, "split": self.split, "seed": self.seed,
            "every": self.every, "kernel": self.kernel, "label_kernel": self.label_kernel,
            "distance": self.distance, "sigma": self.sigma, "eps": self.eps,
            "input": "normalised images, flattened", **self._reference,
            "seconds": [round(s, 3) for s in self.seconds],
        }

    def on_fit_start(self, trainer: Trainer) -> None:
        main = trainer.accelerator.is_main_process
        if main or len(trainer.executor.probe_blocks()):  # the main process describes it
            self.log, self.progress = main, trainer.config.progress and main
            start = time.perf_counter()
            self.prepare(trainer.data, trainer.eval_transform, trainer.accelerator.device)
            if self.log:
                tqdm.write(f"information plane: {self.m} probe images ({self.split} split) "
                           f"prepared in {time.perf_counter() - start:.1f} s")
        if trainer.start_epoch == 0:  # a resumed run has its epoch 0
            self._record(trainer, 0)
        trainer.accelerator.wait_for_everyone()  # the others wait rather than race ahead

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the entries measured so far."""
        return {"entries": self.entries, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries[:] = state["entries"]
        self.seconds[:] = state["seconds"]

    def on_epoch_end(self, trainer: Trainer, entry: dict[str, Any]) -> None:
        epoch = entry["epoch"]
        if epoch % self.every and epoch != trainer.config.epochs:
            return
        self._record(trainer, epoch)
        trainer.accelerator.wait_for_everyone()

    def _record(self, trainer: Trainer, epoch: int) -> None:
        # The executor calls measure_range on the blocks each process holds (every block
        # on the main process of a serial run, each stage's own in a pipeline) and gives
        # the main process every entry.
        start = time.perf_counter()
        entries = trainer.executor.run_probe(
            lambda blocks, inputs: self.measure_range(trainer.stack, epoch, blocks, inputs))
        if trainer.accelerator.is_main_process:
            self.seconds.append(time.perf_counter() - start)
            self.entries.extend(entries)
            if self.log:
                tqdm.write(f"information plane, epoch {epoch}: {len(entries)} blocks measured "
                           f"in {self.seconds[-1]:.1f} s")

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        self._probe = None  # the m x m matrices are not needed any more

    def prepare(self, data: ImageData, transform: BatchTransform, device: torch.device) -> None:
        """Draw the probe set and decompose the kernels of its inputs and labels, once."""
        images = data.train_images if self.split == "train" else data.test_images
        labels = data.train_labels if self.split == "train" else data.test_labels
        self.m = min(self.probe_size, len(labels))
        index = balanced_subset(labels, self.m, self.seed)
        images = images[index].cpu()
        device = torch.device(device)
        # MPS has no float64; the m x m matrices then live on the CPU.
        gram_device = torch.device("cpu") if device.type == "mps" else device
        x = transform(images)  # normalised, no augmentation
        x_linear = inner_products(x, device=gram_device)
        x_proj = soft_projector(kernel_from_inner_products(
            x_linear, x[0].numel(), self.kernel, self.sigma, distance=self.distance
        ), self.eps)
        onehot = F.one_hot(labels[index].cpu(), data.num_classes).to(torch.float64)
        y_kernel = kernel_matrix(onehot, self.label_kernel, self.sigma, distance=self.distance)
        y_proj = soft_projector(y_kernel.to(gram_device), self.eps)
        self._probe = _Probe(images, transform, device, gram_device, x_proj, y_proj, x_linear,
                             inner_products(onehot, device=gram_device))
        self._reference = {
            "nhsic_xx": x_proj.self_nhsic(), "nhsic_yy": y_proj.self_nhsic(),
            "rank_x": x_proj.effective_rank(), "rank_y": y_proj.effective_rank(),
        }

    def measure(self, stack: nn.Module, epoch: int) -> list[dict[str, Any]]:
        """One entry per block of ``stack`` (a BlockStack) for the prepared probe set."""
        return self.measure_range(stack, epoch, range(len(stack.blocks)))[0]

    def measure_range(self, stack: nn.Module, epoch: int, blocks: range,
                      inputs: Tensor | None = None) -> tuple[list[dict[str, Any]], Tensor]:
        """The entries of the consecutive ``blocks`` of ``stack``, and the probe's output of
        the last of them: what a pipeline stage measures and hands to the next stage.

        Only ``blocks`` run (the others may be on another process). ``inputs`` is the probe
        set's ``(m, ...)`` float32 input to ``blocks[0]`` (the previous stage's output);
        None for the normalised probe images, which only block 0 takes. The output is
        ``(m, ...)`` float32 on the CPU. Runs in eval mode without autograd or autocast;
        every module's training flag is restored afterwards.
        """
        probe = self._probe
        if probe is None:
            raise RuntimeError("call prepare() (or attach the observer to a Trainer) first")

        def batch(start: int, stop: int) -> Tensor:
            if inputs is None:
                return probe.transform(probe.images[start:stop].to(probe.device))
            return inputs[start:stop].to(probe.device)

        modes = [(module, module.training) for module in stack.modules()]
        stack.eval()
        try:
            with torch.no_grad(), torch.autocast(probe.device.type, enabled=False):
                h, shapes = batch(0, 1), {}
                for k in blocks:  # each block's output shape, from a one-sample forward
                    h = stack.blocks[k](h)
                    shapes[k] = tuple(h.shape[1:])
                dims = {k: math.prod(shape) for k, shape in shapes.items()}
                entries, out = [], None
                bar = tqdm(total=len(dims), desc=f"information plane, epoch {epoch}",
                           unit="block", leave=False, disable=None if self.progress else True)
                for group in _groups(dims, self.m, self.memory_budget):
                    feats = self._features(stack, group, blocks[0], dims, batch)
                    if group[-1] == blocks[-1]:
                        out = feats[group[-1]].reshape(-1, *shapes[group[-1]])
                    for k in group:  # pop: each block's features go as soon as it is measured
                        entries.append(self._entry(stack, probe, epoch, k, feats.pop(k)))
                        bar.update()
                bar.close()
        finally:
            for module, mode in modes:
                module.train(mode)
        return entries, out

    def _features(self, stack: nn.Module, group: list[int], first: int, dims: dict[int, int],
                  batch: Callable[[int, int], Tensor]) -> dict[int, Tensor]:
        """Run the probe set batch by batch through the blocks from ``first`` up to the
        group's last, and keep the group's outputs: block -> ``(m, d)`` float32, on the CPU."""
        m = len(self._probe.images)
        feats = {k: torch.empty(m, dims[k], dtype=torch.float32) for k in group}
        for start in range(0, m, self.batch_size):
            h = batch(start, start + self.batch_size)
            for k in range(first, group[-1] + 1):
                h = stack.blocks[k](h)
                if k in feats:
                    feats[k][start:start + len(h)] = h.reshape(len(h), -1).float().cpu()
        return feats

    def _entry(self, stack: nn.Module, probe: _Probe, epoch: int, k: int, feats: Tensor
               ) -> dict[str, Any]:
        gram = inner_products(feats, device=probe.gram_device)
        z = soft_projector(kernel_from_inner_products(
            gram, feats.shape[1], self.kernel, self.sigma, distance=self.distance
        ), self.eps)
        zz, rank = z.self_nhsic(), z.effective_rank()
        xz, yz = probe.x.dot(z), probe.y.dot(z)
        ref, m = self._reference, z.size
        return {
            "epoch": epoch, "block": k, "name": stack.names[k], "dim": feats.shape[1],
            "nhsic_x": xz, "nhsic_y": yz,
            "nhsic_x_scaled": _scaled(xz, ref["nhsic_xx"], zz),
            "nhsic_y_scaled": _scaled(yz, ref["nhsic_yy"], zz),
            "nhsic_x_adj": adjust_for_chance(xz, ref["nhsic_xx"], zz, ref["rank_x"], rank, m),
            "nhsic_y_adj": adjust_for_chance(yz, ref["nhsic_yy"], zz, ref["rank_y"], rank, m),
            "nhsic_self": zz, "rank": rank,
            "cka_x": kernel_alignment(probe.x_linear, gram),
            "cka_y": kernel_alignment(probe.y_linear, gram),
        }


def _scaled(ab: float, aa: float, bb: float) -> float:
    norm = (aa * bb) ** 0.5
    return ab / norm if norm > 0 else 0.0


def _groups(dims: dict[int, int], m: int, budget: int) -> list[list[int]]:
    """Consecutive blocks whose float32 features fit the memory budget together."""
    groups: list[list[int]] = []
    used = budget + 1  # the first block starts a group
    for k, d in dims.items():
        size = 4 * d * m
        if used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(k)
        used += size
    return groups
