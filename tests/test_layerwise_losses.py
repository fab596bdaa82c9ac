"""layerwise's loss and head options: each trains (its loss goes down on a fixed batch)."""

import pytest
import timm
import torch

from locallearn import create_rule, split
from locallearn.bench import random_data
from locallearn.errors import ConfigError
from locallearn.trainer import TrainConfig, Trainer


@pytest.mark.parametrize("options", [
    {}, {"loss": "predsim"}, {"loss": "supcon"}, {"head": "linear"}, {"head": "mlp"},
    {"head": "conv"},
    {"nhsic_lambda": 0.1}, {"nhsic_lambda": 0.1, "nhsic_target": "block_input"},
    {"aux_hidden": 8},
])
def test_local_loss_goes_down_on_a_fixed_batch(options):
    torch.manual_seed(0)
    data = random_data(16, 16)
    stack = split(timm.create_model("resnet18_cifar", num_classes=10), "stage", 2,
                  input_size=(3, 16, 16))
    # The rule's own training defaults (the seed's Adam), at a constant rate: the default
    # cosine over this one-batch epoch is 0 after the first step.
    rule = create_rule("layerwise", **options)
    defaults = {k.replace("-", "_"): v for k, v in rule.training_defaults.items()}
    trainer = Trainer(stack, rule, data,
                      TrainConfig(progress=False, batch_size=16, schedule="constant", **defaults))
    x, y = data.train_images, data.train_labels
    totals = []
    for _ in range(6):
        inputs, step = trainer.make_step(x, y, trainer.eval_transform)
        losses, _, _ = trainer.train_step(inputs, step, trainer.schedule[0])
        totals.append(float(losses[0]))
    assert totals[-1] < totals[0], totals


def test_supcon_trains_on_two_views_and_bad_options_are_one_line_errors():
    rule = create_rule("layerwise", loss="supcon")
    data = random_data(4, 8)
    from locallearn.data import BatchTransform
    inputs, step = rule.make_step(data.train_images, data.train_labels,
                                  BatchTransform((0.5,) * 3, (0.25,) * 3, "crop_flip"), 10)
    assert len(inputs) == 8 and len(step.labels) == 4 and step.views == 2
    assert len(step.labels_for(len(inputs))) == 8
    # The registry's losses are the choices: an unknown one names the close matches.
    with pytest.raises(ConfigError, match="unknown loss 'predsm'; did you mean predsim"):
        create_rule("layerwise", loss="predsm")
    with pytest.raises(ConfigError, match="unknown loss 'mse'"):
        create_rule("layerwise", loss="mse")
    with pytest.raises(ConfigError, match="beta"):
        create_rule("layerwise", beta=2)


def test_predsim_similarity_branch_is_finite_on_a_1x1_map():
    from locallearn.heads import SpatialStd

    torch.manual_seed(0)
    out = SpatialStd(8)(torch.randn(4, 8, 1, 1))
    assert out.shape == (4, 8) and torch.isfinite(out).all()
    assert torch.isfinite(SpatialStd(8)(torch.randn(4, 8, 3, 3))).all()
