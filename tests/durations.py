"""Measure every test and write ``tests/durations.json``, from which conftest.py picks the
``slow`` tier (``SLOW_SECONDS`` and more). On a quiet machine, from the repository root::

    LOCALLEARN_CIFAR10=/path/to/cifar10 python tests/durations.py

runs the whole suite as the README's test command does on a 2-core machine (``-n 2``,
slow tests included) and rewrites the file: ``{node id: seconds}``. Extra arguments go
to pytest (``python tests/durations.py tests/test_pipeline.py``): then only the files
run are measured again, and the file keeps the others (less those deleted). A test's
seconds are its setup, call and teardown, where the setup of a module- or
session-scoped fixture is charged to every test that uses it, not to whichever test
happened to set it up first: a test is slow if running it alone is. The CIFAR-10
tests must run to be measured, so ``LOCALLEARN_CIFAR10`` must be set. A test absent
from the file (new, or faster than 5 ms) counts as fast.

The same file is the pytest plugin that measures (``-p durations``, which does nothing
unless this script set ``LOCALLEARN_DURATIONS``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

FILE = Path(__file__).parent / "durations.json"
OUT = "LOCALLEARN_DURATIONS"  # where the plugin writes what it measured

_costs: dict[str, float] = {}  # this process: module/session fixture -> its setup seconds
_paid: list[str] = []  # the wide fixtures the current test's setup set up
_seen: dict[str, dict] = {}  # controller: node id -> seconds, fixtures paid, fixtures used


def _key(fixturedef) -> str:
    return f"{fixturedef.baseid}::{fixturedef.argname}"


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    start = time.perf_counter()  # its dependencies are set up before this hook
    yield
    if os.environ.get(OUT) and fixturedef.scope != "function":
        _costs[_key(fixturedef)] = time.perf_counter() - start
        _paid.append(_key(fixturedef))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    _paid.clear()
    yield
    if os.environ.get(OUT):  # goes to the controller with the setup report
        defs = [d[-1] for d in item._fixtureinfo.name2fixturedefs.values() if d]
        uses = {_key(d): _costs.get(_key(d), 0.0) for d in defs if d.scope != "function"}
        paid = sum(_costs[k] for k in set(_paid))
        item.user_properties.append(("durations", {"paid": paid, "uses": uses}))


def pytest_runtest_logreport(report):
    if not os.environ.get(OUT) or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # a worker: its reports reach the controller, which counts them
    seen = _seen.setdefault(report.nodeid, {"seconds": 0.0, "paid": 0.0, "uses": {}})
    seen["seconds"] += report.duration
    for name, value in report.user_properties:
        if name == "durations" and report.when == "setup":
            seen["paid"], seen["uses"] = value["paid"], value["uses"]


def pytest_sessionfinish(session):
    if os.environ.get(OUT) and not os.environ.get("PYTEST_XDIST_WORKER"):
        costs: dict[str, float] = {}
        for seen in _seen.values():
            for key, cost in seen["uses"].items():
                costs[key] = max(costs.get(key, 0.0), cost)
        result = {nodeid: max(0.0, s["seconds"] - s["paid"]) + sum(costs[k] for k in s["uses"])
                  for nodeid, s in _seen.items()}
        Path(os.environ[OUT]).write_text(json.dumps(result))


def main(args: list[str]) -> int:
    if not os.environ.get("LOCALLEARN_CIFAR10"):
        sys.exit("durations.py: error: set LOCALLEARN_CIFAR10 (the CIFAR-10 tests must run "
                 "to be measured; see .ci/run)")
    out = FILE.with_suffix(".new")
    here = str(Path(__file__).parent)
    env = {**os.environ, OUT: str(out),
           "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pytest", "-n", "2", "-p", "durations", "-q",
               "-p", "no:cacheprovider", *args]
    status = subprocess.run(command, env=env, cwd=FILE.parents[1]).returncode
    measured = json.loads(out.read_text())
    out.unlink()
    kept = json.loads(FILE.read_text()) if args and FILE.exists() else {}
    files = {nodeid.split("::")[0] for nodeid in measured}  # measured again: replaced
    root = FILE.parents[1]
    kept = {k: v for k, v in kept.items()
            if k.split("::")[0] not in files and (root / k.split("::")[0]).exists()}
    result = {k: round(v, 2) for k, v in sorted({**kept, **measured}.items()) if v >= 0.005}
    FILE.write_text(json.dumps(result, indent=0) + "\n")
    print(f"durations.py: {len(measured)} tests measured (pytest exit status {status}); "
          f"wrote {len(result)} to {FILE}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
