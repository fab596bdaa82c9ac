"""DGL's auxiliary networks (``cnn``, ``mlp_sr``) are built as the reference code builds them.

Reference: eugenium/DGL @ 4cc7c178ecfc0f780976cda99abf57517bed7b00,
``auxiliary_nets_study/models.py``, ``auxillary_classifier2(input_features=C,
in_size=side, num_classes=10, ...)``: ``cnn=True, n_lin=2, mlp_layers=0`` is the
CNN aux, ``cnn=False, n_lin=3, mlp_layers=3`` MLP-SR. The counts below were
computed by instantiating that class on CPU from a copy in /tmp and counting
the parameters that take part in its forward (those given a gradient by one
backward pass). Its MLP-SR also builds a ``BatchNorm2d(C)`` (``self.bn``) that
only its variants without an MLP use: 2C parameters more in ``parameters()``
(846,346 for C = 128, side 32). (128, 32), (256, 16), (512, 8) are the maps of
the reference's own network (``Net``, feature_size 128).
"""

import pytest
import torch
from torch import nn

from locallearn.heads import build_head

REFERENCE = {
    ("cnn", 128, 32): 300810,
    ("cnn", 256, 16): 1191434,
    ("cnn", 512, 8): 4742154,
    ("cnn", 64, 32): 76682,
    ("cnn", 256, 2): 1191434,
    ("mlp_sr", 128, 32): 846090,
    ("mlp_sr", 256, 16): 3363338,
    ("mlp_sr", 512, 8): 13411338,
    ("mlp_sr", 64, 32): 214154,
    ("mlp_sr", 256, 2): 3363338,
}


@pytest.mark.parametrize(("key", "count"), REFERENCE.items(), ids=str)
def test_parameter_counts_equal_the_reference(key, count):
    name, channels, side = key
    head = build_head(name, (2, channels, side, side), 10)
    assert sum(p.numel() for p in head.parameters()) == count
    assert head(torch.randn(2, channels, side, side)).shape == (2, 10)


def _inputs_of(module: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    head(x)
    handle.remove()
    return seen[0]


def test_cnn_batch_normalises_the_pooled_map_before_its_linear_layer():
    torch.manual_seed(0)
    head = build_head("cnn", (8, 16, 8, 8), 10).train()
    z = _inputs_of(head.fc, head, torch.randn(8, 16, 8, 8) + 3).view(8, 16, 2, 2)
    mean = z.mean(dim=(0, 2, 3))
    var = z.var(dim=(0, 2, 3), unbiased=False)
    assert mean.abs().max() < 1e-5 and (var - 1).abs().max() < 1e-2  # eps: 1e-5


def test_mlp_sr_shrinks_the_map_to_a_quarter_then_runs_1x1_convs_and_an_mlp():
    torch.manual_seed(0)
    head = build_head("mlp_sr", (4, 32, 30, 17), 10, depth=2, pool=3, hidden=8)
    x = torch.randn(4, 32, 30, 17)
    assert _inputs_of(head.convs, head, x).shape == (4, 32, 8, 5)  # ceil(30/4), ceil(17/4)
    convs = [m for m in head.convs if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.bias) for c in convs] == [(8, (1, 1), None)] * 2
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(72, 72), (72, 72), (72, 10)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.mlp) == 2
