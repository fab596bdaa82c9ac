"""sequential's frozen_mode and head_phase, and the seed's head as layerwise's default.

The seed's sequential training (keitaroskmt/E2E-info @ 88473c3, ``main_lw_seq.py``)
calls ``model.train()`` once, so frozen blocks run in training mode, and trains
the final classifier in a phase of its own after every block.
"""

import copy
import dataclasses

import pytest
import timm
import torch

from locallearn import create_rule, split
from locallearn.checkpoint import load, save
from locallearn.data import load_dataset
from locallearn.errors import ConfigError
from locallearn.heads import ReducedLinear
from locallearn.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def data():
    full = load_dataset("synthetic")
    return dataclasses.replace(full, train_images=full.train_images[:64],
                               train_labels=full.train_labels[:64])


@pytest.fixture(scope="module")
def stack(data):
    torch.manual_seed(0)
    net = timm.create_model("resnet32_cifar", num_classes=data.num_classes)
    return split(net, "stage", 2, input_size=data.image_size)


@pytest.fixture
def make(data, stack):
    """A Trainer of ``sequential`` with ``options`` on a fresh copy of the same 2-part stack."""
    def build(epochs=2, **options):
        torch.manual_seed(0)
        cfg = TrainConfig(progress=False, batch_size=32, epochs=epochs, lr=0.05)
        return Trainer(copy.deepcopy(stack), create_rule("sequential", **options), data, cfg)
    return build


def _bn_means(part):
    return [m.running_mean.clone() for m in part.modules()
            if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_frozen_blocks_batchnorm_statistics_move_only_in_train_mode(make, mode):
    trainer = make(frozen_mode=mode)
    assert trainer.schedule == [[0], [1, 2]]
    trainer._train_epoch(0)
    means = _bn_means(trainer.parts[0])
    params = [p.detach().clone() for p in trainer.parts[0].parameters()]
    trainer._train_epoch(1)  # part 0 is frozen in this phase
    moved = [not torch.equal(a, b) for a, b in zip(means, _bn_means(trainer.parts[0]),
                                                   strict=True)]
    assert all(moved) if mode == "train" else not any(moved)
    assert trainer.parts[0].training == (mode == "train")
    # Either way the frozen part learns nothing and holds no optimizer state.
    assert trainer.optimizers[0] is None
    for p, p0 in zip(trainer.parts[0].parameters(), params, strict=True):
        assert p.grad is None and torch.equal(p, p0)


def test_head_phase_trains_the_head_alone_after_every_block(make):
    trainer = make(epochs=4, head_phase=True, epochs_per_part="1,1,2")
    assert trainer.schedule == [[0], [1], [2], [2]]  # part 2 is the model's head
    rule = create_rule("sequential", head_phase=True)
    assert [rule.trained_parts(e, 3, 3) for e in range(3)] == [[0], [1], [2]]
    for epoch in (0, 1):
        trainer._train_epoch(epoch)
    blocks = {k: v.clone() for part in trainer.parts[:2] for k, v in
              part.state_dict().items()}  # blocks, their heads, BN statistics
    head = [p.detach().clone() for p in trainer.parts[2].parameters()]
    trainer._train_epoch(2)
    trainer._train_epoch(3)
    after = {k: v for part in trainer.parts[:2] for k, v in part.state_dict().items()}
    assert all(torch.equal(blocks[k], after[k]) for k in blocks)
    assert not any(torch.equal(p, p0) for p, p0 in zip(trainer.parts[2].parameters(), head,
                                                       strict=True))


def test_head_phase_takes_one_more_epoch_count():
    rule = create_rule("sequential", head_phase=True, epochs_per_part="2,1")
    with pytest.raises(ConfigError, match="needs 3 positive counts adding up to --epochs 3"):
        rule.trained_parts(0, 3, 3)  # 2 block parts and the head: 3 phases
    with pytest.raises(ConfigError, match="needs --epochs >= 3; got 2"):
        create_rule("sequential", head_phase=True).trained_parts(0, 2, 3)


def test_resumed_in_the_head_phase_gives_the_same_network(make, tmp_path):
    options = {"head_phase": True, "frozen_mode": "train"}
    whole = make(epochs=3, **options)
    for epoch in range(2):
        whole.history.append(whole._train_epoch(epoch))
    path = save(whole, tmp_path, 2, {}, 1, "run")  # after the blocks' phases
    whole._train_epoch(2)
    resumed = make(epochs=3, **options)
    assert load(resumed, path, {}, "run") == 2
    resumed._train_epoch(2)
    for a, b in zip(whole.parts, resumed.parts, strict=True):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name


def test_options_in_the_record_and_refused_combination():
    options = create_rule("sequential", frozen_mode="train", head_phase="true").describe()
    assert options["frozen_mode"] == "train" and options["head_phase"] is True
    defaults = create_rule("sequential").describe()
    assert defaults["frozen_mode"] == "eval" and defaults["head_phase"] is False
    assert defaults["head"] == create_rule("layerwise").describe()["head"] == "reduced_linear"
    with pytest.raises(ConfigError, match="must be one of eval, train; got 'all'"):
        create_rule("sequential", frozen_mode="all")
    with pytest.raises(ConfigError, match="cache_features .* frozen_mode=train cannot apply"):
        create_rule("sequential", frozen_mode="train", cache_features=True)


def test_the_seeds_head_by_default_and_linear_by_name(data, stack):
    example = torch.zeros(2, *data.image_size)
    for rule in ("layerwise", "sequential"):
        parts = create_rule(rule).parts(stack, 10, example)
        assert all(isinstance(p.objective.heads["aux"], ReducedLinear) for p in parts[:-1])
        parts = create_rule(rule, head="linear").parts(stack, 10, example)
        assert not any(isinstance(p.objective.heads["aux"], ReducedLinear) for p in parts[:-1])
