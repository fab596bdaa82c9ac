import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cifar10_path() -> Path:
    """An extracted copy of ../shared/data/cifar10-jpeg.tar.gz, named by LOCALLEARN_CIFAR10."""
    path = os.environ.get("LOCALLEARN_CIFAR10")
    if not path or not Path(path, "train").is_dir():
        pytest.skip("set LOCALLEARN_CIFAR10 to an extracted CIFAR-10 JPEG copy (see .ci/run)")
    return Path(path)
