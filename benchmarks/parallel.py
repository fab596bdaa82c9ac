"""Images/s of a local rule pipelined over P processes, against serial and against GPipe.

Four configurations train on the same random 32x32 images, interleaved over
``--repeats`` rounds (a, b, c, d, a, b, ...) so drifts in machine load hit
all alike; the median images/s of each is printed, and the median over rounds
of (a)'s images/s over each one's in the same round, with every round's ratio:

    (a) the local rule (layerwise by default) under ``--parallel parts``:
        P processes x 1 thread, one stage each;
    (b) the same rule serial: 1 process x 1 thread;
    (c) the same rule serial: 1 process x P threads (equal total cores);
    (d) e2e backprop pipelined by ``torch.distributed.pipelining`` (GPipe,
        ``--microbatches`` M) on the same P processes x 1 thread, the model cut
        where the rule's parts are cut;
    (e) with ``--replay-buffer M``: the rule's stages run asynchronously, each
        after the first drawing from the last M batches it received;
    (f) with ``--ceiling``: P copies of (b) at once, independent, their images/s
        summed: what P single-thread processes get from this machine when
        nothing passes between them, the most (a) can reach;
    (g) with ``--pin``: (a) with each process pinned to its own CPU.

Images/s is measured over the last of ``--epochs`` epochs (the first warms up),
for the pipelined executor from the first stage's start to the last stage's end.

    python benchmarks/parallel.py   # resnet18_cifar, layerwise in 2 parts cut after layer2.1

The cut after ``layer2.1`` splits resnet18_cifar's multiply-adds about evenly
(stem + layer1 + layer2 against layer3 + layer4); ``--blocks K`` instead cuts
by activation memory, which leaves the stages unequal in time.

Memory, per process: what (a)'s stages and (b) hold, counted from the tensors
(the same on any device): weights, buffers and optimizer state, plus the peak
bytes saved for backward; (a)'s largest stage over (b), against 1/P, and over
e2e backprop on one process (one step, which holds every block's activations).
On GPUs also ``torch.cuda.max_memory_allocated``, the largest stage's over (b)'s
and e2e's.

On P GPUs (``--device cuda``, one GPU per process): (a) on P GPUs, (b) on one,
and (d) on P under NCCL; (c), (f) and (g) are about CPU threads and are left
out. Target: (a) at least 0.8 P x (b), each GPU holding about 1/P of (b)'s.

    python benchmarks/parallel.py --device cuda --processes 2 --batch-size 256 --images 25600

Bad input (an unknown model or rule, fewer than 2 processes, fewer GPUs than
processes, a batch that does not split into the micro-batches) is one line on
stderr and exit status 2, before anything runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULT = "RESULT "


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stack(args, data):
    import timm

    from locallearn import split

    net = timm.create_model(args.model, num_classes=data.num_classes)
    if args.split_after:
        return split(net, "block", input_size=data.image_size,
                     split_after=args.split_after.split(","))
    return split(net, "stage", args.blocks, input_size=data.image_size)


def _local(args) -> dict:
    """(a), (b), (c), (e), (f), (g): the rule by the serial loop or the pipelined executor."""
    if args.pinned:  # before torch starts any thread: they inherit the mask
        os.sched_setaffinity(0, {int(os.environ.get("LOCAL_RANK", "0")) % os.cpu_count()})
    import torch
    from accelerate import Accelerator

    from locallearn import TrainConfig, Trainer, create_rule
    from locallearn.bench import random_data
    from locallearn.pipeline import PipelineExecutor

    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=args.device == "cpu")
    data = random_data(args.images, 32)
    data.test_images, data.test_labels = data.test_images[:2], data.test_labels[:2]
    torch.manual_seed(0)
    stack = _stack(args, data)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.01,
                         schedule="constant", progress=False)
    executor = PipelineExecutor(args.stage_balance, replay_buffer=args.replay_buffer) \
        if args.worker == "parts" else None
    trainer = Trainer(stack, create_rule(args.rule), data, config, accelerator,
                      executor=executor)
    result = trainer.fit()
    last = result["history"][-1]
    # What one process holds: the weights, buffers and optimizer state of its parts (its
    # stage's, pipelined) and its peak bytes saved for backward; the weights alone too.
    weights = sum(p.numel() * p.element_size() for i in trainer.owned
                  for p in trainer.parts[i].parameters())
    out = {"images_per_s": last["images_per_s"], "saved": [last["saved_bytes_peak"]],
           "state": [last["state_bytes"]],
           "cuda": last.get("cuda_max_memory"),
           "parts": [p.part_name for p in trainer.parts], "weights": weights}
    if args.worker == "parts":
        import torch.distributed as dist

        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, weights)
        out.update(stages=last["stages"], waited=last["stage_wait_seconds"],
                   seconds=last["seconds"], weights=max(everyone), replay=last.get("replay"),
                   saved=last["stage_saved_bytes"], state=last["stage_state_bytes"])
    accelerator.end_training()
    return out


def _gpipe(args) -> dict:
    """(d): e2e backprop, the model cut in P stages, GPipe over M micro-batches."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    from locallearn.bench import random_data
    from locallearn.data import BatchTransform

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = random_data(args.images, 32)
    torch.manual_seed(0)
    stack = _stack(args, data)
    if len(stack.blocks) < world:
        raise SystemExit(f"{len(stack.blocks)} blocks cannot fill {world} stages")
    # The same cut as the local rule: contiguous blocks per stage, the head with the last.
    per = [len(stack.blocks) // world + (i < len(stack.blocks) % world) for i in range(world)]
    first = sum(per[:rank])
    modules = list(stack.blocks[first:first + per[rank]])
    if rank == world - 1:
        modules.append(stack.head)
    module = nn.Sequential(*modules).to(device)
    stage = PipelineStage(module, rank, world, device)
    schedule = ScheduleGPipe(stage, args.microbatches, loss_fn=F.cross_entropy)
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    transform = BatchTransform(data.mean, data.std, "none")
    order = torch.Generator().manual_seed(0)
    seconds = images = 0.0
    for epoch in range(args.epochs):
        perm = torch.randperm(args.images, generator=order)
        dist.barrier()
        t0 = time.perf_counter()
        for k in range(0, args.images - args.batch_size + 1, args.batch_size):
            idx = perm[k:k + args.batch_size]
            x = transform(data.train_images[idx].to(device))
            y = data.train_labels[idx].to(device)
            if rank == 0:
                schedule.step(x)
            elif rank == world - 1:
                schedule.step(target=y)
            else:
                schedule.step()
            opt.step()
            opt.zero_grad(set_to_none=True)
            images += len(idx) if epoch == args.epochs - 1 else 0
        if cuda:
            torch.cuda.synchronize(device)
        last = torch.tensor(time.perf_counter() - t0, device=device)
        dist.all_reduce(last, dist.ReduceOp.MAX)  # as slow as its slowest stage
        seconds = last.item()
    dist.destroy_process_group()
    return {"images_per_s": round(images / seconds, 1)}


def _start(args, worker: str, processes: int, threads: int, extra: tuple = ()):
    script = [str(Path(__file__).resolve()), "--worker", worker, "--threads", str(threads),
              *extra]
    for key in ("model", "rule", "blocks", "split_after", "batch_size", "images", "epochs",
                "microbatches", "device", "stage_balance"):
        value = getattr(args, key)
        if value is not None:
            script += [f"--{key.replace('_', '-')}", str(value)]
    cmd = [sys.executable, *script]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *script]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env), f"{worker} on {processes} process(es)"


def _result(started) -> dict:
    proc, what = started
    stdout, stderr = proc.communicate()
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{what} failed:\n{stderr[-3000:]}")
    return json.loads(lines[0][len(RESULT):])


def _launch(args, worker: str, processes: int, threads: int, extra: tuple = ()) -> dict:
    if worker == "copies":  # (f): P serial processes x 1 thread at once, their images/s summed
        outs = [_result(s) for s in [_start(args, "serial", 1, 1) for _ in range(processes)]]
        return {**outs[0], "images_per_s": round(sum(o["images_per_s"] for o in outs), 1),
                "each": [o["images_per_s"] for o in outs]}
    return _result(_start(args, worker, processes, threads, extra))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked; bad input raises ConfigError (one line)."""
    import timm

    import locallearn.models  # noqa: F401 - registers the small-image backbones in timm
    from locallearn.errors import ConfigError, unknown_name
    from locallearn.pipeline import check_rule
    from locallearn.rules import create_rule
    from locallearn.settings import Parser, positive_int

    p = Parser(prog="parallel.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18_cifar")
    p.add_argument("--rule", default="layerwise")
    p.add_argument("--split-after", default="layer2.1",
                   help="cut the rule's parts after these blocks ('' to use --blocks)")
    p.add_argument("--blocks", type=positive_int, default=None,
                   help="K parts by activation memory")
    p.add_argument("--processes", type=positive_int, default=2,
                   help="P: stages, and threads of (c)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: one GPU per process")
    p.add_argument("--stage-balance", choices=("time", "memory"), default="time",
                   help="how (a) groups the parts into stages")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--images", type=positive_int, default=1024, help="images per epoch")
    p.add_argument("--epochs", type=positive_int, default=2, help="the last one is measured")
    p.add_argument("--microbatches", type=positive_int, default=4, help="M of (d)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--skip-gpipe", action="store_true", help="leave (d) out")
    p.add_argument("--replay-buffer", type=positive_int, default=None, metavar="M",
                   help="add (e): the stages asynchronous, with a replay buffer of M batches")
    p.add_argument("--ceiling", action="store_true",
                   help="add (f): P copies of (b) at once, what P processes get from this machine")
    p.add_argument("--pin", action="store_true",
                   help="add (g): (a) with each process pinned to one CPU")
    p.add_argument("--worker", choices=("parts", "serial", "gpipe"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--pinned", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)  # --split-after '' stays '': the workers get it too
    if args.worker is not None:
        return args
    if not timm.is_model(args.model):
        raise unknown_name("model", args.model, timm.list_models())
    if args.processes < 2:
        raise ConfigError(f"--processes {args.processes}: a pipeline needs 2 or more "
                          "processes, one stage each")
    check_rule(create_rule(args.rule), args.epochs, args.processes)  # known, and pipelined
    if args.images < args.batch_size:
        raise ConfigError(f"--images {args.images} is less than one batch of "
                          f"--batch-size {args.batch_size}")
    if not args.skip_gpipe and args.batch_size % args.microbatches:
        raise ConfigError(f"--batch-size {args.batch_size} does not split into "
                          f"--microbatches {args.microbatches} of (d); pick a divisor, or "
                          "--skip-gpipe")
    if args.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if gpus < args.processes:
            raise ConfigError(f"--device cuda needs {args.processes} GPUs, one per process; "
                              f"this machine has {gpus}")
        if args.ceiling or args.pin:
            raise ConfigError("--ceiling and --pin measure CPU processes; drop them with "
                              "--device cuda")
    return args


def _runs(args) -> dict[str, tuple]:
    """Each configuration's label and (worker, processes, threads per process, options)."""
    P, cpu = args.processes, args.device == "cpu"
    where = "1 thread" if cpu else "1 GPU"
    runs = {f"(a) {args.rule} pipelined, {P} processes x {where}": ("parts", P, 1, ()),
            f"(b) {args.rule} serial, 1 process x {where}": ("serial", 1, 1, ())}
    if cpu:
        runs[f"(c) {args.rule} serial, 1 process x {P} threads"] = ("serial", 1, P, ())
    if not args.skip_gpipe:
        runs[f"(d) e2e GPipe ({args.microbatches} micro-batches), {P} processes x {where}"] = (
            "gpipe", P, 1, ())
    if args.replay_buffer is not None:
        runs[f"(e) {args.rule} asynchronous (buffer {args.replay_buffer}), {P} x {where}"] = (
            "parts", P, 1, ("--replay-buffer", str(args.replay_buffer)))
    if args.ceiling:
        runs[f"(f) {P} copies of (b) at once, independent (images/s summed)"] = (
            "copies", P, 1, ())
    if args.pin:
        runs["(g) (a) with each process pinned to one CPU"] = ("parts", P, 1, ("--pinned",))
    return runs


def _memory(args, parts: dict, serial: dict, e2e: dict) -> list[str]:
    """What one process holds, (a)'s stages against (b) and against e2e on one process."""
    mib, P = 2**20, args.processes
    held = [s + a for s, a in zip(parts["state"], parts["saved"], strict=True)]
    alone = serial["state"][0] + serial["saved"][0]
    whole = e2e["state"][0] + e2e["saved"][0]
    lines = [
        f"per process, (a)'s largest stage against (b): parameters "
        f"{parts['weights'] / mib:.1f} / {serial['weights'] / mib:.1f} MiB = "
        f"{parts['weights'] / serial['weights']:.2f}; "
        f"peak saved for backward {max(parts['saved']) / mib:.1f} / "
        f"{serial['saved'][0] / mib:.1f} MiB = {max(parts['saved']) / serial['saved'][0]:.2f}",
        f"per process, weights + buffers + optimizer state + peak saved for backward "
        f"(--stage-balance {args.stage_balance}): (a)'s stages "
        f"{', '.join(f'{h / mib:.1f}' for h in held)} MiB, (b) {alone / mib:.1f} MiB; "
        f"largest / (b) = {max(held) / alone:.2f} (1/P = {1 / P:.2f})",
        f"per process, the same against e2e backprop serial on one process (one step of "
        f"batch {args.batch_size}): {whole / mib:.1f} MiB; (a)'s largest / e2e = "
        f"{max(held) / whole:.2f}"]
    if parts["cuda"] is not None and serial["cuda"] is not None:
        lines.append(f"per GPU, torch.cuda.max_memory_allocated: (a)'s largest stage "
                     f"{parts['cuda'] / mib:.0f} MiB, (b) {serial['cuda'] / mib:.0f} MiB, "
                     f"e2e {e2e['cuda'] / mib:.0f} MiB; (a) / (b) = "
                     f"{parts['cuda'] / serial['cuda']:.2f}, (a) / e2e = "
                     f"{parts['cuda'] / e2e['cuda']:.2f} (1/P = {1 / P:.2f})")
    return lines


def _where(args) -> str:
    if args.device == "cpu":
        return f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"
    import torch

    return f"{args.processes} x {torch.cuda.get_device_name(0)}"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2: bad input)."""
    from locallearn.errors import LocallearnError

    try:
        args = parse_args(argv)
    except LocallearnError as err:
        print(f"parallel.py: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
    if args.worker is not None:
        out = _gpipe(args) if args.worker == "gpipe" else _local(args)
        if os.environ.get("RANK", "0") == "0":
            print(RESULT + json.dumps(out), flush=True)
        return 0

    P, runs = args.processes, _runs(args)
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    info = {}
    for _ in range(args.repeats):
        for name, (worker, processes, threads, extra) in runs.items():
            out = _launch(args, worker, processes, threads, extra)
            speeds[name].append(out["images_per_s"])
            info.setdefault(worker + "".join(extra), out)
    medians = {name: statistics.median(v) for name, v in speeds.items()}
    first = next(iter(speeds.values()))
    print(f"{args.model}, {args.rule}, parts {info['serial']['parts']}, stages "
          f"{info['parts']['stages']}; batch {args.batch_size}, {args.images} images per epoch, "
          f"last of {args.epochs} epochs measured; median of {args.repeats} interleaved rounds; "
          f"{_where(args)}")
    # Each round's (a) against the same round's others: runs minutes apart share the
    # machine's state less than runs of one round, so the ratios are paired by round.
    for name, values in speeds.items():
        ratios = [a / v for a, v in zip(first, values, strict=True)]
        print(f"{name:60s} {medians[name]:8.1f} images/s   (a) / this: "
              f"{statistics.median(ratios):5.2f}x (rounds: "
              f"{', '.join(f'{r:.2f}' for r in ratios)})")
    parts, serial = info["parts"], info["serial"]
    print(f"(a), first round: each stage waited {parts['waited']} s of the measured "
          f"epoch's {parts['seconds']} s (fill and drain, imbalance, sends)")
    if args.replay_buffer is not None:
        replayed = info[f"parts--replay-buffer{args.replay_buffer}"]
        print(f"(e), first round: each stage waited {replayed['waited']} s of the measured "
              f"epoch's {replayed['seconds']} s; staleness of the later stages "
              f"{json.dumps(replayed['replay']['stages'])}")
    if args.ceiling:
        threaded, ceiling = (next(n for n in runs if n.startswith(k)) for k in ("(c)", "(f)"))
        ratios = [c / f for c, f in zip(speeds[threaded], speeds[ceiling], strict=True)]
        print(f"(f), first round: each copy's images/s {info['copies']['each']}; "
              f"(c) / (f), threads against independent processes: "
              f"{statistics.median(ratios):.2f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    if args.device == "cuda":
        ratio = medians[list(runs)[0]] / medians[list(runs)[1]]
        print(f"(a) / (b) on {P} GPUs: {ratio:.2f}x, against the target 0.8 P = {0.8 * P:.1f}x")
    # What backprop holds on one process: e2e, one epoch of one batch (deterministic).
    once = argparse.Namespace(**{**vars(args), "rule": "e2e", "images": args.batch_size,
                                 "epochs": 1})
    print("\n".join(_memory(args, parts, serial, _launch(once, "serial", 1, 1))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
