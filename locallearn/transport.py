"""Point-to-point messages between pipeline stages: a part's output and its step context.

A message is a few tensors and a few integers, sent with ``isend``/``irecv``. The
receiver cannot know the shapes in advance (a last batch is smaller, a rule may stack
views), so every message starts with a fixed-size int64 header describing what follows.
The step context crosses whole, so a part on another process sees what it would see
in one (DESIGN principle 11).
"""

from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist
from torch import Tensor

from .step import Step

# Message kinds, the header's first integer.
BATCH, END = 0, 1

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
           torch.int32, torch.uint8, torch.bool)
_MAX_TENSORS, _MAX_INTS, _MAX_DIMS = 6, 6, 6
_SLOT = 3 + _MAX_DIMS  # present, dtype, ndim, dims
HEADER = 3 + _MAX_INTS + _MAX_TENSORS * _SLOT


def _header(kind: int, tensors: list[Tensor | None], ints: list[int]) -> Tensor:
    head = torch.zeros(HEADER, dtype=torch.int64)
    head[:3] = torch.tensor([kind, len(tensors), len(ints)])
    head[3:3 + len(ints)] = torch.tensor(ints, dtype=torch.int64)
    for i, t in enumerate(tensors):
        if t is None:
            continue
        at = 3 + _MAX_INTS + i * _SLOT
        head[at:at + 3] = torch.tensor([1, _DTYPES.index(t.dtype), t.ndim])
        head[at + 3:at + 3 + t.ndim] = torch.tensor(t.shape, dtype=torch.int64)
    return head


class Sender:
    """Sends messages to one rank, with at most ``in_flight`` messages not yet delivered.

    ``isend`` returns at once; the tensors must stay alive until the send
    completes, so they are kept here, and :meth:`send` waits for the oldest
    message once ``in_flight`` are outstanding. That bound is what keeps a
    fast stage from filling memory with activations its successor has not
    taken yet.

    Args:
        dst: the receiving rank.
        device: where the header is put (the backend's device: CPU for gloo).
        in_flight: the most messages outstanding at once (at least 1).
    """

    def __init__(self, dst: int, device: torch.device, in_flight: int = 2):
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
    head = head.cpu().tolist()
    kind, count, nints = head[:3]
    ints = head[3:3 + nints]
    tensors: list[Tensor | None] = []
    works = []
    for i in range(count):
        at = 3 + _MAX_INTS + i * _SLOT
        present, dtype, ndim = head[at:at + 3]
        if not present:
            tensors.append(None)
            continue
        t = torch.empty(head[at + 3:at + 3 + ndim], dtype=_DTYPES[dtype], device=device)
        works.append(dist.irecv(t, src))
        tensors.append(t)
    for work in works:
        work.wait()
    return kind, tensors, ints


#: The tensors and ints of a packed step context (the part's output first); a message
#: may carry more after them.
STEP_TENSORS, STEP_INTS = 5, 3


def pack_step(h: Tensor, step: Step) -> tuple[list[Tensor | None], list[int]]:
    """A part's output and its step context as message tensors and ints."""
    tensors = [h, step.labels, step.network_input, step.mean, step.std]
    return tensors, [int(step.train), step.views, step.num_classes]


def unpack_step(tensors: list[Tensor | None], ints: list[int]) -> tuple[Tensor, Step]:
    """The inverse of :func:`pack_step`."""
    h, labels, network_input, mean, std = tensors
    train, views, num_classes = ints[:STEP_INTS]  # a message may carry more ints after them
    return h, Step(labels, network_input, bool(train), views, num_classes, mean, std)
