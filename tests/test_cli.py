"""The command users run: records, summaries and bad input, through the script (a subprocess)
or, where the process itself is not what is tested, its main in this process (run_main)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

RUN = [sys.executable, str(ROOT / "benchmarks" / "run.py")]


def run_cli(*args, launcher=RUN, timeout=600):
    return subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_synthetic_run_under_accelerate_launch_writes_a_record(tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(ROOT / "benchmarks" / "run.py")]
    out = run_cli("--rule", "layerwise", "--model", "resnet18_cifar", "--dataset", "synthetic",
                  "--epochs", "2", "--batch-size", "32", "--output", tmp_path, "--no-progress",
                  "--rule-opt", "aux_hidden=8", "--probe-size", "64", launcher=launch)
    assert out.returncode == 0, out.stderr
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    for key in ("rule", "model", "dataset", "config", "versions", "history", "test_acc",
                "block_acc", "status"):
        assert key in record
    assert record["status"] == "complete" and record["rule"] == "layerwise"
    assert record["config"]["rule_options"] == {"head": "reduced_linear", "aux_hidden": 8}
    assert record["versions"]["torch"] and record["versions"]["timm"]
    assert len(record["history"]) == 2
    assert all(a is not None for a in record["block_acc"])  # every block has an aux head
    assert record["params"]["auxiliary"] > 0
    assert "accuracy at each depth" in out.stdout and str(path.name) in out.stdout
    # The information plane: epochs 0 (before training), 1 and 2, every block.
    blocks = len(record["stack"]["blocks"])
    assert {(e["epoch"], e["block"]) for e in record["plane"]} == {
        (epoch, block) for epoch in (0, 1, 2) for block in range(blocks)
    }
    assert record["plane_config"]["m"] == 64


def test_main_job_on_the_cifar10_copy(tmp_path, cifar10_path, image_cache, capsys):
    # The README's main job on the CIFAR-10 copy, through run.py's main in this process
    # (the script under accelerate launch is tested above, on synthetic data).
    from locallearn.cli import main

    status = main(["--rule", "layerwise", "--model", "resnet18", "--dataset",
                   f"imagefolder:{cifar10_path}", "--train-subset", "2000", "--test-subset",
                   "1000", "--epochs", "1", "--batch-size", "32", "--output", str(tmp_path),
                   "--no-progress", "--cache-dir", str(image_cache)])
    assert status == 0, capsys.readouterr().err[-3000:]
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["dataset"].startswith("imagefolder:")
    # Chance is 0.1; on 1000 test images its standard error is about 0.01.
    assert record["test_acc"] > 0.14
    assert len(record["block_acc"]) == 5


BAD_INPUTS = [
    (["--rule", "layerwse"], "unknown rule 'layerwse'; did you mean layerwise"),
    (["--model", "resnet18_cifr"], "unknown model 'resnet18_cifr'; did you mean resnet18_c"),
    (["--dataset", "cifar1O"], "unknown dataset 'cifar1O'; did you mean cifar10"),
    (["--epochs", "0"], "--epochs: must be a positive integer"),
    (["--epochs", "-3"], "--epochs: must be a positive integer"),
    (["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["--lr", "fast"], "--lr: must be a number; got 'fast'"),
    (["--rule", "layerwise", "--rule-opt", "aux_hidden"], "malformed --rule-opt 'aux_hidden'"),
    (["--rule", "layerwise", "--rule-opt", "aux=3"], "unknown option 'aux' for rule 'layerwise'"),
    (["--rule", "layerwise", "--rule-opt", "aux_hidden=big"], "must be an integer; got 'big'"),
    (["--dataset", "imagefolder:/no/such/folder"], "/no/such/folder"),
    (["--optimizer", "adam"], "invalid choice: 'adam'"),
    (["--probe-size", "0"], "--probe-size: must be a positive integer"),
    (["--plugin", "/no/such/rules.py"], "plugin file '/no/such/rules.py' not found"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_no_record(tmp_path, capsys, args, message):
    from locallearn.cli import main  # in this process: the script's own exit is tested below

    status = main(["--dataset", "synthetic", *args, "--output", str(tmp_path / "runs")])
    out = capsys.readouterr()
    assert status == 2
    assert "Traceback" not in out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run.py: error: ")
    assert message in lines[0]
    assert not (tmp_path / "runs").exists()
    assert out.out == ""


def test_bad_input_through_the_script_exits_2_with_one_line(tmp_path):
    out = run_cli("--dataset", "synthetic", "--rule", "layerwse", "--output", tmp_path / "runs")
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "run.py: error: unknown rule 'layerwse'; did you mean layerwise?"]
    assert not (tmp_path / "runs").exists()


def test_missing_data_without_network_says_how_to_supply_it(tmp_path, run_main):
    out = run_main("--dataset", "cifar10", "--data-root", tmp_path / "none", "--output",
                   tmp_path / "runs")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "imagefolder:" in line
    assert not (tmp_path / "runs").exists()


def test_list_rules_names_every_rule(run_main):
    out = run_main("--list-rules")
    assert out.returncode == 0
    assert "e2e" in out.stdout and "layerwise" in out.stdout and "Sakamoto" in out.stdout
    # the summaries start in one column, after the longest name and two spaces
    lines = out.stdout.splitlines()
    width = max(len(line.split()[0]) for line in lines if not line.startswith(" "))
    assert all(line[width:width + 2] == "  " and line[width + 2] != " " for line in lines)


def test_divergence_writes_a_diverged_record_and_exits_non_zero(tmp_path, run_main):
    out = run_main("--rule", "layerwise", "--dataset", "synthetic", "--epochs", "2", "--lr",
                   "1e12", "--momentum", "0", "--batch-size", "32", "--no-plane", "--no-progress",
                   "--output", tmp_path)
    assert out.returncode == 3 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "rule 'layerwise' diverged: part" in line and "step" in line
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["status"] == "diverged" and record["test_acc"] is None
    assert record["error"] == line.removeprefix("run.py: error: ")


def test_a_loss_above_the_bound_counts_as_divergence(tmp_path, run_main):
    out = run_main("--rule", "e2e", "--dataset", "synthetic", "--epochs", "1", "--max-loss",
                   "0.5", "--batch-size", "32", "--no-plane", "--no-progress", "--output", tmp_path)
    assert out.returncode == 3
    (line,) = out.stderr.strip().splitlines()
    assert "part 'e2e' has a mean loss of" in line and "above --max-loss 0.5" in line
    assert json.loads(next(tmp_path.glob("*.json")).read_text())["status"] == "diverged"


def test_the_summary_names_the_final_heads_accuracy_and_the_best_depth():
    # Under layerwise the model's own head can sit below every auxiliary head (the
    # README's main job: 0.161 against 0.176-0.315): the line must not call it "test acc".
    from locallearn.cli import summary

    record = {"rule": "layerwise", "model": "resnet18", "dataset": "synthetic",
              "config": {"epochs": 1}, "test_acc": 0.161, "seconds": 38.0,
              "stack": {"blocks": ["stem", "layer1", "layer2", "layer3"]},
              "block_acc": [0.299, None, 0.315, 0.213]}
    header, row, depths = summary(record).splitlines()
    assert "final-head acc" in header and "best depth" in header and "test acc" not in header
    cells = row.split()
    assert cells[cells.index("0.1610") + 1:][:2] == ["layer2", "0.3150"]
    assert depths == "accuracy at each depth: stem 0.299 | layer2 0.315 | layer3 0.213"
