"""The linear probe (``--probe linear``): a classifier on each block's frozen, pooled output,
before training and after every epoch; a label-free rule's accuracy."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch

from locallearn.analysis.probe import LinearProbe, fit_linear, pooled
from locallearn.errors import ConfigError

RUN = ["--model", "resnet32_cifar", "--dataset", "synthetic", "--train-subset", "64",
       "--test-subset", "32", "--epochs", "2", "--batch-size", "32", "--no-plane",
       "--no-progress", "--probe-images", "40", "--probe-epochs", "3"]

# A rule that learns without labels: each block shrinks its own output, no logits anywhere.
LABEL_FREE = textwrap.dedent('''
    from torch import nn
    from locallearn.rules import register_rule
    from locallearn.rules.base import LocalPart, Rule
    from locallearn.step import Scored

    class Shrink(nn.Module):
        def forward(self, h, step, x):
            return Scored(h.float().pow(2).mean())

    @register_rule("shrink", paper="a test rule", summary="label-free")
    class ShrinkRule(Rule):
        label_free = True
        training_defaults = {"probe": "linear"}

        def parts(self, stack, num_classes, example):
            return [LocalPart(n, [b], [i], Shrink())
                    for i, (n, b) in enumerate(zip(stack.names, stack.blocks))]
''')


def _record(folder) -> dict:
    (path,) = folder.glob("*.json")
    return json.loads(path.read_text())


def test_pooling_keeps_a_coarse_map_of_feature_maps_and_means_tokens():
    h = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    cells = pooled(h)
    assert cells.shape == (2, 3 * 4)
    assert cells[1, 4 * 2 + 3] == h[1, 2, 2:, 2:].mean()  # channel 2, bottom-right cell
    tokens = torch.randn(2, 5, 6)
    assert torch.equal(pooled(tokens), tokens.mean(1))
    flat = torch.randn(2, 6)
    assert torch.equal(pooled(flat), flat)


def test_the_classifier_reads_a_linear_rule_and_cannot_read_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    mixing = torch.randn(8, 4, generator=g)
    y = (x @ mixing).argmax(1)  # four classes, each a linear region
    train_acc, acc = fit_linear(x[:400], y[:400], x[400:], y[400:], 4, 60,
                                torch.Generator().manual_seed(1), lr=1e-2)
    assert acc > 0.9 and train_acc > 0.9
    noise = torch.randint(0, 4, (600,), generator=g)  # labels unrelated to the features
    _, acc = fit_linear(x[:400], noise[:400], x[400:], noise[400:], 4, 60,
                        torch.Generator().manual_seed(1), lr=1e-2)
    assert acc < 0.4


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="must be positive"):
        LinearProbe(images=0)


def test_the_probe_records_every_block_and_leaves_training_alone(run_main, tmp_path):
    with_probe = run_main(*RUN, "--rule", "layerwise", "--probe", "linear",
                          "--output", tmp_path / "a")
    without = run_main(*RUN, "--rule", "layerwise", "--output", tmp_path / "b")
    assert with_probe.returncode == 0 and without.returncode == 0, with_probe.stderr
    a, b = _record(tmp_path / "a"), _record(tmp_path / "b")
    # Training is bit-identical with or without the probe.
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert a["block_acc"] == b["block_acc"] and a["test_acc"] == b["test_acc"]
    blocks = len(a["stack"]["blocks"])
    assert len(a["probe"]) == 3 * blocks  # before training and after each of 2 epochs
    assert [e["epoch"] for e in a["probe"]] == [0] * blocks + [1] * blocks + [2] * blocks
    for h in a["history"]:
        assert h["probe_acc"] == [e["acc"] for e in a["probe"] if e["epoch"] == h["epoch"]]
    assert a["probe_config"]["train_images"] == 40 and a["probe_config"]["test_images"] == 32
    assert "probe" not in b and "probe_acc" not in b["history"][0]
    assert "linear probe, epoch 2" in with_probe.stdout


def test_a_label_free_rule_takes_its_accuracy_from_the_probe(run_main, tmp_path):
    plugin = tmp_path / "shrink.py"
    plugin.write_text(LABEL_FREE)
    out = run_main("--plugin", plugin, *RUN, "--rule", "shrink", "--output", tmp_path / "r")
    assert out.returncode == 0, out.stderr
    record = _record(tmp_path / "r")
    last = [e["acc"] for e in record["probe"] if e["epoch"] == 2]
    assert record["block_acc"] == last and record["test_acc"] == last[-1]
    assert record["config"]["probe"] == "linear"  # the rule's default
    refused = run_main("--plugin", plugin, *RUN, "--rule", "shrink", "--probe", "none",
                       "--output", tmp_path / "n")
    assert refused.returncode == 2 and not (tmp_path / "n").exists()
    assert refused.stderr.strip().count("\n") == 0
    assert "learns without labels" in refused.stderr and "--probe linear" in refused.stderr


def test_a_resumed_run_keeps_its_probe(run_main, tmp_path):
    args = [*RUN, "--rule", "layerwise", "--probe", "linear", "--checkpoint-dir",
            tmp_path / "ckpt", "--output", tmp_path / "r"]
    assert run_main(*args).returncode == 0
    whole = _record(tmp_path / "r")
    newest = sorted((tmp_path / "ckpt").iterdir())[-1]
    assert newest.name.endswith("2")
    shutil.rmtree(newest)  # as if killed during epoch 2: resume after epoch 1
    again = run_main(*args, "--resume", "--overwrite")
    assert again.returncode == 0, again.stderr
    resumed = _record(tmp_path / "r")
    assert resumed["resumed"][0]["after_epoch"] == 1
    for key in ("probe", "test_acc", "block_acc"):
        assert resumed[key] == whole[key], key
    assert [h["probe_acc"] for h in resumed["history"]] == \
        [h["probe_acc"] for h in whole["history"]]


def test_the_report_averages_seeds_beside_the_untrained_network(run_main, tmp_path):
    from locallearn.analysis.probe_report import main as report

    for seed in (0, 1):
        out = run_main(*RUN, "--rule", "layerwise", "--probe", "linear", "--seed", seed,
                       "--output", tmp_path / "r")
        assert out.returncode == 0, out.stderr
    paths = sorted((tmp_path / "r").glob("*.json"))
    records = [json.loads(p.read_text()) for p in paths]
    figure = tmp_path / "probes.png"
    assert report([*map(str, paths), "-o", str(figure)]) == 0
    assert figure.stat().st_size > 0
    lines = [line for line in run_report(report, paths) if line.startswith("| layerwise")]
    assert [line.split(" | ")[2] for line in lines] == ["after epoch 2", "before training"]
    last = [[e["acc"] for e in r["probe"] if e["epoch"] == 2] for r in records]
    first_block = sum(acc[0] for acc in last) / 2
    assert f"stem {100 * first_block:.1f} ± " in lines[0]
    without = run_main(*RUN, "--rule", "layerwise", "--output", tmp_path / "n")
    assert without.returncode == 0
    (bare,) = (tmp_path / "n").glob("*.json")
    assert report([str(bare)]) == 2


def run_report(report, paths) -> list[str]:
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert report([str(p) for p in paths]) == 0
    return text.getvalue().splitlines()
