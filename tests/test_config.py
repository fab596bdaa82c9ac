from dataclasses import dataclass
from typing import Literal

import pytest

from locallearn.config import build_config, config_dict, parse_assignments
from locallearn.errors import ConfigError
from locallearn.registry import Registry


@dataclass
class Options:
    steps: int = 1
    rate: float = 0.5
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    points: tuple[float, ...] = (0.5,)


def test_strings_are_converted_to_declared_types():
    got = build_config(
        Options,
        {"steps": "3", "rate": "1e-3", "flag": "yes", "mode": "b", "points": "0.1,0.2"},
        "x",
    )
    assert got == Options(3, 1e-3, True, "b", (0.1, 0.2))
    assert config_dict(got)["points"] == [0.1, 0.2]


def test_python_values_are_type_checked():
    assert build_config(Options, {"rate": 2}, "x").rate == 2.0
    with pytest.raises(ConfigError, match="integer"):
        build_config(Options, {"steps": True}, "x")
    with pytest.raises(ConfigError, match="integer"):
        build_config(Options, {"steps": 1.5}, "x")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"steps": "1.5"}, "'steps' of rule 'r' must be an integer"),
        ({"rate": "nan"}, "must be a number"),
        ({"rate": "fast"}, "must be a number"),
        ({"flag": "maybe"}, "must be true or false"),
        ({"mode": "c"}, "must be one of a, b"),
        ({"stesp": "1"}, "unknown option 'stesp' for rule 'r'; did you mean steps?"),
        ({"zzz": "1"}, "choices: flag, mode, points, rate, steps"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ConfigError) as err:
        build_config(Options, options, "rule 'r'")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("item", ["novalue", "=3", "a b=1", ""])
def test_malformed_assignments(item):
    with pytest.raises(ConfigError, match="malformed"):
        parse_assignments([item])


def test_assignments_split_on_first_equals():
    assert parse_assignments(["a=1", "b = x=y"]) == {"a": "1", "b": "x=y"}


def test_registry_names_close_matches_and_refuses_clashes():
    reg = Registry("thing", required=("paper",))

    @reg.register("alpha", paper="P")
    def alpha():
        return 1

    assert reg.names() == ["alpha"] and "alpha" in reg and reg.get("alpha").meta["paper"] == "P"
    with pytest.raises(ConfigError, match="did you mean alpha"):
        reg.get("alpah")
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("alpha", paper="Q")(lambda: 2)
    with pytest.raises(ConfigError, match="lacks metadata: paper"):
        reg.register("beta")
