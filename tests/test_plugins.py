"""Rules from outside the package: the docs' tutorial rule through --plugin, and bad plugins.

The runs call run.py's main in this process (conftest's ``run_main``), which undoes
their plugins' registrations after each."""

import json
import re
import sys

import pytest
from conftest import ROOT


def tutorial_code(page: str = "adding_a_rule.md", block: int = 0) -> str:
    text = (ROOT / "docs" / page).read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)[block]


def test_loss_tutorial_runs_from_a_users_file(tmp_path, run_main):
    run = run_main
    code = tutorial_code("adding_a_loss.md")
    assert len(code.strip().splitlines()) < 30  # the page promises a loss in under 30 lines
    plugin = tmp_path / "my_losses.py"
    plugin.write_text(code)
    out = run("--plugin", plugin, "--rule", "layerwise", "--rule-opt", "loss=focal",
              "--rule-opt", "loss_options=gamma=1.0", "--dataset", "synthetic", "--epochs", "1",
              "--batch-size", "64", "--model", "resnet32_cifar", "--no-plane", "--no-progress",
              "--output", tmp_path / "runs")
    assert out.returncode == 0, out.stderr
    record = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    assert record["status"] == "complete"
    assert record["config"]["rule_options"]["loss"] == "focal"
    assert record["config"]["rule_options"]["loss_options"] == ["gamma=1.0"]
    assert all(a is not None for a in record["block_acc"])  # focal's head predicts at each depth
    listed = run("--plugin", plugin, "--list-losses")
    assert listed.returncode == 0 and "focal" in listed.stdout and "Lin, Goyal" in listed.stdout
    typo = run("--plugin", plugin, "--rule", "layerwise", "--rule-opt", "loss=focal",
               "--rule-opt", "loss_options=gama=1", "--dataset", "synthetic", "--check")
    assert typo.returncode == 2 and "unknown option 'gama' for loss 'focal'" in typo.stderr


def test_head_tutorial_composes_with_the_loss_under_sequential(tmp_path, run_main):
    run = run_main
    (tmp_path / "my_losses.py").write_text(tutorial_code("adding_a_loss.md", 0))
    (tmp_path / "my_heads.py").write_text(tutorial_code("adding_a_loss.md", 1))
    out = run("--plugin", tmp_path / "my_heads.py", "--plugin", tmp_path / "my_losses.py",
              "--rule", "sequential", "--rule-opt", "head=pool2_linear", "--rule-opt",
              "loss=focal", "--blocks", "2", "--epochs", "2", "--dataset", "synthetic",
              "--batch-size", "64", "--model", "resnet32_cifar", "--no-plane", "--no-progress",
              "--output", tmp_path / "runs")
    assert out.returncode == 0, out.stderr
    record = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    assert record["config"]["rule_options"]["head"] == "pool2_linear"
    assert record["params"]["auxiliary"] > 0 and len(record["history"]) == 2


def test_tutorial_rule_runs_through_the_cli(tmp_path, run_main):
    run = run_main
    plugin = tmp_path / "my_rules.py"
    plugin.write_text(tutorial_code())
    out = run("--plugin", plugin, "--rule", "random_features", "--rule-opt", "train_last=1",
              "--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--output",
              tmp_path / "runs", "--no-progress")
    assert out.returncode == 0, out.stderr
    record = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    assert record["rule"] == "random_features" and "Rahimi" in record["rule_paper"]
    assert record["config"]["rule_options"] == {"train_last": 1}
    assert record["history"][0]["trained_parts"] == ["trained"]
    assert record["config"]["plugins"] == [str(plugin)]
    assert record["config"]["optimizer"] == "adamw"  # the rule's declared default
    assert record["config_sources"]["optimizer"] == "rule random_features"
    assert record["config_sources"]["batch_size"] == "command line"


def test_plugin_as_a_module_and_in_list_rules(tmp_path, run_main, monkeypatch):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "rules.py").write_text(tutorial_code())
    monkeypatch.syspath_prepend(tmp_path)
    try:
        out = run_main("--plugin", "mypkg.rules", "--list-rules")
    finally:  # an importable name stays imported: drop it with the path
        for name in [n for n in sys.modules if n == "mypkg" or n.startswith("mypkg.")]:
            del sys.modules[name]
    assert out.returncode == 0, out.stderr
    assert "random_features" in out.stdout and "e2e" in out.stdout


def test_plugin_rules_register_in_process(tmp_path):
    from locallearn.plugins import load_plugin
    from locallearn.rules.base import RULES

    plugin = tmp_path / "inproc_rules.py"
    plugin.write_text(tutorial_code().replace('"random_features"', '"random_features_inproc"'))
    try:
        load_plugin(str(plugin))
        assert "random_features_inproc" in RULES
        load_plugin(str(plugin))  # loading it again is harmless
    finally:
        RULES.unregister("random_features_inproc")


BAD_PLUGINS = {
    "missing": (None, "plugin file '{path}' not found"),
    "raises": ("import math\nx = 1 / 0\n", "failed to import: ZeroDivisionError: division by zero"),
    "syntax": ("def broken(:\n", "failed to import: SyntaxError"),
    "clash": (
        "import locallearn\n\n@locallearn.register_rule('e2e', paper='x')\n"
        "class Clash(locallearn.Rule):\n    pass\n",
        "rule 'e2e' is already registered",
    ),
    "loss_clash": (
        "import locallearn\n\n@locallearn.register_loss('ce', summary='x')\n"
        "def ce():\n    return None\n",
        "loss 'ce' is already registered",
    ),
    "bad_role": (
        "import locallearn\n\n@locallearn.register_head('h', role='pooler', summary='x')\n"
        "def h(shape, out):\n    return None\n",
        "role must be one of classifier, decoder, similarity",
    ),
}


@pytest.mark.parametrize("case", BAD_PLUGINS)
def test_bad_plugins_fail_in_one_line_with_status_2(tmp_path, case, run_main):
    source, message = BAD_PLUGINS[case]
    path = tmp_path / f"{case}_rules.py"
    if source is not None:
        path.write_text(source)
    out = run_main("--plugin", path, "--dataset", "synthetic", "--output", tmp_path / "runs")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert message.format(path=path) in lines[0]
    assert not (tmp_path / "runs").exists()


def test_missing_plugin_module(tmp_path, run_main):
    out = run_main("--plugin", "no_such_module_xyz", "--output", tmp_path / "runs")
    assert out.returncode == 2
    assert "plugin module 'no_such_module_xyz' not found" in out.stderr


def test_the_auxiliary_head_tutorial_builds_its_parts_from_the_helpers(tmp_path):
    import timm

    from locallearn import create_rule, split
    from locallearn.plugins import load_plugin
    from locallearn.rules.base import RULES

    plugin = tmp_path / "my_sparse.py"
    plugin.write_text(tutorial_code(block=1))
    try:
        load_plugin(str(plugin))
        model = timm.create_model("resnet32_cifar", num_classes=10)
        stack = split(model, "block", input_size=(3, 16, 16))
        import torch

        parts = create_rule("sparse_heads", stride=4).parts(stack, 10, torch.zeros(2, 3, 16, 16))
        n = len(stack.blocks)  # 1 stem + 15 residual blocks: 4 parts of 4, then the head
        assert [p.block_ids for p in parts[:-1]] == [list(range(k, min(k + 4, n)))
                                                     for k in range(0, n, 4)]
        assert all(list(p.objective.heads) == ["aux"] for p in parts[:-1])
        assert parts[-1].part_name == "head" and list(parts[-1].objective.heads) == ["head"]
    finally:
        RULES.unregister("sparse_heads")
