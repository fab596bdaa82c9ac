"""The suite's own machinery: the CIFAR-10 copy's variable and the measured slow tier."""

import json

import pytest
from conftest import DURATIONS, SLOW_SECONDS, cifar10_copy


def test_a_cifar10_variable_set_to_a_wrong_path_fails_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALLEARN_CIFAR10", str(tmp_path / "nowhere"))
    with pytest.raises(pytest.fail.Exception, match=r"LOCALLEARN_CIFAR10=.*nowhere has no "
                                                    r"train/ folder"):
        cifar10_copy()
    monkeypatch.delenv("LOCALLEARN_CIFAR10")
    with pytest.raises(pytest.skip.Exception, match="set LOCALLEARN_CIFAR10"):
        cifar10_copy()
    (tmp_path / "train").mkdir()
    monkeypatch.setenv("LOCALLEARN_CIFAR10", str(tmp_path))
    assert cifar10_copy() == tmp_path


def test_the_slow_tier_is_the_tests_measured_at_slow_seconds_or_more(request):
    seconds = json.loads(DURATIONS.read_text())
    assert any(s >= SLOW_SECONDS for s in seconds.values())
    for item in request.session.items:  # those this run collected and kept
        slow = item.get_closest_marker("slow") is not None
        assert slow == (seconds.get(item.nodeid, 0.0) >= SLOW_SECONDS), item.nodeid
