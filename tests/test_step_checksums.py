"""Behaviour preserved: every rule's parameters and losses after a few CPU steps.

``fixtures/step_checksums.json`` is written by this file (``python
tests/test_step_checksums.py --write``) from the code whose behaviour is to be
kept. Each case trains a tiny model with a fixed seed for two steps per epoch
on CPU, one thread, and keeps what a change of behaviour would move:

- every backbone tensor (parameters and buffers) by name: its sum and its sum
  of squares;
- the auxiliary modules' tensors (heads, decoders) as a multiset per part,
  ordered by shape and sum of squares, so renaming a head's attributes does not
  change the fixture but changing its values does;
- every trained part's loss at every step.

A bit hash would be a property of one CPU and one torch build, not of the code,
so the numbers are compared within a tolerance (:func:`mismatches`): a loss or
a sum of squares within ``RTOL`` of the recorded one, a sum within ``RTOL`` of
the tensor's norm (a sum can cancel to near zero; its rounding noise scales
with the norm), plus ``ATOL``. How ``RTOL = 1e-4, ATOL = 1e-6`` were chosen,
measured on the 21 cases: the same code on other CPU code paths (ATen's AVX2
and scalar kernels and oneDNN capped at AVX2 or SSE4.1 instead of AVX-512, as
``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA`` select them, or 2 threads)
moved no number by more than 0.1 of that tolerance (float32 rounding after two
steps, ~1e-5 at most); a learning rate 1 % higher or lower moved at least one
number of every case by 13 to 35 times the tolerance. So the tolerance sits
10x above the noise and 10x below the smallest real change; the tests below
show both ends. Two steps and a ResNet-8, not more: from the third step on, a
deep stack of batch norms on 8 images amplifies rounding until it is as large
as the effect of such a change.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from locallearn import create_rule, split
from locallearn.data import load_dataset
from locallearn.models import CifarResNet
from locallearn.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "step_checksums.json"
STEPS, BATCH, LR = 2, 8, 0.05
RTOL, ATOL = 1e-4, 1e-6

# The layer-wise cases name head=linear: the fixture was first written when global average
# pooling + linear was the default head of layerwise and sequential (issue 13 made the seed
# paper's reduced_linear the default); the cases kept their head.
GAP = {"head": "linear"}

# The "dgl" case names aux=cnn: the fixture was written when DGL's CNN auxiliary was the
# default (issue 30 made MLP-SR, the reference code's, the default; "dgl-mlp_sr" keeps it).

# The backbone of the convolutional cases: 3 stages of one basic block (a ResNet-32 is 3 of
# 5; its deeper stacks of batch norms on 8 images amplify float rounding step by step).
RESNET8 = "resnet8"

# name: (model, model kwargs, rule, rule options, --blocks, epochs)
CASES: dict[str, tuple] = {
    "e2e": (RESNET8, {}, "e2e", {}, None, 1),
    "layerwise": (RESNET8, {}, "layerwise", GAP, None, 1),
    "layerwise-mlp": (RESNET8, {}, "layerwise", {"head": "mlp"}, None, 1),
    "layerwise-conv": (RESNET8, {}, "layerwise", {"head": "conv"}, None, 1),
    "layerwise-hidden": (RESNET8, {}, "layerwise", {**GAP, "aux_hidden": 16}, None, 1),
    "layerwise-predsim": (RESNET8, {}, "layerwise", {**GAP, "loss": "predsim"}, None, 1),
    "layerwise-supcon": (RESNET8, {}, "layerwise", {**GAP, "loss": "supcon"}, None, 1),
    "layerwise-nhsic-input": (RESNET8, {}, "layerwise",
                              {**GAP, "nhsic_lambda": 0.1}, None, 1),
    "layerwise-nhsic-block": (RESNET8, {}, "layerwise",
                              {**GAP, "nhsic_lambda": 0.1, "nhsic_target": "block_input"}, None, 1),
    "sequential": (RESNET8, {}, "sequential", GAP, 2, 2),
    "sequential-cached": (RESNET8, {}, "sequential", {**GAP, "cache_features": True},
                          2, 2),
    "sequential-nhsic": (RESNET8, {}, "sequential", {**GAP, "nhsic_lambda": 0.1}, 2, 2),
    "dgl": (RESNET8, {}, "dgl", {"aux": "cnn"}, None, 1),
    "dgl-mlp_sr": (RESNET8, {}, "dgl", {"aux": "mlp_sr"}, None, 1),
    "dgl-linear": (RESNET8, {}, "dgl", {"aux": "linear"}, None, 1),
    "infopro-2": (RESNET8, {}, "infopro", {}, 2, 1),
    "infopro-4": (RESNET8, {}, "infopro", {}, 4, 1),
    "infopro-contrast": (RESNET8, {}, "infopro", {"aux_loss": "contrast"}, 2, 1),
    "infopro-kept-heads": (RESNET8, {}, "infopro", {"recompute_heads": False}, 2, 1),
    "forward_forward": ("ff_mlp", {"img_size": 16, "widths": (32, 32, 32)},
                        "forward_forward", {}, None, 1),
    "forward_forward-sequential": ("ff_mlp", {"img_size": 16, "widths": (32, 32, 32)},
                                   "forward_forward", {"sequential": True}, None, 3),
}


def _stats(t: torch.Tensor) -> list[float]:
    t = t.detach().double()
    return [t.sum().item(), t.square().sum().item()]


def behaviour(name: str, lr: float = LR) -> dict[str, object]:
    """Train case ``name`` for ``STEPS`` steps per epoch; what it learned and its losses."""
    model, model_kwargs, rule, options, blocks, epochs = CASES[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order, whatever the machine's cores
    try:
        data = load_dataset("synthetic")
        n = STEPS * BATCH
        data = dataclasses.replace(data, train_images=data.train_images[:n],
                                   train_labels=data.train_labels[:n],
                                   test_images=data.test_images[:n],
                                   test_labels=data.test_labels[:n])
        torch.manual_seed(0)
        if model == RESNET8:
            net = CifarResNet(blocks=1, num_classes=data.num_classes)
        else:
            net = timm.create_model(model, num_classes=data.num_classes, **model_kwargs)
        stack = split(net, "stage", blocks, input_size=data.image_size)
        cfg = TrainConfig(epochs=epochs, batch_size=BATCH, lr=lr, progress=False)
        trainer = Trainer(stack, create_rule(rule, **options), data, cfg)
        losses, train_step = [], trainer.train_step

        def recorded(*args, **kwargs):  # each step's loss of each trained part
            out = train_step(*args, **kwargs)
            losses.append([float(out[0][i]) for i in sorted(out[0])])
            return out

        trainer.train_step = recorded
        trainer.fit()
        in_stack = {id(t) for t in stack.state_dict(keep_vars=True).values()}
        aux = [sorted(([list(t.shape), *_stats(t)] for t in part.state_dict(keep_vars=True)
                       .values() if id(t) not in in_stack), key=lambda s: (s[0], s[2]))
               for part in trainer.parts]
        return {"backbone": {k: _stats(t) for k, t in stack.state_dict().items()},
                "aux": aux, "losses": losses}
    finally:
        torch.set_num_threads(threads)


def mismatches(got: dict, want: dict) -> list[str]:
    """Where ``got`` differs from ``want`` by more than the tolerance (empty: the same)."""
    out = []

    def close(where: str, a: float, b: float, scale: float) -> None:
        if not abs(a - b) <= RTOL * abs(scale) + ATOL:
            out.append(f"{where}: {a!r} != {b!r}")

    def tensor(where: str, a: list[float], b: list[float]) -> None:
        close(f"{where} sum", a[0], b[0], math.sqrt(b[1]))
        close(f"{where} sum of squares", a[1], b[1], b[1])

    if got["backbone"].keys() != want["backbone"].keys():
        return [f"backbone tensors {sorted(got['backbone'])} != {sorted(want['backbone'])}"]
    for key, b in want["backbone"].items():
        tensor(key, got["backbone"][key], b)
    shapes = [[[s[0] for s in part] for part in d["aux"]] for d in (got, want)]
    if shapes[0] != shapes[1]:
        return out + [f"auxiliary tensor shapes {shapes[0]} != {shapes[1]}"]
    for p, (part_a, part_b) in enumerate(zip(got["aux"], want["aux"], strict=True)):
        for k, (a, b) in enumerate(zip(part_a, part_b, strict=True)):
            tensor(f"part {p} auxiliary tensor {k} {b[0]}", a[1:], b[1:])
    if [len(s) for s in got["losses"]] != [len(s) for s in want["losses"]]:
        return out + [f"losses {got['losses']} != {want['losses']}"]
    for s, (a, b) in enumerate(zip(got["losses"], want["losses"], strict=True)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close(f"step {s} loss {i}", x, y, y)
    return out


def _fixture() -> dict[str, dict]:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_steps_give_the_recorded_parameters_and_losses(name):
    assert mismatches(behaviour(name), _fixture()[name]) == []


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_learning_rate_one_percent_higher_is_caught(name):
    assert mismatches(behaviour(name, lr=LR * 1.01), _fixture()[name])


def test_other_cpu_kernels_stay_within_the_tolerance(tmp_path):
    # The portable code paths (no AVX, oneDNN at SSE4.1) in a fresh process, as another
    # CPU would run them: every case still matches the fixture.
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "other.json"
    subprocess.run([sys.executable, __file__, "--write", str(out)], env=env, check=True,
                   capture_output=True, timeout=600)
    other, fixture = json.loads(out.read_text()), _fixture()
    assert {name: mismatches(other[name], fixture[name]) for name in CASES} == \
        dict.fromkeys(CASES, [])


def test_every_case_is_in_the_fixture():
    assert sorted(_fixture()) == sorted(CASES)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--write"] or len(sys.argv) > 3:
        sys.exit("usage: python tests/test_step_checksums.py --write [PATH]")
    path = Path(sys.argv[2]) if len(sys.argv) == 3 else FIXTURE
    path.parent.mkdir(exist_ok=True)
    result = {name: behaviour(name) for name in sorted(CASES)}
    text = json.dumps(result, indent=1)  # then each tensor's numbers on one line
    one_line = r"\[(?:[^\[\]{}]|\[[^\[\]{}]*\])*\]"
    path.write_text(re.sub(one_line, lambda m: " ".join(m[0].split()), text) + "\n")
    print(f"wrote {len(result)} cases to {path}")
