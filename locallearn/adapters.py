"""Per-family layouts of timm models: stem, stages of fine blocks, head.

timm has no single API that yields composable blocks (see docs/architecture.md),
so each family the splitter knows gets a small adapter that reads the model's
own ``forward_features``/``forward_head`` and lays its modules out in forward
order. Adapters are matched by exact type: a subclass may override ``forward``
and must not be split by its parent's recipe. Everything else goes through
:func:`generic_layout`, which cuts at timm's ``feature_info`` taps. Adapters
only describe; :func:`locallearn.blocks.split` proves every layout by
comparing the composed blocks with ``model(x)``.

Adapters raise :class:`~locallearn.errors.SplitError` with a short reason; the
caller turns it into the full one-line refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.models._features import FeatureInfo
from timm.models.convnext import ConvNeXt
from timm.models.mlp_mixer import MlpMixer
from timm.models.resnet import ResNet
from timm.models.vgg import VGG
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from locallearn.errors import SplitError

from .models import CifarVGG


@dataclass
class Stage:
    """A stage (``"layer1"``): ``(name, module)`` per fine block in forward order, and the
    model's own module running the whole stage (used at stage granularity; None: the fine
    blocks in an ``nn.Sequential``)."""

    name: str
    fine: list[tuple[str, nn.Module]]
    module: nn.Module | None = None


@dataclass
class Layout:
    """A model in forward order: ``head(stages(stem(x)))``."""

    stem: nn.Module
    stages: list[Stage]
    head: nn.Module


def _isotropic(blocks: nn.Sequential) -> list[Stage]:
    # Transformers have no stages: every block is its own stage.
    return [Stage(f"blocks.{i}", [(f"blocks.{i}", b)], b) for i, b in enumerate(blocks)]


class TimmHead(nn.Module):
    """The model's ``forward_head``, run by timm's own code on the model's modules and
    settings named in ``keep`` (values such as ResNet's dropout rate are read at split
    time); with ``final_norm``, the ``norm`` that ends ``forward_features`` runs first."""

    def __init__(self, model: nn.Module, keep: tuple[str, ...], final_norm: bool = False):
        super().__init__()
        self.family, self.final_norm = type(model), final_norm
        for name in keep + (("norm",) if final_norm else ()):
            setattr(self, name, getattr(model, name))

    def pool(self, x: torch.Tensor) -> torch.Tensor:  # ViT's forward_head pools by its method
        return self.family.pool(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.family.forward_head(self, self.norm(x) if self.final_norm else x)


def resnet_layout(model: ResNet) -> Layout:
    """Stem conv1-bn1-act1-maxpool; stages layer1..4 of residual blocks; pool-dropout-fc head."""
    stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
    layers = (model.layer1, model.layer2, model.layer3, model.layer4)
    stages = [Stage(f"layer{i}", [(f"layer{i}.{j}", b) for j, b in enumerate(layer)], layer)
              for i, layer in enumerate(layers, 1)]
    return Layout(stem, stages, TimmHead(model, ("global_pool", "fc", "drop_rate")))


def vgg_layout(model: VGG | CifarVGG) -> Layout:
    """Fine blocks are conv-(bn)-act units, each max-pool riding with the unit before it.

    Stages are the units between max-pools; the first unit is the stem (so in
    VGG-16 the stem's stage-mates form a stage of their own). A
    :class:`~locallearn.models.CifarVGG` with ``pool_first`` puts each max-pool
    at the start of the unit after it instead (the last one with the first
    fully connected block, or the head); one with ``fc_layers`` adds a stage
    ``pre_logits`` of its fully connected blocks.
    """
    pool_first = getattr(model, "pool_first", False)
    units: list[list[int]] = []
    waiting: list[int] = []  # max-pools waiting for the next unit (pool_first)
    for i, m in enumerate(model.features):
        if pool_first and isinstance(m, nn.MaxPool2d):
            waiting.append(i)
        elif isinstance(m, nn.Conv2d) or not units:
            units.append(waiting + [i])
            waiting = []
        else:
            units[-1].append(i)

    def module(idx: list[int]) -> nn.Module:
        return nn.Sequential(*(model.features[i] for i in idx))

    def is_pool(i: int) -> bool:
        return isinstance(model.features[i], nn.MaxPool2d)

    groups: list[list[list[int]]] = [[]]  # a stage ends at a max-pool, on either side of it
    for unit in units[1:]:
        if groups[-1] and is_pool(unit[0]):
            groups.append([])
        groups[-1].append(unit)
        if is_pool(unit[-1]):
            groups.append([])
    stages = [Stage(f"features.{g[0][0]}-{g[-1][-1]}",
                    [(f"features.{u[0]}-{u[-1]}", module(u)) for u in g]) for g in groups if g]
    tail = [model.features[i] for i in waiting]
    if not getattr(model, "fc_layers", 0):
        return Layout(module(units[0]), stages, nn.Sequential(*tail, model.pre_logits, model.head))
    fine = [(f"pre_logits.{i}", m) for i, m in enumerate(model.pre_logits)]
    fine[0] = (fine[0][0], nn.Sequential(*tail, fine[0][1]))
    stages.append(Stage("pre_logits", fine))
    return Layout(module(units[0]), stages, model.head)


def convnext_layout(model: ConvNeXt) -> Layout:
    """Stem; stages whose first fine block carries the stage's downsample; norm_pre + head."""
    stages = []
    for i, stage in enumerate(model.stages):
        fine = [(f"stages.{i}.blocks.{j}", b) for j, b in enumerate(stage.blocks)]
        if not isinstance(stage.downsample, nn.Identity):
            fine[0] = (fine[0][0], nn.Sequential(stage.downsample, stage.blocks[0]))
        stages.append(Stage(f"stages.{i}", fine, stage))
    return Layout(model.stem, stages, nn.Sequential(model.norm_pre, model.head))


class VitEmbed(nn.Module):
    """The ViT embedding step as a block, holding the model's own parameters: what
    ``VisionTransformer.forward_features`` runs before the blocks, by timm's own code
    (patch embedding, ``_pos_embed`` without dynamic image size, patch_drop, norm_pre)."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        for name in ("patch_embed", "cls_token", "reg_token", "pos_embed", "no_embed_class",
                     "pos_drop", "patch_drop", "norm_pre"):
            setattr(self, name, getattr(model, name))
        self.dynamic_img_size = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = VisionTransformer._pos_embed(self, self.patch_embed(x))
        return self.norm_pre(self.patch_drop(x))


def vit_layout(model: VisionTransformer) -> Layout:
    """Embedding step, then each transformer block; refuses what it does not reproduce."""
    if model.dynamic_img_size:
        raise SplitError("dynamic_img_size=True is not supported")
    keep = ("attn_pool", "global_pool", "num_prefix_tokens", "pool_include_prefix", "fc_norm",
            "head_drop", "head")
    return Layout(VitEmbed(model), _isotropic(model.blocks), TimmHead(model, keep, True))


def mixer_layout(model: MlpMixer) -> Layout:
    """Patch embedding, then each mixer block."""
    head = TimmHead(model, ("global_pool", "head_drop", "head"), final_norm=True)
    return Layout(model.stem, _isotropic(model.blocks), head)


def generic_layout(model: nn.Module) -> Layout:
    """Cut the top-level children at the modules named by ``model.feature_info``.

    Like timm's ``FeatureListNet``, a top-level ``nn.Sequential`` is opened one
    level when a tap points inside it (``"blocks.1"``). Children up to the
    first tap are the stem, each later tap closes a stage, and the children
    after the last tap, in order, are the head. Fine blocks open each stage
    member that is a plain ``nn.Sequential`` one more level.
    """
    info = getattr(model, "feature_info", None)
    if isinstance(info, FeatureInfo):
        taps = info.module_name()
    elif isinstance(info, (list, tuple)) and info:
        taps = [f["module"] for f in info]
    else:
        raise SplitError("no feature_info")
    taps = list(dict.fromkeys(taps))  # some models tap one module twice
    units: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and any(t.startswith(name + ".") for t in taps):
            units += [(f"{name}.{n}", m) for n, m in child.named_children()]
        else:
            units.append((name, child))
    order = {name: i for i, (name, _) in enumerate(units)}
    for tap in taps:
        if tap not in order:
            raise SplitError(f"feature module {tap!r} is neither a child nor in a child Sequential")
    cuts = [order[t] for t in taps]
    if cuts != sorted(cuts):
        raise SplitError("feature_info is not in registration order")
    bounds = [-1, *cuts]
    segments = [units[a + 1 : b + 1] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    stages = []
    for seg in segments[1:]:
        fine = []
        for name, m in seg:
            # Only a plain Sequential is a list of blocks; a subclass is one unit (DenseTransition).
            if type(m) is nn.Sequential and len(m):
                fine += [(f"{name}.{n}", c) for n, c in m.named_children()]
            else:
                fine.append((name, m))
        stages.append(Stage("+".join(n for n, _ in seg), fine))
    stem = nn.Sequential(*(m for _, m in segments[0]))
    return Layout(stem, stages, nn.Sequential(*(m for _, m in units[cuts[-1] + 1 :])))


ADAPTERS: dict[type, Callable[..., Layout]] = {
    ResNet: resnet_layout,
    VGG: vgg_layout,
    CifarVGG: vgg_layout,
    ConvNeXt: convnext_layout,
    VisionTransformer: vit_layout,
    MlpMixer: mixer_layout,
}


def layout_of(model: nn.Module) -> Layout:
    """The model's layout: by its family's adapter (exact type), else by ``feature_info``."""
    return ADAPTERS.get(type(model), generic_layout)(model)
