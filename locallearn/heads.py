"""Auxiliary heads, registered by name and built from a block's output shape.

Every auxiliary network in the library lives here: a local objective asks for
a head by name (``build_head("cnn", shape, out)``) and any rule can use any
head. A head is registered where it is defined::

    @register_head("linear", role="classifier", summary="global average pool + linear")
    def linear(shape, out, hidden=0):
        return PoolLinear(channels_of(shape), out, hidden)

The factory takes the block output's shape (batch first), the head's output
size ``out`` and keyword options; the registry reads which options a head
takes from its signature. ``role`` says what the head produces: ``classifier``
(``out`` features: class scores or a projection), ``decoder`` (an image of
shape ``out``), or ``similarity`` (features for predsim's similarity matching).
``needs="map"`` marks heads that only take ``(B, C, H, W)`` feature maps. A factory
whose third parameter is ``later`` is built from the stack itself: it gets the
:class:`Later` blocks after the part it sits on (AugLocal's ``augmented`` head).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from .errors import ConfigError
from .registry import Registry

ROLES = ("classifier", "decoder", "similarity")
HEADS = Registry("head", required=("role", "summary"), choices={"role": ROLES})
#: Register a head factory ``f(shape, out, **options) -> nn.Module`` (see the module docstring).
register_head = HEADS.register


def list_heads(role: str | None = None) -> list[str]:
    """Names of the registered heads (of ``role``, if given), sorted."""
    return [e.name for e in HEADS if role is None or e.meta["role"] == role]


class Later(NamedTuple):
    """A block after a head's part, at the finest granularity the stack keeps.

    ``index`` is its position in that fine list (the stem is 0); ``shape_in`` and
    ``shape_out`` its input and output shapes, batch first. ``module`` is the
    backbone's own block: a head may copy its architecture, never hold it.
    """

    index: int
    name: str
    module: nn.Module
    shape_in: torch.Size
    shape_out: torch.Size


def reads_later(name: str) -> bool:
    """Whether head ``name`` is built from the :class:`Later` blocks after its part."""
    return "later" in inspect.signature(HEADS.get(name).factory).parameters


def build_head(name: str, shape: Sequence[int], out: Any, where: str = "",
               option: str = "head", later: Sequence[Later] = (),
               **options: Any) -> nn.Module:
    """The head ``name`` for block outputs of ``shape``, with ``out`` outputs.

    ``shape`` is the block output's, batch first; ``out`` an int, or a decoder's image
    shape. Options the head does not take are refused, except those left at 0 (a
    rule passes its settings for every head it may build). ``where`` (what the head is
    for: "rule 'dgl', block 'layer1'") and ``option`` (the option that chose the head)
    go into messages. ``later`` goes to the heads that read it (:func:`reads_later`).

    Raises:
        ConfigError: an unknown head (close matches named), a feature-map head
            on a block that outputs tokens or vectors, or an option it does not take.
    """
    entry, takes = HEADS.get(name), HEADS.options(name)
    at = f"{where}: " if where else ""
    given = {k: v for k, v in options.items() if v not in (0, None, ())}
    extra = sorted(set(given) - set(takes))
    if extra:
        raise ConfigError(f"{at}head {name!r} takes {', '.join(takes) or 'no options'}; "
                          f"got {extra[0]}={given[extra[0]]}")
    if entry.meta.get("needs") == "map" and len(shape) != 4:
        anywhere = [n for n in list_heads(entry.meta["role"])
                    if HEADS.get(n).meta.get("needs") != "map"]
        raise ConfigError(f"{at}head {name!r} needs (B, C, H, W) block outputs, not "
                          f"{tuple(shape)}; use --rule-opt {option}={' or '.join(anywhere)}")
    args = (torch.Size(shape), out, *((tuple(later),) if reads_later(name) else ()))
    return HEADS.build(name, *args, **options)


def pool(h: torch.Tensor) -> torch.Tensor:
    """Average a block output down to one vector per sample (B, D)."""
    if h.ndim == 4:
        return h.mean(dim=(2, 3))
    if h.ndim == 3:
        return h.mean(dim=1)
    return h.flatten(1)


def channels_of(shape: Sequence[int]) -> int:
    """Feature size left after :func:`pool` for a block output of ``shape`` (batch first)."""
    return shape[1] if len(shape) == 4 else shape[-1] if len(shape) == 3 else int(
        torch.Size(shape[1:]).numel())


class PoolLinear(nn.Module):
    """Global average pooling, then a linear layer (or a one-hidden-layer MLP).

    Pools a (B, C, H, W) feature map over space, a (B, N, D) token sequence
    over tokens, and passes (B, D) through.
    """

    def __init__(self, channels: int, out: int, hidden: int = 0):
        super().__init__()
        self.fc = (nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out)) if hidden else nn.Linear(channels, out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(pool(h))


@register_head("linear", role="classifier",
               summary="global average pool + linear (a hidden ReLU layer with hidden > 0)")
def linear(shape, out, hidden: int = 0):
    return PoolLinear(channels_of(shape), out, hidden)


@register_head("mlp", role="classifier",
               summary="global average pool + hidden ReLU layer (width hidden, else the "
                       "pooled size) + linear")
def mlp(shape, out, hidden: int = 0):
    return PoolLinear(channels_of(shape), out, hidden or channels_of(shape))


def reduced_pool(shape: Sequence[int],
                 features: int = 2048) -> tuple[tuple[int, int], tuple[int, int], int]:
    """Kernel, padding and output size of the average pool that keeps at most ``features`` values.

    The rule of Nøkland & Eidnes' local-loss code (``dim_in_decoder``), which
    the seed paper's layer-wise heads use (keitaroskmt/E2E-info,
    ``src/models/trainable_block.py``, ``get_avg_pool``): double the kernel's
    height, then its width, in turn, until ``C * ceil(H / kh) * ceil(W / kw)``
    is at most ``features`` or the kernel is as tall as the map; pad so the
    pooled map has ``ceil(H / kh) x ceil(W / kw)`` cells (the padding counts as
    zeros in each average, as ``nn.AvgPool2d`` does by default).

    Returns ``((kh, kw), (ph, pw), C * ceil(H / kh) * ceil(W / kw))`` for a
    ``(B, C, H, W)`` shape.
    """
    _, channels, height, width = shape
    kh = kw = 1
    sh, sw = height, width
    size = channels * sh * sw
    while size > features and kh < height:
        kh *= 2
        sh = -(-height // kh)
        size = channels * sh * sw
        if size > features:
            kw *= 2
            sw = -(-width // kw)
            size = channels * sh * sw
    pad = ((kh * (sh - height // kh)) // 2, (kw * (sw - width // kw)) // 2)
    return (kh, kw), pad, size


@register_head("reduced_linear", role="classifier",
               paper="Nøkland & Eidnes 2019, Training Neural Networks with Local Error Signals; "
                     "Sakamoto & Sato 2024 (TMLR), the seed paper's layer-wise head",
               summary="average pool to at most features (2048) values keeping the spatial "
                       "layout, linear (a hidden ReLU layer with hidden > 0)")
class ReducedLinear(nn.Module):
    """Average pooling to at most ``features`` values, keeping the spatial layout, then linear.

    The auxiliary head of Nøkland & Eidnes' local-loss code and of the seed
    paper's layer-wise training (Sakamoto & Sato, TMLR 2024): a feature map is
    average-pooled with the kernel of :func:`reduced_pool` and flattened, so an
    early block's head still sees where things are; token sequences are
    average-pooled over tokens in the same way (halving their number until
    ``tokens * D <= features``); vectors pass through. With ``hidden > 0`` a
    hidden ReLU layer comes before the linear layer (the seed's ``mlp`` head).
    """

    def __init__(self, shape: Sequence[int], out: int, features: int = 0, hidden: int = 0):
        super().__init__()
        shape, features = torch.Size(shape), features or 2048
        self.pool: nn.Module = nn.Identity()
        if len(shape) == 4:
            kernel, pad, size = reduced_pool(shape, features)
            if kernel != (1, 1):
                self.pool = nn.AvgPool2d(kernel, padding=pad)
        elif len(shape) == 3:
            tokens, dim = shape[1], shape[2]
            step = 1
            while -(-tokens // step) * dim > features and step < tokens:
                step *= 2
            if step > 1:
                self.pool = nn.AvgPool1d(step, ceil_mode=True)
            size = -(-tokens // step) * dim
        else:
            size = int(shape[1:].numel())
        self.tokens = len(shape) == 3
        self.features = size
        self.fc = PoolLinear(size, out, hidden)  # on (B, D) its pooling is a flatten

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.tokens:  # (B, N, D): pool over N
            h = self.pool(h.transpose(1, 2)).transpose(1, 2)
        else:
            h = self.pool(h)
        return self.fc(h.flatten(1))


class ConvPoolLinear(nn.Module):
    """``depth`` 3x3 conv-BN-ReLU layers, global average pooling, a linear layer (or an MLP).

    The shape of three heads of the literature: the layer-wise ``conv`` head and InfoPro's
    ``1c2f`` and ``2c2f`` nets (strided below 64 channels, an MLP). ``hidden`` 0 has no
    hidden layer, ``width`` 0 keeps ``channels``; ``stride`` is the first conv's.
    """

    def __init__(self, channels: int, out: int, hidden: int = 0, width: int = 0,
                 stride: int = 1, depth: int = 1):
        super().__init__()
        width = width or channels
        self.convs = nn.Sequential(*conv_bn_relu(channels, width, 3, depth, stride))
        self.fc = PoolLinear(width, out, hidden)  # it pools globally

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(h))


@register_head("conv", role="classifier", needs="map",
               summary="3x3 conv-BN-ReLU, global average pool, linear")
def conv(shape, out, hidden: int = 0):
    return ConvPoolLinear(shape[1], out, hidden=hidden)


@register_head("infopro", role="classifier", needs="map",
               paper="Wang, Ni, Song, Yang & Huang 2021, Revisiting Locally Supervised Learning",
               summary="InfoPro's 1c2f auxiliary net: 3x3 conv-BN-ReLU (below 64 channels: to "
                       "twice the channels, stride 2; else the same channels, stride 1), global "
                       "average pool, FC-ReLU (hidden, 128), FC; depth=2: the 2c2f net")
def infopro(shape, out, hidden: int = 0, depth: int = 0):
    """The ``1c2f`` net of InfoPro's ``AuxClassifier`` (blackfeather-wang/InfoPro-Pytorch,
    ``networks/auxiliary_nets.py``), which that code defines for 16, 32 and 64 channels:
    16 -> 32 and 32 -> 64 with stride 2, 64 -> 64 with stride 1; other widths follow
    the same rule (below 64: doubled, stride 2). Convs start He-normal, as there.
    ``depth`` 2 is that code's ``2c2f`` (a second conv-BN-ReLU at the new width), the
    net MAN's command uses (JunhaoSu0/MAN)."""
    wide = shape[1] < 64
    return he_normal(ConvPoolLinear(shape[1], out, width=2 * shape[1] if wide else shape[1],
                                    stride=2 if wide else 1, hidden=hidden or 128,
                                    depth=depth or 1))


@register_head("projector", role="classifier",
               paper="Siddiqui, Krueger, LeCun & Deny 2023, Blockwise Self-Supervised Learning "
                     "at Scale (arXiv 2302.01647)",
               summary="blockwise SSL's projector: kernel x kernel conv-BN-ReLU to features "
                       "(2048) channels, global average pool, depth (3) Linear layers "
                       "without bias (hidden 8192), BN-ReLU between them")
class Projector(nn.Module):
    """The projector of blockwise self-supervised learning, as the reference builds it.

    Siddiqui, Krueger, LeCun & Deny 2023 (shoaibahmed/blockwise_ssl, ``model.py``
    ``pool_conv`` and ``main.py`` ``BarlowTwins``): a ``kernel x kernel`` conv without
    bias from the block's channels to ``features``, BatchNorm2d, ReLU and global average
    pooling, then Barlow Twins' MLP ``features-hidden-...-out`` (``depth`` linear layers
    without bias, BatchNorm1d and ReLU after all but the last). Its defaults are the
    reference's for ResNet-50 (2048, 8192, 3 layers, kernel 3; its training script uses
    kernel 1). Token sequences and vectors take the conv as a 1x1 one over each token.
    """

    def __init__(self, shape: Sequence[int], out: int, features: int = 0, hidden: int = 0,
                 depth: int = 0, kernel: int = 0):
        super().__init__()
        features, hidden, depth = features or 2048, hidden or 8192, depth or 3
        kernel = (kernel or 3) if len(shape) == 4 else 1
        self.conv = nn.Sequential(*conv_bn_relu(channels_of(shape), features, kernel, 1),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        sizes = [features] + [hidden] * (depth - 1) + [out]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-2], sizes[1:-1], strict=True):
            layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        self.mlp = nn.Sequential(*layers, nn.Linear(sizes[-2], out, bias=False))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.ndim == 3:  # (B, N, D) tokens: a (B, D, N, 1) map
            h = h.transpose(1, 2).unsqueeze(-1)
        elif h.ndim == 2:
            h = h[:, :, None, None]
        return self.mlp(self.conv(h))


def conv_bn_relu(channels: int, width: int, kernel: int, depth: int,
                 stride: int = 1) -> list[nn.Module]:
    """``depth`` conv-BN-ReLU layers (convs without bias, padded; ``stride`` is the first's)."""
    layers: list[nn.Module] = []
    for k in range(depth):
        layers += [nn.Conv2d(channels if k == 0 else width, width, kernel,
                             stride=stride if k == 0 else 1, padding=kernel // 2, bias=False),
                   nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    return layers


@register_head("cnn", role="classifier", needs="map",
               paper="Belilovsky, Eickenberg & Oyallon 2020, Decoupled Greedy Learning of CNNs",
               summary="DGL's CNN auxiliary net: depth (2) 3x3 conv-BN-ReLU layers, "
                       "average pool to pool x pool (2), BatchNorm, linear")
class CnnAux(nn.Module):
    """DGL's CNN auxiliary network: 3x3 conv-BN-ReLU layers, 2x2 average pool, BatchNorm, linear.

    Belilovsky, Eickenberg & Oyallon, "Decoupled Greedy Learning of CNNs"
    (ICML 2020). Built as their code builds it (eugenium/DGL,
    ``auxiliary_nets_study/models.py``, ``auxillary_classifier2`` with
    ``cnn=True``): the convs keep the block's channels and have no bias, the
    pooled map is batch-normalised before the linear layer, and every layer
    keeps PyTorch's default initialisation. The paper has ``depth`` 2 and ``pool`` 2.
    """

    def __init__(self, shape: Sequence[int], out: int, depth: int = 0, pool: int = 0):
        super().__init__()
        channels, side = shape[1], pool or 2
        self.convs = nn.Sequential(*conv_bn_relu(channels, channels, 3, depth or 2))
        self.pool = nn.AdaptiveAvgPool2d(side)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels * side * side, out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.pool(self.convs(h))).flatten(1))


@register_head("mlp_sr", role="classifier", needs="map",
               paper="Belilovsky, Eickenberg & Oyallon 2020, Decoupled Greedy Learning of CNNs",
               summary="DGL's MLP-SR auxiliary net: average pool to a quarter of the side, "
                       "depth (3) 1x1 conv-BN-ReLU layers (hidden channels, else the "
                       "block's), average pool to pool x pool (2), depth Linear-BN-ReLU "
                       "layers, linear")
class MlpSr(nn.Module):
    """DGL's MLP-SR auxiliary network: spatial reduction, 1x1 convs, 2x2 pool, an MLP.

    Belilovsky, Eickenberg & Oyallon 2020 (ICML), as their code builds it
    (eugenium/DGL, ``auxiliary_nets_study/models.py``, ``auxillary_classifier2``
    with ``n_lin=3, mlp_layers=3``): average pool to ``ceil(H/4) x ceil(W/4)``,
    ``depth`` 1x1 conv-BN-ReLU layers (no bias), average pool to ``pool x
    pool``, ``depth`` Linear-BN-ReLU layers of ``hidden * pool**2`` features, a
    linear layer. Cheap at any resolution: the convs run on a map 16 times
    smaller than the block's. The paper has ``depth`` 3, ``pool`` 2 and ``hidden`` the
    block's channels (0).
    """

    def __init__(self, shape: Sequence[int], out: int, depth: int = 0, pool: int = 0,
                 hidden: int = 0):
        super().__init__()
        _, channels, height, breadth = shape
        depth, side, width = depth or 3, pool or 2, hidden or channels
        self.reduce = nn.AdaptiveAvgPool2d((-(-height // 4), -(-breadth // 4)))
        self.convs = nn.Sequential(*conv_bn_relu(channels, width, 1, depth))
        self.pool = nn.AdaptiveAvgPool2d(side)
        features = width * side * side
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(features, features), nn.BatchNorm1d(features),
                       nn.ReLU(inplace=True)]
        self.mlp = nn.Sequential(*layers, nn.Linear(features, out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool(self.convs(self.reduce(h))).flatten(1))


@register_head("decoder", role="decoder", needs="map",
               paper="Wang, Ni, Song, Yang & Huang 2021, Revisiting Locally Supervised Learning",
               summary="InfoPro's decoder: bilinear upsampling to the image, conv-BN-ReLU "
                       "(width, 12), conv, sigmoid")
class Decoder(nn.Module):
    """InfoPro's reconstruction decoder: upsample to the image size, conv-BN-ReLU, conv, sigmoid.

    As the ``Decoder`` of InfoPro's code (Wang, Ni, Song, Yang & Huang, ICLR
    2021; blackfeather-wang/InfoPro-Pytorch, ``networks/auxiliary_nets.py``):
    bilinear upsampling with aligned corners, two 3x3 convs with biases (the
    first followed by batch norm and ReLU), a sigmoid; convs start He-normal
    (fan-out), as that code's ``InfoProResNet`` initialises every conv. ``out`` is the
    image's ``(C, H, W)``; ``width`` the hidden conv's channels (12 in the paper's code).
    """

    def __init__(self, shape: Sequence[int], out: Sequence[int], width: int = 0):
        super().__init__()
        image_channels, *size = out
        self.size, width = tuple(size), width or 12
        self.net = nn.Sequential(
            nn.Conv2d(shape[1], width, 3, padding=1), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True), nn.Conv2d(width, image_channels, 3, padding=1), nn.Sigmoid(),
        )
        he_normal(self)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if tuple(h.shape[2:]) != self.size:  # at the image's size already: no copy
            h = F.interpolate(h, size=self.size, mode="bilinear", align_corners=True)
        return self.net(h)


def he_normal(module: nn.Module) -> nn.Module:
    """Draw every conv weight of ``module`` from N(0, 2 / (k * k * out_channels)); returns it.

    The initialisation InfoPro's code gives all its convs, auxiliary nets
    included (He et al. 2015, fan-out mode); biases and linear layers keep
    PyTorch's defaults, as there.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return module


@register_head("spatial_std", role="similarity", needs="map",
               paper="Nøkland & Eidnes 2019, Training Neural Networks with Local Error Signals",
               summary="predsim's similarity branch on maps: 3x3 conv, each channel's std "
                       "over space")
class SpatialStd(nn.Module):
    """predsim's similarity branch on maps: a 3x3 conv, then each channel's std over space.

    Nøkland & Eidnes, "Training Neural Networks with Local Error Signals"
    (ICML 2019). As their code (anokland/local-loss, ``train.py``:
    ``conv_loss`` of ``LocalLossBlockConv``, then ``similarity_matrix``): the
    conv keeps the channels and has no bias; the standard deviation (unbiased)
    is taken where the map has more than 3 channels and more than one row,
    and elsewhere the conv's output is compared as it is, flattened.
    """

    def __init__(self, shape: Sequence[int], out: None = None):
        super().__init__()
        self.conv = nn.Conv2d(shape[1], shape[1], 3, padding=1, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.conv(h)
        if z.shape[1] > 3 and z.shape[2] > 1:
            return z.flatten(2).std(dim=2)
        return z.flatten(1)


@register_head("sim_linear", role="similarity",
               paper="Nøkland & Eidnes 2019, Training Neural Networks with Local Error Signals",
               summary="predsim's similarity branch on vectors: square linear layer without "
                       "bias (tokens: averaged first)")
class SimLinear(nn.Module):
    """predsim's similarity branch on vectors: a square linear layer without bias.

    Nøkland & Eidnes 2019 (ICML); their code (anokland/local-loss,
    ``train.py``, ``LocalLossBlockLinear.linear_loss``) maps a layer's output
    through it before the similarity matrix. Token sequences, which the
    reference does not have, are averaged over tokens first (:func:`pool`).
    """

    def __init__(self, shape: Sequence[int], out: None = None):
        super().__init__()
        self.fc = nn.Linear(channels_of(shape), channels_of(shape), bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(pool(h))


def zero_last_linear(head: nn.Module) -> nn.Module:
    """Zero the weight (not the bias) of the last ``nn.Linear`` registered in ``head``.

    The prediction layer of Nøkland & Eidnes' local-loss code
    (``decoder_y``) starts from zero weights, so a block's local
    cross-entropy starts from the bias alone. A head without a linear layer is
    left as it is.
    """
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if linears:
        with torch.no_grad():
            linears[-1].weight.zero_()
    return head


@register_head("augmented", role="classifier",
               paper="Ma, Wu, Si & Tan 2024, Scaling Supervised Local Learning with Augmented "
                     "Auxiliary Networks (ICLR)",
               summary="AugLocal's auxiliary net: fresh copies of depth (2) blocks evenly spaced "
                       "over the blocks after the part (the last one included), global average "
                       "pool, BatchNorm1d when depth is 1, linear")
class Augmented(nn.Module):
    """AugLocal's auxiliary network, built from the architecture of the later blocks.

    Ma, Wu, Si & Tan, "Scaling Supervised Local Learning with Augmented Auxiliary
    Networks" (ICLR 2024); as their code (ChenxiangMA/AugLocal at 98c90d6,
    ``networks/auxiliary_nets.py``, ``AuxNetwork`` with ``unifSamp``). Of the ``m``
    blocks after the part, whose last block is block ``l`` of the fine list, it takes
    blocks ``round(l + m / depth * j)`` for ``j = 1 .. depth`` (Python's round, ties to
    even, as there), or all ``m`` if ``depth >= m``. Each becomes a block with fresh
    weights: a timm ``BasicBlock``/``Bottleneck`` is built anew at that block's width
    on the running width, with stride 2 while the widths have doubled more often than
    the map has halved and a 1x1 conv-BN shortcut where shapes change (the reference's
    rule; convs He-normal, as there); any other block is a deep copy with its
    parameters reset, behind a 1x1 conv-BN (strided by the integer size ratio) where
    the running map is not the shape it takes. Then global average pooling, a
    BatchNorm1d where ``depth`` is 1, and a linear layer.
    """

    def __init__(self, shape: Sequence[int], out: int, later: Sequence[Later],
                 depth: int = 0):
        super().__init__()
        depth = depth or 2
        blocks, running, carry = [], torch.Size(shape), 0
        for block in _spaced(later, depth):
            if isinstance(block.module, (BasicBlock, Bottleneck)) and len(running) == 4:
                width = block.shape_out[1]
                carry += int(math.log2(width // running[1])) if width >= running[1] else 0
                stride = 2 if carry >= 1 else 1
                carry -= stride - 1
                new = _resnet_block(type(block.module), running[1], width, stride)
                running = torch.Size([running[0], width, -(-running[2] // stride),
                                      -(-running[3] // stride)])
            else:
                new, running = _copy_block(block, running), block.shape_out
            blocks.append(new)
        self.blocks = nn.Sequential(*blocks)
        width = channels_of(running)
        self.norm = nn.BatchNorm1d(width) if depth <= 1 else nn.Identity()
        self.fc = nn.Linear(width, out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(pool(self.blocks(h))))


def _spaced(later: Sequence[Later], depth: int) -> list[Later]:
    """AugLocal's evenly spaced choice of ``depth`` of the ``later`` blocks (ties to even)."""
    if depth >= len(later):
        return list(later)
    first = later[0].index  # the part's last block is first - 1
    return [later[round(first - 1 + len(later) / depth * j) - first] for j in range(1, depth + 1)]


def _resnet_block(kind: type, channels: int, width: int, stride: int) -> nn.Module:
    """A fresh timm ResNet block of ``kind`` from ``channels`` to ``width`` channels."""
    down = None
    if stride != 1 or channels != width:
        down = nn.Sequential(nn.Conv2d(channels, width, 1, stride=stride, bias=False),
                             nn.BatchNorm2d(width))
    return he_normal(kind(channels, width // kind.expansion, stride, down))


def _copy_block(block: Later, running: torch.Size) -> nn.Module:
    """A deep copy of ``block.module`` with fresh parameters, fed ``running``-shaped inputs."""
    new = copy.deepcopy(block.module)
    for m in new.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    want = block.shape_in
    if running[1:] == want[1:]:
        return new
    ratio = running[2] // want[2] if len(running) == len(want) == 4 else 0
    if not ratio or running[2:] != torch.Size([want[2] * ratio, want[3] * ratio]):
        raise ConfigError(f"head 'augmented' cannot feed {tuple(running[1:])} outputs into a "
                          f"copy of block {block.name!r}, which takes {tuple(want[1:])}; use "
                          "another head (--rule-opt aux=...) or --split-after")
    adapt = nn.Sequential(nn.Conv2d(running[1], want[1], 1, stride=ratio, bias=False),
                          nn.BatchNorm2d(want[1]))
    return nn.Sequential(he_normal(adapt), new)
