"""The leaderboard is rebuilt byte for byte from the same records, and keeps failed runs apart."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import shlex

import pytest
from conftest import ROOT

from locallearn import settings
from locallearn.cli import main, parse_args
from locallearn.config import parse_assignments
from locallearn.leaderboard import (
    build_tables,
    collect,
    command,
    depth_text,
    render_markdown,
    row_commands,
    write_all,
)
from locallearn.records import read_record, write_json
from locallearn.rules import create_rule

NAMES = ["stem", "layer1", "layer2"]
PLANE_CONFIG = {"m": 64, "split": "train", "kernel": "gaussian", "label_kernel": "gaussian",
                "sigma": 5.0, "eps": 1e-5}


def make_record(rule: str, seed: int, acc: float, status: str = "complete", model: str = "resnet18",
                blocks: int | None = None, saved: int = 3 * 2**20, epochs: int = 2,
                options: dict | None = None) -> dict:
    """A small but complete run record, every number a function of the arguments."""
    done = epochs if status == "complete" else 1
    heads = [acc - 0.1, acc - 0.05, acc] if rule != "e2e" else [None, None, acc]
    history = [{"epoch": e + 1, "seconds": 10.0 + e + seed, "images_per_s": 400.0 + 10 * seed,
                "saved_bytes_peak": saved - e, "test_acc": acc, "block_acc": heads}
               for e in range(done)]
    plane = [{"epoch": e, "block": b, "name": n, "nhsic_x": 1.0 + 0.1 * b + 0.01 * e + seed / 100,
              "nhsic_y": 0.5 + 0.05 * b + 0.02 * e, "nhsic_x_scaled": 0.1, "nhsic_y_scaled": 0.1,
              "cka_x": 0.1, "cka_y": 0.1}
             for e in range(done + 1) for b, n in enumerate(NAMES)]
    config = {"rule": rule, "model": model, "granularity": "stage", "blocks": blocks,
              "dataset": "imagefolder:/somewhere/cifar10", "train_subset": 1000,
              "test_subset": 500, "epochs": epochs, "lr": 0.05, "seed": seed,
              "output": "/tmp/x", "preset": "cpu-smoke",
              # all the rule's options, resolved, as runs record them
              "rule_options": create_rule(rule, **(options or {})).describe()}
    return {
        "version": 1, "status": status, "rule": rule, "model": model,
        "dataset": config["dataset"], "seed": seed, "config": config,
        "hardware": {"device": "cpu", "device_name": "x86_64", "num_processes": 1},
        "stack": {"blocks": NAMES, "granularity": "stage", "num_blocks": blocks},
        "params": {"backbone": 11_181_642, "auxiliary": 0 if rule == "e2e" else 5_130},
        "history": history, "test_acc": acc if status == "complete" else None,
        "block_acc": heads if status == "complete" else None,
        "memory": {"saved_bytes_peak": saved, "cuda_max_memory": None},
        "seconds_per_epoch": 10.5 + seed, "plane_config": PLANE_CONFIG, "plane": plane,
        **({"error": "rule 'layerwise' diverged: part 'stem' has a non-finite loss"}
           if status == "diverged" else {}),
    }


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    runs = [
        ("e2e", 0, 0.50, "complete", {}), ("e2e", 1, 0.60, "complete", {}),
        ("e2e", 2, 0.11, "diverged", {}),
        ("layerwise", 0, 0.40, "complete", {"saved": 2**20}),
        ("layerwise", 1, 0.44, "complete", {"saved": 2**20}),
        ("layerwise", 2, 0.99, "running", {}),
        ("dgl", 0, 0.30, "interrupted", {}),
        ("infopro", 0, 0.45, "complete", {"blocks": 2, "options": {"aux_loss": "contrast"}}),
        ("infopro", 0, 0.47, "complete", {"blocks": 4, "options": {"aux_loss": "ce"}}),
        ("forward_forward", 0, 0.30, "complete", {"model": "ff_mlp"}),
        ("e2e", 0, 0.35, "complete", {"model": "ff_mlp"}),
    ]
    for rule, seed, acc, status, kw in runs:
        record = make_record(rule, seed, acc, status, **kw)
        tag = f"-K{kw['blocks']}" if kw.get("blocks") else ""
        write_json(root / "cpu-smoke" / f"{rule}{tag}__{record['model']}__seed{seed}.json", record)
    (root / "cpu-smoke" / "truncated.json").write_text('{"rule": "e2e", "mod')
    return root


def test_same_records_give_byte_identical_files(results, tmp_path):
    first = write_all(results, tmp_path / "a", source="benchmarks/results")
    again = write_all(results, tmp_path / "a", source="benchmarks/results")
    other = write_all(results, tmp_path / "b", source="benchmarks/results")
    names = sorted(p.relative_to(tmp_path / "a").as_posix() for p in first)
    assert names == ["figures/leaderboard_imagefolder-cifar10_ff_mlp_2ep_1000.png",
                     "figures/leaderboard_imagefolder-cifar10_resnet18_2ep_1000.png",
                     "leaderboard.csv", "leaderboard.md"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in other]


def test_incomplete_and_diverged_runs_are_listed_apart_not_averaged(results, tmp_path):
    complete, apart = collect(results)
    assert len(complete) == 8
    assert {(a["status"], a["file"].split("__")[0]) for a in apart} == {
        ("diverged", "cpu-smoke/e2e"), ("running", "cpu-smoke/layerwise"),
        ("interrupted", "cpu-smoke/dgl"), ("unreadable", "cpu-smoke/truncated.json"),
    }
    (resnet,) = [t for t in build_tables(complete) if t.model == "resnet18"]
    rows = {row.label: row for row in resnet.rows}
    # e2e first; no dgl row at all (its only run was interrupted)
    assert list(rows) == ["e2e", "infopro K=2", "infopro K=4", "layerwise"]
    assert rows["e2e"].seeds == [0, 1] and rows["layerwise"].seeds == [0, 1]
    mean, std = rows["e2e"].acc()
    assert mean == pytest.approx(0.55) and std == pytest.approx(0.0707107, abs=1e-6)

    write_all(results, tmp_path / "docs", source="benchmarks/results", figures=False)
    text = (tmp_path / "docs" / "leaderboard.md").read_text()
    e2e_line = next(line for line in text.splitlines() if line.startswith("| e2e | 2 |"))
    assert "55.00 ± 7.07" in e2e_line
    apart_section = text.split("## Runs kept out of the means")[1]
    assert "| diverged | e2e |" in apart_section and "non-finite loss" in apart_section
    assert "| running | layerwise |" in apart_section and "1 of 2" in apart_section
    assert "truncated.json" in apart_section and "99.00" not in text


def test_table_columns_ratio_to_e2e_depths_and_plane(results, tmp_path):
    write_all(results, tmp_path / "docs", source="benchmarks/results", figures=False)
    text = (tmp_path / "docs" / "leaderboard.md").read_text()
    assert text.count("\n## imagefolder:cifar10 · ") == 2  # resnet18 and ff_mlp tables
    layerwise = next(line for line in text.splitlines() if line.startswith("| layerwise | 2 |"))
    cells = [c.strip() for c in layerwise.strip("|").split("|")]
    assert cells[2] == "42.00 ± 2.83"
    assert cells[3] == "-13.00"  # 42 % against the e2e row's 55 %
    assert cells[4] == "32.0 37.0 42.0"  # mean accuracy at each depth with a head
    assert cells[5] == "11.18M + 5.1k"
    assert cells[6] == "405" and cells[7] == "11.0"
    assert cells[8] == "1.0" and cells[9] == "0.33"  # 1 MiB saved vs e2e's 3 MiB
    assert cells[11] == "1.225" and cells[12] == "0.640"  # last block, epoch 2, mean of seeds
    assert cells[13] == "2 ep · sgd lr 0.05 · batch 128"  # batch: the flag's default
    assert "x86_64 (cpu) x1" in cells[14]
    infopro = next(line for line in text.splitlines() if line.startswith("| infopro K=2 |"))
    assert infopro.endswith("| aux_loss=contrast |")  # the option that tells the two apart
    assert layerwise.endswith("| — |")

    rows = list(csv.DictReader(io.StringIO((tmp_path / "docs" / "leaderboard.csv").read_text())))
    assert [(r["model"], r["rule"], r["seeds"]) for r in rows] == [
        ("ff_mlp", "e2e", "0"), ("ff_mlp", "forward_forward", "0"),
        ("resnet18", "e2e", "0 1"), ("resnet18", "infopro", "0"), ("resnet18", "infopro", "0"),
        ("resnet18", "layerwise", "0 1"),
    ]
    assert float(rows[5]["saved_ratio_e2e"]) == pytest.approx(1 / 3, abs=1e-6)
    assert json.loads(rows[3]["rule_options"])["aux_loss"] == "contrast"
    assert rows[5]["saved_bytes_peak"] == "1048576" and rows[5]["test_acc_std"] == "0.028284"
    assert rows[5]["delta_e2e"] == "-0.130000" and rows[2]["delta_e2e"] == ""  # e2e itself
    assert rows[1]["delta_e2e"] == "-0.050000"  # against its own table's e2e (ff_mlp, 35 %)
    assert (rows[5]["optimizer"], rows[5]["lr"], rows[5]["batch_size"]) == ("sgd", "0.05", "128")
    assert rows[5]["command_source"] == "reconstructed"
    assert rows[5]["command"].startswith("for seed in 0 1; do python benchmarks/run.py ")


def test_many_depths_are_sampled_evenly():
    assert depth_text([0.1, 0.2]) == "10.0 20.0"
    text = depth_text([i / 100 for i in range(55)])
    assert text.startswith("0.0 ") and text.endswith("54.0 (55 depths)")
    assert len(text.split()) == 8 + 2


def test_command_line(results, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("board", ROOT / "benchmarks" / "leaderboard.py")
    board = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(board)
    assert board.main(["--results", str(results), "--docs", str(tmp_path / "d"),
                       "--no-figures"]) == 0
    assert (tmp_path / "d" / "leaderboard.md").is_file()
    assert board.main(["--results", str(tmp_path / "none"), "--docs", str(tmp_path / "d")]) == 2
    assert "no folder" in capsys.readouterr().err


def test_parameter_counts_below_10k_show_in_thousands():
    from locallearn.leaderboard import _count

    assert _count(5130) == "5.1k" and _count(10_250) == "0.01M" and _count(2_500_000) == "2.50M"


def test_a_preset_is_named_for_the_rows_it_made():
    e2e, layerwise = make_record("e2e", 0, 0.5), make_record("layerwise", 0, 0.4)
    layerwise["config"]["preset"] = None
    text = render_markdown(build_tables([("a.json", e2e), ("b.json", layerwise)]), [], "x", {})
    assert "Presets: `cpu-smoke` made e2e; no preset: layerwise" in text
    text = render_markdown(build_tables([("a.json", e2e)]), [], "x", {})
    assert "Preset: `cpu-smoke` ([presets.md](presets.md))." in text


def test_runs_on_other_hardware_are_other_rows_and_old_records_read_new_flags_as_default():
    cpu = make_record("e2e", 0, 0.50)
    gpu = make_record("e2e", 1, 0.60)
    gpu["hardware"] = {"device": "cuda:0", "device_name": "NVIDIA H200", "num_processes": 1}
    old = make_record("e2e", 2, 0.40)  # from before --channels-last existed
    new = make_record("e2e", 3, 0.44)
    new["config"] |= {"channels_last": False, "compile": "no", "optimizer_impl": "auto"}
    (table,) = build_tables([("cpu", cpu), ("gpu", gpu), ("old", old), ("new", new)])
    rows = sorted(table.rows, key=lambda r: r.hardware())
    assert [r.hardware() for r in rows] == ["NVIDIA H200 (cuda:0) x1", "x86_64 (cpu) x1"]
    assert rows[0].seeds == [1] and rows[1].seeds == [0, 2, 3]
    assert all(r.options == "" for r in rows)  # the hardware column tells them apart


def shown_commands(text: str) -> list[list[str]]:
    """The run.py arguments of each command of a shown line, its seed loop unrolled."""
    loop = re.fullmatch(r"for seed in ([\d ]+); do (.*); done", text)
    runs = [text] if loop is None else [loop[2].replace("$seed", s) for s in loop[1].split()]
    out = []
    for run in runs:
        words = shlex.split(run)
        assert words[:2] == ["python", "benchmarks/run.py"]
        out.append(words[2:])
    return out


def same_as_recorded(argv: list[str], record: dict) -> None:
    """run.py's own parser reads ``argv`` back to ``record``'s config: every identity and
    setting flag the config holds, its rule options and model options."""
    args = parse_args(argv)
    config = json.loads(json.dumps(record["config"]))
    for flag in settings.FLAGS:
        if flag.recorded and flag.role in (settings.IDENTITY, settings.SETTING) \
                and flag.dest in config and getattr(args, flag.dest) is not None:
            assert json.loads(json.dumps(getattr(args, flag.dest))) == config[flag.dest], flag.dest
    assert args.seed == record["seed"]
    options = create_rule(args.rule, **parse_assignments(args.rule_opt)).describe()
    assert json.loads(json.dumps(options)) == config["rule_options"]
    assert parse_assignments(args.model_opt, "--model-opt") == {
        k: str(v) for k, v in config.get("model_options", {}).items()}


def test_each_row_shows_a_command_that_gives_its_config_again(results):
    complete, _ = collect(results)
    checked = 0
    for table in build_tables(complete):
        for row in table.rows:
            (shown, source), = row_commands(row)
            assert source == "reconstructed"  # these records predate argv
            runs = shown_commands(shown)
            assert len(runs) == len(row.records)  # one per seed, the seed varying
            for argv, record in zip(runs, row.records, strict=True):
                same_as_recorded(argv, record)
                checked += 1
    assert checked == 8


def test_a_preset_that_no_longer_fits_is_left_out_of_the_command():
    record = make_record("layerwise", 0, 0.4, options={"head": "linear"})
    record["config"]["preset"] = "no-such-preset"
    argv, source = command(record)
    assert source == "reconstructed" and "--preset" not in argv
    same_as_recorded(argv, record)
    record["config"]["rule_options"] = {"no_such_option": 1}  # cannot be given again
    assert command(record) == (None, "not recorded")
    text = render_markdown(build_tables([("a.json", record)]), [], "x", {})
    assert "- **layerwise**: not recorded" in text


def test_a_recorded_command_is_shown_without_where_it_wrote(tmp_path):
    argv = ["--dataset", "synthetic", "--model", "ff_mlp", "--model-opt", "img_size=16",
            "--epochs", "1", "--train-subset", "64", "--test-subset", "32", "--no-progress",
            "--no-plane", "--rule", "layerwise", "--rule-opt", "aux_hidden=8", "--seed", "3",
            "--output", str(tmp_path / "runs"), "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert main(argv) == 0
    (path,) = (tmp_path / "runs").glob("*.json")
    record = read_record(path)
    assert record["argv"] == argv
    shown, source = command(record)
    assert source == "recorded" and shown[-2:] == ["--seed", "3"]
    assert not {"--output", "--checkpoint-dir", "--no-progress"} & set(shown)
    same_as_recorded(shown, record)
    (row,) = build_tables([("a.json", record)])[0].rows
    assert row_commands(row) == [(shlex.join(["python", "benchmarks/run.py", *shown]),
                                  "recorded")]


def test_delta_is_blank_without_an_e2e_row():
    rows = [("a", make_record("layerwise", 0, 0.4)), ("b", make_record("dgl", 0, 0.3))]
    (table,) = build_tables(rows)
    assert [table.delta(r) for r in table.rows] == [None, None]
    line = next(x for x in render_markdown([table], [], "x", {}).splitlines()
                if x.startswith("| dgl |"))
    assert line.split("|")[4].strip() == ""
    e2e = make_record("e2e", 0, 0.5)
    (table,) = build_tables([*rows, ("c", e2e)])
    assert [round(100 * d, 6) if d is not None else d for d in map(table.delta, table.rows)] \
        == [None, -20.0, -10.0]


def test_a_label_free_rows_accuracy_is_marked_as_the_probes():
    free = make_record("blockwise_ssl", 0, 0.4)
    free["probe"] = [{"epoch": 2, "block": b, "name": n, "acc": a, "train_acc": a}
                     for b, (n, a) in enumerate(zip(NAMES, free["block_acc"], strict=True))]
    free["history"][-1]["probe_acc"] = list(free["block_acc"])
    probed_e2e = make_record("e2e", 0, 0.5)  # probes too, but its accuracy is its own head's
    probed_e2e["probe"] = free["probe"]
    probed_e2e["history"][-1]["probe_acc"] = list(free["block_acc"])
    (table,) = build_tables([("a", free), ("b", probed_e2e)])
    lines = render_markdown([table], [], "x", {}).splitlines()
    cells = {x.split("|")[1].strip(): x.split("|")[3].strip() for x in lines
             if x.startswith(("| blockwise_ssl |", "| e2e |"))}
    assert cells == {"blockwise_ssl": "40.00 (probe)", "e2e": "50.00"}


def test_two_presets_of_one_budget_compare_with_their_own_e2e():
    rows = []
    for preset, e2e_acc in (("local-cpu", 0.5), ("probes-cpu", 0.3)):
        for rule, acc in (("e2e", e2e_acc), ("dgl", 0.4)):
            record = make_record(rule, 0, acc)
            record["config"]["preset"] = preset
            record["config"]["lr"] = 0.05 if preset == "local-cpu" else 0.1  # other rows
            rows.append((f"{preset}-{rule}", record))
    (table,) = build_tables(rows)
    deltas = {(r.rule, r.preset): table.delta(r) for r in table.rows}
    assert deltas[("e2e", "local-cpu")] is None and deltas[("e2e", "probes-cpu")] is None
    assert round(100 * deltas[("dgl", "local-cpu")], 6) == -10.0
    assert round(100 * deltas[("dgl", "probes-cpu")], 6) == 10.0
