"""A rule's declared training defaults: below the command line and presets, shown and recorded."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import ROOT

from locallearn import Rule, cli, list_rules, register_rule, settings
from locallearn.errors import ConfigError
from locallearn.rules.base import DEFAULTABLE, RULES

FF = "rule forward_forward"
TINY = ["--dataset", "synthetic", "--model-opt", "img_size=16", "--train-subset", "64",
        "--test-subset", "32", "--epochs", "1", "--no-plane", "--no-progress"]


@pytest.fixture
def preset(tmp_path):
    """A preset file setting the batch size (and the optimizer) of forward_forward's runs."""
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"args": {"batch-size": 32},
                                "rule_args": {"forward_forward": {"optimizer": "sgd"}},
                                "runs": [{"rule": "forward_forward"}], "seeds": [0]}))
    return str(path)


@pytest.fixture
def scratch_rule():
    """Registers rules made by the test and removes them afterwards."""
    names: list[str] = []

    def make(name: str, defaults: dict):
        cls = type("Scratch", (Rule,), {"training_defaults": defaults})
        register_rule(name, paper="none")(cls)
        names.append(name)

    yield make
    for name in names:
        RULES.unregister(name)


def test_the_defaultable_flags_are_the_model_the_presettable_loop_settings_and_the_probe():
    # What is trained; not how fast (--channels-last, --compile, ...: settings). The probe: a
    # label-free rule's accuracy needs it.
    loop = {f.name for f in settings.FLAGS
            if f.identity_key == settings.TRAIN and f.role == settings.IDENTITY and f.presettable}
    assert set(DEFAULTABLE) == loop | {"model", "probe", "probe-images", "probe-epochs"}


@pytest.mark.parametrize("rule", list_rules())
def test_every_registered_rule_declares_defaults_run_py_accepts(rule):
    declared = RULES.get(rule).factory.training_defaults
    args = cli.parse_args(["--rule", rule])
    for name, value in declared.items():
        assert getattr(args, name.replace("-", "_")) == value
        assert args.config_sources[name.replace("-", "_")] == f"rule {rule}"


def test_forward_forward_picks_its_declared_defaults_where_nothing_else_is_set():
    args = cli.parse_args(["--rule", "forward_forward"])
    assert (args.model, args.optimizer, args.lr, args.batch_size) == ("ff_mlp", "adamw", 1e-3, 16)
    assert args.config_sources["optimizer"] == FF and args.config_sources["rule"] == "command line"
    assert "momentum" not in args.config_sources  # run.py's own default
    e2e = cli.parse_args(["--rule", "e2e"])  # a rule without declared defaults: run.py's
    for name in ("model", "optimizer", "lr", "batch-size"):
        flag = settings.BY_NAME[name]
        assert getattr(e2e, flag.dest) == flag.default and flag.dest not in e2e.config_sources


def test_the_command_line_and_a_preset_beat_the_rule(preset):
    args = cli.parse_args(["--rule", "forward_forward", "--preset", preset, "--lr", "0.01"])
    assert (args.lr, args.batch_size, args.optimizer, args.model) == (0.01, 32, "sgd", "ff_mlp")
    sources = args.config_sources
    assert sources["lr"] == "command line" and sources["model"] == FF
    assert sources["batch_size"] == sources["optimizer"] == f"preset {preset}"
    given = cli.parse_args(["--preset", preset, "--rule", "forward_forward", "--batch-size", "8"])
    assert given.batch_size == 8 and given.config_sources["batch_size"] == "command line"


def test_check_and_list_rules_show_the_declared_defaults(capsys, preset):
    assert cli.main(["--list-rules"]) == 0
    out = capsys.readouterr().out
    assert "defaults: --model ff_mlp --optimizer adamw --lr 0.001" in out
    # --check builds the model: ff_mlp gets the synthetic images' size without being told.
    small = ["--dataset", "synthetic"]
    assert cli.main(["--rule", "forward_forward", *small, "--check"]) == 0
    assert "from rule forward_forward: --model ff_mlp --batch-size 16" in capsys.readouterr().out
    argv = ["--rule", "forward_forward", "--preset", preset, "--lr", "0.01", "--check", *small]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "--lr (by the command line)" in out and f"--batch-size (by the preset {preset})" in out


def test_the_resume_identity_uses_the_resolved_values(tmp_path):
    def identity(*argv):
        args = cli.parse_args(["--rule", "forward_forward", *TINY, "--output", str(tmp_path),
                               *argv])
        return cli._check(args).identity

    implicit = identity()
    assert implicit == identity("--model", "ff_mlp", "--optimizer", "adamw", "--lr", "0.001")
    assert implicit["train"]["optimizer"] == "adamw" and implicit["model"] == "ff_mlp"
    assert implicit != identity("--lr", "0.002")


def test_the_record_shows_the_values_used_and_where_each_came_from(tmp_path, preset):
    argv = ["--rule", "forward_forward", "--preset", preset, *TINY, "--lr", "0.002",
            "--output", str(tmp_path / "runs")]
    assert cli.main(argv) == 0
    (path,) = (tmp_path / "runs").glob("*.json")
    record = json.loads(path.read_text())
    config, sources = record["config"], record["config_sources"]
    assert (config["lr"], sources["lr"]) == (0.002, "command line")
    assert (config["batch_size"], sources["batch_size"]) == (32, f"preset {preset}")
    assert (config["model"], sources["model"]) == ("ff_mlp", FF)
    assert (config["weight_decay"], sources["weight_decay"]) == (0.0, FF)
    assert "momentum" not in sources and config["momentum"] == 0.9  # run.py's own default
    assert "output" not in sources  # only what changes results: a resume may move outputs
    assert record["config"]["train"]["lr"] == 0.002  # the loop ran with the resolved value


def test_an_unknown_key_is_refused_at_registration():
    with pytest.raises(ConfigError, match="rule 'bad': unknown training default 'learning-rate'; "
                                          "valid: model, epochs, batch-size"):
        register_rule("bad", paper="none")(
            type("Bad", (Rule,), {"training_defaults": {"learning-rate": 0.1}}))
    assert "bad" not in RULES


def test_a_bad_declared_value_is_one_line_naming_the_rule(scratch_rule, capsys):
    scratch_rule("adam_rule", {"optimizer": "adam"})
    assert cli.main(["--rule", "adam_rule", "--dataset", "synthetic", "--check"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "rule 'adam_rule' declares a bad training default" in line and "'adam'" in line


def test_a_plugin_rule_declares_its_own_defaults(scratch_rule):
    scratch_rule("slow_rule", {"lr": 0.01, "milestones": (0.3,), "nesterov": True})
    args = cli.parse_args(["--rule", "slow_rule", "--schedule", "multistep"])
    assert (args.lr, args.milestones, args.nesterov) == (0.01, (0.3,), True)
    assert args.config_sources["schedule"] == "command line"


def test_suite_names_runs_by_the_rule_defaults_model(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("suite", ROOT / "benchmarks" / "suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    path = tmp_path / "ff.json"
    # The suite checks each run as run.py would (ff_mlp gets the synthetic images' size).
    path.write_text(json.dumps({"args": {"dataset": "synthetic"},
                                "runs": [{"rule": "forward_forward"}], "seeds": [0]}))
    assert suite.main(["--preset", str(path), "--dry-run", "--output", str(tmp_path)]) == 0
    assert "forward_forward__ff_mlp__synthetic__seed0.json" in capsys.readouterr().out

