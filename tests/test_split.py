"""Splitting timm models into block stacks: parity, sharing, balance, refusals."""

from __future__ import annotations

import functools
import itertools
import random

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import ResNet
from torch import nn

from locallearn.blocks import BlockStack, balanced_partition, saved_bytes_per_block, split
from locallearn.errors import ConfigError, SplitError
from locallearn.models import CifarVGG

# name -> (create kwargs, probe input size, blocks at stage granularity, at block granularity)
CASES = {
    "resnet18": ({}, (3, 32, 32), 5, 9),
    "resnet18_cifar": ({}, (3, 32, 32), 5, 9),
    "vgg11_cifar": ({}, (3, 32, 32), 5, 8),
    "convnext_atto": ({}, (3, 32, 32), 5, 13),
    "vit_tiny_patch16_224": (dict(img_size=32, patch_size=4), (3, 32, 32), 13, 13),
    "mixer_s16_224": (dict(img_size=64), (3, 64, 64), 9, 9),
}


@functools.cache
def _model(name: str) -> nn.Module:
    """One eval-mode model per name, shared by the read-only tests."""
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **CASES[name][0]).eval()


def _input(name: str) -> torch.Tensor:
    return torch.randn(2, *CASES[name][1], generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("granularity", ["stage", "block"])
@pytest.mark.parametrize("name", list(CASES))
def test_composed_blocks_reproduce_the_model(name, granularity):
    model, x = _model(name), _input(name)
    stack = split(model, granularity, input_size=CASES[name][1])
    assert len(stack.blocks) == len(stack.names) == CASES[name][2 if granularity == "stage" else 3]
    assert stack.names[0] == "stem"
    stack.eval()
    with torch.no_grad():
        want = model(x)
        h = x
        for block in stack.blocks:
            h = block(h)
        by_hand = stack.head(h)
        features = stack.features(x)
        # The stack runs the model's own modules in the model's order, so on CPU the result
        # is bit-identical, not merely close.
        assert torch.equal(by_hand, want)
        assert torch.equal(stack(x), want)
        assert len(features) == len(stack.blocks) and torch.equal(features[-1], h)


def test_stack_shares_the_models_parameters():
    torch.manual_seed(0)
    model = timm.create_model("resnet18_cifar").eval()
    stack = split(model, "block").eval()
    assert set(stack.parameters()) == set(model.parameters())
    parts = [*stack.blocks, stack.head]
    assert sum(len(list(p.parameters())) for p in parts) == len(list(model.parameters()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = stack(x)
        model.fc.bias.add_(1.0)
        assert torch.allclose(stack(x), before + 1.0, atol=1e-6)
        model.conv1.weight.mul_(2.0)
        assert not torch.allclose(stack(x), before + 1.0)
        assert torch.equal(stack(x), model(x))


def test_split_leaves_model_state_and_rng_alone():
    torch.manual_seed(0)
    model = timm.create_model("resnet18_cifar").eval()
    model.layer2.train()  # a mixed train/eval state must survive the probes
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.random.get_rng_state()
    stack = split(model, num_blocks=3)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not stack.training and not stack.head.training  # the stack's own wrappers follow


def test_stochastic_steps_are_reproduced_in_train_mode():
    # Verification runs the stack and the model in train mode with one seed, so these
    # only split because every dropout and drop-path sits where the model has it.
    resnet = timm.create_model("resnet18_cifar", drop_rate=0.5)
    assert len(split(resnet)) == 5
    drops = dict(drop_rate=0.3, pos_drop_rate=0.2, drop_path_rate=0.2, patch_drop_rate=0.3)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, **drops)
    assert split(vit, "block").names == ["stem", "blocks.0", "blocks.1"]
    vgg = timm.create_model("vgg11_cifar", drop_rate=0.5)
    assert len(split(vgg, "block")) == 8


def test_num_blocks_groups_fine_blocks_by_saved_bytes():
    model = _model("resnet18_cifar")
    fine = split(model, "block")
    costs = saved_bytes_per_block(fine, (3, 32, 32))
    assert all(c > 0 for c in costs)
    stack = split(model, num_blocks=4)
    assert len(stack.blocks) == 4 and all(isinstance(b, nn.Sequential) for b in stack.blocks)
    assert stack.names[0].startswith("stem+") and "+".join(stack.names) == "+".join(fine.names)
    x = _input("resnet18_cifar")
    with torch.no_grad():
        assert torch.equal(stack.eval()(x), model(x))
    sizes = [len(b) for b in stack.blocks]
    bounds = list(itertools.accumulate(sizes))
    group_bytes = [sum(costs[a:b]) for a, b in zip([0, *bounds[:-1]], bounds, strict=True)]
    # The grouping is the best possible, and that best is far from one group holding it all:
    # a quarter each is the ideal, the stem and layer1 at full resolution make it ~0.31.
    assert max(group_bytes) == _brute_force(costs, 4)[0]
    assert max(group_bytes) <= 0.4 * sum(costs)


def _brute_force(costs, k):
    """(largest group sum, sum of squared group sums), best over every contiguous cut."""
    scores = []
    for cuts in itertools.combinations(range(1, len(costs)), k - 1):
        bounds = [0, *cuts, len(costs)]
        sums = [sum(costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        scores.append((max(sums), sum(g * g for g in sums)))
    return min(scores)


def test_balanced_partition_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        costs = [rng.choice([0, 1, 2, 5, 10, 37, 100]) for _ in range(n)]
        groups = balanced_partition(costs, k)
        assert len(groups) == k and all(groups)
        assert [i for g in groups for i in g] == list(range(n))  # contiguous, in order
        sums = [sum(costs[i] for i in g) for g in groups]
        assert (max(sums), sum(g * g for g in sums)) == _brute_force(costs, k)


def test_balanced_partition_rejects_bad_k():
    with pytest.raises(ConfigError, match="1 <= k <= 3"):
        balanced_partition([1, 2, 3], 4)
    with pytest.raises(ConfigError):
        balanced_partition([1, 2, 3], 0)


class _TimmLikeNet(nn.Module):
    """A small CNN with timm-style ``feature_info``; optionally with steps no child holds."""

    def __init__(self, functional_relu: bool = False, drop_rate: float = 0.0):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stage = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, 10)
        self.feature_info = [
            dict(num_chs=4, reduction=1, module="stem"),
            dict(num_chs=4, reduction=2, module="stage"),
        ]
        self.functional_relu, self.drop_rate = functional_relu, drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.functional_relu:
            x = F.relu(x)
        x = self.flatten(self.pool(self.stage(x)))
        return self.fc(F.dropout(x, self.drop_rate, self.training))


def _refusal(model: nn.Module, **kwargs) -> str:
    with pytest.raises(SplitError) as info:
        split(model, input_size=(3, 8, 8), **kwargs)
    message = str(info.value)
    assert "\n" not in message and "supported families: resnet, vgg" in message
    return message


def test_generic_path_splits_a_plain_cnn_at_its_feature_info():
    stack = split(_TimmLikeNet(), input_size=(3, 8, 8))
    assert stack.names == ["stem", "stage"] and len(stack.head) == 3


def test_refuses_models_it_cannot_split_correctly():
    class NoInfo(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x.mean((2, 3)))

    assert _refusal(NoInfo()).startswith("cannot split NoInfo: no feature_info")
    # A functional step between children changes the eval-mode output.
    assert "eval-mode output differs" in _refusal(_TimmLikeNet(functional_relu=True))
    # A dropout only in forward: eval mode agrees, train mode does not.
    assert "train-mode output differs" in _refusal(_TimmLikeNet(drop_rate=0.5))
    # A parameter used by forward but held by no child is left out of every block.
    net = _TimmLikeNet()
    net.scale = nn.Parameter(torch.ones(1))
    assert "parameters in no block: scale" in _refusal(net, verify=False)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, dynamic_img_size=True)
    assert "dynamic_img_size" in _refusal(vit)


def test_config_errors():
    model = _model("resnet18_cifar")
    with pytest.raises(ConfigError, match="granularity 'layer'.*stage"):
        split(model, "layer")
    with pytest.raises(ConfigError, match="has 9 blocks"):
        split(model, num_blocks=10)
    with pytest.raises(ConfigError, match="pass input_size"):
        split(_TimmLikeNet())


def test_split_names_the_model():
    stack = split(timm.create_model("vgg11_cifar", num_classes=4), "block")
    assert isinstance(stack, BlockStack) and stack.model_name == "vgg11_cifar"
    assert stack(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_cifar_models_are_registered_in_timm():
    x = torch.randn(2, 3, 32, 32)
    resnet = timm.create_model("resnet18_cifar")
    assert type(resnet) is ResNet and resnet(x).shape == (2, 10)
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert isinstance(resnet.maxpool, nn.Identity)
    assert [f["reduction"] for f in resnet.feature_info] == [1, 1, 2, 4, 8]
    vgg = timm.create_model("vgg11_cifar", drop_rate=0.25)
    assert type(vgg) is CifarVGG and vgg(x).shape == (2, 10) and vgg.pre_logits[-1].p == 0.25
    kinds = [type(m) for m in vgg.features]
    assert kinds.count(nn.Conv2d) == kinds.count(nn.BatchNorm2d) == 8
    assert kinds.count(nn.MaxPool2d) == 5
    assert sum(p.numel() for p in vgg.parameters()) < 10_000_000  # no 4096-wide 7x7 head
    for name in ("resnet18_cifar", "vgg11_cifar"):
        with pytest.raises(ConfigError, match="no pretrained weights"):
            timm.create_model(name, pretrained=True)


def test_resnet18_cifar_keeps_its_last_batch_norms_unless_asked():
    # The seed's (kuangliu's) ResNet starts every batch norm at weight 1; timm zeroes the
    # last one of each residual branch, which makes each block start as its shortcut.
    def last_bns(model):
        return [b.bn2.weight for layer in (model.layer1, model.layer2, model.layer3,
                                           model.layer4) for b in layer]

    assert all(torch.equal(w, torch.ones_like(w))
               for w in last_bns(timm.create_model("resnet18_cifar")))
    zeroed = last_bns(timm.create_model("resnet18_cifar", zero_init_last=True))
    assert len(zeroed) == 8 and all(not w.any() for w in zeroed)


def test_resnet18_cifar_stem_dropout():
    model = timm.create_model("resnet18_cifar", drop_stem=0.2)
    stack = split(model, "block")  # proven in train mode too: the dropout is where it runs
    drops = [(n, m.p) for n, m in model.named_modules() if isinstance(m, nn.Dropout)]
    assert drops == [("maxpool", 0.2)]  # after the stem's ReLU, nowhere in the blocks
    assert [type(m) for m in stack.blocks[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout]
    with pytest.raises(ConfigError, match=r"drop_stem must be a dropout rate in \[0, 1\); got 1"):
        timm.create_model("resnet18_cifar", drop_stem=1)


SEED_VGG = dict(drop_conv=0.2, fc_layers=2, drop_rate=0.2, pool_first=True)


def test_vgg11_cifar_with_the_seed_papers_options():
    torch.manual_seed(0)
    model = timm.create_model("vgg11_cifar", **SEED_VGG)
    stack = split(model, "block")  # proven in eval and train mode
    assert stack.names == ["stem", *(f"features.{a}-{b}" for a, b in (
        (4, 8), (9, 13), (14, 17), (18, 22), (23, 26), (27, 31), (32, 35))),
        "pre_logits.0", "pre_logits.1"]
    kinds = [type(m) for m in model.features]
    assert kinds.count(nn.Dropout) == kinds.count(nn.Conv2d) == 8
    for i, block in enumerate(stack.blocks[:8]):  # a conv unit, led by its max-pool if any
        body = [type(m) for m in block]
        assert body[-4:] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout]
        assert body[:-4] in ([], [nn.MaxPool2d]) and (body[:-4] == []) == (i in (0, 3, 5, 7))
    fc = [[type(m) for m in b.modules() if not isinstance(m, nn.Sequential)]
          for b in stack.blocks[8:]]
    assert fc[1] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout]
    assert fc[0][-4:] == fc[1] and nn.MaxPool2d in fc[0]  # the last pool, then flatten
    assert isinstance(stack.head, nn.Linear) and stack.head.in_features == 512
    stack.eval()
    x = torch.randn(2, 3, 32, 32)
    h, shapes = x, []
    with torch.no_grad():
        for block in stack.blocks:
            h = block(h)
            shapes.append(tuple(h.shape[1:]))
        assert torch.equal(stack.head(h), model.eval()(x))
    # Each conv unit's output is taken before its pool, as the seed's heads read it.
    assert shapes == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (256, 8, 8), (512, 4, 4),
                      (512, 4, 4), (512, 2, 2), (512, 2, 2), (512,), (512,)]
    assert len(split(model, "stage")) == 6  # stem, four runs of convs, the fc blocks


@pytest.mark.parametrize("option, message", [
    (dict(drop_conv=1.5), r"drop_conv must be a dropout rate in \[0, 1\); got 1.5"),
    (dict(fc_layers=-1), "fc_layers must be a whole number >= 0; got -1"),
    (dict(pool_first="yes"), "pool_first must be true or false; got 'yes'"),
])
def test_vgg11_cifar_refuses_bad_options(option, message):
    with pytest.raises(ConfigError, match=message):
        timm.create_model("vgg11_cifar", **option)
