"""``--check`` builds what a run would train and tries it on a probe batch, so setups that
would fail seconds into training are refused up front: one line, exit 2, nothing written."""

import json
import re

import pytest
from conftest import ROOT

from locallearn import data
from locallearn.cli import main
from locallearn.rules.base import RULES

SMALL = ["--dataset", "synthetic", "--model", "resnet32_cifar"]


def refused(capsys, argv: list[str]) -> str:
    """The one error line of ``argv`` under ``--check``, asserting exit 2 and nothing else."""
    status = main([*argv, "--check"])
    out = capsys.readouterr()
    assert status == 2, out
    assert out.out == "" and "Traceback" not in out.err
    (line,) = out.err.strip().splitlines()
    assert line.startswith("run.py: error: ")
    return line


@pytest.fixture
def own_rules(monkeypatch):
    """Rules a test's plugin registers are gone after it (the registry is restored)."""
    monkeypatch.setattr(RULES, "_entries", dict(RULES._entries))


def test_a_good_setup_is_accepted(capsys):
    assert main([*SMALL, "--rule", "layerwise", "--check"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("arguments ok") and out.err == ""


def test_sequential_with_fewer_epochs_than_parts(capsys):
    line = refused(capsys, [*SMALL, "--rule", "sequential", "--epochs", "2"])
    assert re.search(r"rule 'sequential' trains \d+ parts one after another and needs "
                     r"--epochs >= \d+; got 2", line)


def test_forward_forward_on_a_conv_backbone(capsys):
    line = refused(capsys, ["--dataset", "synthetic", "--rule", "forward_forward",
                            "--model", "resnet18_cifar"])
    assert "rule 'forward_forward' supports fully connected backbones such as ff_mlp" in line
    assert "block 'stem' outputs a 4-D tensor" in line


def test_dgl_default_head_on_a_vit(capsys):
    line = refused(capsys, ["--dataset", "synthetic", "--rule", "dgl", "--model",
                            "vit_tiny_patch16_224", "--model-opt", "img_size=16",
                            "--model-opt", "patch_size=4"])
    assert "head 'mlp_sr' needs (B, C, H, W) block outputs" in line
    assert "use --rule-opt aux=" in line  # the valid choices


def tutorial_rule() -> str:
    text = (ROOT / "docs" / "adding_a_rule.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)[0]


def test_a_plugin_rules_out_of_range_option(tmp_path, capsys, own_rules):
    # The tutorial's rule checks train_last only when it builds its parts.
    plugin = tmp_path / "my_rules.py"
    plugin.write_text(tutorial_rule())
    line = refused(capsys, [*SMALL, "--plugin", str(plugin), "--rule", "random_features",
                            "--rule-opt", "train_last=99"])
    assert "option 'train_last' of rule 'random_features' must be in [0, " in line


PLUGIN = '''
import locallearn
from locallearn.objectives import classifier, no_objective


@locallearn.register_rule("{name}", paper="test")
class Broken(locallearn.Rule):
    def parts(self, stack, num_classes, example):
        {body}
'''

BROKEN = [
    # A plugin's own check that raises a plain exception while building its parts.
    ("raises", "raise ValueError('width must be below 64\\nsecond line')",
     "ValueError: width must be below 64"),
    # Parts that build, but give the network no prediction: found on the probe batch.
    ("silent", "return [locallearn.LocalPart('all', stack.blocks, range(len(stack.blocks)), "
               "no_objective())]", "the last part gives no logits"),
]


@pytest.mark.parametrize("name, body, message", BROKEN, ids=[b[0] for b in BROKEN])
def test_a_rule_failing_on_the_probe_batch_names_rule_model_and_error(
        tmp_path, capsys, own_rules, name, body, message):
    plugin = tmp_path / f"{name}.py"
    plugin.write_text(PLUGIN.format(name=f"broken_{name}", body=body))
    line = refused(capsys, [*SMALL, "--plugin", str(plugin), "--rule", f"broken_{name}"])
    assert line.startswith(f"run.py: error: rule 'broken_{name}' on model 'resnet32_cifar' "
                           "fails on a probe batch of 2 3x16x16 images: ")
    assert message in line and "second line" not in line


def test_cifar10_absent_without_network_names_the_folder_and_the_way_to_it(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "_download_reachable", lambda urls, timeout=3.0: False)
    root = tmp_path / "empty"
    root.mkdir()
    line = refused(capsys, ["--dataset", "cifar10", "--data-root", str(root)])
    assert f"CIFAR-10 is not in '{root}'" in line and "no download host answers" in line
    assert f"torchvision.datasets.CIFAR10('{root}', download=True)" in line
    assert "--dataset imagefolder:PATH" in line


def test_cifar10_files_present_need_no_network(tmp_path, monkeypatch):
    def no_probe(urls, timeout=3.0):
        raise AssertionError("the files are there: no connection needed")

    monkeypatch.setattr(data, "_download_reachable", no_probe)
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (batches / name).touch()
    info = data.dataset_info("cifar10", tmp_path)
    assert (info.num_classes, info.image_size) == (10, (3, 32, 32))
    monkeypatch.setattr(data, "_download_reachable", lambda urls, timeout=3.0: True)
    data.dataset_info("cifar100", tmp_path)  # absent but downloadable: accepted


@pytest.mark.parametrize("spec", ["synthetic", "imagefolder"])
def test_dataset_info_agrees_with_the_loaded_data(tmp_path, spec):
    if spec == "imagefolder":
        from PIL import Image

        for split in ("train", "test"):
            for label in ("a", "b", "c"):
                (tmp_path / split / label).mkdir(parents=True)
                Image.new("RGB", (12, 10)).save(tmp_path / split / label / "0.png")
        spec = f"imagefolder:{tmp_path}"
    info = data.dataset_info(spec)
    loaded = data.load_dataset(spec, cache_dir=tmp_path / "cache")
    assert (info.num_classes, info.image_size) == (loaded.num_classes, loaded.image_size)
    assert (info.train_size, info.test_size) == (len(loaded.train_labels),
                                                  len(loaded.test_labels))


def test_a_run_refused_early_writes_nothing_and_loads_no_data(tmp_path, capsys, monkeypatch):
    def load_dataset(*args, **kwargs):
        raise AssertionError("the checks should have refused this before loading data")

    monkeypatch.setattr(data, "load_dataset", load_dataset)
    status = main([*SMALL, "--rule", "sequential", "--epochs", "1", "--output",
                   str(tmp_path / "runs"), "--checkpoint-dir", str(tmp_path / "ckpt")])
    out = capsys.readouterr()
    assert status == 2 and "Traceback" not in out.err
    (line,) = out.err.strip().splitlines()
    assert "rule 'sequential' trains" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ckpt").exists()


def test_fp16_without_a_gpu_is_refused_not_ignored(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on a GPU")
    line = refused(capsys, [*SMALL, "--mixed-precision", "fp16"])
    assert "--mixed-precision fp16 needs a GPU" in line and "bf16 or no" in line
    assert main([*SMALL, "--mixed-precision", "bf16", "--check"]) == 0


def _state(stack):
    return {k: v.clone() for k, v in stack.state_dict().items()}


@pytest.mark.parametrize("rule", ["layerwise", "sequential"])
def test_the_probe_leaves_the_runs_own_stack_as_it_was(rule):
    # The check trains the parts one step (BatchNorm statistics move, gradients appear)
    # and builds heads (random draws): none of it may reach the run that follows.
    import torch

    from locallearn.preflight import build_stack, check_setup
    from locallearn.rules import create_rule

    info = data.dataset_info("synthetic")
    split = {"granularity": "stage", "num_blocks": None, "split_after": None, "seed": 3}
    built = build_stack("resnet32_cifar", {}, info, **split)
    weights, modes = _state(built.stack), [m.training for m in built.stack.modules()]
    rng = torch.get_rng_state()
    options = {"frozen_mode": "train"} if rule == "sequential" else {}
    check_setup(create_rule(rule, **options), built.stack, info, epochs=4, batch_size=8,
                train_size=64)
    after = _state(built.stack)
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[k], weights[k]) for k in weights)  # bit for bit
    assert [m.training for m in built.stack.modules()] == modes
    assert all(p.grad is None for p in built.stack.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    # And the stack is the one a fresh build under the seed gives, random state included.
    again = build_stack("resnet32_cifar", {}, info, **split)
    assert all(torch.equal(v, after[k]) for k, v in _state(again.stack).items())
    assert torch.equal(again.rng, built.rng)


def test_a_run_builds_its_model_once(tmp_path, capsys, monkeypatch):
    import timm

    built = []
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(a) or create(*a, **k))
    argv = [*SMALL, "--rule", "layerwise", "--epochs", "1", "--train-subset", "32",
            "--test-subset", "16", "--batch-size", "16", "--no-plane", "--no-progress",
            "--output", str(tmp_path)]
    assert main(argv) == 0, capsys.readouterr().err
    assert len(built) == 1  # the check's model is the one trained


def test_a_model_that_takes_img_size_gets_the_datas(tmp_path, capsys):
    # ff_mlp is built for 32x32 images; the synthetic data's are 16x16.
    import torch

    from locallearn.preflight import build_model

    argv = ["--rule", "forward_forward", "--model", "ff_mlp", "--dataset", "synthetic"]
    assert main([*argv, "--check"]) == 0
    assert capsys.readouterr().out.startswith("arguments ok")
    torch.manual_seed(0)
    model, options = build_model("ff_mlp", 10, {}, (3, 16, 16))
    assert options == {"img_size": 16}
    torch.manual_seed(0)  # the same model as the option given by hand
    given, _ = build_model("ff_mlp", 10, {"img_size": 16}, (3, 16, 16))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 given.state_dict().values(), strict=True))
    # A model that takes no img_size still fails in one line naming the data's size.
    line = refused(capsys, [*SMALL, "--model", "resnet18", "--model-opt", "in_chans=1"])
    assert "fails on the data's 3x16x16 images" in line


def test_a_checked_run_trains_as_a_model_built_without_the_check(tmp_path):
    # The run after the check is the run without it: the same weights and the same random
    # draws after them (the rule's heads, the batches), so the same losses.
    import timm
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from locallearn import TrainConfig, Trainer, create_rule, load_dataset, split

    argv = [*SMALL, "--rule", "dgl", "--epochs", "1", "--train-subset", "48", "--test-subset",
            "16", "--batch-size", "16", "--no-plane", "--no-progress", "--seed", "5",
            "--output", str(tmp_path)]
    assert main(argv) == 0
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    data = load_dataset("synthetic", train_subset=48, test_subset=16, seed=5)
    set_seed(5)
    stack = split(timm.create_model("resnet32_cifar", num_classes=data.num_classes),
                  input_size=data.image_size)
    config = TrainConfig(epochs=1, batch_size=16, seed=5, progress=False)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # as run.py's
    plain = Trainer(stack, create_rule("dgl"), data, config, accelerator).fit()
    assert record["history"][0]["train_loss"] == pytest.approx(
        plain["history"][0]["train_loss"], rel=1e-5)
