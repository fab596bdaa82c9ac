"""infopro: the lambda schedule, the decoder's output shape, no gradient across parts."""

import pytest
import timm
import torch

from locallearn import create_rule, split
from locallearn.bench import random_data
from locallearn.errors import ConfigError
from locallearn.rules.infopro import Decoder, lambda_schedule
from locallearn.trainer import TrainConfig, Trainer


def test_lambda_schedule_is_linear_between_the_endpoints():
    assert lambda_schedule((5, 0), (0, 1), 3) == [(5, 0), (2.5, 0.5), (0, 1)]
    rule = create_rule("infopro")
    assert rule.lambdas(1) == [(5.0, 0.5)]  # K = 2: the paper's code's (5, 0.5)
    assert rule.lambdas(7)[0] == (5.0, 0.0) and rule.lambdas(7)[-1] == (0.0, 1.0)
    assert create_rule("infopro", lambda_first="1,2").lambdas(1) == [(1.0, 2.0)]
    with pytest.raises(ConfigError, match="two weights"):
        create_rule("infopro", lambda_first="1,2,3")


@pytest.mark.parametrize("shape", [(2, 64, 32, 32), (2, 256, 8, 8)])
def test_decoder_output_matches_the_input_shape(shape):
    out = Decoder(shape[1], (32, 32))(torch.randn(shape))
    assert out.shape == (2, 3, 32, 32) and 0 <= out.min() and out.max() <= 1


@pytest.fixture(scope="module")
def trainer():
    torch.manual_seed(0)
    data = random_data(32, 32)
    stack = split(timm.create_model("resnet18_cifar", num_classes=10), "stage", 4,
                  input_size=(3, 32, 32))
    return Trainer(stack, create_rule("infopro"), data,
                   TrainConfig(progress=False, batch_size=16)), data


def test_parts_have_the_schedule_and_the_last_uses_the_model_head(trainer):
    trainer, _ = trainer
    weights = [p.objective.lambdas for p in trainer.parts[:-1]]
    assert weights == [(5.0, 0.0), (2.5, 0.5), (0.0, 1.0)]
    assert trainer.parts[-1].objective.head is trainer.stack.head


def test_no_gradient_crosses_part_boundaries(trainer):
    trainer, data = trainer
    x = trainer.eval_transform(data.train_images[:8])
    y = data.train_labels[:8]
    trainer.rule._stats = (trainer.eval_transform.mean, trainer.eval_transform.std)
    h = x
    for k, part in enumerate(trainer.parts):
        for p in (q for part_ in trainer.parts for q in part_.parameters()):
            p.grad = None
        h, loss, _ = part(h.detach(), y)
        loss.backward()
        mine = {id(p) for p in part.parameters()}
        for other in trainer.parts:
            if other is not part:
                assert all(p.grad is None for p in other.parameters() if id(p) not in mine), k


def test_loss_goes_down_on_a_fixed_batch(trainer):
    trainer, data = trainer
    x, y = data.train_images[:16], data.train_labels[:16]
    first = last = None
    for _ in range(8):
        inputs, labels = trainer.rule.batch(x, y, trainer.eval_transform)
        losses, _ = trainer.train_step(inputs, labels, trainer.schedule[0])
        total = sum(float(v) for v in losses.values())
        first = total if first is None else first
        last = total
    assert last < first
