"""layerwise's loss options: supcon's two views, one-line refusals, predsim on a 1x1 map.

That each loss learns is test_rules.py's ``test_every_rule_and_local_loss_learns``; that
every head and loss takes a step, test_compositions.py's."""

import pytest
import torch

from locallearn import create_rule
from locallearn.bench import random_data
from locallearn.errors import ConfigError


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
    out = SpatialStd((4, 8, 1, 1))(torch.randn(4, 8, 1, 1))
    assert out.shape == (4, 8) and torch.isfinite(out).all()
    assert torch.isfinite(SpatialStd((4, 8, 3, 3))(torch.randn(4, 8, 3, 3))).all()
