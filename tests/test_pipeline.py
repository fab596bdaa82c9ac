"""The pipelined executor (``--parallel parts``) gives the serial run's weights.

Pipelining changes when a stage works, not what it computes: stage k's forward
of batch t uses its weights after t updates in both executors, on the same
batch, so every part's final parameters and buffers equal the serial run's. A
pipelined run saves a checkpoint per stage, and one resumed from it ends with the
same weights as the run that was never stopped.
"""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from pipeline_worker import FP16, REPLAY

WORKER = str(ROOT / "tests" / "pipeline_worker.py")
RUN_PY = ROOT / "benchmarks" / "run.py"
# Layer norm; batch norm (whose buffers must match too); InfoPro, whose decoder rebuilds
# the network input from the step context, which must cross the stages whole; forward-
# forward, whose prediction sums the goodness of every layer, on every stage; AugLocal,
# whose auxiliary heads copy the architectures of blocks on later stages; blockwise SSL,
# whose parts see two stacked views, each through the blocks on its own, and no label;
# sigprop, whose parts hand on the targets' rows beside the images' (more rows in evaluation
# than training); SoftHebb, label-free, whose step is a surrogate built in its forward.
MODELS = ("vit,cnn,cnn:infopro,mlp:forward_forward,cnn:auglocal,cnn:blockwise_ssl,mlp:sigprop,"
          "cnn:softhebb")
RESUMED = "cnn"  # checkpointed and resumed: batch norm's buffers, momentum, a cosine schedule


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script, args, processes, cwd):
    """``script args`` under torchrun on ``processes`` (plain Python on one), one thread each."""
    cmd = [sys.executable, str(script), *args]
    if processes > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def _run(mode, processes, out, *extra, models=MODELS):
    out.mkdir()
    done = _launch(WORKER, [mode, models, str(out), *extra], processes, ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(processes)]


@pytest.fixture(scope="module")
def serial():
    """The serial runs, in this process (one Python start less), on one thread as the
    stages are: the thread count can change a kernel's order of summation."""
    from accelerate import Accelerator
    from pipeline_worker import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {spec: train("serial", spec, Accelerator(cpu=True))
                for spec in MODELS.split(",")}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory):
    """``launch(stages, balance_by)``: the pipelined workers' results and output folder,
    each launch run once. The 2-stage one also checkpoints ``RESUMED``'s run and resumes
    it (one torchrun start less than a launch of its own)."""
    done = {}

    def launch(stages, balance_by):
        if (stages, balance_by) not in done:
            out = tmp_path_factory.mktemp(f"parts-{stages}") / "run"
            extra = [RESUMED] if stages == 2 else []
            models = f"{MODELS},{FP16}" if stages == 2 else MODELS
            done[stages, balance_by] = (
                _run(f"parts-{balance_by}", stages, out, *extra, models=models), out)
        return done[stages, balance_by]

    return launch


def _assert_same_entry(got, expected):
    """A plane entry equal to another: its numbers within 1e-6 (relative), its strings and
    integers exactly (``pytest.approx`` refuses a dict that holds strings)."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        else:
            assert got[key] == value, key


def _assert_serial_weights(stages, model, expected):
    """The stages' parts, together, are the serial run's, each on one stage, with its weights."""
    got = {}
    for rank in stages:
        assert rank[model]["parts"], "every stage holds at least one part"
        assert not set(got) & set(rank[model]["parts"]), "a part is on one stage only"
        got.update(rank[model]["parts"])
    assert sorted(got) == list(range(expected["num_parts"]))
    for i, weights in expected["parts"].items():
        # Same operations on the same inputs in the same order with one thread per
        # process, and the transport copies bits: equal to the bit is expected. The
        # tolerance (1e-6 relative, in float64 of float32 weights) only admits a
        # kernel that reduces in another order for a received (contiguous) tensor.
        torch.testing.assert_close(got[i], weights, rtol=1e-6, atol=1e-7)
        assert not torch.equal(weights, torch.zeros_like(weights))


@pytest.mark.parametrize("stages, balance_by", [(2, "time"), (3, "memory")])
def test_pipelined_stages_give_the_serial_weights(serial, pipelined, stages, balance_by):
    ranks, _ = pipelined(stages, balance_by)
    for model in MODELS.split(","):
        expected = serial[model]
        _assert_serial_weights(ranks, model, expected)
        # The record's numbers: accuracy at each depth, gathered from the stages.
        assert ranks[0][model]["block_acc"] == expected["block_acc"]
        assert ranks[0][model]["test_acc"] == expected["test_acc"]
        assert all(r[model]["block_acc"] == expected["block_acc"] for r in ranks)
        last, serial_last = ranks[0][model]["history"][-1], expected["history"][-1]
        assert last["part_loss"] == pytest.approx(serial_last["part_loss"], rel=1e-6)
        assert last["train_acc"] == serial_last["train_acc"]
        assert len(last["stages"]) == len(last["stage_wait_seconds"]) == stages
        # What each process holds: its parts' weights and optimizer state, all of them
        # once over the stages; the largest activation peak is the serial run's.
        assert sum(last["stage_state_bytes"]) == serial_last["state_bytes"]
        assert min(last["stage_state_bytes"]) > 0
        assert last["state_bytes"] == max(last["stage_state_bytes"])
        assert max(last["stage_saved_bytes"]) == last["saved_bytes_peak"] \
            == serial_last["saved_bytes_peak"]
        # The information plane, each stage measuring its own blocks on the probe that
        # flowed through the stages before it: the serial run's entries, kept (as in a
        # serial run) by the first process, which writes the record.
        plane, got = expected["plane"], ranks[0][model]["plane"]
        assert len(plane) == 3 * len(expected["block_acc"])  # epochs 0, 1, 2
        assert [(e["epoch"], e["block"]) for e in got] == [(e["epoch"], e["block"])
                                                           for e in plane]
        for got_entry, entry in zip(got, plane, strict=True):
            _assert_same_entry(got_entry, entry)
        assert all(r[model]["plane"] == [] for r in ranks[1:])


def test_a_pipelined_run_resumed_from_its_checkpoint_gives_the_same_weights(pipelined):
    from safetensors.torch import load_file

    ranks, out = pipelined(2, "time")
    for rank in ranks:
        run, resumed = rank[RESUMED]["parts"], rank[RESUMED]["resumed"]
        assert resumed["start_epoch"] == 1 and len(resumed["history"]) == 2
        assert sorted(resumed["parts"]) == sorted(run)
        for i, weights in run.items():
            # Zero tolerance: resuming restores bits (safetensors and torch.save copy them),
            # and epoch 2 then runs the same operations in the same order on one thread; any
            # difference is a piece of state (a buffer, a momentum, the schedule, the RNG)
            # that was not restored.
            assert torch.equal(resumed["parts"][i], weights), f"part {i}"
        # Each process refused the damaged copy, though only stage 1's file is damaged.
        assert "is damaged: its files cannot be loaded" in rank[RESUMED]["damaged"]
    history = ranks[0][RESUMED]["history"]
    names = history[0]["trained_parts"]
    for epoch in (1, 2):
        folder = out / f"ckpt-{RESUMED}" / f"epoch{epoch:04d}"
        meta = json.loads((folder / "meta.json").read_text())
        cut = meta["stages"]
        assert [[names[i] for i in stage] for stage in cut] == history[epoch - 1]["stages"]
        assert cut == ranks[0][RESUMED]["resumed"]["stages"]  # the resumed run's cut: saved
        assert sorted(p.name for p in folder.iterdir()) == [
            "meta.json", "stage0.pt", "stage0.safetensors", "stage1.pt", "stage1.safetensors"]
        for r, parts in enumerate(cut):  # each stage wrote its own parts, and only those
            held = {name.split(".")[0] for name in load_file(folder / f"stage{r}.safetensors")}
            assert held == {f"part{i}" for i in parts}
            state = torch.load(folder / f"stage{r}.pt", weights_only=True)
            # Optimizers of the parts that train on; none after the run's last epoch.
            assert sorted(state["optimizers"]) == (parts if epoch == 1 else [])


def test_fp16_stages_scale_each_part_and_give_the_serial_weights(pipelined):
    """fp16 (CPU autocast, through the Python API: run.py refuses fp16 without a GPU): each
    stage gives each of its parts its own gradient scaler, as the serial loop does, and the
    weights, losses and scales are the serial run's."""
    from pipeline_worker import FP16, fresh_accelerator, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = train("serial", "vit", fresh_accelerator("fp16"))
    finally:
        fresh_accelerator()
        torch.set_num_threads(threads)
    ranks, _ = pipelined(2, "time")
    got = {}
    for rank in ranks:
        got.update(rank[FP16]["parts"])
    assert sorted(got) == sorted(expected["parts"])
    for i, weights in expected["parts"].items():
        # As the fp32 comparison: the same operations in the same order; fp16 rounds alike.
        torch.testing.assert_close(got[i], weights, rtol=1e-6, atol=1e-7)
    last, serial_last = ranks[0][FP16]["history"][-1], expected["history"][-1]
    assert last["part_loss"] == pytest.approx(serial_last["part_loss"], rel=1e-6)
    assert ranks[0][FP16]["block_acc"] == expected["block_acc"]
    # Every part has a scaler of its own, on the stage that holds it, whose scale is the
    # serial run's part's.
    scales = [rank[FP16]["scales"] for rank in ranks]
    assert sorted(i for s in scales for i in s) == list(range(expected["num_parts"]))
    assert all(sorted(s) == rank[FP16]["mine"] for s, rank in zip(scales, ranks, strict=True))
    assert {i: v for s in scales for i, v in s.items()} == expected["scales"]


# Batch norm (its buffers: replica 0's, as DDP keeps process 0's), forward-forward (the
# last stage combines every part's logits, per replica) and fp16 (the replicas average
# scaled gradients, as DDP does).
REPLICATED = f"cnn,mlp:forward_forward,{FP16}"


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    """The serial loop's data parallelism (DDP) on 2 processes, and 2 stages x 2 replicas
    of the pipelined executor on 4, which also checkpoints ``RESUMED``'s run and resumes it."""
    root = tmp_path_factory.mktemp("replicas")
    serial = _run("serial", 2, root / "ddp", models=REPLICATED)
    pipelined = _run("parts-time/2", 4, root / "run", RESUMED, models=REPLICATED)
    return serial, pipelined, root / "run"


def test_stages_with_replicas_give_the_data_parallel_serial_weights(replicated, serial):
    one_process = serial
    serial, ranks, _ = replicated
    for model in REPLICATED.split(","):
        expected = serial[0][model]
        # Process r * 2 + s is stage s of replica r. The same operations on the same shards,
        # and gradients averaged as DDP averages them (each times 1/2, summed).
        for replica in (ranks[:2], ranks[2:]):
            _assert_serial_weights(replica, model, expected)
        assert ranks[0][model]["test_acc"] == expected["test_acc"]
        assert all(r[model]["block_acc"] == expected["block_acc"] for r in ranks)
        last, serial_last = ranks[0][model]["history"][-1], expected["history"][-1]
        assert last["part_loss"] == pytest.approx(serial_last["part_loss"], rel=1e-6)
        assert last["train_acc"] == serial_last["train_acc"]
        assert last["replicas"] == 2 and len(last["stages"]) == 2
        assert len(last["stage_wait_seconds"]) == 4  # per process
        # Replica 0's stages measure the plane, as the serial run's first process does.
        assert len(ranks[0][model]["plane"]) == len(expected["plane"]) > 0
        for got_entry, entry in zip(ranks[0][model]["plane"], expected["plane"], strict=True):
            _assert_same_entry(got_entry, entry)
    # The comparison tells replicas from none: 2 processes on half the batches each do not
    # train the one-process run's weights.
    alone = one_process["cnn"]["parts"][0]
    assert not torch.allclose(serial[0]["cnn"]["parts"][0], alone, rtol=1e-3)


def test_stages_with_replicas_resume_from_their_checkpoint(replicated):
    _, ranks, out = replicated
    for rank in ranks:
        run, resumed = rank[RESUMED]["parts"], rank[RESUMED]["resumed"]
        assert resumed["start_epoch"] == 1 and sorted(resumed["parts"]) == sorted(run)
        for i, weights in run.items():  # zero tolerance, as for one replica
            assert torch.equal(resumed["parts"][i], weights), f"part {i}"
        assert "is damaged: its files cannot be loaded" in rank[RESUMED]["damaged"]
    folder = out / f"ckpt-{RESUMED}" / "epoch0001"
    # Replica 0 of each stage writes its files, with both replicas' RNG states.
    assert sorted(p.name for p in folder.iterdir()) == [
        "meta.json", "stage0.pt", "stage0.safetensors", "stage1.pt", "stage1.safetensors"]
    assert json.loads((folder / "meta.json").read_text())["replicas"] == 2
    for stage in (0, 1):
        state = torch.load(folder / f"stage{stage}.pt", weights_only=True)
        assert len(state["replica_rng"]) == 2
        assert torch.equal(state["replica_rng"][0]["torch"], state["rng"]["torch"])


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    """Each scenario of asynchronous stages (pipeline_worker.REPLAY) on 3 stages."""
    return _run("replay", 3, tmp_path_factory.mktemp("replay") / "run", models="vit")


def _replay_of(ranks, scenario):
    """Each later stage's replay record of every epoch, by stage; the record's epochs."""
    history = ranks[0][scenario]["history"]
    by_stage = {}
    for entry in history:
        assert entry["replay"]["buffer"] == REPLAY[scenario][0]
        assert entry["replay"]["max_reuse"] == REPLAY[scenario][1]
        for stage in entry["replay"]["stages"]:
            by_stage.setdefault(stage["stage"], []).append(stage)
    assert sorted(by_stage) == [1, 2]  # every stage after the first, each epoch
    return by_stage, history


def test_starved_asynchronous_stages_drawing_once_give_the_serial_weights(replayed, serial):
    """With the first stage slowed down and each sample drawn at most once, every later stage
    waits for each batch and steps on it once, in order: the serial run's arithmetic."""
    by_stage, _ = _replay_of(replayed, "starved")
    _assert_serial_weights([{"vit": rank["starved"]} for rank in replayed], "vit",
                           serial["vit"])
    assert replayed[0]["starved"]["block_acc"] == serial["vit"]["block_acc"]
    for stages in by_stage.values():
        for epoch in stages:  # 64 images in batches of 16: 4 steps an epoch
            assert (epoch["steps"], epoch["received"], epoch["unused"]) == (4, 4, 0)
            assert epoch["draws_max"] == 1 and epoch["age_max"] == 0


def test_a_slow_asynchronous_stage_skips_batches_and_records_their_staleness(replayed,
                                                                              serial):
    by_stage, _ = _replay_of(replayed, "slow")
    for epoch in by_stage[2]:  # the last stage, slowed: it takes as many steps, on fewer
        assert epoch["steps"] == 4 and epoch["received"] == 4  # batches, some of them late
        assert epoch["unused"] >= 1 and epoch["age_max"] >= 1
    got = {i: w for r in replayed for i, w in r["slow"]["parts"].items()}
    last = max(got)
    assert not torch.allclose(got[last], serial["vit"]["parts"][last])


def test_fast_asynchronous_stages_reuse_samples(replayed):
    by_stage, history = _replay_of(replayed, "fast")
    for epoch in by_stage[1]:  # the first stage is slowed: the next draws what it has again
        assert epoch["steps"] == 4 and epoch["draws_max"] >= 2 and epoch["unused"] >= 1
    assert all(entry["part_loss"] and entry["test_acc"] is not None for entry in history)


def test_the_progress_bar_is_drawn_by_the_first_process_alone(replayed):
    """With stderr a terminal on every process, only process 0 draws its epochs' bars."""
    drawn = [rank["progress"] for rank in replayed]
    assert "epoch 1/2" in drawn[0] and "epoch 2/2" in drawn[0] and "0/4 [" in drawn[0]
    assert drawn[1:] == ["", ""]


def _meta(folder, **fields):
    """A checkpoint's meta.json alone, enough for :func:`checkpoint.read_meta`."""
    folder.mkdir()
    meta = {"format": 2, "run_id": "r", "epoch": 1, "identity": {}, "seconds": 1.0,
            "history": [{"epoch": 1}], "observers": []} | fields
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


PIPELINED = "'pipelined, {} stages x {} replicas'"


@pytest.mark.parametrize("saved, resuming, there, here", [
    ({"stages": [[0, 1], [2]]}, (0, 1), PIPELINED.format(2, 1), "'serial'"),
    ({"stages": [[0, 1], [2]]}, (3, 1), PIPELINED.format(2, 1), PIPELINED.format(3, 1)),
    ({}, (2, 1), "'serial'", PIPELINED.format(2, 1)),
    ({"stages": [[0, 1], [2]], "replicas": 2}, (2, 1), PIPELINED.format(2, 2),
     PIPELINED.format(2, 1)),
    ({"stages": [[0, 1], [2]]}, (2, 2), PIPELINED.format(2, 1), PIPELINED.format(2, 2)),
], ids=["pipelined by serial", "other process count", "serial by pipelined",
        "replicated by one replica", "one replica by replicated"])
def test_a_checkpoint_resumes_only_the_executor_that_saved_it(tmp_path, saved, resuming,
                                                               there, here):
    from locallearn.checkpoint import CheckpointError, read_meta

    folder = _meta(tmp_path / "epoch0001", **saved)
    message = f"is from another run: executor is {there} there, {here} here"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        read_meta(folder, {}, stages=resuming[0], replicas=resuming[1])
    assert read_meta(folder, {}, stages=len(saved.get("stages", [])),  # the same: accepted
                     replicas=saved.get("replicas", 1))["run_id"] == "r"


REFUSED = [  # (processes, arguments, what the one line says)
    (1, ["--rule", "layerwise", "--no-plane"], "start run.py with torchrun --nproc_per_node P"),
    (2, ["--rule", "sequential", "--no-plane"], "rule 'sequential' does not train all its parts"),
    (2, ["--rule", "forward_forward", "--rule-opt", "sequential=true", "--no-plane"],
     "rule 'forward_forward' does not train all its parts"),
    (2, ["--rule", "layerwise", "--no-plane", "--channels-last"], "--channels-last yet"),
    (2, ["--rule", "layerwise", "--no-plane", "--compile", "default"], "--compile yet"),
    (4, ["--rule", "layerwise", "--no-plane", "--stages", "3"],
     "--stages 3 does not divide the 4 processes into stages x replicas (at least 2 stages); "
     "valid: 2, 4"),
    (4, ["--rule", "layerwise", "--no-plane", "--stages", "1"], "--stages 1 does not divide"),
    (2, ["--rule", "layerwise", "--no-plane", "--stages", "4"], "valid: 2"),
    (1, ["--rule", "layerwise", "--no-plane", "--stages", "2"],
     "start run.py with torchrun --nproc_per_node P"),
    (2, ["--rule", "dgl", "--no-plane", "--max-reuse", "2"],
     "--max-reuse caps the draws of each sample from --replay-buffer; add --replay-buffer M"),
    (4, ["--rule", "dgl", "--no-plane", "--stages", "2", "--replay-buffer", "4"],
     "--replay-buffer lets each stage step at its own pace, and data-parallel replicas"),
]


@pytest.mark.parametrize("processes, args, message", REFUSED,
                         ids=[" ".join(a) for _, a, _ in REFUSED])
def test_what_cannot_be_pipelined_is_one_line_exit_2_and_nothing_written(
        tmp_path, capsys, monkeypatch, processes, args, message):
    from locallearn.cli import main

    # The checks read torchrun's WORLD_SIZE before any process group exists.
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    monkeypatch.chdir(tmp_path)
    status = main(["--dataset", "synthetic", "--parallel", "parts", *args,
                   "--output", str(tmp_path / "runs")])
    out = capsys.readouterr()
    assert status == 2 and out.out == "" and "Traceback" not in out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run.py: error: ")
    assert message in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", [["--stage-balance", "memory"], ["--stages", "2"],
                                  ["--replay-buffer", "4"], ["--max-reuse", "1"]])
def test_a_stage_option_without_stages_is_refused(tmp_path, capsys, flag):
    from locallearn.cli import main

    status = main(["--dataset", "synthetic", *flag, "--no-plane",
                   "--output", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and f"{flag[0]} sets the stages" in err[0]
    assert "add --parallel parts" in err[0]
    assert not (tmp_path / "runs").exists()


def test_a_rule_with_fewer_parts_than_stages_is_refused():
    from locallearn.errors import ConfigError
    from locallearn.pipeline import check_rule
    from locallearn.rules import create_rule

    with pytest.raises(ConfigError, match="rule 'e2e' has 1 part, fewer than the 2 stages"):
        check_rule(create_rule("e2e"), 1, 2, num_parts=1)
    check_rule(create_rule("layerwise"), 3, 2, num_parts=3)  # enough parts: accepted


@pytest.mark.parametrize("costs, stages, starts", [
    ([1, 1, 1, 1], 2, [0, 2]),
    ([5, 1, 1, 1], 2, [0, 1]),
    ([1, 1, 1, 5], 2, [0, 3]),
    ([3, 1, 1, 1, 3], 3, [0, 1, 4]),
    ([1, 2], 2, [0, 1]),
])
def test_stages_are_contiguous_nonempty_and_minimise_the_slowest(costs, stages, starts):
    from locallearn.pipeline import cut

    assert [stage[0] for stage in cut(costs, stages, "time")] == starts


def test_memory_stages_hold_their_weights_and_one_part_s_step_at_a_time():
    from locallearn.pipeline import cut

    # Parts a and b save 10 bytes for backward each, c holds 6 bytes of weights.
    resident, transient = [0, 0, 6], [10, 10, 1]
    # a and b never hold their activations at once: together they need 10 (c alone 7),
    # where a alone needs 10 and b with c 16.
    assert cut(list(zip(resident, transient, strict=True)), 2, "memory") == [[0, 1], [2]]
    # Summing every byte, as for time, would cut elsewhere: the wrong model of memory.
    assert cut([r + t for r, t in zip(resident, transient, strict=True)], 2, "time") == [
        [0], [1, 2]]
    # Weights add up on a stage: heavy weights go alone.
    assert cut([(1, 5), (1, 5), (20, 1), (1, 5)], 2, "memory") == [[0, 1], [2, 3]]
    assert cut([(1, 1)] * 3, 3, "memory") == [[0], [1], [2]]


def test_part_costs_leave_the_weights_as_they_were_and_count_the_optimizer():
    import timm

    from locallearn import TrainConfig, create_rule, split
    from locallearn.bench import random_data
    from locallearn.data import BatchTransform
    from locallearn.pipeline import part_costs

    data = random_data(8, 16)
    torch.manual_seed(0)
    net = timm.create_model("resnet32_cifar", num_classes=10)
    stack = split(net, "stage", 3, input_size=data.image_size)
    rule, transform = create_rule("layerwise"), BatchTransform(data.mean, data.std, "none")
    parts = rule.parts(stack, 10, transform(data.train_images[:2]))
    before = [{k: v.clone() for k, v in p.state_dict().items()} for p in parts]
    h, step = rule.make_step(data.train_images, data.train_labels, transform, 10, None, True)
    config = TrainConfig(momentum=0.9)
    costs = part_costs(parts, h, step, config, "memory")
    for part, kept in zip(parts, before, strict=True):
        assert all(torch.equal(v, kept[k]) for k, v in part.state_dict().items())
        assert all(p.grad is None for p in part.parameters())
    for part, (resident, transient) in zip(parts, costs, strict=True):
        weights = sum(p.numel() * p.element_size() for p in part.parameters())
        buffers = sum(b.numel() * b.element_size() for b in part.buffers())
        # SGD with momentum keeps one buffer per parameter; the step, its gradients.
        assert resident == 2 * weights + buffers
        assert transient > weights
    plain = part_costs(parts, h, step, TrainConfig(momentum=0.0), "memory")
    assert [r for r, _ in plain] == [r - sum(p.numel() * p.element_size()
                                             for p in part.parameters())
                                     for part, (r, _) in zip(parts, costs, strict=True)]
    assert [t for _, t in plain] == [t for _, t in costs]
    # Half the batch, scaled by 2: the activations of the whole batch, the same weights.
    h, step = rule.make_step(data.train_images[:4], data.train_labels[:4], transform, 10, None,
                             True)
    half = part_costs(parts, h, step, config, "memory", scale=2.0)
    assert [r for r, _ in half] == [r for r, _ in costs]
    # Within 1%, or a few hundred bytes: per-batch statistics (a loss, a mean) do not halve.
    assert [t for _, t in half] == pytest.approx([t for _, t in costs], rel=0.01, abs=256)
    unscaled = part_costs(parts, h, step, config, "memory")
    assert all(u < t for (_, u), (_, t) in zip(unscaled, half, strict=True))


def test_a_pipelined_run_writes_a_normal_record(tmp_path, capsys, monkeypatch):
    args = ["--rule", "layerwise", "--model", "resnet32_cifar", "--blocks", "2",
            "--dataset", "synthetic", "--train-subset", "64", "--test-subset", "40",
            "--epochs", "1", "--batch-size", "16", "--probe-size", "32", "--no-progress",
            "--output", str(tmp_path / "runs"), "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--probe", "linear", "--probe-images", "32", "--probe-epochs", "2"]
    done = _launch(RUN_PY, ["--parallel", "parts", *args, "--stage-balance", "memory"], 2,
                   tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (tmp_path / "runs").glob("*.json")  # one record, by the first process
    record = json.loads(path.read_text())
    assert record["status"] == "complete" and record["config"]["parallel"] == "parts"
    assert record["config"]["stage_balance"] == "memory"
    assert record["hardware"]["num_processes"] == 2
    names = [p["name"] for p in record["parts"]]
    assert len(names) == 3 and all(p["params"] > 0 for p in record["parts"])
    (entry,) = record["history"]
    # Both stages' parts are in the record: losses of every part, accuracy at every depth.
    assert sorted(entry["part_loss"]) == sorted(names)
    assert sum(entry["stages"], []) == names
    assert len(record["block_acc"]) == 2 and all(0 <= a <= 1 for a in record["block_acc"])
    assert record["test_acc"] == entry["test_acc"] and 0 <= record["test_acc"] <= 1
    assert done.stdout.count("accuracy at each depth") == 1  # the summary: first process only
    # The information plane, measured across the stages: epochs 0 and 1, every block.
    assert [(e["epoch"], e["block"]) for e in record["plane"]] == [(0, 0), (0, 1), (1, 0),
                                                                  (1, 1)]
    assert record["plane_config"]["m"] == 32 and len(record["plane_config"]["seconds"]) == 2
    # So are the linear probes: each stage trains its own blocks' on the probe set's output
    # the previous stage sent.
    assert [(e["epoch"], e["block"]) for e in record["probe"]] == [(0, 0), (0, 1), (1, 0),
                                                                  (1, 1)]
    assert entry["probe_acc"] == [e["acc"] for e in record["probe"][2:]]
    assert record["probe_config"]["test_images"] == 40
    # docs/records.md documents every field, and the pipelined ones are there
    from test_record_format import documented, undocumented

    assert undocumented(record, "record") == []
    assert {n for n, row in documented("history[]").items() if row["when"] == "parallel"} \
        <= entry.keys()
    # Each stage saved its own parts; the checkpoint resumes a pipelined run of 2 processes
    # only (refused before anything is built: one line, exit status 2).
    (folder,) = (tmp_path / "ckpt").glob("epoch*")
    assert sorted(p.name for p in folder.iterdir()) == [
        "meta.json", "stage0.pt", "stage0.safetensors", "stage1.pt", "stage1.safetensors"]
    from locallearn.cli import main

    before = sorted(tmp_path.rglob("*"))
    for processes, parallel, message in (
            (1, [], f"{PIPELINED.format(2, 1)} there, 'serial' here"),
            (3, ["--parallel", "parts"], f"there, {PIPELINED.format(3, 1)} here"),
            (4, ["--parallel", "parts", "--stages", "2"], f"there, {PIPELINED.format(2, 2)} here")):
        monkeypatch.setenv("WORLD_SIZE", str(processes))
        assert main([*args, *parallel, "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert sorted(tmp_path.rglob("*")) == before


def test_an_asynchronous_run_records_its_staleness(tmp_path):
    """``run.py --replay-buffer``: the record's name says so, and each epoch the staleness
    of every stage after the first, as docs/records.md documents it."""
    args = ["--parallel", "parts", "--rule", "dgl", "--model", "resnet32_cifar", "--blocks",
            "2", "--dataset", "synthetic", "--train-subset", "64", "--test-subset", "40",
            "--epochs", "2", "--batch-size", "16", "--no-plane", "--no-progress",
            "--replay-buffer", "2", "--max-reuse", "3", "--output", str(tmp_path / "runs")]
    done = _launch(RUN_PY, args, 2, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (tmp_path / "runs").glob("*.json")
    from locallearn.cli import parse_args
    from locallearn.outputs import identity_tags

    # The name tells this run from the same one in step (here a hash of the tags: long).
    tags = identity_tags(parse_args(args))
    assert tags[-2:] == ["replay-buffer-2", "max-reuse-3"]
    assert "__cfg-" in path.name
    record = json.loads(path.read_text())
    assert record["status"] == "complete"
    assert (record["config"]["replay_buffer"], record["config"]["max_reuse"]) == (2, 3)
    from test_record_format import documented, undocumented

    assert undocumented(record, "record") == []
    for entry in record["history"]:
        assert {n for n, row in documented("history[]").items()
                if row["when"] in ("parallel", "replay")} <= entry.keys()
        (stage,) = entry["replay"]["stages"]
        assert stage["stage"] == 1 and stage["steps"] == 4 and stage["received"] == 4
        assert 1 <= stage["draws_max"] <= 3 and stage["age_max"] >= 0
        # Every draw is of a received sample, and each step is one draw.
        assert round(stage["draws_mean"] * stage["received"]) == stage["steps"]
        assert 0 <= stage["unused"] < stage["received"]


def test_a_pipelined_run_that_diverges_stops_every_stage_and_says_so(tmp_path):
    """Every stage sees every part's mean loss at the epoch's end, so all stop together; the
    record says which part diverged, as a serial run's does."""
    done = _launch(RUN_PY, [
        "--parallel", "parts", "--rule", "layerwise", "--model", "resnet32_cifar", "--blocks",
        "2", "--dataset", "synthetic", "--train-subset", "32", "--test-subset", "16",
        "--epochs", "2", "--batch-size", "16", "--no-plane", "--no-progress", "--max-loss",
        "1e-9", "--output", str(tmp_path / "runs")], 2, tmp_path)
    assert done.returncode != 0  # torchrun reports its children's failure
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("run.py: error: ")]
    assert len(lines) == 2, done.stderr[-3000:]  # one line from each stage's process
    assert all("diverged" in ln and "above --max-loss 1e-09, by the end of epoch 1" in ln
               for ln in lines)
    assert "Traceback" not in "\n".join(lines)
    (path,) = (tmp_path / "runs").glob("*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "diverged" and record["history"] == []
    assert lines[0].endswith(record["error"])


class _Wire:
    """torch.distributed's point-to-point calls on one in-memory queue, for one process."""

    def __init__(self):
        self.queue, self.waited = [], 0

    def _work(self):
        wire = self

        class Work:
            def wait(self):
                wire.waited += 1

        return Work()

    def isend(self, tensor, dst):
        self.queue.append(tensor.clone())
        return self._work()

    def irecv(self, tensor, src):
        tensor.copy_(self.queue.pop(0))
        return self._work()

    def recv(self, tensor, src):
        tensor.copy_(self.queue.pop(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_output_and_its_step_context_cross_the_wire_whole(monkeypatch, dtype):
    from locallearn import transport
    from locallearn.step import Step

    wire = _Wire()
    for name in ("isend", "irecv", "recv"):
        monkeypatch.setattr(transport.dist, name, getattr(wire, name))
    h = torch.randn(4, 3, 2, 5).to(dtype).transpose(1, 2)  # not contiguous
    labels, x = torch.tensor([3, 1, 0, 2]), torch.randn(8, 3, 2, 2)
    mean, std = torch.rand(1, 3, 1, 1), torch.rand(1, 3, 1, 1)
    cpu = torch.device("cpu")
    sender = transport.Sender(1, cpu, in_flight=2)
    for step in (Step(labels, x, True, 2, 10, mean, std), Step(labels, x[:4], False, 1, 10)):
        sender.send(transport.BATCH, *transport.pack_step(h, step))
        kind, tensors, ints = transport.receive(0, cpu)
        got_h, got, carried, stamp = transport.unpack_step(tensors, ints)
        assert carried is None and stamp == 0
        assert kind == transport.BATCH and got_h.dtype == dtype and torch.equal(got_h, h)
        assert torch.equal(got.labels, step.labels)
        assert torch.equal(got.network_input, step.network_input)
        assert (got.train, got.views, got.num_classes) == (step.train, step.views,
                                                         step.num_classes)
        for a, b in ((got.mean, step.mean), (got.std, step.std)):
            assert (a is None and b is None) or torch.equal(a, b)
    sender.send(transport.END, [], [])
    assert transport.receive(0, cpu) == (transport.END, [], [])


def test_a_sender_waits_for_its_oldest_message_beyond_the_bound(monkeypatch):
    from locallearn import transport

    wire = _Wire()
    monkeypatch.setattr(transport.dist, "isend", wire.isend)
    sender = transport.Sender(1, torch.device("cpu"), in_flight=2)
    for _ in range(2):
        sender.send(transport.BATCH, [torch.ones(3)], [])
    assert len(sender.pending) == 2 and wire.waited == 0  # within the bound: no wait
    sender.send(transport.BATCH, [torch.ones(3)], [])
    assert len(sender.pending) == 2 and wire.waited == 2  # the oldest (header + tensor) done
    sender.flush()
    assert not sender.pending and wire.waited == 6
