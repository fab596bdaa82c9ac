"""Cutting a rule's parts into pipeline stages: each part's measured cost, and the
contiguous cut that makes the costliest stage as cheap as possible (by time a stage
costs the sum of its parts'; by memory, see :func:`cut` and docs/parallel.md).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
from torch import nn

from .measure import SavedTensorMeter
from .optim import make_optimizer


def held_bytes(modules: Iterable[nn.Module], optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """Bytes of the modules' parameters and buffers and the optimizers' state tensors,
    each storage once (a tensor shared by two modules counts once; ``meta`` tensors,
    which hold no memory, count nothing)."""
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    tensors += [v for opt in optimizers for state in opt.state.values()
                for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if not t.is_meta}
    storages.pop(0, None)  # empty tensors
    return sum(storages.values())


def best_cut(n: int, stages: int, cost: Callable[[int, int], float]) -> list[int]:
    """The first part of each of ``stages`` contiguous, non-empty groups of parts
    ``0..n-1``, so that the largest ``cost(a, b)`` of a group ``a..b-1`` is as small as
    possible (exact dynamic programme; on a tie, the earliest cut)."""
    # best[s][i]: the least largest cost cutting the first i parts into s groups.
    best = [[math.inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                worst = max(best[s - 1][j], cost(j, i))
                if worst < best[s][i]:
                    best[s][i], cut[s][i] = worst, j
    starts, i = [], n
    for s in range(stages, 0, -1):
        i = cut[s][i]
        starts.append(i)
    return starts[::-1]


def cut(costs: list[float] | list[tuple[int, int]], count: int, by: str) -> list[list[int]]:
    """The part indices of each of ``count`` stages, balanced by :func:`part_costs`'s
    ``costs``. By time (``by="time"``, seconds) a stage costs the sum of its parts'. By
    memory (``"memory"``, (resident, transient) bytes) a stage holds all its parts'
    resident bytes (weights, buffers, optimizer state) and the largest of their
    transient bytes (one part's activations saved for backward and gradients, while
    that part steps)."""
    if by == "time":
        prefix = list(itertools.accumulate(costs, initial=0.0))
        starts = best_cut(len(costs), count, lambda a, b: prefix[b] - prefix[a])
    else:
        resident, transient = zip(*costs, strict=True)
        starts = best_cut(len(costs), count,
                          lambda a, b: sum(resident[a:b]) + max(transient[a:b]))
    ends = [*starts[1:], len(costs)]
    return [list(range(a, b)) for a, b in zip(starts, ends, strict=True)]


def part_costs(parts: list[nn.Module], h: torch.Tensor, step, config, by: str,
               repeats: int = 3, scale: float = 1.0) -> list[float] | list[tuple[int, int]]:
    """Each part's cost on one batch, the parts run in order from the first one's input
    ``h``: ``by="time"``, the median seconds of ``repeats`` forwards and backwards;
    ``by="memory"``, the pair (resident, transient) of :func:`cut`, counted
    once: parameters, buffers and the state of the optimizer ``config`` gives the part
    after one step; peak bytes saved for backward times ``scale`` plus the gradients'
    bytes. Activations grow with the batch and weights do not: measured on a smaller
    batch than the run's, ``scale`` (the run's batch over this one) puts them back in
    proportion (activations are per image; a few per-batch statistics are not, and
    are scaled too).

    In eval mode (BatchNorm statistics do not move). Every part's weights are left as
    they were (the memory count's optimizer step is undone) and its gradients dropped.
    """
    costs = []
    for part in parts:
        was = part.training
        part.eval()
        times, meter = [], None
        for _ in range(1 if by == "memory" else repeats):
            # The meter's hooks cost time: only where memory is measured.
            meter = SavedTensorMeter(part) if by == "memory" else None
            t0 = time.perf_counter()
            with meter or nullcontext():
                out, scored = part(h.detach(), step)
                if scored.loss.requires_grad:
                    scored.loss.backward()
            times.append(time.perf_counter() - t0)
        if meter is None:
            costs.append(sorted(times)[len(times) // 2])
        else:
            grads = sum(p.grad.untyped_storage().nbytes()
                        for p in part.parameters() if p.grad is not None)
            costs.append((_resident(part, config), round(meter.peak * scale) + grads))
        for p in part.parameters():
            p.grad = None
        part.train(was)
        h = out.detach()
    return costs


def _resident(part: nn.Module, config) -> int:
    """The part's weights, buffers and its optimizer's state after one step (the
    optimizer fills its state then), with the step undone."""
    if not any(p.requires_grad and p.grad is not None for p in part.parameters()):
        return held_bytes([part], ())
    kept = {k: v.clone() for k, v in part.state_dict().items()}
    opt = make_optimizer(part.parameters(), config, getattr(part, "lr_scale", 1.0))
    opt.step()
    held = held_bytes([part], [opt])
    part.load_state_dict(kept)
    return held
