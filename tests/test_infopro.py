"""infopro: the lambda schedule, decoder shape, no gradient across parts, recomputed heads."""

import pytest
import timm
import torch

from locallearn import create_rule, split
from locallearn.bench import random_data
from locallearn.errors import ConfigError
from locallearn.heads import Decoder
from locallearn.trainer import TrainConfig, Trainer, evaluate


def test_lambda_schedule_is_linear_between_the_endpoints():
    def lambdas(rule, parts):
        return [tuple(rule.weights(k, parts).values()) for k in range(parts)]

    assert lambdas(create_rule("infopro", lambda_first="5,0"), 3) == [(5, 0), (2.5, 0.5), (0, 1)]
    rule = create_rule("infopro")
    assert lambdas(rule, 1) == [(5.0, 0.5)]  # K = 2: the paper's code's (5, 0.5)
    assert lambdas(rule, 7)[0] == (5.0, 0.0) and lambdas(rule, 7)[-1] == (0.0, 1.0)
    assert lambdas(create_rule("infopro", lambda_first="1,2"), 1) == [(1.0, 2.0)]
    with pytest.raises(ConfigError, match="two weights"):
        create_rule("infopro", lambda_first="1,2,3")


@pytest.mark.parametrize("shape", [(2, 64, 32, 32), (2, 256, 8, 8)])
def test_decoder_output_matches_the_input_shape(shape):
    out = Decoder(shape, (3, 32, 32))(torch.randn(shape))
    assert out.shape == (2, 3, 32, 32) and 0 <= out.min() and out.max() <= 1


@pytest.fixture(scope="module")
def trainer():
    torch.manual_seed(0)
    data = random_data(32, 32)
    stack = split(timm.create_model("resnet18_cifar", num_classes=10), "stage", 4,
                  input_size=(3, 32, 32))
    return Trainer(stack, create_rule("infopro", aux_loss="ce"), data,
                   TrainConfig(progress=False, batch_size=16)), data


def test_parts_have_the_schedule_and_the_last_uses_the_model_head(trainer):
    trainer, _ = trainer
    weights = [{t.loss: t.weight for t in p.objective.terms} for p in trainer.parts[:-1]]
    assert weights == [{"reconstruction": 5.0}, {"reconstruction": 2.5, "ce": 0.5}, {"ce": 1.0}]
    assert trainer.parts[-1].objective.heads["head"] is trainer.stack.head


def test_no_gradient_crosses_part_boundaries(trainer):
    trainer, data = trainer
    h, step = trainer.make_step(data.train_images[:8], data.train_labels[:8],
                                trainer.eval_transform)
    for k, part in enumerate(trainer.parts):
        for p in (q for part_ in trainer.parts for q in part_.parameters()):
            p.grad = None
        h, (loss, _, _) = part(h.detach(), step)
        loss.backward()
        mine = {id(p) for p in part.parameters()}
        for other in trainer.parts:
            if other is not part:
                assert all(p.grad is None for p in other.parameters() if id(p) not in mine), k


def test_a_term_weighted_zero_has_no_module_and_no_prediction(trainer):
    trainer, _ = trainer
    first, middle, last_local = (p.objective for p in trainer.parts[:-1])
    assert set(first.heads) == {"decoder"}  # (5, 0)
    assert set(middle.heads) == {"decoder", "aux"}  # (2.5, 0.5)
    assert set(last_local.heads) == {"aux"}  # (0, 1)
    _, block_acc = evaluate(trainer)
    assert block_acc[0] is None and all(a is not None for a in block_acc[1:])


def _one_step(recompute: bool, aux_loss: str = "ce"):
    torch.manual_seed(0)
    data = random_data(16, 16)
    stack = split(timm.create_model("resnet18_cifar", num_classes=10), "stage", 2,
                  input_size=(3, 16, 16))
    rule = create_rule("infopro", recompute_heads=recompute, aux_loss=aux_loss)
    trainer = Trainer(stack, rule, data, TrainConfig(progress=False, batch_size=16, lr=0.1))
    inputs, step = trainer.make_step(data.train_images, data.train_labels, trainer.eval_transform)
    losses, _, _ = trainer.train_step(inputs, step, trainer.schedule[0])
    return trainer.parts[0].state_dict(), losses


@pytest.mark.parametrize("aux_loss", ["ce", "contrast"])
def test_recomputed_heads_give_the_step_of_kept_heads(aux_loss):
    (kept, kept_losses), (again, again_losses) = (_one_step(r, aux_loss) for r in (False, True))
    assert kept.keys() == again.keys()
    for name in kept:  # blocks, decoder and auxiliary head: weights and batch-norm statistics
        torch.testing.assert_close(again[name], kept[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(again_losses[0], kept_losses[0])
