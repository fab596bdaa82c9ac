"""A loss term or a block that keeps only its input for backward and runs again there.

Gradients are exact (the same function on the same input, with the first forward's
random state and autocast); the parameters are inputs of the autograd node, so their
gradients accumulate as usual (DDP, gradient scaling). Unlike ``torch.utils.checkpoint``
it installs no saved-tensor hooks, so :class:`~locallearn.measure.SavedTensorMeter`
counts what the second forward saves. Why: docs/architecture.md ("The loop").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


def recomputed(fn: Callable[[torch.Tensor], torch.Tensor], module: nn.Module,
               h: torch.Tensor) -> torch.Tensor:
    """``fn(h)`` (a loss computed by ``module``) whose graph is rebuilt in backward.

    Args:
        fn: maps ``h`` to a tensor through ``module`` (and constants it closes over).
        module: the module holding the parameters and buffers ``fn`` uses.
        h: the input; only it is kept for backward.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    return _Recomputed.apply(fn, module, h, *params)


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, module, h, *params):
        ctx.fn, ctx.module, ctx.params = fn, module, params
        ctx.autocast = (h.device.type, torch.is_autocast_enabled(h.device.type),
                        torch.get_autocast_dtype(h.device.type))
        # Dropout draws the same masks again in backward.
        ctx.rng = (torch.get_rng_state(),
                   torch.cuda.get_rng_state(h.device) if h.device.type == "cuda" else None)
        ctx.save_for_backward(h)
        with torch.no_grad():
            return fn(h)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        needs_h = ctx.needs_input_grad[2]
        x = h.detach().requires_grad_(needs_h)
        inputs = ([x] if needs_h else []) + list(ctx.params)
        cuda = [h.device] if h.device.type == "cuda" else []
        buffers = [(b, b.detach().clone()) for b in ctx.module.buffers()]
        with torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(ctx.rng[0])  # the first forward's; the caller's state is kept
            if cuda:
                torch.cuda.set_rng_state(ctx.rng[1], h.device)
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                out = ctx.fn(x)
            grads = list(torch.autograd.grad(out, inputs, grad, allow_unused=True))
        with torch.no_grad():  # the second forward's buffer updates (batch-norm statistics) undone
            for buffer, value in buffers:
                buffer.copy_(value)
        grad_h = grads.pop(0) if needs_h else None
        return (None, None, grad_h, *grads)


def run_recomputed(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """``blocks`` applied in turn, each fine block keeping only its input for backward
    (``--recompute-blocks``, docs/speed.md); a block that ``--blocks K`` grouped from fine
    blocks is taken apart, as recomputing the whole group would save nothing."""
    for block in blocks:
        for fine in block if isinstance(block, nn.Sequential) else (block,):
            x = recomputed(fine, fine, x)
    return x


@contextlib.contextmanager
def kept_buffers(*modules: nn.Module) -> Iterator[None]:
    """Run a pass whose changes to the modules' buffers (BatchNorm statistics) are undone
    afterwards: a forward-gradient direction after the first, the gradient probe."""
    saved = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
