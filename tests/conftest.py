import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cifar10_copy() -> Path:
    """The CIFAR-10 copy named by ``LOCALLEARN_CIFAR10``: skips where it is not set, fails
    where it is set but wrong (a typo must not silently skip the tests that read it)."""
    path = os.environ.get("LOCALLEARN_CIFAR10")
    if not path:
        pytest.skip("set LOCALLEARN_CIFAR10 to an extracted CIFAR-10 JPEG copy (see .ci/run)")
    if not Path(path, "train").is_dir():
        pytest.fail(f"LOCALLEARN_CIFAR10={path} has no train/ folder: set it to an extracted "
                    "CIFAR-10 JPEG copy (see .ci/run), or unset it to skip these tests",
                    pytrace=False)
    return Path(path)


@pytest.fixture(scope="session")
def cifar10_path() -> Path:
    """An extracted copy of ../shared/data/cifar10-jpeg.tar.gz, named by LOCALLEARN_CIFAR10."""
    return cifar10_copy()


@pytest.fixture(scope="session")
def image_cache(tmp_path_factory) -> Path:
    """Where runs on the CIFAR-10 copy cache its decoded images: ``$LOCALLEARN_CACHE``
    (``.ci/run`` sets it: every test and worker then decodes the copy at most once), else
    one folder for the session."""
    path = os.environ.get("LOCALLEARN_CACHE")
    return Path(path) if path else tmp_path_factory.mktemp("image-cache")


@contextmanager
def plugins_undone():
    """Restore the rule, head and loss registries and drop the plugin modules loaded
    inside, so what runs next sees only the built-in ones."""
    from locallearn.plugins import REGISTRIES

    kept = [set(registry.names()) for registry in REGISTRIES]
    modules = set(sys.modules)
    try:
        yield
    finally:  # a registered name cannot be registered again, so only new names are undone
        for registry, names in zip(REGISTRIES, kept, strict=True):
            for name in set(registry.names()) - names:
                registry.unregister(name)
        for name in set(sys.modules) - modules:
            if name.startswith("locallearn_plugin_"):
                del sys.modules[name]


@pytest.fixture(scope="session")
def tiny_data():
    """The synthetic set cut to 64 training and 16 test images of 8 x 8 pixels: enough for
    a rule's few steps, small enough for any test."""
    import dataclasses

    from locallearn.data import load_dataset

    full = load_dataset("synthetic")
    return dataclasses.replace(full, train_images=full.train_images[:64, :, :8, :8].contiguous(),
                               train_labels=full.train_labels[:64],
                               test_images=full.test_images[:16, :, :8, :8].contiguous(),
                               test_labels=full.test_labels[:16])


@pytest.fixture
def run_main(capsys, monkeypatch):
    """``run.py``'s ``main`` in this process, with its plugins undone after: a command-line
    run without the seconds a new Python takes to import torch and timm. Returns what
    ``subprocess.run`` would (``returncode``, ``stdout``, ``stderr``). Tests of the script's
    own process (its exit status, signals, launchers) start it as a subprocess instead."""
    from locallearn.cli import main

    def run(*args, cwd: Path | None = None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        with plugins_undone():
            status = main([str(a) for a in args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=status, stdout=out.out, stderr=out.err)

    return run


# The slow tier, `-m slow`: the tests that take SLOW_SECONDS or more, as measured by
# `python tests/durations.py` (see there) into tests/durations.json. The README's test
# command leaves them out; .ci/run runs them after it. A test not in the file is fast.
SLOW_SECONDS = 2.0
DURATIONS = ROOT / "tests" / "durations.json"


def pytest_configure(config):
    """Under pytest-xdist, give each worker (and every process it starts) its share of the
    cores: two workers that each run torch on every core slow each other down (on 2 cores,
    two quick-preset runs at once took 32 s with 2 threads each and 24 s with 1)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    seconds = json.loads(DURATIONS.read_text())
    for item in items:
        if seconds.get(item.nodeid, 0.0) >= SLOW_SECONDS:
            item.add_marker(pytest.mark.slow)


def resumes_exactly(whole, make, tmp_path, epochs: int = 2):
    """Train the Trainer ``whole`` ``epochs`` epochs, checkpoint it and train one more; a new
    Trainer from ``make()`` resumed from that checkpoint trains the same epoch, and every part's
    state must then be bit-identical to ``whole``'s. Returns ``whole`` (its history holds the
    ``epochs + 1`` epochs, for the caller's checks that it learned)."""
    import torch

    from locallearn.checkpoint import load, save

    for epoch in range(epochs):
        whole.history.append(whole._train_epoch(epoch))
    path = save(whole, tmp_path, epochs, {}, 1, "run")
    whole.history.append(whole._train_epoch(epochs))
    resumed = make()
    assert load(resumed, path, {}, "run") == epochs
    resumed._train_epoch(epochs)
    for a, b in zip(whole.parts, resumed.parts, strict=True):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
    return whole


def every_part_loss_fell(trainer) -> None:
    """Each part's mean loss in the last epoch of ``trainer.history`` is below its first's."""
    first, last = trainer.history[0]["part_loss"], trainer.history[-1]["part_loss"]
    for name in first:
        assert last[name] < first[name], name
