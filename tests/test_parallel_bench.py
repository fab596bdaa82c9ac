"""benchmarks/parallel.py: one tiny round prints every configuration's line and the
memory per process, its ratios the numbers' own; bad input is one line and exit 2."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("parallel", ROOT / "benchmarks" / "parallel.py")
parallel = importlib.util.module_from_spec(spec)
spec.loader.exec_module(parallel)

# resnet32_cifar in 2 parts by memory, 8 images of 32x32 in batches of 4: seconds per launch.
TINY = ["--model", "resnet32_cifar", "--split-after", "", "--blocks", "2", "--batch-size", "4",
        "--images", "8", "--epochs", "1", "--repeats", "1", "--skip-gpipe"]


@pytest.mark.parametrize("argv, words", [
    (["--processes", "1"], "--processes 1: a pipeline needs 2 or more processes"),
    (["--rule", "sequential"], "rule 'sequential' does not train all its parts at once"),
    (["--rule", "layerwize"], "unknown rule 'layerwize'; did you mean layerwise"),
    (["--model", "resnet18_cifra"], "unknown model 'resnet18_cifra'; did you mean"),
    (["--images", "8"], "--images 8 is less than one batch of --batch-size 64"),
    (["--batch-size", "10"], "--batch-size 10 does not split into --microbatches 4 of (d)"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--stage-balance", "flops"], "invalid choice: 'flops'"),
    (["--repeats", "0"], "--repeats: must be a positive integer"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, words):
    assert parallel.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("parallel.py: error: ") and captured.err.count("\n") == 1
    assert words in captured.err


def test_gpus_are_counted_before_anything_runs(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    assert parallel.main(["--device", "cuda"]) == 2
    assert "--device cuda needs 2 GPUs, one per process; this machine has 1" in \
        capsys.readouterr().err
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert parallel.main(["--device", "cuda", "--ceiling"]) == 2
    assert "--ceiling and --pin measure CPU processes" in capsys.readouterr().err


def test_one_round_prints_every_run_and_what_each_process_holds(capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                   "")]))
    assert parallel.main([*TINY, "--stage-balance", "memory"]) == 0
    out = capsys.readouterr().out
    # --blocks 2 reached the workers: the parts cut by memory, not the default cut.
    assert out.startswith("resnet32_cifar, layerwise, parts "
                          "['stem+layer1.0+layer1.1+layer1.2+layer1.3', 'layer1.4+")
    speeds = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in re.finditer(
        r"^\((\w)\) .*?\s([\d.]+) images/s   \(a\) / this:\s+([\d.]+)x", out, re.M)}
    assert list(speeds) == ["a", "b", "c"]  # no (d): --skip-gpipe
    assert speeds["a"][1] == 1.0 and all(v > 0 for v, _ in speeds.values())
    for run in "bc":  # one round: the ratio is the two speeds' own
        assert speeds[run][1] == pytest.approx(speeds["a"][0] / speeds[run][0], abs=0.006)
    held = re.search(r"\(--stage-balance memory\): \(a\)'s stages ([\d.]+), ([\d.]+) MiB, "
                     r"\(b\) ([\d.]+) MiB; largest / \(b\) = ([\d.]+) \(1/P = 0.50\)", out)
    assert held, out
    first, second, alone, ratio = map(float, held.groups())
    assert ratio == pytest.approx(max(first, second) / alone, abs=0.03)
    # Each stage holds some of the weights; the serial process holds all of them, and the
    # largest activation peak (the pipeline's is the serial run's largest part's).
    assert 0 < first < alone and 0 < second < alone
    e2e = re.search(r"against e2e backprop serial on one process \(one step of batch 4\): "
                    r"([\d.]+) MiB; \(a\)'s largest / e2e = ([\d.]+)", out)
    assert e2e, out
    # e2e holds every block's activations at once; layerwise one part's at a time.
    assert float(e2e.group(1)) > alone
    assert float(e2e.group(2)) == pytest.approx(max(first, second) / float(e2e.group(1)),
                                                abs=0.03)
    assert "per GPU" not in out  # no CUDA numbers on a CPU
