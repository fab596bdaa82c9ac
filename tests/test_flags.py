"""The one declaration of run.py's flags: the parser, the checkpoint identity and the roles."""

import json

import pytest

from locallearn import cli, settings
from locallearn.data import AUGMENTS, load_dataset
from locallearn.errors import ConfigError

IDENTITY_KEYS = {"model", "model_options", "rule", "rule_options", "dataset", "train_subset",
                 "test_subset", "augment", "norm_mean", "norm_std", "granularity", "num_blocks",
                 "split_after", "train",
                 # asynchronous stages train on other batches than stages in step
                 "replay_buffer", "max_reuse",
                 # the linear probe: a label-free rule's accuracy
                 "probe", "probe_images", "probe_epochs",
                 # settings change results too (the plane's probe, the precision)
                 "plane_every", "probe_size", "probe_split", "plane_distance", "no_plane",
                 "mixed_precision", "deterministic"}


def test_every_flag_is_declared_once_with_a_role():
    names = [f.name for f in settings.FLAGS]
    assert len(names) == len(set(names))
    assert {f.role for f in settings.FLAGS} == {settings.IDENTITY, settings.SETTING,
                                                settings.OUTPUT, settings.COMMAND}
    parser = settings.build_parser()
    given = {o for a in parser._actions for o in a.option_strings} - {"-h", "--help"}
    assert given == {f"--{n}" for n in names}


def test_the_checkpoint_identity_comes_from_the_identity_and_setting_roles():
    args = settings.build_parser().parse_args(["--blocks", "4", "--rule-opt", "aux_hidden=8"])
    train = {"epochs": 10, "seed": 0, "progress": None}
    identity = settings.run_identity(args, {"rule_options": {"aux_hidden": 8},
                                         "model_options": {}, "train": train})
    assert set(identity) == IDENTITY_KEYS
    assert identity["num_blocks"] == 4 and identity["rule_options"] == {"aux_hidden": 8}
    assert identity["train"] is train and identity["model"] == "resnet18_cifar"
    # Outputs and commands may change between a run and its resume; settings may not.
    other = settings.build_parser().parse_args(
        ["--blocks", "4", "--output", "elsewhere", "--resume", "--no-progress", "--overwrite"])
    resolved = {"rule_options": {"aux_hidden": 8}, "model_options": {}, "train": train}
    assert settings.run_identity(other, resolved) == identity
    probe = settings.build_parser().parse_args(["--blocks", "4", "--probe-size", "64"])
    assert settings.run_identity(probe, resolved)["probe_size"] == 64


def test_recorded_values_leave_out_commands_and_unresolved_options():
    args = settings.build_parser().parse_args(["--rule-opt", "a=1", "--check"])
    values = settings.recorded_values(args)
    assert not {"rule_opt", "model_opt", "plugin", "check", "list_rules"} & set(values)
    assert values["rule"] == "e2e" and values["milestones"] == (0.5, 0.75)


def test_parser_errors_are_config_errors():
    with pytest.raises(ConfigError, match="--epochs: must be a positive integer; got '0'"):
        settings.build_parser().parse_args(["--epochs", "0"])


SEED_NORM = ["--augment", "flip", "--norm-mean", "0.4914,0.4822,0.4465",
             "--norm-std", "0.2023,0.1994,0.2010"]


def test_data_settings_parse_and_default_to_the_data_sets_own():
    args = settings.build_parser().parse_args(SEED_NORM)
    # lists, as a checkpoint's stored identity gives them back
    assert args.augment == "flip" and args.norm_mean == [0.4914, 0.4822, 0.4465]
    assert args.norm_std == [0.2023, 0.1994, 0.2010]
    plain = settings.build_parser().parse_args([])
    assert plain.augment is plain.norm_mean is plain.norm_std is None
    assert settings.BY_NAME["augment"].choices == AUGMENTS


@pytest.mark.parametrize("argv, message", [
    (["--norm-mean", "0.5,x,0.5"], "--norm-mean: must be comma-separated finite numbers, one "
                                   "per channel (R,G,B); got '0.5,x,0.5'"),
    (["--norm-mean", "0.5,inf,0.5"], "--norm-mean: must be comma-separated finite numbers"),
    (["--norm-std", "0.2,0,0.2"], "--norm-std: must be comma-separated finite numbers, one per "
                                  "channel (R,G,B), above 0; got '0.2,0,0.2'"),
    (["--norm-std", "0.2,-1,0.2"], "above 0"),
    (["--norm-std", "0.2,nan,0.2"], "above 0"),
    (["--augment", "random_crop"], "--augment: invalid choice: 'random_crop'"),
])
def test_bad_data_settings_are_one_line_refusals(argv, message):
    with pytest.raises(ConfigError) as info:
        settings.build_parser().parse_args(argv)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_mean_of_the_wrong_length_is_refused_once_the_data_is_known(tmp_path, capsys):
    argv = ["--dataset", "synthetic", "--model", "resnet32_cifar", "--epochs", "1",
            "--train-subset", "32", "--test-subset", "16", "--no-plane", "--no-progress",
            "--output", str(tmp_path), "--norm-mean", "0.5,0.5"]
    assert cli.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert "normalisation mean needs 3 finite numbers" in err and "\n" not in err
    assert not list(tmp_path.iterdir())


def test_data_settings_reach_the_trainer_and_the_record(tmp_path):
    argv = ["--dataset", "synthetic", "--model", "resnet32_cifar", "--epochs", "1",
            "--train-subset", "32", "--test-subset", "16", "--batch-size", "16", "--no-plane",
            "--no-progress", "--output", str(tmp_path), *SEED_NORM]
    assert cli.main(argv) == 0
    (path,) = tmp_path.glob("*.json")
    config = json.loads(path.read_text())["config"]
    assert config["augment"] == "flip"
    assert config["norm_mean"] == [0.4914, 0.4822, 0.4465]
    assert config["norm_std"] == [0.2023, 0.1994, 0.2010]
    assert cli.main([*argv[:-6], "--output", str(tmp_path / "default")]) == 0
    (path,) = (tmp_path / "default").glob("*.json")
    config = json.loads(path.read_text())["config"]
    # Not given: the data set's own augmentation and the statistics of its training split.
    measured = load_dataset("synthetic")
    assert config["augment"] == measured.augment == "none"
    assert config["norm_mean"] == list(measured.mean) and config["norm_std"] == list(measured.std)


def test_model_option_switches_read_as_presets_write_them():
    # A preset's {"pool_first": true} reaches run.py as pool_first=true.
    assert cli._literal("true") is True and cli._literal("false") is False
    assert cli._literal("0.2") == 0.2 and cli._literal("True") is True
    assert cli._literal("avg") == "avg"


def test_help_describes_every_flag_and_shows_every_default():
    from locallearn.settings import FLAGS, build_parser

    text = " ".join(build_parser().format_help().split())
    assert "None" not in text
    for flag in FLAGS:
        if flag.kind == "value" and flag.default is not None:
            shown = ",".join(map(str, flag.default)) if isinstance(flag.default, (list, tuple)) \
                else str(flag.default)
            assert f"default: {shown})" in text or f"default {shown})" in text, flag.name


def test_the_loops_flags_are_train_configs_fields_and_build_it():
    # One declaration: each TrainConfig field with flag metadata is a flag, its kind and
    # choices read from its type, and a parsed command line fills the config by name.
    import dataclasses
    import typing

    from locallearn.settings import TRAIN_FLAGS, TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig) if "flag" in f.metadata}
    assert [f.dest for f in TRAIN_FLAGS] == list(fields)
    assert {f.dest for f in settings.FLAGS if f.identity_key == settings.TRAIN} == set(fields)
    hints = typing.get_type_hints(TrainConfig)
    for flag in TRAIN_FLAGS:
        assert (flag.kind == "switch") == (hints[flag.dest] is bool)
        assert flag.choices in (None, typing.get_args(hints[flag.dest]))
    argv = ["--epochs", "3", "--batch-size", "8", "--eval-batch-size", "5", "--lr", "0.5",
            "--optimizer", "adamw", "--momentum", "0.5", "--nesterov", "--weight-decay", "0",
            "--schedule", "multistep", "--milestones", "0.3", "--gamma", "0.5", "--max-loss",
            "9", "--seed", "4", "--channels-last", "--compile", "default",
            "--recompute-blocks", "--optimizer-impl", "loop", "--no-progress"]
    config = TrainConfig.from_flags(settings.build_parser().parse_args(argv))
    assert config == TrainConfig(3, 8, 5, 0.5, "adamw", 0.5, True, 0.0, "multistep", (0.3,),
                                 0.5, 9.0, 4, True, "default", True, "loop", progress=False)
    # every field was given a value other than its default, so each is read from its flag
    assert all(getattr(config, name) != f.default for name, f in fields.items())


def test_the_planes_flags_are_plane_settings_fields_and_build_it():
    # One declaration: run.py builds the InformationPlane from PlaneSettings' flags, each a
    # keyword of the plane with the plane's own default.
    import dataclasses
    import inspect

    from locallearn.analysis import InformationPlane
    from locallearn.settings import PLANE_FLAGS, PlaneSettings

    assert [f.name for f in PLANE_FLAGS] == ["plane-every", "probe-size", "probe-split",
                                             "plane-distance"]
    keywords = inspect.signature(InformationPlane).parameters
    for field in dataclasses.fields(PlaneSettings):
        assert field.default == keywords[field.name].default, field.name
    argv = ["--plane-every", "3", "--probe-size", "64", "--probe-split", "test",
            "--plane-distance", "euclidean"]
    chosen = PlaneSettings.from_flags(settings.build_parser().parse_args(argv))
    plane = InformationPlane(**dataclasses.asdict(chosen))
    assert (plane.every, plane.probe_size, plane.split, plane.distance) == (
        3, 64, "test", "euclidean")
