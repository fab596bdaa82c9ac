"""The seed paper's layer-wise head (``reduced_linear``) pools as its code does.

Reference: keitaroskmt/E2E-info @ 88473c3, ``src/models/trainable_block.py``,
``TrainableBlock2d.get_avg_pool(out_channels, input_size, dim_in_decoder=2048)``
(the rule of anokland/local-loss ``train.py``). The kernels and feature sizes
below are what that function returns, run on CPU for each (channels, side) of
ResNet-18's layer-wise blocks on 32x32 CIFAR images, and of VGG-11's conv
layers as ``LayerWiseVGGSpec._make_layers`` (``src/models/layer_wise_model_spec.py``)
sizes them: each conv at the side it runs at, before its max-pool. The file does
not compile at that commit (line 151 repeats a keyword argument), so
``get_avg_pool`` and ``ProjectionHead`` were taken out of its syntax tree and run
as written. VGG-11's two fully connected layers are ``TrainableBlock1d``s whose
head is ``ProjectionHead(in_features=512, ...)``: ``Linear(512, classes)``.
"""

import pytest
import timm
import torch
from torch import nn

from locallearn import split
from locallearn.errors import ConfigError
from locallearn.heads import build_head, reduced_pool

# (channels, side) -> (kernel, padding, features) from the seed's get_avg_pool
SEED = {
    (64, 32): ((8, 4), (0, 0), 2048),
    (128, 16): ((4, 4), (0, 0), 2048),
    (256, 8): ((4, 2), (0, 0), 2048),
    (512, 4): ((2, 2), (0, 0), 2048),
    (512, 2): ((1, 1), (0, 0), 2048),
    (512, 1): ((1, 1), (0, 0), 512),
    (64, 7): ((2, 1), (1, 0), 1792),  # an odd side: padded as the seed pads it
}


@pytest.mark.parametrize(("key", "expected"), SEED.items())
def test_reduced_pool_matches_the_seed(key, expected):
    channels, side = key
    assert reduced_pool((1, channels, side, side)) == expected


def test_resnet18_cifar_blocks_get_the_seed_feature_sizes():
    stack = split(timm.create_model("resnet18_cifar"), "block")
    h = torch.randn(2, 3, 32, 32)
    sizes = []
    for block in stack.blocks:
        h = block(h)
        head = build_head("reduced_linear", h.shape, 10)
        kernel, pad, features = SEED[(h.shape[1], h.shape[2])]
        assert head.features == features
        # the pooled values are the seed's AvgPool2d's, cell for cell
        seed_pool = nn.AvgPool2d(kernel, padding=pad) if kernel != (1, 1) else nn.Identity()
        torch.testing.assert_close(head.pool(h), seed_pool(h))
        assert head(h).shape == (2, 10)
        sizes.append(features)
    assert stack.names[0] == "stem" and sizes == [2048] * 9


def test_vgg11_cifar_seed_blocks_get_the_seed_feature_sizes():
    model = timm.create_model("vgg11_cifar", drop_conv=0.2, fc_layers=2, drop_rate=0.2,
                              pool_first=True)
    stack = split(model, "block").eval()
    h = torch.randn(2, 3, 32, 32)
    sizes = []
    with torch.no_grad():
        for block in stack.blocks:
            h = block(h)
            head = build_head("reduced_linear", h.shape, 10)
            if h.ndim == 4:
                kernel, pad, features = SEED[(h.shape[1], h.shape[2])]
                seed_pool = nn.AvgPool2d(kernel, padding=pad) if kernel != (1, 1) \
                    else nn.Identity()
                torch.testing.assert_close(head.pool(h), seed_pool(h))
            assert head(h).shape == (2, 10)
            sizes.append(head.features)
    # 8 conv layers at 2048 values each, then the two fully connected layers' 512
    assert sizes == [2048] * 8 + [512, 512]


def test_tokens_and_vectors():
    tokens = build_head("reduced_linear", (2, 197, 384), 10)
    assert tokens.features == 4 * 384  # 197 tokens pooled by 64 -> 4
    assert tokens(torch.randn(2, 197, 384)).shape == (2, 10)
    vectors = build_head("reduced_linear", (2, 100), 10, features=64)
    assert vectors.features == 100 and vectors(torch.randn(2, 100)).shape == (2, 10)


def test_features_option_and_refusals():
    head = build_head("reduced_linear", (2, 64, 8, 8), 10, features=256, hidden=32)
    assert head.features == 256
    assert head(torch.randn(2, 64, 8, 8)).shape == (2, 10)
    with pytest.raises(ConfigError, match="takes features, hidden; got depth=2"):
        build_head("reduced_linear", (2, 64, 8, 8), 10, depth=2)
