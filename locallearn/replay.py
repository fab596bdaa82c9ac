"""Asynchronous stages with a bounded replay buffer between them (``--replay-buffer M``).

Decoupled Greedy Learning's asynchronous variant (Belilovsky, Eickenberg and Oyallon,
ICML 2020, section 4): each stage after the first draws from the last M messages it
received, by "priority LIFO" (among the samples drawn the fewest times, the newest),
while a thread receives the next ones. The draws, the cap, the staleness recorded and
where this differs from the reference code: docs/parallel.md.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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
        if size < 1 or (max_reuse is not None and max_reuse < 1):
            raise ValueError(f"a replay buffer holds at least 1 sample, each drawn at least "
                             f"once; got size {size}, max_reuse {max_reuse}")
        self.size, self.max_reuse = size, max_reuse
        self._held: deque[_Held] = deque()
        self._ready = threading.Condition()
        self.clear()

    def clear(self) -> None:
        """Empty the buffer and its counts (a new epoch)."""
        with self._ready:
            self._held.clear()
            self.ended, self.error = False, None
            self.received, self.unused, self.newest = 0, 0, -1
            self.draws: list[int] = []  # per sample evicted or left at the end
            self.ages: list[int] = []  # per draw

    def add(self, sample: Any, stamp: int) -> None:
        """Hold ``sample``, the predecessor's batch number ``stamp`` (stamps increase)."""
        with self._ready:
            if len(self._held) == self.size:
                self._retire(self._held.popleft())
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
        best = None
        for held in self._held:  # oldest first: a later one with as few draws wins
            if self.max_reuse is not None and held.draws >= self.max_reuse:
                continue
            if best is None or held.draws <= best.draws:
                best = held
        return best

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

    def _retire(self, held: _Held) -> None:
        self.draws.append(held.draws)
        self.unused += held.draws == 0

    def summary(self) -> dict[str, Any]:
        """The epoch's staleness, once the predecessor has ended: samples received, never
        drawn, draws per received sample (mean, max) and the draws' ages (mean, max)."""
        with self._ready:
            while self._held:
                self._retire(self._held.popleft())
            draws, ages = self.draws, self.ages
            return {"received": self.received, "unused": self.unused,
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

