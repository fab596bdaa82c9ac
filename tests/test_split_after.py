"""Explicit split points: --split-after cuts the fine blocks after the named ones, for any rule."""

import json

import pytest
import timm
import torch

from locallearn import cli, settings, split
from locallearn.blocks import cut_after
from locallearn.errors import ConfigError

NAMES = ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1"]


def test_cut_after_ends_a_part_after_each_named_block():
    assert cut_after(NAMES, ["layer1.0"]) == [[0, 1], [2, 3, 4]]
    assert cut_after(NAMES, ["stem", "layer2.0"]) == [[0], [1, 2, 3], [4]]
    assert cut_after(NAMES, []) == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("after, message", [
    (["layer3.0"], "unknown block 'layer3.0' of m; did you mean layer2.0, layer1.0"),
    (["head"], "unknown block 'head' of m; blocks in order: stem, layer1.0, layer1.1, "
               "layer2.0, layer2.1"),
    (["layer1.0", "layer1.0"], "distinct blocks in forward order; got layer1.0, layer1.0"),
    (["layer2.0", "layer1.1"], "distinct blocks in forward order; got layer2.0, layer1.1"),
    (["layer2.1"], "cannot cut after 'layer2.1', the last block of m"),
])
def test_bad_split_points_are_one_line_errors(after, message):
    with pytest.raises(ConfigError, match=message) as err:
        cut_after(NAMES, after, "m")
    assert "\n" not in str(err.value)


def test_split_groups_the_model_at_the_named_blocks_and_stays_exact():
    model = timm.create_model("resnet32_cifar", num_classes=10).eval()
    stack = split(model, split_after=["stem", "layer2.4"]).eval()
    assert [n.split("+")[0] for n in stack.names] == ["stem", "layer1.0", "layer3.0"]
    assert stack.names[1].split("+")[-1] == "layer2.4" and len(stack.names[2].split("+")) == 5
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(stack(x), model(x))
    with pytest.raises(ConfigError, match="num_blocks and split_after both"):
        split(model, num_blocks=2, split_after=["layer1.0"])


def test_the_flag_parses_names_and_refuses_empty_ones():
    parser = settings.build_parser()
    args = parser.parse_args(["--split-after", "layer1.4, layer2.3"])
    assert args.split_after == ["layer1.4", "layer2.3"]
    identity = settings.run_identity(args, {"rule_options": {}, "model_options": {}, "train": {}})
    assert json.loads(json.dumps(identity)) == identity  # a checkpoint's copy matches
    assert parser.parse_args([]).split_after is None
    with pytest.raises(ConfigError, match="must be comma-separated block names"):
        parser.parse_args(["--split-after", "layer1.4,,layer2.3"])


RUN = ["--model", "resnet32_cifar", "--dataset", "synthetic", "--train-subset", "16",
       "--test-subset", "16", "--epochs", "1", "--batch-size", "8", "--no-plane", "--no-progress"]


def test_a_run_records_its_split_points_and_refuses_them_with_blocks(tmp_path, capsys):
    argv = ["--rule", "dgl", "--split-after", "layer1.4,layer2.4", "--output", str(tmp_path)]
    assert cli.main(argv + RUN) == 0
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    assert record["config"]["split_after"] == ["layer1.4", "layer2.4"]
    assert record["stack"]["num_blocks"] == 3 and len(record["parts"]) == 3
    assert record["stack"]["blocks"][1].startswith("layer2.0+")
    capsys.readouterr()
    assert cli.main(argv + ["--blocks", "3", "--overwrite"] + RUN) == 2
    assert "--blocks K and --split-after NAMES both cut" in capsys.readouterr().err
    assert cli.main(["--rule", "dgl", "--split-after", "layer4.0", "--output",
                     str(tmp_path / "other")] + RUN) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown block 'layer4.0'" in err
