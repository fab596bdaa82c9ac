"""``blockwise_ssl`` and its ``projector`` head against the reference code.

Numbers computed from shoaibahmed/blockwise_ssl at commit
b3bb944 (``model.py``: ``pool_conv``; ``main.py``: ``BarlowTwins``), on CPU with
``torch.distributed.all_reduce`` the identity (one process):

- REFERENCE_SIZES: the parameters of each block's ``pool_conv_block_i`` plus
  ``projector_list[i]`` of ``BarlowTwins`` built (on the meta device) with the default
  ``--projector 8192-8192-8192``, at ``--filter-size`` 3 (main.py's default) and 1
  (train.sh's), for ResNet-50's four stages (256, 512, 1024, 2048 channels).
- REFERENCE_LOSS: ``BarlowTwins.forward(h1, h2)[0]`` and the norm of its gradient with
  respect to ``(h1, h2)``, the backbone replaced by a stub returning
  ``flatten(pool_conv(16, filter_size=3)(x))``, with ``--projector 64-64-64``,
  ``batch_size 8``, ``lambd 3.9e-3``, ``scale_loss 1/32``; the parameters of the
  stub's pool conv and of ``projector_list[0]``, in that order, drawn as
  ``randn(shape, generator) * 0.1`` from one generator seeded 0; ``h = randn(2, 8, 16, 4,
  4)`` from a generator seeded 1, ``h1, h2 = h[0], h[1]``.
"""

import copy
import dataclasses

import pytest
import timm
import torch
from conftest import every_part_loss_fell, resumes_exactly

from locallearn import create_rule, split
from locallearn.cli import main
from locallearn.errors import ConfigError
from locallearn.heads import build_head
from locallearn.objectives import Objective, Term
from locallearn.rules.blockwise_ssl import PerView
from locallearn.step import Step
from locallearn.trainer import TrainConfig, Trainer

REF = "b3bb944"
REFERENCE_SIZES = {3: [155750400, 160468992, 169906176, 188780544],
                   1: [151556096, 152080384, 153128960, 155226112]}
REFERENCE_LOSS = (2.0352816581726074, 1.007853627204895)


@pytest.mark.parametrize("kernel", [3, 1])
def test_projector_sizes_equal_the_reference(kernel):
    got = []
    for channels in (256, 512, 1024, 2048):
        with torch.device("meta"):
            head = build_head("projector", (2, channels, 7, 7), 8192, kernel=kernel)
        got.append(sum(p.numel() for p in head.parameters()))
    assert got == REFERENCE_SIZES[kernel]


def test_a_block_s_loss_and_gradient_equal_the_reference():
    head = build_head("projector", (8, 16, 4, 4), 64, features=2048, hidden=64, depth=3,
                      kernel=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    objective = Objective({"aux": PerView(head, 2)}, [Term("barlow", head="aux")]).train()
    h = torch.randn(2, 8, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    x = h.flatten(0, 1).requires_grad_(True)  # view 1's 8 rows, then view 2's
    step = Step(torch.zeros(8, dtype=torch.long), x, True, 2, 10)
    loss = objective(x, step, x).loss
    loss.backward()
    torch.testing.assert_close(loss.item(), REFERENCE_LOSS[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad.norm().item(), REFERENCE_LOSS[1], rtol=1e-4, atol=0)


def test_each_view_is_normalised_on_its_own():
    # Hand-checkable: a batch norm over a batch of two views equals each view's alone.
    bn = torch.nn.BatchNorm1d(1, affine=False)
    x = torch.tensor([[0.0], [2.0], [10.0], [30.0]])
    want = torch.tensor([[-1.0], [1.0], [-1.0], [1.0]])  # each pair to -1, +1 (eps aside)
    torch.testing.assert_close(PerView(bn, 2).train()(x), want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(bn(x), want, atol=0.1)  # the stacked batch differs


def _stack(model="resnet32_cifar", **options):
    torch.manual_seed(0)
    net = timm.create_model(model, num_classes=10, widths=(8, 16, 16), **options)
    return split(net, "stage", input_size=(3, 8, 8))


SMALL = {"aux_features": 16, "aux_hidden": 16, "proj_dim": 16}


def _trainer(data, stack, rule, **cfg):
    torch.manual_seed(0)
    config = TrainConfig(**{"progress": False, "batch_size": 16, "epochs": 3, "lr": 1e-3,
                            "optimizer": "adamw", **cfg})
    return Trainer(copy.deepcopy(stack), rule, data, config)


@pytest.fixture(scope="module")
def data(tiny_data):
    return tiny_data


def test_parts_are_the_stages_with_the_stem_in_the_first_and_give_no_logits():
    stack = _stack()
    parts = create_rule("blockwise_ssl").parts(stack, 10, torch.zeros(2, 3, 8, 8))
    assert [p.part_name for p in parts] == ["stem+layer1", "layer2", "layer3"]
    assert [p.block_ids for p in parts] == [[0, 1], [2], [3]]
    alone = create_rule("blockwise_ssl", merge_stem=False).parts(stack, 10,
                                                                  torch.zeros(2, 3, 8, 8))
    assert [p.part_name for p in alone] == ["stem", "layer1", "layer2", "layer3"]
    x = torch.randn(4, 3, 8, 8)
    for part in parts:
        x, scored = part.eval()(x, Step(torch.zeros(4, dtype=torch.long), x, False, 1, 10))
        assert scored.logits is None


def test_no_label_reaches_the_parts(data):
    shuffled = dataclasses.replace(data, train_labels=data.train_labels.flip(0),
                                   test_labels=data.test_labels.flip(0))
    rule = create_rule("blockwise_ssl", **SMALL)
    a, b = (_trainer(d, _stack(), rule, epochs=1) for d in (data, shuffled))
    for t in (a, b):
        t._train_epoch(0)
    assert not torch.equal(data.train_labels, shuffled.train_labels)
    for x, y in zip(a.parts, b.parts, strict=True):
        for (name, u), v in zip(x.state_dict().items(), y.state_dict().values(), strict=True):
            assert torch.equal(u, v), name


def test_no_gradient_crosses_parts(data):
    # The first part steps alike whatever the later parts hold: nothing flows back from them.
    rule = create_rule("blockwise_ssl", **SMALL)
    a, b = _trainer(data, _stack(), rule), _trainer(data, _stack(), rule)
    with torch.no_grad():
        for p in b.parts[-1].parameters():
            p.add_(torch.randn_like(p))
    for t in (a, b):
        x, step = t.make_step(data.train_images[:16], data.train_labels[:16],
                              t.train_transform, torch.Generator().manual_seed(0))
        t.train_step(x, step, t.schedule[0])
    for u, v in zip(a.parts[0].state_dict().values(), b.parts[0].state_dict().values(),
                    strict=True):
        assert torch.equal(u, v)
    assert not torch.equal(a.parts[-1].blocks[0].state_dict()["0.conv1.weight"],
                           b.parts[-1].blocks[0].state_dict()["0.conv1.weight"])


def test_it_learns_and_resumes_exactly(data, tmp_path):
    rule = create_rule("blockwise_ssl", **SMALL)
    every_part_loss_fell(resumes_exactly(_trainer(data, _stack(), rule),
                                         lambda: _trainer(data, _stack(), rule), tmp_path))


@pytest.mark.parametrize("options, match", [
    ({"loss": "ce"}, r"loss=ce is not a label-free two-view loss; choose one of .*barlow"),
    ({"loss": "supcon"}, r"loss=supcon is not a label-free"),
    ({"kernel": 2}, r"option 'kernel' .* an odd number >= 1; got 2"),
    ({"head": "decoder"}, r"head=decoder is a decoder head"),
    ({"loss": "barlow_twins"}, r"barlow"),
])
def test_bad_options_are_refused_in_one_line(options, match):
    with pytest.raises(ConfigError, match=match) as e:
        create_rule("blockwise_ssl", **options)
    assert "\n" not in str(e.value)


def test_check_accepts_it_and_refuses_probe_none(capsys):
    small = ["--dataset", "synthetic", "--model", "resnet32_cifar", "--rule", "blockwise_ssl"]
    assert main([*small, "--check"]) == 0
    assert capsys.readouterr().out.startswith("arguments ok")
    assert main([*small, "--probe", "none", "--check"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("run.py: error: ") and "probe" in line
