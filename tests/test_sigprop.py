"""sigprop: the reference's loss values, the loss by hand, locality, learning, resume, refusals."""

from __future__ import annotations

import copy
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import every_part_loss_fell, resumes_exactly

from locallearn import cli, create_rule, split
from locallearn.errors import ConfigError
from locallearn.models import CifarResNet
from locallearn.rules.sigprop import sigprop_loss, similarities
from locallearn.trainer import TrainConfig, Trainer


def wave(*shape, f=0.37, p=0.0):
    """A fixed tensor without a random generator: sin(0.37 i + p) over its entries."""
    n = math.prod(shape)
    return torch.sin(torch.arange(n, dtype=torch.float64) * f + p).float().view(*shape)


LABELS = torch.tensor([0, 1, 0, 2, 1, 0])
H2, T2 = wave(6, 5), wave(6, 5, f=0.53, p=1.0)
H4, T4 = wave(6, 4, 3, 3), wave(6, 4, 3, 3, f=0.29, p=0.5)
T0_4 = wave(6, 2, 3, 3, f=0.71, p=2.0)

# The reference library's loss functions (amassivek/signalpropagation at commit b4cbef2,
# sigprop/loss/functional/input_target.py: v9_input_target_max_all, v14_input_target_max_rand,
# v15_input_target_topk) run on CPU on the tensors above (torch 2.14.1); the one-hot target
# input is that of LABELS over 3 classes. Topk is compared where no two matches tie.
REFERENCE = [
    ("2d max_all", H2, T2, "onehot", "max_all", 6, 9.42639446258545),
    ("2d max_rand", H2, T2, "onehot", "max_rand", 6, 4.435287952423096),
    ("4d max_all", H4, T4, T0_4, "max_all", 6, 2.2478504180908203),
    ("4d max_rand", H4, T4, T0_4, "max_rand", 6, 2.2478506565093994),
    ("4d topk 1", H4, T4, T0_4, "topk", 1, 2.2478504180908203),
    ("4d topk 3", H4, T4, T0_4, "topk", 3, 6.671749114990234),
    ("4d topk 6", H4, T4, T0_4, "topk", 6, 13.362022399902344),
    ("2d-h 4d-t0 topk 2", H2, T2, T0_4, "topk", 2, 6.614194393157959),
]


@pytest.mark.parametrize("case", REFERENCE, ids=[c[0] for c in REFERENCE])
def test_the_loss_equals_the_reference_librarys(case):
    _, h1, t1, t0, kind, k, want = case
    t0 = F.one_hot(LABELS, 3).float() if isinstance(t0, str) else t0
    assert sigprop_loss(h1, t1, t0, kind, k).item() == pytest.approx(want, rel=1e-5)


def test_the_loss_by_hand_on_two_samples():
    # h = [[1, 0], [0, 2]], t = [[1, 1], [0, 1]]: similarities [[1, 0], [2, 2]]. Labels 0 and
    # 1 (one-hot targets): each row's match is itself, so the loss is the mean of
    # -log softmax([1, 0])[0] = log(1 + e^-1) and -log softmax([2, 2])[1] = log 2.
    h, t = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert similarities(h, t).tolist() == [[1.0, 0.0], [2.0, 2.0]]
    want = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    for kind in ("topk", "max_all", "max_rand"):
        assert sigprop_loss(h, t, torch.eye(2), kind, 1).item() == pytest.approx(want)
    # Feature maps: the mean over positions of the channel dot products.
    h4, t4 = torch.ones(1, 2, 1, 2), torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]]])
    assert similarities(h4, t4).item() == pytest.approx(((1 + 0) + (3 + 2)) / 2)


def _mlp_trainer(data, rule="sigprop", **config):
    torch.manual_seed(0)
    net = timm.create_model("ff_mlp", num_classes=10, img_size=8, widths=(32, 32))
    stack = split(net, "stage", input_size=(3, 8, 8))
    cfg = TrainConfig(progress=False, **{"batch_size": 16, "optimizer": "adamw", "lr": 1e-2,
                                         "weight_decay": 0.0, **config})
    return Trainer(stack, create_rule(rule), data, cfg)


def _conv_trainer(data, **config):
    torch.manual_seed(0)
    net = CifarResNet(blocks=1, widths=(8, 16, 16), num_classes=10)  # resnet32_cifar's family
    stack = split(net, "block", input_size=(3, 8, 8))
    cfg = TrainConfig(progress=False, **{"batch_size": 16, "optimizer": "adamw", "lr": 1e-2,
                                         "weight_decay": 0.0, "epochs": 3, **config})
    return Trainer(stack, create_rule("sigprop"), data, cfg)


def test_each_part_learns_from_its_own_signals_only(tiny_data):
    trainer = _conv_trainer(tiny_data)
    parts = trainer.parts
    assert len(parts) == 5 and parts[-1].part_name == "head"
    x, step = trainer.make_step(tiny_data.train_images[:16], tiny_data.train_labels[:16],
                                trainer.train_transform, torch.Generator().manual_seed(0))
    assert len(x) == 32  # the images, then their labels' targets
    h = x
    for i, part in enumerate(parts):
        h, (loss, logits, _) = part(h.detach(), step)
        grads = torch.autograd.grad(loss, [p for q in parts for p in q.parameters()],
                                    allow_unused=True)
        owned = {id(p) for p in part.parameters()}
        for p, g in zip([p for q in parts for p in q.parameters()], grads, strict=True):
            assert (g is not None) == (id(p) in owned), (i, p.shape)
    # The target embedding belongs to the first part and trains with its loss.
    assert parts[0].objective.weight.shape == (x[0].numel(), 10)


def test_evaluation_scores_every_class_at_every_depth(tiny_data):
    trainer = _mlp_trainer(tiny_data)
    x, step = trainer.make_step(tiny_data.test_images, tiny_data.test_labels,
                                trainer.eval_transform, None, train=False)
    assert len(x) == 16 + 10  # the images, then one target per class
    h = x
    with torch.no_grad():
        for part in trainer.parts:
            part.eval()
            h, scored = part(h, step)
            assert scored.logits.shape == (16, 10)


def test_it_learns_and_resumes_exactly(tiny_data, tmp_path):
    every_part_loss_fell(resumes_exactly(_conv_trainer(tiny_data),
                                         lambda: _conv_trainer(tiny_data), tmp_path))


def test_the_targets_pass_leaves_the_running_statistics_to_the_images(tiny_data):
    trainer = _conv_trainer(tiny_data)
    part = trainer.parts[0]
    x, step = trainer.make_step(tiny_data.train_images[:16], tiny_data.train_labels[:16],
                                trainer.train_transform, torch.Generator().manual_seed(0))
    plain = copy.deepcopy(part.blocks).train()
    with torch.no_grad():
        h = x[:16]
        for block in plain:
            h = block(h)
        part.train()(x, step)
    norms = [(m, n) for m, n in zip(part.blocks.modules(), plain.modules(), strict=True)
             if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    for bn, want in norms:
        assert torch.equal(bn.running_mean, want.running_mean)
    bn = norms[0][0]
    assert bn.training and bn.track_running_stats  # restored


def test_a_short_run_records_every_depth_and_the_check_passes(tmp_path, capsys):
    argv = ["--rule", "sigprop", "--model", "ff_mlp", "--model-opt", "img_size=16",
            "--model-opt", "widths=32,32", "--dataset", "synthetic", "--train-subset", "64",
            "--test-subset", "32", "--batch-size", "32", "--epochs", "1", "--no-plane",
            "--no-progress", "--output", str(tmp_path)]
    assert cli.main([*argv, "--check"]) == 0
    assert capsys.readouterr().out.startswith("arguments ok")
    assert cli.main([*argv, "--rule-opt", "loss=max_rand"]) == 0
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    (entry,) = record["history"]
    assert [a is not None for a in entry["block_acc"]] == [False, True, True]
    assert isinstance(record["test_acc"], float)
    assert "match" in json.dumps(entry["rule_metrics"])


@pytest.mark.parametrize("options, message", [
    ({"loss": "cosine"}, "loss"),
    ({"topk": 0}, "option 'topk' of rule 'sigprop' must be >= 1"),
])
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(ConfigError, match=message) as info:
        create_rule("sigprop", **options)
    assert "\n" not in str(info.value)


def test_a_token_backbone_is_refused(tiny_data):
    net = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=8, patch_size=4)
    stack = split(net, "stage", 2, input_size=(3, 8, 8))
    with pytest.raises(ConfigError, match="rule 'sigprop' compares vectors or feature maps"):
        Trainer(stack, create_rule("sigprop"), tiny_data, TrainConfig(progress=False))
