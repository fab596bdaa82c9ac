"""Activation memory as bytes saved for backward.

Bytes that autograd saves for the backward pass are what local learning saves
memory on. Counting them through ``torch.autograd.graph.saved_tensors_hooks``
is deterministic and device-independent, unlike allocator statistics. Each
storage is counted once while any saved reference to it is alive; parameters
are not activations and are skipped.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


class _Saved:
    """What the pack hook stores: the tensor, and the storage it counts (None: not counted)."""

    __slots__ = ("tensor", "key", "__weakref__")

    def __init__(self, tensor: torch.Tensor, key: int | None):
        self.tensor, self.key = tensor, key


class SavedTensorMeter:
    """Context manager tracking the live and peak bytes saved for backward.

    A storage counts while any object the pack hook returned for it is alive.
    Those objects are watched through weak references and the dead ones are
    swept at the next pack (the only moment the peak can grow), so nothing runs
    when autograd frees them: a ``__del__`` there would swallow a Ctrl-C that
    arrives while it runs.

    Args:
        skip: modules whose parameters are not counted (they are not activations).

    Example:
        >>> with SavedTensorMeter(model) as meter:
        ...     model(x).sum().backward()
        >>> meter.peak  # largest number of bytes alive at once
    """

    def __init__(self, *skip: nn.Module):
        self._params = {p.data_ptr() for m in skip for p in m.parameters()}
        self._holders: dict[int, list[weakref.ref]] = {}  # storage -> its saved references
        self._sizes: dict[int, int] = {}
        self._current = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @property
    def current(self) -> int:
        """Bytes of the storages saved for backward and still referenced now."""
        self._sweep()
        return self._current

    def _sweep(self) -> None:
        for key in list(self._holders):
            alive = [ref for ref in self._holders[key] if ref() is not None]
            if alive:
                self._holders[key] = alive
            else:
                del self._holders[key]
                self._current -= self._sizes.pop(key)

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        if isinstance(tensor, nn.Parameter) or tensor.data_ptr() in self._params:
            return _Saved(tensor, None)
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:  # empty or meta storage holds no memory
            return _Saved(tensor, None)
        self._sweep()
        saved = _Saved(tensor, key)
        if key not in self._holders:
            self._holders[key] = []
            self._sizes[key] = storage.nbytes()
            self._current += storage.nbytes()
            self.peak = max(self.peak, self._current)
        self._holders[key].append(weakref.ref(saved))
        return saved

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def step_peak_bytes(
    trainer, images: torch.Tensor, labels: torch.Tensor, trained: list[int] | None = None,
) -> int:
    """Peak bytes saved for backward during one training step of ``trainer``.

    Parts before the first trained one run without autograd, so they save
    nothing: the peak is the one a step on their cached outputs would have.

    Args:
        trainer: a :class:`~locallearn.trainer.Trainer`.
        images: a uint8 image batch as the data loader yields it.
        labels: the batch's labels.
        trained: the parts that learn in this step; those of the first epoch by default.
    """
    device = trainer.accelerator.device
    x, step = trainer.make_step(images.to(device), labels.to(device), trainer.eval_transform)
    trained = trained or trainer.schedule[0]
    for i in trained:
        trainer.activate(i)
    with SavedTensorMeter(*trainer.parts) as meter:
        trainer.train_step(x, step, trained)
    return meter.peak
