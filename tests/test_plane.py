"""The information-plane observer (sees only the BlockStack) and the figures drawn from records."""

import importlib.util
import io
import json
import math
import subprocess
import sys

import pytest
import timm
import torch
from conftest import ROOT

from locallearn import create_rule, split
from locallearn import hsic as H
from locallearn.analysis import InformationPlane, plots
from locallearn.data import load_dataset
from locallearn.errors import ConfigError
from locallearn.records import RECORD_VERSION, read_record
from locallearn.trainer import TrainConfig, Trainer

M = 64  # probe size: small, so each measurement takes a fraction of a second


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic")


def _trainer(rule, data, observers=(), **config):
    torch.manual_seed(0)
    net = timm.create_model("resnet18_cifar", num_classes=data.num_classes)
    stack = split(net, "stage", input_size=data.image_size)
    cfg = TrainConfig(**{"progress": False, "batch_size": 32, "lr": 0.05, **config})
    return Trainer(stack, create_rule(rule), data, cfg, observers=observers)


@pytest.fixture(scope="module")
def fitted(synthetic):
    plane = InformationPlane(probe_size=M)
    trainer = _trainer("e2e", synthetic, (plane,), epochs=2)
    trainer.fit()
    return trainer, plane


def _prepared(trainer, **options):
    plane = InformationPlane(probe_size=M, **options)
    plane.prepare(trainer.data, trainer.eval_transform, trainer.accelerator.device)
    return plane


def test_a_two_epoch_fit_records_epochs_0_1_2_for_every_block(fitted):
    trainer, plane = fitted
    blocks = len(trainer.stack.blocks)
    assert len(plane.entries) == 3 * blocks
    assert {(e["epoch"], e["block"]) for e in plane.entries} == {
        (epoch, k) for epoch in (0, 1, 2) for k in range(blocks)
    }
    assert [e["name"] for e in plane.entries[:blocks]] == trainer.stack.names
    config = plane.describe()
    assert config["m"] == M and config["sigma"] == 5.0 and config["eps"] == 1e-5
    assert len(config["seconds"]) == 3
    for e in plane.entries:
        assert 0 <= e["nhsic_x"] <= config["rank_x"] + 1e-9  # Tr R_X bounds nHSIC(X; .)
        assert 0 <= e["nhsic_y"] <= config["rank_y"] + 1e-9
        for key in ("nhsic_x_scaled", "nhsic_y_scaled", "cka_x", "cka_y"):
            assert 0 <= e[key] <= 1 + 1e-12
    json.dumps({"plane": plane.entries, "plane_config": config})  # fits in a run record


def test_entries_carry_the_chance_adjusted_forms(fitted):
    trainer, plane = fitted
    config = plane.describe()
    m = config["m"]
    for e in plane.entries:  # the definition, from the entry's and the probe set's fields
        for side in ("x", "y"):
            chance = config[f"rank_{side}"] * e["rank"] / (m - 1)
            top = math.sqrt(config[f"nhsic_{side}{side}"] * e["nhsic_self"])
            expected = (e[f"nhsic_{side}"] - chance) / (top - chance)
            assert e[f"nhsic_{side}_adj"] == pytest.approx(expected, rel=1e-12, abs=1e-12)
            assert e[f"nhsic_{side}_adj"] <= 1 + 1e-12
    # Not every value sits at chance: the synthetic labels are in the input from the start.
    assert max(e["nhsic_y_adj"] for e in plane.entries) > 0.1
    # and the same as the function of the measures, on the block's own features
    again = _prepared(trainer)
    entry = again.measure(trainer.stack, 2)[-1]
    k = entry["block"]
    stack, probe, training = trainer.stack, again._probe, trainer.stack.training
    with torch.no_grad():
        feats = stack.eval().features(probe.transform(probe.images))[k].flatten(1)
    stack.train(training)
    z = H.soft_projector(H.kernel_matrix(feats))
    assert entry["nhsic_x_adj"] == pytest.approx(H.nhsic_adjusted(again._probe.x, z), rel=1e-9)
    assert entry["nhsic_y_adj"] == pytest.approx(H.nhsic_adjusted(again._probe.y, z), rel=1e-9)


def test_measures_every_nth_epoch_and_always_the_last(fitted):
    trainer, _ = fitted  # trained for 2 epochs
    plane = InformationPlane(probe_size=M, every=3)
    plane.on_fit_start(trainer)
    for epoch in (1, 2):
        plane.on_epoch_end(trainer, {"epoch": epoch})
    assert sorted({e["epoch"] for e in plane.entries}) == [0, 2]


def test_same_weights_give_the_same_plane_whichever_rule_trained_them(synthetic):
    e2e, layerwise = _trainer("e2e", synthetic), _trainer("layerwise", synthetic)
    x, step = e2e.make_step(synthetic.train_images[:32], synthetic.train_labels[:32],
                            e2e.eval_transform)
    for trainer in (e2e, layerwise):  # one step each: the rules move the weights apart
        trainer.train_step(x, step, list(range(len(trainer.parts))))
    plane = _prepared(e2e)
    assert plane.measure(e2e.stack, 1) != plane.measure(layerwise.stack, 1)
    layerwise.stack.load_state_dict(e2e.stack.state_dict())
    assert plane.measure(e2e.stack, 1) == plane.measure(layerwise.stack, 1)


def test_the_probe_leaves_no_trace(synthetic):
    trainer = _trainer("layerwise", synthetic)
    stack = trainer.stack
    stack.train()
    stack.blocks[1].eval()  # a mixed pattern of modes must come back as it was
    modes = [m.training for m in stack.modules()]
    buffers = {k: v.clone() for k, v in stack.state_dict().items()}
    rng = torch.get_rng_state()
    plane = _prepared(trainer)
    entries = plane.measure(stack, 0)
    assert [m.training for m in stack.modules()] == modes
    for k, v in stack.state_dict().items():  # batch-norm statistics untouched
        assert torch.equal(v, buffers[k]), k
    assert torch.equal(torch.get_rng_state(), rng)  # training draws the same numbers after it
    assert all(p.grad is None for p in stack.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in stack.modules())
    assert torch.is_grad_enabled()
    assert all(isinstance(e["nhsic_x"], float) and math.isfinite(e["nhsic_x"]) for e in entries)
    probe = plane._probe
    assert not any(t.requires_grad for t in (probe.x.matrix, probe.y.matrix, probe.x_linear))


def test_training_is_the_same_with_or_without_the_observer(synthetic, fitted):
    observed, _ = fitted
    plain = _trainer("e2e", synthetic, epochs=2)
    plain.fit()
    assert [h["train_loss"] for h in plain.history] == [h["train_loss"] for h in observed.history]
    for (name, a), b in zip(plain.stack.state_dict().items(),
                            observed.stack.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_several_passes_under_a_small_memory_budget_give_the_same_numbers(fitted):
    trainer, _ = fitted
    one_pass = _prepared(trainer).measure(trainer.stack, 2)
    per_block = _prepared(trainer, memory_budget=1).measure(trainer.stack, 2)
    assert per_block == one_pass


def test_probe_set_is_balanced_and_clamped_to_the_split(synthetic, fitted):
    trainer, _ = fitted
    plane = InformationPlane(probe_size=10**6, split="test")
    plane.prepare(synthetic, trainer.eval_transform, torch.device("cpu"))
    assert plane.describe()["m"] == len(synthetic.test_labels)
    assert plane.describe()["split"] == "test"


@pytest.mark.parametrize("options, message", [
    ({"split": "val"}, "unknown probe split 'val'"),
    ({"probe_size": 1}, "probe size must be at least 2"),
    ({"kernel": "delta"}, "delta kernel is for labels"),
    ({"label_kernel": "rbf"}, "unknown kernel 'rbf'"),
    ({"eps": 0.0}, "must be positive"),
])
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        InformationPlane(**options)


@pytest.fixture(scope="module")
def records(fitted, tmp_path_factory):
    trainer, plane = fitted
    folder = tmp_path_factory.mktemp("records")
    paths = []
    for rule in ("e2e", "layerwise"):
        record = {"version": RECORD_VERSION, "status": "complete", "rule": rule,
                  "model": "resnet18_cifar", "dataset": "synthetic", "config": {"seed": 0},
                  "plane": plane.entries, "plane_config": plane.describe()}
        paths.append(folder / f"{rule}.json")
        paths[-1].write_text(json.dumps(record))
    bare = folder / "bare.json"
    bare.write_text(json.dumps({"version": RECORD_VERSION, "status": "complete", "rule": "e2e",
                                "model": "resnet18_cifar", "history": []}))
    other = json.loads(paths[0].read_text())
    other["plane_config"]["m"] = 2 * M
    paths.append(folder / "other_m.json")
    paths[-1].write_text(json.dumps(other))
    found = {"e2e": paths[0], "layerwise": paths[1], "bare": bare, "other_m": paths[2]}
    # records made before the adjusted form was stored, with and without what computes it
    old = json.loads(paths[0].read_text())
    for entry in old["plane"]:
        del entry["nhsic_x_adj"], entry["nhsic_y_adj"]
    found["old"] = folder / "old.json"
    found["old"].write_text(json.dumps(old))
    del old["plane_config"]["rank_y"]
    found["no_rank_y"] = folder / "no_rank_y.json"
    found["no_rank_y"].write_text(json.dumps(old))
    del old["plane"][3]["rank"]
    old["plane_config"]["rank_y"] = 1.0
    found["no_rank"] = folder / "no_rank.json"
    found["no_rank"].write_text(json.dumps(old))
    bad = json.loads(paths[0].read_text())
    bad["plane"][1]["nhsic_y_adj"] = "high"
    found["bad_adj"] = folder / "bad_adj.json"
    found["bad_adj"].write_text(json.dumps(bad))
    return found


@pytest.mark.parametrize("kind, form", [("plane", "raw"), ("compare", "scaled"), ("depth", "cka"),
                                        ("compare", "adjusted")])
def test_figures_are_drawn_deterministically(records, tmp_path, kind, form, capsys):
    inputs = [records["e2e"]] if kind == "plane" else [records["e2e"], records["layerwise"]]
    outputs = [tmp_path / f"{kind}{i}.png" for i in range(2)]
    for out in outputs:
        args = [*map(str, inputs), "-o", str(out), "--kind", kind, "--form", form]
        assert plots.main(args) == 0
    assert outputs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    assert f"wrote {outputs[1]}" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["plane", "depth"])
def test_the_adjusted_form_of_an_older_record_is_computed_as_the_observer_stores_it(
        records, tmp_path, kind):
    figures = []
    for name in ("e2e", "old"):
        figures.append(tmp_path / f"{name}.png")
        args = [str(records[name]), "-o", str(figures[-1]), "--kind", kind, "--form", "adjusted"]
        assert plots.main(args) == 0
    assert figures[0].read_bytes() == figures[1].read_bytes()
    stored = read_record(records["e2e"])
    computed = plots.with_adjusted(read_record(records["old"]))
    for a, b in zip(stored["plane"], computed["plane"], strict=True):
        assert a == b  # exactly: the same formula on the same stored numbers
    # the other forms do not need it
    assert plots.main([str(records["no_rank"]), "-o", str(tmp_path / "raw.png")]) == 0


@pytest.mark.parametrize("args, message", [
    (["missing.json"], "missing.json: cannot read: No such file"),
    (["{bare}"], "has no 'plane' entries"),
    (["{e2e}", "--kind", "trajectory"], "unknown kind 'trajectory'"),
    (["{e2e}", "--form", "log"], "unknown form 'log'"),
    (["{e2e}", "{other_m}"], "measured differently (m: 64 vs 128)"),
    (["{e2e}", "{layerwise}", "--kind", "plane"], "--kind plane draws one record"),
    (["{no_rank_y}", "--form", "adjusted"],
     "no_rank_y.json: plane_config.rank_y is missing, and --form adjusted needs it"),
    (["{e2e}", "{no_rank}", "--form", "adjusted", "--kind", "depth"],
     "no_rank.json: plane[3].rank is missing, and --form adjusted needs it"),
    (["{bad_adj}", "--form", "adjusted"],
     "bad_adj.json: plane[1].nhsic_y_adj: expected a finite number, got 'high'"),
])
def test_bad_input_is_one_line_exit_2_and_no_figure(records, tmp_path, capsys, args, message):
    out = tmp_path / "fig.png"
    args = [a.format(**records) for a in args]
    assert plots.main([*args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plane.py: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_plane_script_reports_bad_input_without_a_traceback(records, tmp_path):
    out = tmp_path / "fig.png"
    script = ROOT / "benchmarks" / "plane.py"
    result = subprocess.run([sys.executable, str(script), str(records["bare"]), "-o", str(out)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith("plane.py: error: ") and "Traceback" not in result.stderr
    assert not out.exists()


def test_compare_titles_name_only_what_every_run_shares(records):
    e2e = json.loads(records["e2e"].read_text())
    other = dict(e2e, model="vgg11_cifar")
    fig = plots.compare_figure([e2e, other])
    title = fig._suptitle.get_text()
    assert "resnet18_cifar" not in title and "vgg11_cifar" not in title
    assert e2e["dataset"] in title and f"m = {e2e['plane_config']['m']}" in title
    panels = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert any("resnet18_cifar" in t for t in panels) and any("vgg11_cifar" in t for t in panels)
    other_m = json.loads(records["other_m"].read_text()) | {"file": str(records["other_m"])}
    e2e["file"] = str(records["e2e"])
    assert "plane settings differ" in plots.compare_figure([e2e, other_m])._suptitle.get_text()


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so that tqdm draws its bars into it."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("progress", [True, False])
def test_each_measurement_and_epoch_is_logged_with_or_without_progress_bars(
        synthetic, capsys, monkeypatch, progress):
    """``progress=False`` (``--no-progress``) hides the bars only: a job's log still gets
    each plane measurement's line, with its time, and each epoch's."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    plane = InformationPlane(probe_size=M)
    _trainer("e2e", synthetic, (plane,), epochs=1, progress=progress).fit()
    out = capsys.readouterr().out
    assert f"information plane: {M} probe images (train split) prepared in" in out
    for epoch in (0, 1):
        assert f"information plane, epoch {epoch}: 5 blocks measured in" in out
    assert "epoch 1/1 [" in out and "final-head acc" in out
    drawn = terminal.getvalue()  # the bars of the epoch and of each measurement
    assert ("epoch 1/1" in drawn and "information plane, epoch 1" in drawn) is progress
    assert progress or drawn == ""


def test_a_run_without_progress_bars_prints_its_epochs(run_main, tmp_path):
    """``run.py --no-progress`` (a cluster job's log) prints every epoch's line and the
    plane's, as they happen."""
    done = run_main("--rule", "layerwise", "--model", "resnet32_cifar", "--blocks", "2",
                    "--dataset", "synthetic", "--train-subset", "64", "--test-subset", "32",
                    "--batch-size", "32", "--epochs", "2", "--probe-size", "32",
                    "--no-progress", "--output", tmp_path / "runs")
    assert done.returncode == 0, done.stderr
    for epoch in (1, 2):
        assert f"epoch {epoch}/2 [" in done.stdout
        assert f"information plane, epoch {epoch}: 2 blocks measured in" in done.stdout


def test_the_gradients_kind_draws_the_probe_over_epochs(tmp_path, capsys):
    history = [{"epoch": e, "gradient_probe": {"angle": {"fc1": 80.0 - 10 * e, "fc2": 60.0},
                                               "cosine": {"fc1": 0.1 * e, "fc2": 0.5}}}
               for e in (1, 2, 3)]
    paths = []
    for rule in ("fa", "dfa"):
        paths.append(tmp_path / f"{rule}.json")
        paths[-1].write_text(json.dumps({"version": RECORD_VERSION, "status": "complete",
                                         "rule": rule, "model": "ff_mlp", "history": history}))
    out = tmp_path / "g.png"
    assert plots.main([*map(str, paths), "-o", str(out), "--kind", "gradients"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plots.gradients_figure([read_record(p) for p in paths])
    drawn = [ax for ax in fig.axes if ax.lines]
    assert len(drawn) == 4  # 2 runs x 2 metrics
    assert [ax.get_ylabel() for ax in drawn] == [plots.PROBED["angle"], plots.PROBED["cosine"]] * 2
    assert list(drawn[0].lines[0].get_ydata()) == [70.0, 60.0, 50.0]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"version": RECORD_VERSION, "status": "complete", "rule": "e2e",
                                "model": "ff_mlp", "history": [{"epoch": 1}]}))
    assert plots.main([str(bare), "-o", str(out), "--kind", "gradients"]) == 2
    assert "has no gradient probe" in capsys.readouterr().err


def test_runs_of_one_rule_are_told_apart_by_their_options():
    runs = [{"rule": "dgl", "config": {"rule_options": {"aux": "mlp_sr"}}},
            {"rule": "dgl", "config": {"rule_options": {"aux": "mlp_sr", "man": 0.995}}},
            {"rule": "e2e", "config": {"rule_options": {}}}]
    assert plots._labels(runs) == ["dgl", "dgl man=0.995", "e2e"]


def test_plane_last_prints_each_records_last_epoch_adjusted(records, capsys):
    spec = importlib.util.spec_from_file_location("plane_last",
                                                  ROOT / "benchmarks" / "plane_last.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(records["e2e"]), str(records["layerwise"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    stored = json.loads(records["e2e"].read_text())["plane"]
    last = [e for e in stored if e["epoch"] == max(x["epoch"] for x in stored)]
    assert len(lines) == 2 and lines[0].count("|") == len(last)
    assert f"{last[0]['nhsic_x_adj']:.3f}, {last[0]['nhsic_y_adj']:.3f}" in lines[0]
    assert module.main([str(records["bare"])]) == 2
    assert "has no 'plane' entries" in capsys.readouterr().err
