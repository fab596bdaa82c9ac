"""sequential and dgl: what trains when, and which parameters each optimizer holds."""

import pytest
import timm
import torch

from locallearn import create_rule, split
from locallearn.data import load_dataset
from locallearn.errors import ConfigError
from locallearn.models import CifarResNet
from locallearn.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic")


def _trainer(rule, data, blocks=3, epochs=3, **config):
    torch.manual_seed(0)
    net = CifarResNet(blocks=1, widths=(8, 16, 32), num_classes=data.num_classes)  # stem + 3
    stack = split(net, "stage", blocks, input_size=data.image_size)
    cfg = TrainConfig(progress=False, batch_size=64, epochs=epochs, **config)
    return Trainer(stack, rule, data, cfg)


def _optimizer_params(optimizer):
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_sequential_trains_one_part_per_phase_and_freezes_the_rest(synthetic):
    trainer = _trainer(create_rule("sequential"), synthetic)
    assert trainer.schedule == [[0], [1], [2, 3]]  # the head trains with the last block
    trainer._train_epoch(0)
    frozen = [p.detach().clone() for p in trainer.parts[0].parameters()]
    trainer._train_epoch(1)
    # Part 0 is done: no optimizer holds its parameters, and they got no gradient.
    assert trainer.optimizers[0] is None
    part0 = {id(p) for p in trainer.parts[0].parameters()}
    for opt in trainer.optimizers:
        if opt is not None:
            assert not part0 & _optimizer_params(opt)
    for p, p0 in zip(trainer.parts[0].parameters(), frozen, strict=True):
        assert p.grad is None and torch.equal(p, p0)
    assert not trainer.parts[0].training  # frozen parts run in eval mode (BN stats fixed)
    assert trainer.optimizers[1] is None  # part 1's phase is over too
    trainer._train_epoch(2)
    assert [o is None for o in trainer.optimizers] == [True, True, True, True]
    trainer.activate(2)
    part2 = {id(p) for p in trainer.parts[2].parameters()}
    assert _optimizer_params(trainer.optimizers[2]) == part2


def test_sequential_record_says_which_part_trained_when(synthetic):
    trainer = _trainer(create_rule("sequential", epochs_per_part="1,1,2"), synthetic, epochs=4)
    result = trainer.fit()
    p = [part.part_name for part in trainer.parts]
    assert [e["trained_parts"] for e in result["history"]] == [
        [p[0]], [p[1]], [p[2], "head"], [p[2], "head"]
    ]


def test_sequential_restarts_the_schedule_per_part(synthetic):
    trainer = _trainer(create_rule("sequential"), synthetic, lr=0.1)
    trainer.activate(1)
    steps = len(trainer.train_loader)
    # Part 1 runs a whole one-epoch cosine schedule of its own, from the full rate.
    assert trainer.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.1)
    assert trainer.schedulers[1].lr_lambdas[0](steps) == pytest.approx(0.0, abs=1e-12)
    glob = _trainer(create_rule("sequential", restart_schedule="false"), synthetic, lr=0.1)
    glob.activate(1)
    # One schedule over the run: part 1 starts a third of the way through the cosine.
    assert glob.schedulers[1].lr_lambdas[0](0) == pytest.approx(
        0.5 * (1 + torch.cos(torch.tensor(torch.pi * steps / (3 * steps))).item())
    )


def test_cached_features_are_the_frozen_prefix_on_unaugmented_images(synthetic):
    trainer = _trainer(create_rule("sequential", cache_features="true"), synthetic)
    loader = trainer.executor.cached_inputs(2)
    features = loader.dataset.tensors[0]
    with torch.no_grad():
        trainer.stack.eval()
        x = trainer.eval_transform(synthetic.train_images)
        want = trainer.stack.blocks[1](trainer.stack.blocks[0](x))
    torch.testing.assert_close(features, want)
    result = trainer.fit()
    assert result["history"][2]["trained_parts"][0] == trainer.parts[2].part_name


def test_sequential_refuses_too_few_epochs(synthetic):
    with pytest.raises(ConfigError, match="needs --epochs >= 3; got 2"):
        _trainer(create_rule("sequential"), synthetic, epochs=2)
    with pytest.raises(ConfigError, match="adding up to --epochs 3"):
        _trainer(create_rule("sequential", epochs_per_part="1,1"), synthetic)


@pytest.mark.parametrize("aux", ["cnn", "mlp_sr", "linear"])
def test_dgl_each_optimizer_holds_its_part_and_aux_net_only(synthetic, aux):
    trainer = _trainer(create_rule("dgl", aux=aux, lr_scales="1,0.5,0.25"), synthetic)
    for part, opt in zip(trainer.parts, trainer.optimizers, strict=True):
        assert _optimizer_params(opt) == {id(p) for p in part.parameters()}
        blocks = {id(p) for b in part.blocks for p in b.parameters()}
        aux_params = {id(p) for p in part.objective.parameters()}
        assert blocks and aux_params and _optimizer_params(opt) == blocks | aux_params
    lrs = [o.param_groups[0]["lr"] for o in trainer.optimizers]
    assert lrs == pytest.approx([0.1, 0.05, 0.025])
    # The last part's objective is the model's own head.
    assert trainer.parts[-1].objective.heads["head"] is trainer.stack.head
    assert trainer.schedule[0] == [0, 1, 2]


def test_dgl_refuses_conv_aux_on_token_outputs_and_bad_lr_scales(synthetic):
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2,
                            num_classes=10)
    stack = split(vit, input_size=(3, 16, 16))
    cfg = TrainConfig(progress=False, batch_size=32)
    with pytest.raises(ConfigError, match=r"use --rule-opt aux=\S*.*\blinear\b"):
        Trainer(stack, create_rule("dgl"), synthetic, cfg)
    Trainer(stack, create_rule("dgl", aux="linear"), synthetic, cfg)
    with pytest.raises(ConfigError, match="one value per part"):
        _trainer(create_rule("dgl", lr_scales="1,1"), synthetic)


def test_dgl_default_aux_is_the_references_mlp_sr(synthetic):
    # eugenium/DGL (commit 4cc7c17): cifar_dgl.py's --type_aux defaults to mlp-sr and
    # imagenet_dgl.py, learning_curves/ and ddg_comparison/ build MLP-SR (n_lin=3, mlp_layers=3).
    trainer = _trainer(create_rule("dgl"), synthetic)
    auxes = [type(h).__name__ for p in trainer.parts[:-1] for h in p.objective.heads.values()]
    assert auxes == ["MlpSr"] * (len(trainer.parts) - 1)
