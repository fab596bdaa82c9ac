"""Presets load, give run.py defaults that flags override, and each one's first run trains."""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch
from conftest import ROOT

import locallearn
from locallearn import cli
from locallearn.errors import ConfigError
from locallearn.presets import list_presets, load_preset

PRESETS = ["augmented-k", "cpu-smoke", "gpu-short", "infopro-k", "local-cpu", "nobp-cpu",
           "paper-resnet18", "paper-vgg11"]
# One step of 32 images (the presets' models are for 32x32 images: VGG-11 pools 5 times).
ONE_STEP = ["--epochs", "1", "--train-subset", "32", "--test-subset", "20", "--batch-size", "32",
            "--no-plane", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A 32x32 image folder of 10 classes: 4 train and 2 test images each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("test", 2)):
        for c in range(10):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / f"c{c}" / f"{i}.png")
    return root


def suite_module():
    spec = importlib.util.spec_from_file_location("suite", ROOT / "benchmarks" / "suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_presets_exist_and_load():
    assert set(PRESETS) <= set(list_presets())
    for name in PRESETS:
        preset = load_preset(name)
        runs, skipped = preset.runs(locallearn.list_rules())
        assert runs and not skipped and preset.about and preset.seeds
    runs, _ = load_preset("cpu-smoke").runs(locallearn.list_rules())
    assert set(locallearn.list_rules()) <= {r.rule for r in runs}  # every registered rule
    k_runs, _ = load_preset("infopro-k").runs(locallearn.list_rules())
    assert {(r.rule, len(r.args.get("split-after", ())) + 1) for r in k_runs} == {("e2e", 1)} | {
        (rule, k) for rule in ("layerwise", "dgl", "infopro") for k in (2, 4, 8)}


def test_each_preset_has_a_one_line_about_and_its_prose_in_the_docs():
    text = (ROOT / "docs" / "presets.md").read_text()
    sections = re.findall(r"^### ([^\n]*)\n(.*?)(?=^#|\Z)", text, re.S | re.M)
    for name in list_presets():
        about = load_preset(name).about
        assert about and "\n" not in about and len(about) <= 200, name
        anchor = about.partition("docs/presets.md#")[2]  # GitHub's anchor of its section
        (prose,) = [body for title, body in sections
                    if title.replace("`", "").replace(" ", "-") == anchor and f"`{name}`" in title]
        assert len(prose) > 500, name  # the why: settings, sizing, what differs
    (gpu,) = [body for title, body in sections if title == "`gpu-short`"]
    assert "python benchmarks/suite.py --preset gpu-short --jobs 6" in gpu


def test_gpu_short_has_every_rule_at_k4_and_the_seed_papers_pair():
    preset = load_preset("gpu-short")
    runs, _ = preset.runs(locallearn.list_rules())
    assert set(locallearn.list_rules()) <= {r.rule for r in runs}
    assert {r.run_id for r in runs if r.args.get("blocks") == 4} == {
        f"{rule}-K4" for rule in ("layerwise", "sequential", "dgl", "infopro", "auglocal",
                                  "forward_gradient")}
    assert preset.seeds == (0, 1)
    paper = {k: v for k, v in load_preset("paper-resnet18").args.items() if k not in (
        "epochs", "batch-size", "probe-size", "plane-every")}
    for rule in ("e2e", "layerwise"):
        args = cli.parse_args(preset.argv(next(r for r in runs if r.run_id == f"{rule}-paper")))
        seed = cli.parse_args(["--preset", "paper-resnet18", "--rule", rule])
        assert (args.epochs, args.batch_size, args.mixed_precision) == (10, 256, "bf16")
        for key in paper:  # the seed paper's settings but the budget
            dest = key.replace("-", "_")
            assert getattr(args, dest) == getattr(seed, dest), key
        assert args.model_opt == seed.model_opt and args.rule_opt[-1:] == seed.rule_opt[-1:]


def parts(preset, run):
    """(run id, model, number of parts) of one run of a preset, as run.py parses it."""
    args = cli.parse_args(preset.argv(run))
    return run.run_id, args.model, len(args.split_after or ()) + 1


def test_augmented_k_has_the_references_commands():
    preset = load_preset("augmented-k")
    runs, _ = preset.runs(locallearn.list_rules())
    # AugLocal's run.sh and README: K = 16 (ResNet-32) and 55 (ResNet-110); auglocal makes K - d
    # parts (d = 2, 3), MAN's config.py merges the stem into the first part (15 parts).
    assert {parts(preset, r) for r in runs} == {
        ("e2e-r32", "resnet32_cifar", 1), ("dgl-r32-K16", "resnet32_cifar", 16),
        ("infopro-r32-K16", "resnet32_cifar", 16), ("auglocal-r32-K16", "resnet32_cifar", 14),
        ("dgl-man-r32-K16", "resnet32_cifar", 15), ("infopro-man-r32-K16", "resnet32_cifar", 15),
        ("e2e-r110", "resnet110_cifar", 1), ("dgl-r110-K55", "resnet110_cifar", 55),
        ("infopro-r110-K55", "resnet110_cifar", 55),
        ("auglocal-r110-K55", "resnet110_cifar", 52)}
    for run in runs:
        args = cli.parse_args(preset.argv(run))
        assert (args.epochs, args.batch_size, args.lr, args.nesterov) == (400, 1024, 0.8, True)
        assert ("man=0.995" in args.rule_opt) == ("man" in run.tag)


def test_local_cpu_compares_the_six_rows_at_k8_with_three_seeds():
    preset = load_preset("local-cpu")
    runs, _ = preset.runs(locallearn.list_rules())
    assert preset.seeds == (0, 1, 2)
    # e2e is cut at the same 8 points: its plane is measured where the others' are.
    assert {parts(preset, r) for r in runs} == {
        (rule, "resnet32_cifar", 8)
        for rule in ("e2e", "dgl", "dgl-man", "infopro", "infopro-man", "auglocal")}
    for run in runs:
        args = cli.parse_args(preset.argv(run))
        assert not args.no_plane and args.probe_size > 0  # the plane is measured
        assert ("man=0.995" in args.rule_opt) == (run.tag == "man")


def test_nobp_cpu_compares_the_backprop_free_rules_with_three_seeds():
    preset = load_preset("nobp-cpu")
    runs, _ = preset.runs(locallearn.list_rules())
    assert preset.seeds == (0, 1, 2)
    assert {r.run_id for r in runs} == {"e2e", "fa", "dfa", "forward_gradient-weight",
                                        "forward_gradient-activity", "layerwise-linear"}
    for run in runs:
        args = cli.parse_args(preset.argv(run))
        assert args.model == "ff_mlp" and not args.no_plane and args.probe_size > 0
    options = {r.run_id: cli.parse_args(preset.argv(r)).rule_opt for r in runs}
    assert set(options["forward_gradient-weight"]) == {"perturb=weight", "local=false"}
    assert options["forward_gradient-activity"] == ["perturb=activity"]


CHECKED = [(name, run) for name in ("augmented-k", "local-cpu", "nobp-cpu")
           for run in load_preset(name).runs(locallearn.list_rules())[0]]


@pytest.mark.parametrize("name, run", CHECKED, ids=[f"{n}:{r.run_id}" for n, r in CHECKED])
def test_every_row_of_the_issue_30_and_31_presets_passes_check(name, run, capsys, fresh_accelerate):
    """Every row builds its model, split and heads and steps a probe batch (synthetic data,
    a small batch: --check tries the setup, not the budget)."""
    argv = load_preset(name).argv(run) + ["--dataset", "synthetic", "--train-subset", "64",
                                          "--test-subset", "32", "--batch-size", "8", "--check"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("arguments ok")


def first_runs():
    cases = []
    for name in PRESETS:
        runs, _ = load_preset(name).runs(locallearn.list_rules())
        cases.append((name, runs[0]))
    smoke, _ = load_preset("cpu-smoke").runs(locallearn.list_rules())
    cases += [("cpu-smoke", r) for r in smoke if r.rule == "forward_forward"]
    k_runs, _ = load_preset("infopro-k").runs(locallearn.list_rules())
    cases += [("infopro-k", r) for r in k_runs if r.run_id == "infopro-K8"]  # split points
    return cases


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps one state per process and refuses a second mixed precision in it
    (gpu-short trains in bf16, the others in fp32): clear it before and after."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("name, run", first_runs(), ids=lambda v: getattr(v, "run_id", v))
def test_a_preset_run_trains_a_step(name, run, tiny_folder, tmp_path, fresh_accelerate):
    argv = load_preset(name).argv(run) + ONE_STEP + [
        "--dataset", f"imagefolder:{tiny_folder}", "--cache-dir", str(tmp_path / "cache"),
        "--output", str(tmp_path)]
    assert cli.main(argv) == 0
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "complete" and record["config"]["preset"] == name
    assert record["config"]["mixed_precision"] == load_preset(name).args.get("mixed-precision",
                                                                             "no")
    assert record["rule"] == run.rule and len(record["history"]) == 1
    assert record["memory"]["saved_bytes_peak"] > 0 and record["seconds_per_epoch"] > 0
    assert record["history"][0]["saved_bytes_peak"] == record["memory"]["saved_bytes_peak"]


def test_given_flags_override_the_preset():
    def parse(*argv):
        return cli.parse_args(list(argv))

    args = parse("--preset", "cpu-smoke")
    assert (args.model, args.probe_size, args.preset) == ("resnet18", 500, "cpu-smoke")
    assert parse("--preset", "cpu-smoke", "--lr", "0.2", "--model", "resnet34").lr == 0.2
    assert parse("--preset", "cpu-smoke", "--rule", "forward_forward").model == "ff_mlp"
    assert parse("--preset", "cpu-smoke", "--rule", "forward_forward", "--model",
                 "resnet18").model == "resnet18"
    args = parse("--preset", "infopro-k", "--rule", "infopro", "--rule-opt", "aux_loss=ce")
    assert args.rule_opt == ["aux_loss=contrast", "aux_loss=ce"]  # the last one wins
    assert parse("--preset", "paper-resnet18").milestones == (0.5, 0.75, 0.875, 0.9375)


def test_an_unknown_preset_is_one_line_naming_the_choices(capsys):
    assert cli.main(["--preset", "cpu-smok"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown preset 'cpu-smok'; did you mean cpu-smoke" in err
    assert cli.main(["--preset", "nothing-like-it"]) == 2
    assert ("choices: augmented-k, cpu-smoke, gpu-short, infopro-k, local-cpu, nobp-cpu, "
            "paper-resnet18, paper-vgg11") in capsys.readouterr().err


BAD_FILES = [
    ({"args": {"epochz": 3}}, "unknown run.py flag 'epochz'"),
    ({"args": {"seed": 3}}, "'seed' cannot be set in a preset"),
    ({"args": {"no-plane": "yes"}}, "'no-plane' must be true or false"),
    ({"args": {"rule-opt": ["a=1"]}}, "'rule-opt' must be an object"),
    ({"args": {"epochs": 0}}, "--epochs: must be a positive integer"),
    ({"extra": 1}, "unknown key 'extra'"),
    ({"seeds": []}, "'seeds' must be a non-empty list"),
    ({"runs": [{"rule": "e2e", "tag": "a b"}]}, "'tag' must be"),
    ({"runs": [{"rule": "e2e"}, {"rule": "e2e"}]}, "two runs named 'e2e'"),
]


@pytest.mark.parametrize("change, message", BAD_FILES, ids=[m for _, m in BAD_FILES])
def test_a_bad_preset_file_is_a_clear_error(tmp_path, change, message):
    data = {"args": {"epochs": 1}, "runs": [{"rule": "e2e"}], "seeds": [0], **change}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        load_preset(str(path)).runs(locallearn.list_rules())


def test_a_rule_that_is_not_registered_is_skipped_with_a_message(tmp_path):
    path = tmp_path / "later.json"
    path.write_text(json.dumps({"args": {}, "runs": [{"rule": "e2e"}, {"rule": "hebbian"}],
                                "seeds": [0]}))
    runs, skipped = load_preset(str(path)).runs(locallearn.list_rules())
    assert [r.rule for r in runs] == ["e2e"]
    assert skipped == ["hebbian: rule 'hebbian' is not registered; skipped"]


def test_suite_dry_run_and_bad_preset(capsys, tmp_path):
    suite = suite_module()
    from PIL import Image

    for split in ("train", "test"):  # a folder of two blank images per split: checked, not read
        for name in ("a", "b"):
            (tmp_path / "folder" / split / name).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(tmp_path / "folder" / split / name / "x.png")
    argv = ["--preset", "infopro-k", "--dry-run", "--seeds", "0", "--data", tmp_path / "folder"]
    assert suite.main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "layerwise-K4__resnet32_cifar__imagefolder__seed0.json" in out
    assert "10 of 10 runs to go" in out
    # Flags after -- tag every record's name: such a grid never skips the first as done.
    assert suite.main([str(a) for a in argv] + ["--", "--channels-last", "--optimizer-impl",
                                                "fused", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert ("layerwise-K4__resnet32_cifar__imagefolder__channels-last__optimizer-impl-fused__"
            "seed0.json") in out
    assert suite.main(["--preset", "cpu-smok"]) == 2
    assert "unknown preset 'cpu-smok'" in capsys.readouterr().err


def test_suite_runs_the_grid_and_resumes(tmp_path, capsys):
    suite = suite_module()
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({
        "about": "one step of e2e", "args": {"model": "resnet18", "dataset": "synthetic",
                                             "train-subset": 32, "test-subset": 20,
                                             "batch-size": 32, "epochs": 1, "no-plane": True},
        "runs": [{"rule": "e2e"}], "seeds": [0],
    }))
    argv = ["--preset", str(path), "--output", str(tmp_path / "results")]
    assert suite.main(argv) == 0
    record = tmp_path / "results" / "tiny" / "e2e__resnet18__synthetic__seed0.json"
    assert json.loads(record.read_text())["status"] == "complete"
    capsys.readouterr()
    assert suite.main(argv) == 0  # everything done: nothing runs
    out = capsys.readouterr().out
    assert "tiny: 0 run(s)" in out and "1 already done" in out


def test_suite_runs_two_at_once_with_labelled_lines(tmp_path, capsys):
    suite = suite_module()
    path = tmp_path / "pair.json"
    path.write_text(json.dumps({
        "about": "one step of e2e, two seeds", "args": {
            "model": "resnet18", "dataset": "synthetic", "train-subset": 32, "test-subset": 20,
            "batch-size": 32, "epochs": 1, "no-plane": True},
        "runs": [{"rule": "e2e"}], "seeds": [0, 1],
    }))
    argv = ["--preset", str(path), "--output", str(tmp_path / "results"), "--jobs", "2"]
    assert suite.main(argv) == 0
    out = capsys.readouterr().out
    for seed in (0, 1):
        record = tmp_path / "results" / "pair" / f"e2e__resnet18__synthetic__seed{seed}.json"
        record = json.loads(record.read_text())
        assert record["status"] == "complete" and record["seed"] == seed
        assert f"e2e seed {seed} | epoch 1/1" in out
    assert "\r" not in out and "batch/s" not in out  # no child's progress bar
    # Both started before either's output was read: they ran at the same time.
    assert out.index("e2e seed 1: python") < out.index("e2e seed 0 | ")
    child = [line for line in out.splitlines() if "epoch 1/1" in line]
    assert len(child) == 2 and all(line.startswith("e2e seed ") for line in child)
    assert "pair: 2 run(s)" in out and "0 failed" in out


def test_ctrl_c_stops_every_running_child_and_they_record_it(tmp_path):
    path = tmp_path / "long.json"
    path.write_text(json.dumps({
        "about": "long enough to interrupt", "args": {
            "model": "resnet18", "dataset": "synthetic", "train-subset": 32, "test-subset": 20,
            "batch-size": 32, "epochs": 1000, "no-plane": True},
        "runs": [{"rule": "e2e"}], "seeds": [0, 1, 2],
    }))
    argv = [sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--preset", str(path),
            "--output", str(tmp_path / "results"), "--jobs", "2"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                       signal.SIG_DFL))
    records = [tmp_path / "results" / "long" / f"e2e__resnet18__synthetic__seed{s}.json"
               for s in (0, 1, 2)]
    deadline = time.monotonic() + 240
    while not (records[0].exists() and records[1].exists()):  # both are training
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "suite.py: interrupted; run it again to resume" in err
    assert [json.loads(r.read_text())["status"] for r in records[:2]] == ["interrupted"] * 2
    assert not records[2].exists()  # the third never started


def test_suite_jobs_set_the_childrens_threads(monkeypatch):
    suite = suite_module()
    item = {"argv": ["--rule", "e2e"]}
    assert suite._command(item, 1) == (["--rule", "e2e"], None)  # today's command, as it was
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(suite.os, "cpu_count", lambda: 16)
    argv, env = suite._command(item, 6)
    assert argv == ["--rule", "e2e"] and env["OMP_NUM_THREADS"] == "2"
    assert suite._command(item, 32)[1]["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    assert suite._command(item, 6)[1]["OMP_NUM_THREADS"] == "3"


@pytest.mark.parametrize("jobs", ["0", "-2", "two"])
def test_suite_refuses_a_bad_jobs_count(jobs, capsys):
    assert suite_module().main(["--preset", "cpu-smoke", "--jobs", jobs]) == 2
    captured = capsys.readouterr()
    assert not captured.out and captured.err.count("\n") == 1
    assert f"--jobs: must be a positive integer; got '{jobs}'" in captured.err


@pytest.mark.parametrize("name, blocks, params", [("resnet32_cifar", 5, 466_906),
                                                 ("resnet110_cifar", 18, 1_730_714)])
def test_cifar_resnets_split_exactly(name, blocks, params):
    model = timm.create_model(name, num_classes=10).eval()
    assert sum(p.numel() for p in model.parameters()) == params
    x = torch.randn(2, 3, 32, 32)
    for granularity, count in (("stage", 4), ("block", 1 + 3 * blocks)):
        stack = locallearn.split(model, granularity).eval()
        assert len(stack) == count
        assert torch.equal(stack(x), model(x))
    stack = locallearn.split(model, num_blocks=4).eval()
    assert len(stack) == 4 and torch.equal(stack(x), model(x))
    assert model.layer2[0].downsample is not None  # option B: a 1x1 projection shortcut
