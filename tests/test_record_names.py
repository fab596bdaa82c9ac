"""Default record names: runs that train differently get different names."""

import pytest

from locallearn.cli import parse_args
from locallearn.outputs import MAX_DEFAULT_NAME, default_name


def name(*argv):
    return default_name(parse_args(list(argv)))


def test_the_plain_run_keeps_its_name_and_defaults_given_again_add_nothing():
    plain = "layerwise__resnet18__imagefolder__seed0.json"
    assert name("--rule", "layerwise", "--model", "resnet18", "--dataset", "imagefolder:x") == plain
    # the rule's own option values, the flags' defaults, the rule's training_defaults
    assert name("--rule", "layerwise", "--model", "resnet18", "--dataset", "imagefolder:x",
                "--rule-opt", "head=reduced_linear", "--epochs", "10",
                "--granularity", "stage") == plain
    assert name("--rule", "forward_forward", "--lr", "0.001") == \
        "forward_forward__ff_mlp__cifar10__seed0.json"


@pytest.mark.parametrize("argv, tags", [
    (["--rule-opt", "loss=predsim"], "loss-predsim"),
    (["--blocks", "4"], "blocks-4"),
    (["--granularity", "block"], "granularity-block"),
    (["--split-after", "layer1.1,layer2.1"], "split-after-layer1.1-layer2.1"),
    (["--train-subset", "2000", "--test-subset", "1000", "--epochs", "1"],
     "train-subset-2000__test-subset-1000__epochs-1"),
    (["--nesterov", "--model-opt", "drop_rate=0.1"], "drop_rate-0.1__nesterov"),
])
def test_each_identity_setting_that_is_not_its_default_adds_a_tag(argv, tags):
    assert name("--rule", "layerwise", *argv) == \
        f"layerwise__resnet18_cifar__cifar10__{tags}__seed0.json"


def test_a_long_list_of_tags_becomes_one_short_hash():
    many = ["--norm-mean", "0.4914,0.4822,0.4465", "--norm-std", "0.247,0.2435,0.2616",
            "--lr", "0.05", "--batch-size", "64", "--weight-decay", "0.0001"]
    long = name("--rule", "layerwise", *many)
    assert len(long) <= MAX_DEFAULT_NAME and "__cfg-" in long
    assert name("--rule", "layerwise", *many, "--lr", "0.02") != long  # still told apart


def test_the_readme_names_the_main_jobs_record_as_run_py_does():
    import re
    import shlex

    from conftest import ROOT

    text = (ROOT / "README.md").read_text()
    job = next(line for line in text.splitlines() if "benchmarks/run.py --rule layerwise" in line)
    argv = shlex.split(job.split("benchmarks/run.py", 1)[1])
    shown = re.search(r"`runs/([^`]+\.json)`", text).group(1)
    assert name(*argv) == shown
