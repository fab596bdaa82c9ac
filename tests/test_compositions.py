"""Every rule x head x loss the registries offer: one training step, or a one-line refusal.

Parametrised over the registries (as timm's tests are over its model list),
so a head or loss registered tomorrow is tested here for free.
"""

import copy
import math

import pytest
import timm
import torch

from locallearn import create_rule, list_heads, split
from locallearn.bench import random_data
from locallearn.errors import ConfigError
from locallearn.heads import HEADS
from locallearn.losses import LOSSES
from locallearn.models import CifarResNet
from locallearn.rules import RULES
from locallearn.rules.blockwise_ssl import label_free_losses
from locallearn.rules.local import LocalRule
from locallearn.trainer import TrainConfig, Trainer

LOCAL_RULES = [e.name for e in RULES if issubclass(e.factory, LocalRule)]
CLASSIFIER_HEADS = list_heads("classifier")
LOCAL_LOSSES = [e.name for e in LOSSES if e.meta["head"] == "classifier"]
DATA = random_data(16, 16)


@pytest.fixture(scope="module")
def stacks():
    torch.manual_seed(0)  # a ResNet-8 of width 8 to 16: every combination in seconds
    conv = split(CifarResNet(blocks=1, widths=(8, 16, 16)), "stage", 2, input_size=(3, 16, 16))
    mlp = split(timm.create_model("ff_mlp", num_classes=10, img_size=16, widths=(32, 32)),
                "stage", input_size=(3, 16, 16))
    return {"conv": conv, "mlp": mlp}


def _options(rule, head, loss):
    cls = RULES.get(rule).factory
    small = {"aux_features": 16, "aux_hidden": 32} if head == "projector" else {}
    return {cls.head_option: head, cls.loss_option: loss, **small}  # ResNet-50's is 84M


def _one_step(stack, rule):
    trainer = Trainer(copy.deepcopy(stack), rule, DATA,
                      TrainConfig(epochs=4, batch_size=8, lr=0.05, progress=False))
    trained = trainer.schedule[0]
    before = [[p.detach().clone() for p in trainer.parts[i].parameters()] for i in trained]
    x, step = trainer.make_step(DATA.train_images[:8], DATA.train_labels[:8],
                                trainer.train_transform, torch.Generator().manual_seed(0))
    losses, _, _ = trainer.train_step(x, step, trained)
    assert all(math.isfinite(float(v)) for v in losses.values())
    for i, old in zip(trained, before, strict=True):  # every trained part learned something
        new = list(trainer.parts[i].parameters())
        assert any(not torch.equal(a, b) for a, b in zip(old, new, strict=True)), i


GRID = [(r, h, loss) for r in LOCAL_RULES for h in CLASSIFIER_HEADS for loss in LOCAL_LOSSES]


@pytest.mark.parametrize("rule, head, loss", GRID)
def test_every_head_and_loss_trains_under_every_local_rule(stacks, rule, head, loss):
    if RULES.get(rule).factory.label_free and loss not in label_free_losses():
        with pytest.raises(ConfigError, match=f"loss={loss} is not a label-free") as err:
            create_rule(rule, **_options(rule, head, loss))
        assert "\n" not in str(err.value)
        return
    _one_step(stacks["conv"], create_rule(rule, **_options(rule, head, loss)))


@pytest.mark.parametrize("head", CLASSIFIER_HEADS)
@pytest.mark.parametrize("rule", LOCAL_RULES)
def test_heads_for_feature_maps_are_refused_on_vector_outputs(stacks, rule, head):
    loss = "barlow" if RULES.get(rule).factory.label_free else "ce"
    composed = create_rule(rule, **_options(rule, head, loss))
    if rule == "infopro":  # the decoder rebuilds images from maps: no MLP backbone
        with pytest.raises(ConfigError, match="needs image inputs") as err:
            Trainer(copy.deepcopy(stacks["mlp"]), composed, DATA, TrainConfig(progress=False))
    elif HEADS.get(head).meta.get("needs") == "map":
        with pytest.raises(ConfigError, match=rf"head '{head}' needs \(B, C, H, W\)") as err:
            Trainer(copy.deepcopy(stacks["mlp"]), composed, DATA, TrainConfig(progress=False))
    else:
        _one_step(stacks["mlp"], composed)
        return
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("rule,options,refusal", [
    ("layerwise", {"loss": "goodness"}, "scores the part's output itself"),
    ("dgl", {"loss": "reconstruction"}, "scores a decoder head"),
    ("layerwise", {"head": "decoder"}, "is a decoder head"),
    ("sequential", {"head": "spatial_std"}, "is a similarity head"),
    ("sequential", {"loss": "supcon", "cache_features": True}, "2 identical views"),
    ("infopro", {"head": "convv"}, "unknown head 'convv'; did you mean conv"),
    ("dgl", {"loss": "focal"}, "unknown loss 'focal'"),
    ("layerwise", {"head": "linear", "aux_depth": 2}, "head 'linear' takes hidden; got depth=2"),
    ("layerwise", {"loss": "supcon", "loss_options": "tau=1"}, "unknown option 'tau'"),
])
def test_incompatible_compositions_are_refused_up_front_in_one_line(stacks, rule, options,
                                                                    refusal):
    with pytest.raises(ConfigError, match=refusal) as err:
        Trainer(copy.deepcopy(stacks["conv"]), create_rule(rule, **options), DATA,
                TrainConfig(progress=False))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("rule,model", [("e2e", "conv"), ("forward_forward", "mlp")])
def test_rules_without_heads_or_losses_to_choose_train_a_step(stacks, rule, model):
    _one_step(stacks[model], create_rule(rule))
