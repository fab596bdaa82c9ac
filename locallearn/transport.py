"""Messages between pipeline stages: a part's output and its step context, in step or
through a replay buffer.

A message is a few tensors and a few integers, sent with ``isend``/``irecv``. The
receiver cannot know the shapes in advance (a last batch is smaller, a rule may stack
views), so every message starts with a fixed-size int64 header describing what follows.
The step context crosses whole, so a part on another process sees what it would see
in one (DESIGN principle 11).

With ``--replay-buffer M`` (Decoupled Greedy Learning's asynchronous variant,
Belilovsky, Eickenberg and Oyallon, ICML 2020, section 4) each stage after the first
draws from the last M messages it received (:class:`ReplayBuffer`, by "priority LIFO":
among the samples drawn the fewest times, the newest), while a thread receives the
next ones (:func:`fill`). The draws, the cap, the staleness recorded and where this
differs from the reference code: docs/parallel.md.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .step import Step

# Message kinds, the header's first integer.
BATCH, END = 0, 1

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
           torch.int32, torch.uint8, torch.bool)
# A header is HEADER int64s: the kind, the ints (count first), the tensors (count first),
# each as dtype (-1: none), ndim and shape; then zeros.
HEADER = 64


def _header(kind: int, tensors: list[Tensor | None], ints: list[int]) -> Tensor:
    head = [kind, len(ints), *ints, len(tensors)]
    for t in tensors:
        head += [-1] if t is None else [_DTYPES.index(t.dtype), t.ndim, *t.shape]
    return torch.tensor(head + [0] * (HEADER - len(head)), dtype=torch.int64)


class Sender:
    """Sends messages to rank ``dst`` (headers on ``device``, the backend's), keeping each
    until delivered, as ``isend`` needs; :meth:`send` waits for the oldest once
    ``in_flight`` are outstanding, so a fast stage cannot fill memory with activations
    its successor has not taken yet."""

    def __init__(self, dst: int, device: torch.device, in_flight: int):
        self.dst, self.device, self.in_flight = dst, device, in_flight
        self.pending: deque[tuple[list, list[Tensor]]] = deque()
        self.waited = 0.0  # seconds spent waiting for deliveries

    def send(self, kind: int, tensors: list[Tensor | None], ints: list[int]) -> None:
        """Start sending a message; returns once at most ``in_flight`` are outstanding."""
        while len(self.pending) >= self.in_flight:
            self._finish_oldest()
        # Contiguous copies: the receiver rebuilds each tensor from its shape alone.
        payload = [t.detach().contiguous() for t in tensors if t is not None]
        kept = [_header(kind, tensors, ints).to(self.device), *payload]
        works = [dist.isend(t, self.dst) for t in kept]
        self.pending.append((works, kept))

    def _finish_oldest(self) -> None:
        works, _ = self.pending.popleft()
        t0 = time.perf_counter()
        for work in works:
            work.wait()
        self.waited += time.perf_counter() - t0

    def flush(self) -> None:
        """Wait until every message sent has been delivered."""
        while self.pending:
            self._finish_oldest()


def receive(src: int, device: torch.device) -> tuple[int, list[Tensor | None], list[int]]:
    """The next message from ``src``: its kind, its tensors (None where none was sent), its ints."""
    head = torch.empty(HEADER, dtype=torch.int64, device=device)
    dist.recv(head, src)
    kind, nints, *head = head.cpu().tolist()
    ints, count, at = head[:nints], head[nints], nints + 1
    tensors: list[Tensor | None] = []
    works = []
    for _ in range(count):
        dtype = head[at]
        if dtype < 0:
            tensors.append(None)
            at += 1
            continue
        ndim = head[at + 1]
        t = torch.empty(head[at + 2:at + 2 + ndim], dtype=_DTYPES[dtype], device=device)
        at += 2 + ndim
        works.append(dist.irecv(t, src))
        tensors.append(t)
    for work in works:
        work.wait()
    return kind, tensors, ints


def pack_step(h: Tensor, step: Step, carried: Tensor | None = None, stamp: int = 0
              ) -> tuple[list[Tensor | None], list[int]]:
    """A part's output, its step context, the earlier stages' logits where the rule
    combines them (else None) and the batch's number in its pass, as tensors and ints."""
    tensors = [h, step.labels, step.network_input, step.mean, step.std, carried]
    return tensors, [int(step.train), step.views, step.num_classes, stamp]


def unpack_step(tensors: list[Tensor | None], ints: list[int]
                ) -> tuple[Tensor, Step, Tensor | None, int]:
    """The inverse of :func:`pack_step`: ``(h, step, carried, stamp)``."""
    h, labels, network_input, mean, std, carried = tensors
    train, views, num_classes, stamp = ints
    step = Step(labels, network_input, bool(train), views, num_classes, mean, std)
    return h, step, carried, stamp


@dataclass(slots=True)
class _Held:
    sample: Any
    stamp: int
    draws: int = 0


class ReplayBuffer:
    """The last ``size`` samples received, drawn by priority LIFO, each at most
    ``max_reuse`` times (None: no cap). Safe to fill from one thread and draw from another.

    Args:
        size: M, the samples held (at least 1); a new sample evicts the oldest.
        max_reuse: K, the most draws of one sample (at least 1), or None.
    """

    def __init__(self, size: int, max_reuse: int | None = None):
        self.size, self.max_reuse = size, max_reuse
        self._held: deque[_Held] = deque()
        self._ready = threading.Condition()
        self.clear()

    def clear(self) -> None:
        """Empty the buffer and its counts (a new epoch)."""
        with self._ready:
            self._held.clear()
            self.ended, self.error = False, None
            self.received, self.newest = 0, -1
            self.draws: list[int] = []  # per sample evicted or left at the end
            self.ages: list[int] = []  # per draw

    def add(self, sample: Any, stamp: int) -> None:
        """Hold ``sample``, the predecessor's batch number ``stamp`` (stamps increase)."""
        with self._ready:
            if len(self._held) == self.size:
                self.draws.append(self._held.popleft().draws)
            self._held.append(_Held(sample, stamp))
            self.received += 1
            self.newest = stamp
            self._ready.notify()

    def end(self, error: BaseException | None = None) -> None:
        """No more samples will come (the predecessor's pass ended, or receiving failed)."""
        with self._ready:
            self.ended, self.error = True, error
            self._ready.notify()

    def _eligible(self) -> _Held | None:
        """Among the held samples drawn the fewest times (and fewer than ``max_reuse``),
        the newest."""
        cap = self.max_reuse or math.inf
        return min((held for held in reversed(self._held) if held.draws < cap),  # newest first
                   key=lambda held: held.draws, default=None)

    def draw(self) -> Any | None:
        """The next sample to step on, waiting for one if none can be drawn; None once
        the predecessor has ended and none can be drawn.

        Raises:
            RuntimeError: receiving failed (the receiving thread's error is its cause).
        """
        with self._ready:
            while (held := self._eligible()) is None and not self.ended:
                self._ready.wait()
            if self.error is not None:
                raise RuntimeError("receiving from the previous stage failed") from self.error
            if held is None:
                return None
            held.draws += 1
            self.ages.append(self.newest - held.stamp)
            return held.sample

    def summary(self) -> dict[str, Any]:
        """The epoch's staleness, once the predecessor has ended: samples received, never
        drawn, draws per received sample (mean, max) and the draws' ages (mean, max)."""
        with self._ready:
            draws, ages = self.draws + [held.draws for held in self._held], self.ages
            self._held.clear()
            return {"received": self.received, "unused": draws.count(0),
                    "draws_mean": round(sum(draws) / len(draws), 4) if draws else None,
                    "draws_max": max(draws, default=None),
                    "age_mean": round(sum(ages) / len(ages), 4) if ages else None,
                    "age_max": max(ages, default=None)}


def fill(buffer: ReplayBuffer, receive: Callable[[], tuple[Any, int] | None]) -> threading.Thread:
    """Start a thread that adds what ``receive()`` returns, ``(sample, stamp)``, to
    ``buffer`` until it returns None (the pass's end), then ends the buffer. An error
    ends the buffer too, and :meth:`ReplayBuffer.draw` raises it."""

    def run() -> None:
        try:
            while (got := receive()) is not None:
                buffer.add(*got)
        except BaseException as err:  # handed to the drawing thread
            buffer.end(err)
            return
        buffer.end()

    thread = threading.Thread(target=run, name="replay-receiver", daemon=True)
    thread.start()
    return thread

