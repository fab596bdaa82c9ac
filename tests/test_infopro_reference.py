"""infopro against the reference code: split points, auxiliary nets' sizes, contrastive loss.

Every number below was computed by running InfoPro's code on CPU from a copy in
/tmp: blackfeather-wang/InfoPro-Pytorch, commit
a38362a2b59949a82b7451af7b95dc0b8da31a0b, ``Experiments on CIFAR-SVHN-STL10/``,
with one patch (``.cuda()`` removed from ``InfoProResNet.__init__`` in
``networks/resnet.py``, which needs a GPU otherwise):

- ``REFERENCE_PARTS``: ``networks.resnet.resnet32/resnet110(local_module_num=K,
  aux_net_config="1c2f", local_loss_mode="contrast", aux_net_widen=1,
  aux_net_feature_dim=128, ...)``, one training-mode forward with forward hooks
  on ``conv1`` ("stem") and every ``layerI[J]`` ("layerI.J"), and a cut at each
  call of a decoder: the first and last block of each local module.
- ``REFERENCE_PARAMS``: parameters of each ``decoder_S_L`` and
  ``aux_classifier_S_L`` of those networks (``networks/auxiliary_nets.py``),
  in the order of ``InfoPro[arch][K]`` (``networks/configs.py``), and of the
  backbone (``conv1, bn1, layer1..3, fc``).
- ``REFERENCE_CONTRAST``: ``networks/losses.py``'s ``SupConLoss()`` on
  ``F.normalize(z).unsqueeze(1)`` at temperature 0.07, as
  ``AuxClassifier.forward`` calls it.
"""

import json

import pytest
import timm
import torch
from conftest import ROOT

from locallearn import create_rule, split
from locallearn.losses import contrast_loss

# InfoPro[arch][K] of networks/configs.py: cut after residual block L of stage S
# (stage 0 is the stem).
TABLE = {
    ("resnet32", 2): [(2, 1)],
    ("resnet32", 4): [(1, 2), (2, 1), (3, 0)],
    ("resnet32", 8): [(1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2)],
    ("resnet110", 4): [(1, 11), (2, 7), (3, 3)],
}

REFERENCE_PARTS = {
    ("resnet32", 2): [("stem", "layer2.1"), ("layer2.2", "layer3.4")],
    ("resnet32", 4): [("stem", "layer1.2"), ("layer1.3", "layer2.1"), ("layer2.2", "layer3.0"),
                      ("layer3.1", "layer3.4")],
    ("resnet32", 8): [("stem", "layer1.0"), ("layer1.1", "layer1.2"), ("layer1.3", "layer1.4"),
                      ("layer2.0", "layer2.1"), ("layer2.2", "layer2.3"), ("layer2.4", "layer3.0"),
                      ("layer3.1", "layer3.2"), ("layer3.3", "layer3.4")],
    ("resnet110", 4): [("stem", "layer1.11"), ("layer1.12", "layer2.7"), ("layer2.8", "layer3.3"),
                       ("layer3.4", "layer3.17")],
}

# (arch, K, local_loss_mode): [(decoder, aux net) per local module]
REFERENCE_PARAMS = {
    ("resnet32", 2, "contrast"): [(3819, 43392)],
    ("resnet32", 4, "contrast"): [(2091, 25408), (3819, 43392), (7275, 61824)],
    ("resnet32", 8, "contrast"): [(2091, 25408)] * 3 + [(3819, 43392)] * 2 + [(7275, 61824)] * 2,
    ("resnet32", 4, "cross_entropy"): [(2091, 10186), (3819, 28170), (7275, 46602)],
    ("resnet110", 4, "contrast"): [(2091, 25408), (3819, 43392), (7275, 61824)],
}
REFERENCE_BACKBONE = {"resnet32": 466_906, "resnet110": 1_730_714}

REFERENCE_CONTRAST = {(0, 0, 1, 1, 1, 2): 1.6595993421940605,
                      (0, 0, 1, 1, 1, 1): 3.6934001161020458}


def split_points(arch: str, k: int) -> list[str]:
    """The reference's table as block names of ``{arch}_cifar``."""
    return ["stem" if s == 0 else f"layer{s}.{j}" for s, j in TABLE[(arch, k)]]


@pytest.mark.parametrize("arch, k", sorted(REFERENCE_PARTS))
def test_split_points_give_the_reference_parts(arch, k):
    model = timm.create_model(f"{arch}_cifar", num_classes=10)
    stack = split(model, split_after=split_points(arch, k))
    got = [(n.split("+")[0], n.split("+")[-1]) for n in stack.names]
    assert got == REFERENCE_PARTS[(arch, k)]


def test_the_infopro_k_preset_cuts_at_the_reference_points():
    preset = json.loads((ROOT / "benchmarks" / "presets" / "infopro-k.json").read_text())
    assert preset["args"]["model"] == "resnet32_cifar"
    for run in preset["runs"]:
        if run["rule"] != "e2e":
            k = int(run["tag"][1:])
            assert run["args"]["split-after"] == split_points("resnet32", k), run


@pytest.mark.parametrize("arch, k, mode", sorted(REFERENCE_PARAMS))
def test_aux_nets_and_decoders_have_the_reference_parameter_counts(arch, k, mode):
    model = timm.create_model(f"{arch}_cifar", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_BACKBONE[arch]
    stack = split(model, split_after=split_points(arch, k), verify=False)
    # Weights of 1 everywhere, so every head is built (the reference builds them all).
    rule = create_rule("infopro", lambda_first="1,1", lambda_last="1,1",
                       aux_loss="contrast" if mode == "contrast" else "ce")
    parts = rule.parts(stack, 10, torch.zeros(2, 3, 32, 32))
    got = [tuple(sum(p.numel() for p in part.objective.heads[h].parameters())
                 for h in ("decoder", "aux")) for part in parts[:-1]]
    assert got == REFERENCE_PARAMS[(arch, k, mode)]
    assert "aux" not in parts[-1].objective.heads  # the last part: the model's head


@pytest.mark.parametrize("labels", sorted(REFERENCE_CONTRAST))
def test_contrast_is_the_reference_supcon_on_one_view(labels):
    i = torch.arange(6, dtype=torch.float64)[:, None]
    z = torch.cos(0.7 * i + 1.3 * torch.arange(4, dtype=torch.float64)[None, :])
    got = contrast_loss(z, torch.tensor(labels), temperature=0.07)
    assert got.item() == pytest.approx(REFERENCE_CONTRAST[labels], rel=1e-6)


def test_the_reference_defaults():
    rule = create_rule("infopro")
    assert rule.config.aux_loss == "contrast" and rule.config.head == "infopro"
    assert rule.config.temperature == 0.07 and rule.config.proj_dim == 128
