"""AugLocal's ``augmented`` head and ``auglocal`` rule against the reference code.

Numbers computed from ChenxiangMA/AugLocal at commit
98c90d61455cc00d5d8f31f485bfbaa0ece073a0 (``networks/auxiliary_nets.py``, ``AuxNetwork``
with ``unifSamp``; ``networks/resnet.py``, ``LocalResNet``), run on CPU with the
README's commands (``--pyramid --pyramid_coeff 0.5``; ``train.py`` sets
``local_module_num = K - aux_net_depth``).
"""

import copy
import dataclasses
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from locallearn import create_rule, load_dataset, split
from locallearn.checkpoint import load, save
from locallearn.errors import ConfigError
from locallearn.heads import Later, _spaced, build_head
from locallearn.rules.base import later_blocks
from locallearn.trainer import TrainConfig, Trainer

REF = "98c90d61455cc00d5d8f31f485bfbaa0ece073a0"
FIXTURE = Path(__file__).parent / "fixtures" / "auglocal_r32_K16_d1_after_stem.pt"

# The reference's auxiliary-network parameter counts, one per gradient-isolated module
# (``aux_classifier_*``), for the README's two commands.
R32_K16_D2 = [72906] * 6 + [76938] + [132362] * 4 + [148618] * 2
R110_K55_D3 = ([77578, 91466] + [146890] * 17 + [150922] * 6 + [132362] * 12
               + [148618] * 14)


def _names(per_stage):
    return ["stem"] + [f"layer{s}.{j}" for s in (1, 2, 3) for j in range(per_stage)]


def _parts(model, per_stage, k_ref, d, **options):
    """``auglocal`` parts at the reference's split: one layer per part but the last d + 1."""
    names = _names(per_stage)
    stack = split(timm.create_model(model, num_classes=10), input_size=(3, 32, 32),
                  split_after=names[:len(names) - d - 1])
    assert len(stack) == k_ref - d  # the code's K' = K - d modules
    rule = create_rule("auglocal", aux_depth=d, **options)
    return rule.parts(stack, 10, torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize("model, per_stage, k_ref, d, want", [
    ("resnet32_cifar", 5, 16, 2, R32_K16_D2),
    pytest.param("resnet110_cifar", 18, 55, 3, R110_K55_D3, marks=pytest.mark.slow),
])
def test_aux_parameter_counts_equal_the_reference_at_every_split(model, per_stage, k_ref, d,
                                                                  want):
    parts = _parts(model, per_stage, k_ref, d)
    got = [sum(p.numel() for p in part.objective.parameters()) for part in parts[:-1]]
    assert got == want


def test_without_the_pyramid_every_part_has_depth_d():
    parts = _parts("resnet32_cifar", 5, 16, 3, pyramid=0.0)
    assert [len(part.objective.heads["aux"].blocks) for part in parts[:-1]] == [3] * 12
    parts = _parts("resnet32_cifar", 5, 16, 3)  # the reference's aux_depth_list: 6 x 3, 6 x 2
    assert [len(part.objective.heads["aux"].blocks) for part in parts[:-1]] == [3] * 6 + [2] * 6


def test_layer_choice_is_evenly_spaced_with_ties_to_even():
    # The reference's chosen layers for ResNet-32 K=16 d=2 (16 layers, stem = 0), per module.
    want = [[8, 15], [8, 15], [8, 15], [9, 15], [10, 15], [10, 15], [10, 15], [11, 15],
            [12, 15], [12, 15], [12, 15], [13, 15], [14, 15]]
    for part, chosen in enumerate(want):
        later = [Later(i, str(i), None, None, None) for i in range(part + 1, 16)]
        assert [b.index for b in _spaced(later, 2)] == chosen


def _seeded(module):
    """Every parameter, in state_dict order, from randn * 0.1 of one generator seeded 0."""
    g, params = torch.Generator().manual_seed(0), dict(module.named_parameters())
    with torch.no_grad():
        for key in module.state_dict():
            if key in params:
                params[key].copy_(torch.randn(params[key].shape, generator=g) * 0.1)


def _head(model, per_stage, after):
    stack = split(timm.create_model(model), "block", input_size=(3, 32, 32))
    later = later_blocks(stack, torch.zeros(2, 3, 32, 32))[_names(per_stage).index(after)]
    return later[0].shape_in, later


@pytest.mark.parametrize("model, per_stage, after, d, want", [
    # The reference's module after layer2.0 of ResNet-32 K=16 d=2 (32 -> 32, 32 -> 64 s2)
    # and after the stem of ResNet-110 K=55 d=3 (three blocks), weights as _seeded draws
    # them in the reference's state_dict order; loss of the train-mode forward.
    ("resnet32_cifar", 5, "layer2.0", 2, 2.4169368743896484),
    ("resnet110_cifar", 18, "stem", 3, 2.3646397590637207),
])
def test_loss_equals_the_reference_with_the_same_weights(model, per_stage, after, d, want):
    shape, later = _head(model, per_stage, after)
    head = build_head("augmented", shape, 10, later=later, depth=d)
    _seeded(head)
    torch.manual_seed(0)
    x = torch.randn(4, *shape[1:])
    target = torch.randint(0, 10, (4,))
    assert F.cross_entropy(head(x), target).item() == pytest.approx(want, rel=1e-6)


def test_loss_equals_the_reference_with_its_own_weights():
    """The reference's own initial weights of ResNet-32 K=16 d=1's first module (one block,
    BatchNorm1d tail; seed 1234; BN statistics fresh), mapped onto the head key by key."""
    fixture = torch.load(FIXTURE)
    assert fixture["commit"] == REF
    shape, later = _head("resnet32_cifar", 5, "stem")
    head = build_head("augmented", shape, 10, later=later, depth=1)
    params = list(head.named_parameters())
    assert len(params) == len(fixture["parameters"])
    with torch.no_grad():
        for (_, p), ref in zip(params, fixture["parameters"].values(), strict=True):
            p.copy_(ref)
    torch.manual_seed(0)
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    target = torch.randint(0, 10, (4,))
    head.eval()  # first, while the BN statistics are fresh, as the reference measured it
    assert F.cross_entropy(head(x), target).item() == pytest.approx(2.5621590614318848,
                                                                    rel=1e-6)
    head.train()
    loss = F.cross_entropy(head(x), target)
    assert loss.item() == pytest.approx(2.412724018096924, rel=1e-6)
    loss.backward()
    assert x.grad.norm().item() == pytest.approx(0.4421994090080261, rel=1e-5)


def _train_step(stack, rule, shape):
    parts = rule.parts(stack, 10, torch.zeros(2, *shape))
    from locallearn.step import Step
    x, labels = torch.randn(4, *shape), torch.tensor([0, 1, 2, 3])
    step = Step(labels, x, True, 1, 10, (0.0,) * shape[0], (1.0,) * shape[0])
    for part in parts:
        x, scored = part(x.detach(), step)
        scored[0].backward()
    return parts


def test_works_on_timm_resnet18_with_fresh_blocks():
    stack = split(timm.create_model("resnet18", num_classes=10), "block",
                  input_size=(3, 64, 64))
    parts = _train_step(stack, create_rule("auglocal"), (3, 64, 64))
    head = parts[0].objective.heads["aux"]  # after the stem: layer2.1 and layer4.1 (of 8)
    widths = [b.conv2.out_channels for b in head.blocks]
    assert widths == [128, 512] and head.blocks[0].conv1.stride == (2, 2)
    backbone = {id(p) for p in stack.parameters()}
    assert not any(id(p) in backbone for part in parts[:-1]
                   for p in part.objective.parameters())


def test_other_blocks_are_copied_with_fresh_weights():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4,
                            num_classes=10)
    stack = split(vit, "block", input_size=(3, 32, 32))
    parts = _train_step(stack, create_rule("auglocal"), (3, 32, 32))
    head = parts[0].objective.heads["aux"]
    assert len(head.blocks) == 2 and not torch.equal(head.blocks[1].attn.qkv.weight,
                                                     stack.blocks[4].attn.qkv.weight)


def test_a_block_that_cannot_take_the_running_shape_is_refused_in_one_line():
    shape = torch.Size([2, 8, 6, 6])
    block = torch.nn.Conv2d(16, 16, 3, padding=1)
    later = [Later(1, "odd", block, torch.Size([2, 16, 4, 4]), torch.Size([2, 16, 4, 4]))]
    with pytest.raises(ConfigError, match=r"cannot feed \(8, 6, 6\) outputs into a copy of "
                                          r"block 'odd', which takes \(16, 4, 4\)"):
        build_head("augmented", shape, 10, later=later)


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="aux_depth >= 1 and 0 <= pyramid <= 1"):
        create_rule("auglocal", pyramid=2.0)


def test_resumed_after_epoch_1_gives_the_uninterrupted_network(tmp_path):
    """The aux heads' fresh blocks (weights, batch norm statistics, momentum) are saved and
    restored with the parts: resumed after epoch 1 of 2, every tensor equals the whole run's."""
    full = load_dataset("synthetic")
    data = dataclasses.replace(full, train_images=full.train_images[:64],
                               train_labels=full.train_labels[:64])
    torch.manual_seed(0)
    stack = split(timm.create_model("resnet32_cifar", num_classes=10), "stage", 3,
                  input_size=data.image_size)

    def make():
        torch.manual_seed(0)
        config = TrainConfig(progress=False, batch_size=32, epochs=2, lr=0.05,
                             schedule="cosine")
        return Trainer(copy.deepcopy(stack), create_rule("auglocal"), data, config)

    whole = make()
    assert len(whole.parts[0].objective.heads["aux"].blocks) == 2
    whole.history.append(whole._train_epoch(0))
    path = save(whole, tmp_path, 1, {}, 1, "run")
    whole._train_epoch(1)
    resumed = make()
    assert load(resumed, path, {}, "run") == 1
    resumed._train_epoch(1)
    for a, b in zip(whole.parts, resumed.parts, strict=True):
        assert a.state_dict().keys() == b.state_dict().keys()
        for name, x in a.state_dict().items():
            assert torch.equal(x, b.state_dict()[name]), name
