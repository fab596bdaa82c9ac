import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import locallearn
from locallearn import create_rule, list_rules, split
from locallearn.data import load_dataset
from locallearn.errors import ConfigError
from locallearn.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic")


def _trainer(rule, data, model="resnet18_cifar", blocks=None, model_kwargs=None, **config):
    torch.manual_seed(0)
    net = timm.create_model(model, num_classes=data.num_classes, **(model_kwargs or {}))
    stack = split(net, "stage", blocks, input_size=data.image_size)
    cfg = TrainConfig(progress=False, **{"batch_size": 32, **config})
    return Trainer(stack, rule if not isinstance(rule, str) else create_rule(rule), data, cfg)


def test_builtin_rules_are_registered_with_papers():
    assert {"e2e", "layerwise"} <= set(list_rules())
    for entry in locallearn.rules.RULES:
        assert entry.meta["paper"] and entry.meta.get("summary")


def test_create_rule_checks_options():
    assert create_rule("layerwise", aux_hidden="16").config.aux_hidden == 16
    with pytest.raises(ConfigError, match="unknown option 'hidden' for rule 'layerwise'"):
        create_rule("layerwise", hidden=3)
    with pytest.raises(ConfigError, match="rule 'e2e' takes no options"):
        create_rule("e2e", depth=3)
    with pytest.raises(ConfigError, match="did you mean layerwise"):
        create_rule("layerwse")


# Rules made for one kind of backbone (a small one, at the data's size); others: resnet18_cifar.
MODEL_OF = {"forward_forward": ("ff_mlp", {"widths": (64, 64, 64)})}


@pytest.mark.parametrize("rule", list_rules())
def test_every_rule_trains_on_synthetic_data(rule, synthetic):
    # Two parts and two epochs: enough for rules that train parts in turn.
    model, kwargs = MODEL_OF.get(rule, ("resnet18_cifar", {}))
    if kwargs:
        kwargs = {**kwargs, "img_size": synthetic.image_size[1]}
    trainer = _trainer(rule, synthetic, model, blocks=2, epochs=2, lr=0.05, model_kwargs=kwargs)
    result = trainer.fit()
    for entry in result["history"]:
        assert all(math.isfinite(v) for v in entry["part_loss"].values())
        assert entry["images_per_s"] > 0
    assert 0.0 <= result["test_acc"] <= 1.0
    assert len(result["block_acc"]) == len(trainer.stack.blocks)
    assert result["block_acc"][-1] is not None


def _local_grads(trainer, x, step):
    """Per part, the gradient of its own loss alone w.r.t. its parameters (input detached)."""
    grads, h = [], x
    for part in trainer.parts:
        h, (loss, _, _) = part(h.detach(), step)
        params = list(part.parameters())
        grads.append(torch.autograd.grad(loss, params))
    return grads


def test_layerwise_applies_each_parts_local_gradient_only(synthetic):
    trainer = _trainer("layerwise", synthetic, lr=1.0, momentum=0.0, weight_decay=0.0,
                       schedule="constant")
    x, step = trainer.make_step(synthetic.train_images[:16], synthetic.train_labels[:16],
                                trainer.eval_transform)
    expected = _local_grads(trainer, x, step)
    before = [[p.detach().clone() for p in part.parameters()] for part in trainer.parts]
    trainer.train_step(x, step, list(range(len(trainer.parts))))
    for part, grads, old in zip(trainer.parts, expected, before, strict=True):
        for p, g, p0 in zip(part.parameters(), grads, old, strict=True):
            torch.testing.assert_close(p0 - p.detach(), g, rtol=1e-4, atol=1e-6)


def test_layerwise_loss_leaves_earlier_blocks_untouched(synthetic):
    trainer = _trainer("layerwise", synthetic)
    h, step = trainer.make_step(synthetic.train_images[:8], synthetic.train_labels[:8],
                                trainer.eval_transform)
    k = len(trainer.parts) - 2  # the last block's part
    for part in trainer.parts[:k]:
        h, _ = part(h.detach(), step)
    _, (loss, _, _) = trainer.parts[k](h.detach(), step)
    loss.backward()
    for part in trainer.parts[:k]:
        assert all(p.grad is None for p in part.parameters())
    assert all(p.grad is not None for p in trainer.parts[k].parameters())


def test_e2e_gradients_equal_plain_autograd(synthetic):
    torch.manual_seed(0)
    net = timm.create_model("resnet18_cifar", num_classes=10)
    reference = copy.deepcopy(net)
    stack = split(net, "block", input_size=synthetic.image_size)
    cfg = TrainConfig(lr=1.0, momentum=0.0, weight_decay=0.0, schedule="constant",
                      batch_size=16, progress=False)
    trainer = Trainer(stack, create_rule("e2e"), synthetic, cfg)
    x, step = trainer.make_step(synthetic.train_images[:16], synthetic.train_labels[:16],
                                trainer.eval_transform)
    F.cross_entropy(reference(x), step.labels).backward()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    trainer.train_step(x, step, [0])
    ref = dict(reference.named_parameters())
    for name, p in net.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), ref[name].grad, rtol=1e-4, atol=1e-6)


def test_parts_sharing_a_parameter_are_refused(synthetic):
    class Shared(locallearn.Rule):
        name = "shared"

        def parts(self, stack, num_classes, example):
            ids = list(range(len(stack.blocks)))
            whole = locallearn.LocalPart("a", list(stack.blocks), ids,
                                         locallearn.classifier(stack.head))
            again = locallearn.LocalPart("b", [], [], locallearn.classifier(stack.head))
            return [whole, again]

    with pytest.raises(RuntimeError, match="share a parameter"):
        _trainer(Shared(), synthetic)


def test_divergence_is_caught(synthetic):
    from locallearn.trainer import Diverged

    trainer = _trainer("e2e", synthetic, lr=1e12, momentum=0.0, log_every=1, epochs=1)
    with pytest.raises(Diverged, match="rule 'e2e' diverged: part 'e2e'"):
        trainer.fit()


def test_multistep_and_cosine_schedules():
    from locallearn.trainer import lr_factor

    cfg = TrainConfig(epochs=4, schedule="multistep", milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_factor(cfg, e * 10, 10) for e in range(4)] == pytest.approx([1, 1, 0.1, 0.01])
    cos = TrainConfig(epochs=2, schedule="cosine")
    assert lr_factor(cos, 0, 10) == 1.0 and lr_factor(cos, 10, 10) == pytest.approx(0.5)
    assert lr_factor(cos, 20, 10) == pytest.approx(0.0)
