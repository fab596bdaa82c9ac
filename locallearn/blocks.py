"""Split a timm model into an ordered stack of composable blocks.

A :class:`BlockStack` is what every rule partitions and what the analyzer
probes: ``head(blocks[-1](... blocks[0](x)))`` is the model's forward, on the
model's own modules (nothing is copied). Block 0 is always the ``"stem"`` (the
conv stem or the patch-embedding step). ``"stage"`` granularity is then one
block per stage (ResNet ``layer1..4``, ConvNeXt ``stages.i``, VGG runs of convs
between max-pools; isotropic models such as ViT and Mixer have no stages, so it
equals ``"block"``); ``"block"`` is every residual block, conv unit or
transformer block.

Every split is proven when it is made: a probe batch goes through the stack
and through the model, in eval mode and in train mode with one seed (train
mode catches a dropout or other random step the split left out), and every
parameter must sit in exactly one block or the head. A model that cannot be
split correctly raises :class:`~locallearn.errors.SplitError`; it is never
split wrongly.
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from locallearn.adapters import layout_of
from locallearn.errors import ConfigError, SplitError, unknown_name
from locallearn.measure import SavedTensorMeter

__all__ = ["BlockStack", "balanced_partition", "cut_after", "saved_bytes_per_block", "split"]

GRANULARITIES = ("stage", "block")
SUPPORTED = (
    "supported families: resnet, vgg, convnext, vit/deit, mlp-mixer, "
    "and CNNs with a valid timm feature_info"
)
PROBE_BATCH = 2  # the smallest batch for which train-mode batch norm is defined


class BlockStack(nn.Module):
    """A model as ordered blocks (one name each, e.g. ``"layer1.0"``) and a head.

    Call ``stack.train()`` / ``stack.eval()`` rather than the model's: some
    head modules (e.g. ResNet's functional dropout) belong to the stack only.
    """

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Module, names: Sequence[str],
                 model_name: str = ""):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.names = list(names)
        self.model_name = model_name

    def __len__(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the output of every block, in order."""
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, names={self.names}"


def split(
    model: nn.Module,
    granularity: str = "stage",
    num_blocks: int | None = None,
    input_size: tuple[int, int, int] | None = None,
    verify: bool = True,
    split_after: Sequence[str] | None = None,
) -> BlockStack:
    """Split a timm model into a proven stack.

    ``num_blocks`` groups the block-level blocks into that many contiguous parts
    of balanced activation memory (bytes saved for backward, measured once on a
    probe batch); ``split_after`` into the parts that end after each named
    block-level block (:func:`cut_after`); either makes ``granularity`` unused.
    ``input_size`` is the probe batch's ``(C, H, W)``; by default the model's
    (the patch embedding's image size for ViT/Mixer, else ``pretrained_cfg``).

    Raises:
        ConfigError: unknown granularity, ``num_blocks`` out of range,
            a ``split_after`` that :func:`cut_after` refuses, or both of them given.
        SplitError: the model cannot be split correctly.
    """
    if granularity not in GRANULARITIES:
        raise unknown_name("granularity", granularity, GRANULARITIES)
    if num_blocks is not None and split_after:
        raise ConfigError("num_blocks and split_after both cut the stack into parts; give one")
    name = _model_name(model)
    try:
        layout = layout_of(model)
    except SplitError as e:
        raise _refusal(name, str(e)) from None
    except Exception as e:  # a malformed model attribute is a refusal, not a crash
        raise _refusal(name, f"{type(e).__name__}: {e}") from None

    stem = [("stem", layout.stem)]
    if num_blocks is None and not split_after and granularity == "stage":
        parts = stem + [(s.name, nn.Sequential(*(m for _, m in s.fine)) if s.module is None
                         else s.module) for s in layout.stages]
    else:
        parts = stem + [pair for s in layout.stages for pair in s.fine]
    stack = BlockStack([m for _, m in parts], layout.head, [n for n, _ in parts], name)
    _check_coverage(model, stack, name)
    if num_blocks is not None:
        if not 1 <= num_blocks <= len(stack):
            raise ConfigError(
                f"num_blocks={num_blocks} is out of range: {name} has {len(stack)} blocks "
                "at block granularity"
            )
        input_size = _input_size(model, input_size)
        try:
            costs = saved_bytes_per_block(stack, input_size)
        except Exception as e:  # e.g. an input too small for the model's downsampling
            raise _refusal(name, f"probe forward failed with {type(e).__name__}: {e}") from None
        stack = _group(stack, balanced_partition(costs, num_blocks))
    if split_after:
        stack = _group(stack, cut_after(stack.names, split_after, name))
    if verify:
        _verify(model, stack, _input_size(model, input_size), name)
    _sync_modes(model, stack)
    return stack


def balanced_partition(costs: Sequence[float], k: int) -> list[list[int]]:
    """Cut ``costs`` into ``k`` contiguous non-empty groups minimising the largest group sum.

    Among the cuts with the smallest largest sum, the one with the smallest sum of squared
    group sums wins, so the groups other than the largest are balanced too. Both steps are
    exact dynamic programmes, O(k n^2) for n costs. Returns the groups as lists of indices.
    """
    n = len(costs)
    if not 1 <= k <= n:
        raise ConfigError(f"cannot cut {n} items into {k} non-empty groups; need 1 <= k <= {n}")
    prefix = [0.0, *itertools.accumulate(float(c) for c in costs)]
    top, _ = _best_cut(prefix, k, lambda worst, group: max(worst, group))
    _, groups = _best_cut(prefix, k, lambda sq, group: sq + group * group, limit=top)
    return groups


def cut_after(names: Sequence[str], after: Sequence[str], model: str = "") -> list[list[int]]:
    """Group blocks ``names`` into the contiguous parts that end after each block in ``after``.

    ``cut_after(["stem", "layer1.0", "layer1.1", "layer2.0"], ["layer1.0"])`` is
    ``[[0, 1], [2, 3]]``: the stem and ``layer1.0``, then the rest. ``len(after) + 1``
    parts; the blocks before the first cut (the stem with them) are the first part.
    An unknown name (the closest names, or all of them, named), names out of forward
    order or given twice, or the last block (whose part would be empty) are a
    ConfigError; ``model`` names the model in messages.
    """
    names = list(names)
    at = f" of {model}" if model else ""
    index = {n: i for i, n in enumerate(names)}
    for name in after:
        if name not in index:
            close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else (
                f"blocks in order: {', '.join(names)}")
            raise ConfigError(f"split_after: unknown block {name!r}{at}; {hint}")
    ends = [index[n] for n in after]
    if any(end <= prev for prev, end in itertools.pairwise(ends)):
        raise ConfigError(f"split_after must name distinct blocks in forward order; got "
                          f"{', '.join(after)}")
    if ends and ends[-1] == len(names) - 1:
        raise ConfigError(f"split_after cannot cut after {names[-1]!r}, the last block{at}: "
                          "the part after it would be empty")
    bounds = [0, *(e + 1 for e in ends), len(names)]
    return [list(range(a, b)) for a, b in itertools.pairwise(bounds)]


def _best_cut(
    prefix: list[float], k: int, add: Callable[[float, float], float], limit: float = math.inf
) -> tuple[float, list[list[int]]]:
    """Minimise a score built group by group with ``add``, over cuts whose groups are <= limit."""
    n = len(prefix) - 1
    # best[j][i]: best score of items[:i] in j groups; start[j][i]: where the j-th group starts.
    best = [[math.inf] * (n + 1) for _ in range(k + 1)]
    start = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for t in range(j - 1, i):
                group = prefix[i] - prefix[t]
                if best[j - 1][t] == math.inf or group > limit:
                    continue
                score = add(best[j - 1][t], group)
                if score < best[j][i]:
                    best[j][i], start[j][i] = score, t
    groups, end = [], n
    for j in range(k, 0, -1):
        groups.append(list(range(start[j][end], end)))
        end = start[j][end]
    return best[k][n], groups[::-1]


def saved_bytes_per_block(stack: BlockStack, input_size: tuple[int, int, int]) -> list[int]:
    """Bytes each block saves for backward on a random train-mode batch, each block on the
    detached output of the one before (as a local rule runs it); BN statistics, modes and
    the global RNG are left as they were."""
    costs = []
    with _probe(stack), torch.enable_grad():
        stack.train()
        x = _probe_batch(stack, input_size)
        for block in stack.blocks:
            with SavedTensorMeter(block) as meter:
                y = block(x)
            costs.append(meter.peak)
            x = y.detach()
            del y  # frees this block's graph before the next one runs
    return costs


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _refusal(name: str, why: str) -> SplitError:
    why = " ".join(why.split())  # keep the message on one line
    return SplitError(f"cannot split {name}: {why}; {SUPPORTED}")


def _input_size(model: nn.Module, input_size: tuple[int, int, int] | None) -> tuple[int, ...]:
    if input_size is not None:
        return tuple(input_size)
    chans = getattr(model, "in_chans", None)
    # ViT's patch_embed and Mixer's stem know the image size they were built for.
    embed = getattr(model, "patch_embed", None) or getattr(model, "stem", None)
    img_size = getattr(embed, "img_size", None)
    if img_size is not None and chans is not None:
        return (chans, *img_size)
    cfg_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if cfg_size is not None:
        return (chans or cfg_size[0], *cfg_size[1:])
    raise ConfigError(f"cannot tell the input size of {_model_name(model)}; pass input_size")


def _check_coverage(model: nn.Module, stack: BlockStack, name: str) -> None:
    counts = Counter(p for part in [*stack.blocks, stack.head] for p in part.parameters())
    missing = [n for n, p in model.named_parameters() if p not in counts]
    twice = [n for n, p in model.named_parameters() if counts[p] > 1]
    foreign = set(counts) - set(model.parameters())
    if missing:
        raise _refusal(name, f"parameters in no block: {', '.join(missing[:3])}")
    if twice:
        raise _refusal(name, f"parameters in several blocks: {', '.join(twice[:3])}")
    if foreign:
        raise _refusal(name, f"{len(foreign)} parameters are not the model's")


def _group(fine: BlockStack, groups: list[list[int]]) -> BlockStack:
    blocks = [nn.Sequential(*(fine.blocks[i] for i in g)) for g in groups]
    names = ["+".join(fine.names[i] for i in g) for g in groups]
    return BlockStack(blocks, fine.head, names, fine.model_name)


@contextmanager
def _probe(*roots: nn.Module) -> Iterator[Callable[[], None]]:
    """Fork the RNG and put back every buffer and train/eval flag on exit.

    Yields a function that puts the buffers back early (between two probe passes).
    """
    modules = {m: m.training for root in roots for m in root.modules()}
    buffers = {b: b.detach().clone() for root in roots for b in root.buffers()}

    def restore() -> None:
        with torch.no_grad():
            for b, saved in buffers.items():
                b.copy_(saved)

    devices = {t.device.index for r in roots for t in [*r.parameters(), *r.buffers()]
               if t.device.type == "cuda"}
    with torch.random.fork_rng(devices=sorted(devices)):
        try:
            yield restore
        finally:
            restore()
            for m, training in modules.items():
                m.training = training


def _probe_batch(module: nn.Module, input_size: Sequence[int]) -> torch.Tensor:
    p = next(module.parameters(), None)
    torch.manual_seed(0)
    return torch.randn(PROBE_BATCH, *input_size, device=p.device if p is not None else None,
                       dtype=p.dtype if p is not None else None)


def _verify(model: nn.Module, stack: BlockStack, input_size: Sequence[int], name: str) -> None:
    """Refuse unless ``stack(x)`` equals ``model(x)`` in eval and in train mode."""
    with _probe(model, stack) as restore, torch.no_grad():
        try:
            x = _probe_batch(model, input_size)
            for training in (False, True):
                model.train(training)
                stack.train(training)
                torch.manual_seed(1)
                want = model(x)
                restore()
                torch.manual_seed(1)
                got = stack(x)
                restore()
                mode = "train" if training else "eval"
                if not isinstance(want, torch.Tensor):
                    raise SplitError(f"model output in {mode} mode is a {type(want).__name__}")
                if got.shape != want.shape:
                    raise SplitError(f"{mode}-mode output shape {tuple(got.shape)} != "
                                     f"{tuple(want.shape)}")
                if not torch.allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True):
                    diff = (got - want).abs().max().item()
                    raise SplitError(f"{mode}-mode output differs from the model's by {diff:.3g}")
        except SplitError as e:
            raise _refusal(name, str(e)) from None
        except Exception as e:
            raise _refusal(name, f"probe forward failed with {type(e).__name__}: {e}") from None


def _sync_modes(model: nn.Module, stack: BlockStack) -> None:
    # The stack's own wrappers (heads, Sequentials) start in train mode; match the model.
    own = set(model.modules())
    for m in stack.modules():
        if m not in own:
            m.training = model.training
