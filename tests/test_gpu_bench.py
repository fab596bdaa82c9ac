"""benchmarks/gpu.py on a CPU: its table has every row and column, its ratios are the
numbers' own, compile works, bad input is one line; the CUDA columns from given numbers."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu", ROOT / "benchmarks" / "gpu.py")
gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu)

# A ResNet-18 layout one block per stage, 8 to 16 channels, on 8x8 images: seconds, not minutes.
TINY = ["--model", "resnet18_cifar", "--model-opt", "layers=(1,1,1,1)",
        "--model-opt", "channels=(8,8,16,16)", "--model-opt", "stem_width=8",
        "--batch-size", "4", "--image-size", "8", "--repeats", "1", "--warmup", "0"]
ROWS = ["loop", "e2e", "layerwise K=2", "layerwise K=4", "dgl K=2", "dgl K=4",
        "infopro K=2", "infopro K=4", "sequential K=4"]
SETS = ["plain", "channels_last", "fused", "all"]


def _table(out: str) -> tuple[list[str], dict[str, list[str]]]:
    """The header cells and each row's cells of the (one) markdown table in ``out``."""
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], {row[0]: row[1:] for row in cells[1:]}


def _half_unit(printed: str) -> float:
    """Half a unit in the last printed decimal: how far rounding moved the printed number."""
    decimals = len(printed.partition(".")[2])
    return 0.5 * 10.0 ** -decimals


def ratio_agrees(ratio: str, ms: str, e2e_ms: str) -> bool:
    """Whether the printed ``ratio`` can be ``ms / e2e_ms`` of the unrounded times: the
    times each lie within half a unit of their last decimal, so the true ratio lies
    between the extreme quotients, and the printed ratio within half a unit of it."""
    a, b = float(ms), float(e2e_ms)
    da, db = _half_unit(ms), _half_unit(e2e_ms)
    low, high = (a - da) / (b + db), (a + da) / max(b - db, 1e-12)
    return low - _half_unit(ratio) <= float(ratio) <= high + _half_unit(ratio)


def test_ratio_agrees_allows_the_rounding_of_the_printed_numbers_and_no_more():
    # 1.57 / 0.60 = 2.6167 prints 2.62, yet 2.62 must be allowed for 0.60 and 1.57 whose
    # unrounded values are 0.6049 and 1.5651 (2.587) up to 0.5951 and 1.5749 (2.646).
    assert ratio_agrees("2.62", "1.57", "0.60") and ratio_agrees("2.59", "1.57", "0.60")
    assert not ratio_agrees("2.58", "1.57", "0.60") and not ratio_agrees("2.66", "1.57", "0.60")
    assert ratio_agrees("1.00", "12.34", "12.34") and not ratio_agrees("1.01", "12.34", "12.34")


def test_cpu_table_has_every_row_and_column_and_its_own_ratios(capsys):
    assert gpu.main(TINY) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.startswith("cpu (CPU), torch " + torch.__version__)
    assert "resnet18_cifar" in header and "batch 4" in header and "1 interleaved" in header
    assert f"{torch.get_num_threads()} threads" in header
    assert "### fp32" in out and "### bf16" not in out  # a CPU's default: fp32 alone
    head, rows = _table(out)
    assert head == ["row"] + [c for s in SETS for c in (f"{s} ms", "x e2e", f"{s} MiB", "x e2e")]
    assert list(rows) == ROWS
    for label, cells in rows.items():
        assert len(cells) == 4 * len(SETS)
        for i in range(len(SETS)):
            ms, ratio, mib, mib_ratio = cells[4 * i: 4 * i + 4]
            assert float(ms) > 0
            assert ratio_agrees(ratio, ms, rows["e2e"][4 * i])
            assert (mib, mib_ratio) == ("—", "—")  # no CUDA memory on a CPU
            if label == "e2e":
                assert ratio == "1.00"
    best = re.search(r"e2e images/s, best option set \(fp32 (\w+)\) / fp32 plain loop: "
                     r"([\d.]+) / ([\d.]+) = ([\d.]+)", out)
    assert best and best.group(1) in SETS and float(best.group(4)) > 0
    mine = re.search(r"e2e trainer step / hand-written loop, same options: (.*)", out).group(1)
    assert [part.split()[:2] for part in mine.split(", ")] == [["fp32", s] for s in SETS]
    for s in SETS:
        assert re.search(rf"step / e2e, fp32 {s}: layerwise K=4 [\d.]+, dgl K=4 [\d.]+, "
                         rf"infopro K=4 [\d.]+", out)
    assert "CUDA step memory / e2e (layerwise, infopro): needs a GPU" in out


def test_compile_runs_the_loop_and_every_trained_part_compiled(capsys, monkeypatch):
    calls, real = [], torch.compile

    def counted(model, **kwargs):
        calls.append(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(torch, "compile", counted)
    argv = TINY + ["--options", "plain,all", "--rules", "layerwise", "--parts", "2",
                   "--compile", "default", "--compile-backend", "aot_eager"]
    assert gpu.main(argv) == 0
    out = capsys.readouterr().out
    assert "compile default (aot_eager)" in out.splitlines()[0]
    # Only `all` compiles: the loop's model, e2e's one part, layerwise's 2 blocks and head.
    assert calls == [{"mode": "default", "backend": "aot_eager"}] * 5
    head, rows = _table(out)
    assert list(rows) == ["loop", "e2e", "layerwise K=2"]
    assert all(float(rows[r][4]) > 0 for r in rows) and rows["e2e"][5] == "1.00"


@pytest.mark.parametrize("argv, words", [
    (["--options", "plain,turbo"], "unknown option set turbo; choices: plain"),
    (["--precision", "fp64"], "unknown precision fp64; choices: fp32, bf16, fp16"),
    (["--rules", "e2e"], "unknown rule e2e; choices: layerwise"),
    (["--parts", "1"], "unknown K 1; choices: 2"),
    (["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["--repeats", "-2"], "--repeats: must be a positive integer"),
    (["--warmup", "-1"], "--warmup must be 0 or more"),
    (["--options", "compile"], "option set 'compile' needs --compile MODE"),
    (["--compile", "default", "--compile-backend", "nope"], "unknown --compile-backend 'nope'"),
    (["--model", "resnet18_cifra"], "unknown model 'resnet18_cifra'; did you mean"),
    (TINY + ["--model-opt", "depth=3"], "rejected --model-opt"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, words):
    assert gpu.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("gpu.py: error: ") and captured.err.count("\n") == 1
    assert words in captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU takes fp16")
def test_fp16_without_a_gpu_is_refused(capsys):
    assert gpu.main(["--precision", "fp32,fp16"]) == 2
    assert "fp16 needs a GPU" in capsys.readouterr().err


def test_sequential_times_each_phase_with_the_frozen_prefix_in_eval_mode():
    from locallearn.bench import random_data

    args = gpu.parse_args(TINY, cuda=False)
    acc = gpu.fresh_accelerator("no", cuda=False)
    row = gpu.trainer_row(args, {}, acc, "sequential", 4, random_data(4, 8))
    assert row.label == "sequential K=4" and len(row.phases) == 4
    setup, _ = row.phases[2]
    setup()
    assert [m.training for m in row.trainer.models] == [False, False, True, True, True]
    row.times = [[3.0, 1.0, 2.0], [4.0], [6.0], [8.0]]
    assert gpu.step_seconds(row) == pytest.approx((2 + 4 + 6 + 8) / 4)


def test_cuda_columns_and_headline_memory_ratios_from_given_numbers():
    def rows(scale):
        made = {"loop": (9.9, 99), "e2e": (10, 100), "layerwise K=2": (11, 75),
                "layerwise K=4": (12.5, 53), "infopro K=2": (12, 75), "infopro K=4": (17, 53)}
        return {k: {"ms": ms * scale, "mib": mib * scale} for k, (ms, mib) in made.items()}

    results = {"fp32": {"plain": rows(1.0)}, "bf16": {"all": rows(0.5)}}
    head, rows = _table("\n".join(gpu.table(results["fp32"])))
    assert head == ["row", "plain ms", "x e2e", "plain MiB", "x e2e"]
    assert rows["e2e"] == ["10.00", "1.00", "100.0", "1.00"]
    assert rows["infopro K=4"] == ["17.00", "1.70", "53.0", "0.53"]
    lines = gpu.headline(results, 256, [2, 4])
    assert lines[0] == ("e2e images/s, best option set (bf16 all) / fp32 plain loop: "
                        "51200.0 / 25858.6 = 1.980")
    assert lines[1] == ("e2e trainer step / hand-written loop, same options: "
                        "fp32 plain 1.010, bf16 all 1.010")
    assert ("CUDA step memory / e2e, fp32 plain: layerwise K=4 0.530, infopro K=2 0.750, "
            "infopro K=4 0.530") in lines
    assert not any("needs a GPU" in line for line in lines)


def test_cuda_step_bytes_counts_the_second_step_from_what_was_allocated(monkeypatch):
    memory = {"now": 1000, "peak": 0}
    extra = [600, 300]  # the first step allocates more (optimizer state, workspaces)

    def step():
        memory["peak"] = max(memory["peak"], memory["now"] + extra.pop(0))

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: memory["now"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device: memory.update(peak=memory["now"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: memory["peak"])
    set_up = []
    assert gpu.cuda_step_bytes(lambda: set_up.append(1), step, "cuda") == 300
    assert set_up == [1] and not extra
