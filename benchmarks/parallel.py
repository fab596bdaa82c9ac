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
    from locallearn.pipeline import PipelineTrainer

    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=True)
    data = random_data(args.images, 32)
    data.test_images, data.test_labels = data.test_images[:2], data.test_labels[:2]
    torch.manual_seed(0)
    stack = _stack(args, data)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.01,
                         schedule="constant", progress=False)
    if args.worker == "parts":
        trainer = PipelineTrainer(stack, create_rule(args.rule), data, config, accelerator,
                                  replay_buffer=args.replay_buffer)
    else:
        trainer = Trainer(stack, create_rule(args.rule), data, config, accelerator)
    result = trainer.fit()
    last = result["history"][-1]
    # What one process holds: the parameters of its parts (its stage's, pipelined), and its
    # peak bytes saved for backward (the record's: the largest stage's, pipelined).
    held = trainer.mine if args.worker == "parts" else range(len(trainer.parts))
    weights = sum(p.numel() * p.element_size() for i in held
                  for p in trainer.parts[i].parameters())
    out = {"images_per_s": last["images_per_s"], "saved": last["saved_bytes_peak"],
           "parts": [p.part_name for p in trainer.parts], "weights": weights}
    if args.worker == "parts":
        import torch.distributed as dist

        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, weights)
        out.update(stages=trainer.stage_names(), waited=last["stage_wait_seconds"],
                   seconds=last["seconds"], weights=max(everyone), replay=last.get("replay"))
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
    dist.init_process_group("gloo")
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
    module = nn.Sequential(*modules)
    stage = PipelineStage(module, rank, world, torch.device("cpu"))
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
            x, y = transform(data.train_images[idx]), data.train_labels[idx]
            if rank == 0:
                schedule.step(x)
            elif rank == world - 1:
                schedule.step(target=y)
            else:
                schedule.step()
            opt.step()
            opt.zero_grad(set_to_none=True)
            images += len(idx) if epoch == args.epochs - 1 else 0
        last = torch.tensor(time.perf_counter() - t0)
        dist.all_reduce(last, dist.ReduceOp.MAX)  # as slow as its slowest stage
        seconds = last.item()
    dist.destroy_process_group()
    return {"images_per_s": round(images / seconds, 1)}


def _start(args, worker: str, processes: int, threads: int, extra: tuple = ()):
    script = [str(Path(__file__).resolve()), "--worker", worker, "--threads", str(threads),
              *extra]
    for key in ("model", "rule", "blocks", "split_after", "batch_size", "images", "epochs",
                "microbatches"):
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18_cifar")
    p.add_argument("--rule", default="layerwise")
    p.add_argument("--split-after", default="layer2.1",
                   help="cut the rule's parts after these blocks ('' to use --blocks)")
    p.add_argument("--blocks", type=int, default=None, help="K parts by activation memory")
    p.add_argument("--processes", type=int, default=2, help="P: stages, and threads of (c)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=1024, help="images per epoch")
    p.add_argument("--epochs", type=int, default=2, help="the last one is measured")
    p.add_argument("--microbatches", type=int, default=4, help="M of (d)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-gpipe", action="store_true", help="leave (d) out")
    p.add_argument("--replay-buffer", type=int, default=None, metavar="M",
                   help="add (e): the stages asynchronous, with a replay buffer of M batches")
    p.add_argument("--ceiling", action="store_true",
                   help="add (f): P copies of (b) at once, what P processes get from this machine")
    p.add_argument("--pin", action="store_true",
                   help="add (g): (a) with each process pinned to one CPU")
    p.add_argument("--worker", choices=("parts", "serial", "gpipe"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--pinned", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.split_after = args.split_after or None
    if args.worker is not None:
        out = _gpipe(args) if args.worker == "gpipe" else _local(args)
        if os.environ.get("RANK", "0") == "0":
            print(RESULT + json.dumps(out), flush=True)
        return

    P = args.processes
    threaded = f"(c) {args.rule} serial, 1 process x {P} threads"
    ceiling = f"(f) {P} copies of (b) at once, independent (images/s summed)"
    runs = {
        f"(a) {args.rule} pipelined, {P} processes x 1 thread": ("parts", P, 1, ()),
        f"(b) {args.rule} serial, 1 process x 1 thread": ("serial", 1, 1, ()),
        threaded: ("serial", 1, P, ()),
    }
    if not args.skip_gpipe:
        runs[f"(d) e2e GPipe ({args.microbatches} micro-batches), {P} processes x 1 thread"] = (
            "gpipe", P, 1, ())
    if args.replay_buffer is not None:
        runs[f"(e) {args.rule} asynchronous (buffer {args.replay_buffer}), {P} x 1 thread"] = (
            "parts", P, 1, ("--replay-buffer", str(args.replay_buffer)))
    if args.ceiling:
        runs[ceiling] = ("copies", P, 1, ())
    if args.pin:
        runs["(g) (a) with each process pinned to one CPU"] = ("parts", P, 1, ("--pinned",))
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
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
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
        ratios = [c / f for c, f in zip(speeds[threaded], speeds[ceiling], strict=True)]
        print(f"(f), first round: each copy's images/s {info['copies']['each']}; "
              f"(c) / (f), threads against independent processes: "
              f"{statistics.median(ratios):.2f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    mib = 2**20
    print(f"per process, (a)'s largest stage against (b): parameters "
          f"{parts['weights'] / mib:.1f} / {serial['weights'] / mib:.1f} MiB = "
          f"{parts['weights'] / serial['weights']:.2f}; "
          f"peak saved for backward {parts['saved'] / mib:.1f} / {serial['saved'] / mib:.1f} "
          f"MiB = {parts['saved'] / serial['saved']:.2f}")


if __name__ == "__main__":
    main()
