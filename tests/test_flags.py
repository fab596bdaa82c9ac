"""The one declaration of run.py's flags: the parser, the checkpoint identity and the roles."""

import pytest

from locallearn import flags
from locallearn.errors import ConfigError

IDENTITY_KEYS = {"model", "model_options", "rule", "rule_options", "dataset", "train_subset",
                 "test_subset", "granularity", "num_blocks", "split_after", "train",
                 # settings change results too (the plane's probe, the precision)
                 "plane_every", "probe_size", "probe_split", "plane_distance", "no_plane",
                 "mixed_precision", "deterministic"}


def test_every_flag_is_declared_once_with_a_role():
    names = [f.name for f in flags.FLAGS]
    assert len(names) == len(set(names))
    assert {f.role for f in flags.FLAGS} == {flags.IDENTITY, flags.SETTING, flags.OUTPUT,
                                             flags.COMMAND}
    parser = flags.build_parser()
    given = {o for a in parser._actions for o in a.option_strings} - {"-h", "--help"}
    assert given == {f"--{n}" for n in names}


def test_the_checkpoint_identity_comes_from_the_identity_and_setting_roles():
    args = flags.build_parser().parse_args(["--blocks", "4", "--rule-opt", "aux_hidden=8"])
    train = {"epochs": 10, "seed": 0, "progress": None}
    identity = flags.run_identity(args, {"rule_options": {"aux_hidden": 8},
                                         "model_options": {}, "train": train})
    assert set(identity) == IDENTITY_KEYS
    assert identity["num_blocks"] == 4 and identity["rule_options"] == {"aux_hidden": 8}
    assert identity["train"] is train and identity["model"] == "resnet18_cifar"
    # Outputs and commands may change between a run and its resume; settings may not.
    other = flags.build_parser().parse_args(
        ["--blocks", "4", "--output", "elsewhere", "--resume", "--no-progress", "--overwrite"])
    resolved = {"rule_options": {"aux_hidden": 8}, "model_options": {}, "train": train}
    assert flags.run_identity(other, resolved) == identity
    probe = flags.build_parser().parse_args(["--blocks", "4", "--probe-size", "64"])
    assert flags.run_identity(probe, resolved)["probe_size"] == 64


def test_recorded_values_leave_out_commands_and_unresolved_options():
    args = flags.build_parser().parse_args(["--rule-opt", "a=1", "--check"])
    values = flags.recorded_values(args)
    assert not {"rule_opt", "model_opt", "plugin", "check", "list_rules"} & set(values)
    assert values["rule"] == "e2e" and values["milestones"] == (0.5, 0.75)


def test_parser_errors_are_config_errors():
    with pytest.raises(ConfigError, match="--epochs: must be a positive integer; got '0'"):
        flags.build_parser().parse_args(["--epochs", "0"])
