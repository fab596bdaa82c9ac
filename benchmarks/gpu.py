"""Step time and CUDA memory of every rule under the speed options, against a hand-written loop.

Prints one markdown table per precision (``--precision``: fp32 and bf16 on
a GPU by default; fp32 alone on a CPU, where bf16 convolutions are slow;
fp16 needs a GPU). Rows: ``loop``, a hand-written PyTorch
loop (the plain timm model, cross-entropy and the same SGD, with the same
options: autocast dtype and, under fp16, a GradScaler; channels-last weights
and inputs; the optimizer's kernels; ``torch.compile`` of the whole model
under ``--compile``), then ``e2e`` and ``layerwise``, ``dgl``, ``infopro`` at
each K of ``--parts`` (``--blocks K``), and ``sequential`` at the largest K.
Columns, per option set: the median step in ms and its ratio to ``e2e``'s
under the same options; on CUDA also the step's memory in MiB and its ratio
to ``e2e``'s: ``torch.cuda.max_memory_allocated`` over one step (after the
timed ones) minus what was allocated just before it, so weights, optimizer
state and the other rows' trainers are left out (``cuda step`` of
``benchmarks/memory.py``). Elsewhere those columns show "—".

``sequential`` trains one part at a time: each phase's step runs the frozen
prefix without autograd (in eval mode) and trains the phase's part, as a
default run does (no ``cache_features``); its time is the mean over the K
phases of each phase's median, the mean step of a run whose phases are
equally long, and its memory the largest phase's. ``forward_forward`` is
left out: it needs the ``ff_mlp`` backbone and trains on stacked positive
and negative images, so it has no like-for-like ``e2e`` on these backbones.

Option sets (``--options``): ``plain``; ``channels_last``; ``fused`` (the
fused optimizer kernel); ``all`` = channels-last + fused (+ compile when
``--compile MODE`` is given); ``compile`` (needs ``--compile``). Compiling
is opt-in, as inductor's compiles take minutes; the warm-up steps absorb
them (``--compile-backend aot_eager`` traces without generating code).
Within a precision, the rows of every option set take one step in turn per
round, so drifts in machine load hit them alike; precisions run one after
another, since Accelerate keeps one mixed-precision setting per process.
After the tables come the ratios the speed and memory targets are stated in.

    python benchmarks/gpu.py                        # a GPU: resnet18_cifar, batch 256
    python benchmarks/gpu.py --compile default      # + torch.compile in `all`
    python benchmarks/gpu.py --batch-size 16 --repeats 3 --warmup 1
                                                    # a CPU: minutes (2 cores: 3 to 10)

Bad input (an unknown option set, precision or rule, fp16 without a GPU, a
non-positive number) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F

OPTION_SETS = {"plain": {}, "channels_last": {"channels_last": True},
               "fused": {"optimizer_impl": "fused"},
               "all": {"channels_last": True, "optimizer_impl": "fused"}, "compile": {}}
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
RULES = ("layerwise", "dgl", "infopro", "sequential")
MIB = 2 ** -20


class Row:
    """A row's phases, each an untimed setup and a timed step, their times, its trainer."""

    def __init__(self, label: str, phases: list[tuple[Callable[[], object], Callable[[], object]]],
                 trainer=None):
        self.label, self.phases, self.trainer = label, phases, trainer
        self.times: list[list[float]] = [[] for _ in phases]


def choices(kind: str, allowed) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated list of names from ``allowed``."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(bad) or repr(text)}; choices: {', '.join(allowed)}")
        return list(dict.fromkeys(names))
    return parse


def parse_args(argv: list[str] | None, cuda: bool):
    """The options, checked; bad input raises ConfigError."""
    from locallearn.config import parse_assignments
    from locallearn.errors import ConfigError, unknown_name
    from locallearn.settings import Parser, positive_int

    p = Parser(prog="gpu.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18_cifar")
    p.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword for timm.create_model, e.g. widths=(8,16,16); repeatable")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--image-size", type=positive_int, default=32)
    p.add_argument("--repeats", type=positive_int, default=20, help="timed rounds (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--precision", type=choices("precision", PRECISIONS),
                   help="default fp32,bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--options", type=choices("option set", OPTION_SETS),
                   default="plain,channels_last,fused,all")
    p.add_argument("--parts", type=choices("K", "2345678"), default="2,4", metavar="K,...",
                   help="K of the local rules (sequential: the largest)")
    p.add_argument("--rules", type=choices("rule", RULES), default=",".join(RULES),
                   help="local rules to time (loop and e2e always run)")
    p.add_argument("--compile", default="no",
                   choices=("no", "default", "reduce-overhead", "max-autotune"))
    p.add_argument("--compile-backend", default="inductor")
    args = p.parse_args(argv)
    import timm

    import locallearn.models  # noqa: F401 - registers the small-image backbones in timm

    if not timm.is_model(args.model):
        raise unknown_name("model", args.model, timm.list_models())
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be 0 or more; got {args.warmup}")
    args.precision = args.precision or (["fp32", "bf16"] if cuda else ["fp32"])
    if "fp16" in args.precision and not cuda:
        raise ConfigError("--precision fp16 needs a GPU (its gradient scaling is the GPU's); "
                          "on a CPU use fp32 or bf16")
    if "compile" in args.options and args.compile == "no":
        raise ConfigError("option set 'compile' needs --compile MODE")
    if args.compile != "no":
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if args.compile_backend not in backends:
            raise unknown_name("--compile-backend", args.compile_backend, backends)
    args.parts = sorted(int(k) for k in args.parts)
    args.model_opts = {}
    for key, value in parse_assignments(args.model_opt, "--model-opt").items():
        try:
            args.model_opts[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            args.model_opts[key] = value
    return args


def fresh_accelerator(mixed_precision: str, cuda: bool):
    """An Accelerator in ``mixed_precision``, Accelerate's one setting per process reset."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=not cuda, mixed_precision=mixed_precision)


def loop_row(args, config: dict, device, dtype, data) -> Row:
    """The hand-written loop on its own model, made from the same seed as e2e's, with the
    trainer's SGD settings and the same normalised images."""
    from locallearn.data import BatchTransform
    from locallearn.optim import IMPLS
    from locallearn.preflight import build_model
    from locallearn.trainer import TrainConfig

    torch.manual_seed(0)
    net = build_model(args.model, data.num_classes, args.model_opts, data.image_size)[0]
    layout = torch.channels_last if config.get("channels_last") else torch.preserve_format
    net = net.to(device, memory_format=layout).train()
    x = BatchTransform(data.mean, data.std, "none")(data.train_images.to(device))
    x, y = x.contiguous(memory_format=layout), data.train_labels.to(device)
    cfg = TrainConfig()
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay,
                          **IMPLS[config.get("optimizer_impl", "auto")])
    model = net if config.get("compile", "no") == "no" else torch.compile(
        net, mode=config["compile"], backend=config["compile_backend"])
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
    return Row("loop", [(lambda: None, step)])


def trainer_row(args, config: dict, acc, rule: str, k: int | None, data) -> Row:
    """A trainer's row: one phase per distinct set of trained parts in its schedule."""
    from locallearn.bench import trainer_for

    torch.manual_seed(0)  # a constant rate, as the loop's: no step runs at a rate of 0
    trainer = trainer_for(rule, args.model, data, args.batch_size, k, accelerator=acc,
                          model_options=args.model_opts, epochs=k or 1, schedule="constant",
                          **config)
    device = acc.device
    x, step = trainer.make_step(data.train_images.to(device), data.train_labels.to(device),
                                trainer.eval_transform)
    phases = []
    for trained in sorted({tuple(t) for t in trainer.schedule}):
        for i in trained:
            trainer.activate(i)

        def setup(first=trained[0]):  # frozen parts run in eval mode, as in training
            for i, part in enumerate(trainer.models):
                part.train(i >= first)
        phases.append((setup, lambda t=list(trained): trainer.train_step(x, step, t)))
    return Row(rule if k is None else f"{rule} K={k}", phases, trainer)


def build_rows(args, name: str, acc, data) -> list[Row]:
    """Every row of option set ``name`` under ``acc``'s precision."""
    config = dict(OPTION_SETS[name])
    if name in ("all", "compile") and args.compile != "no":
        config.update(compile=args.compile, compile_backend=args.compile_backend)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)
    rows = [loop_row(args, config, acc.device, dtype, data),
            trainer_row(args, config, acc, "e2e", None, data)]
    for rule in ("layerwise", "dgl", "infopro"):
        if rule in args.rules:
            rows += [trainer_row(args, config, acc, rule, k, data) for k in args.parts]
    if "sequential" in args.rules:
        rows.append(trainer_row(args, config, acc, "sequential", args.parts[-1], data))
    return rows


def time_rows(groups: dict[str, list[Row]], warmup: int, repeats: int, device) -> None:
    """Interleaved: each round, every phase of every row of every group takes one step."""
    from locallearn.bench import timed

    for i in range(warmup + repeats):
        for rows in groups.values():
            for row in rows:
                for times, (setup, step) in zip(row.times, row.phases, strict=True):
                    setup()
                    seconds = timed(step, device)
                    if i >= warmup:
                        times.append(seconds)


def step_seconds(row: Row) -> float:
    """The mean over the row's phases of each phase's median step."""
    return statistics.mean(statistics.median(t) for t in row.times)


def cuda_step_bytes(setup: Callable[[], object], step: Callable[[], object], device) -> int:
    """Peak CUDA allocation over one call of ``step``, counted from what was allocated before."""
    setup()
    step()  # as a step of training is: after others (optimizer state, cuDNN's choices)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure(rows: list[Row], device) -> dict[str, dict]:
    """Each row's step ms and, on CUDA, its largest phase's step MiB."""
    out = {}
    for row in rows:
        mib = None
        if device.type == "cuda":
            mib = max(cuda_step_bytes(s, f, device) for s, f in row.phases) * MIB
        out[row.label] = {"ms": step_seconds(row) * 1e3, "mib": mib}
    return out


def table(results: dict[str, dict[str, dict]]) -> list[str]:
    """A markdown table: a row per rule, four columns per option set, ratios to e2e's."""
    head, rule = ["row"], ["---"]
    for name in results:
        head += [f"{name} ms", "x e2e", f"{name} MiB", "x e2e"]
        rule += ["---:"] * 4
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for label in next(iter(results.values())):
        cells = [label]
        for rows in results.values():
            r, e2e = rows[label], rows["e2e"]
            cells += [f"{r['ms']:.2f}", f"{r['ms'] / e2e['ms']:.2f}"]
            if r["mib"] is None:
                cells += ["—", "—"]
            else:
                cells += [f"{r['mib']:.1f}", f"{r['mib'] / e2e['mib']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def headline(results: dict[str, dict[str, dict[str, dict]]], batch: int,
             parts: list[int]) -> list[str]:
    """The ratios the targets are stated in, from every (precision, option set)."""
    groups = [(p, o, rows) for p, by_set in results.items() for o, rows in by_set.items()]
    lines = []
    best = min(groups, key=lambda g: g[2]["e2e"]["ms"])
    base = results.get("fp32", {}).get("plain")
    if base is None:
        lines.append("e2e images/s, best option set / fp32 plain loop: needs fp32 and plain")
    else:
        fast, slow = batch / best[2]["e2e"]["ms"] * 1e3, batch / base["loop"]["ms"] * 1e3
        lines.append(f"e2e images/s, best option set ({best[0]} {best[1]}) / fp32 plain loop: "
                     f"{fast:.1f} / {slow:.1f} = {fast / slow:.3f}")
    lines.append("e2e trainer step / hand-written loop, same options: " + ", ".join(
        f"{p} {o} {rows['e2e']['ms'] / rows['loop']['ms']:.3f}" for p, o, rows in groups))
    k = parts[-1]
    wanted = [f"{r} K={k}" for r in ("layerwise", "dgl", "infopro")]
    for p, o, rows in groups:
        found = [w for w in wanted if w in rows]
        if found:
            lines.append(f"step / e2e, {p} {o}: " + ", ".join(
                f"{w} {rows[w]['ms'] / rows['e2e']['ms']:.3f}" for w in found))
    wanted = [f"layerwise K={k}"] + [f"infopro K={j}" for j in parts]
    for p, o, rows in groups:
        found = [w for w in wanted if w in rows and rows[w]["mib"] is not None]
        if found:
            lines.append(f"CUDA step memory / e2e, {p} {o}: " + ", ".join(
                f"{w} {rows[w]['mib'] / rows['e2e']['mib']:.3f}" for w in found))
    if not any(rows["e2e"]["mib"] is not None for _, _, rows in groups):
        lines.append("CUDA step memory / e2e (layerwise, infopro): needs a GPU")
    return lines


@contextmanager
def compiling(on: bool):
    """Room for every row's compiled parts, which share one code object (LocalPart.forward,
    past dynamo's default of 8 recompiles); dynamo's caches emptied after."""
    if not on:
        yield
        return
    import torch._dynamo

    try:
        with torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=4096):
            yield
    finally:
        torch._dynamo.reset()


def run(args, cuda: bool) -> list[str]:
    """Every precision in turn; the printed lines."""
    from locallearn.bench import random_data

    data = random_data(args.batch_size, args.image_size)
    results: dict[str, dict[str, dict[str, dict]]] = {}
    for precision in args.precision:
        acc = fresh_accelerator(PRECISIONS[precision], cuda)
        with compiling(args.compile != "no"):
            groups = {name: build_rows(args, name, acc, data) for name in args.options}
            time_rows(groups, args.warmup, args.repeats, acc.device)
            results[precision] = {name: measure(rows, acc.device)
                                  for name, rows in groups.items()}
        del groups
        if cuda:
            torch.cuda.empty_cache()
    device = acc.device
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    opts = " ".join(f"{k}={v!r}" for k, v in args.model_opts.items())
    lines = [f"{device.type} ({name}), torch {torch.__version__}, {args.model}"
             f"{' ' + opts if opts else ''}, batch {args.batch_size}, "
             f"{args.image_size}x{args.image_size}, {args.repeats} interleaved repeats after "
             f"{args.warmup} warm-up, {torch.get_num_threads()} threads, compile "
             f"{args.compile}" + (f" ({args.compile_backend})" if args.compile != "no" else "")]
    for precision, by_set in results.items():
        lines += ["", f"### {precision}", ""] + table(by_set)
    lines += ["", f"Headline ratios (K = {args.parts[-1]}):"]
    lines += ["- " + line for line in headline(results, args.batch_size, args.parts)]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2: bad input)."""
    from locallearn.errors import LocallearnError

    cuda = torch.cuda.is_available()
    try:
        args = parse_args(argv, cuda)
        lines = run(args, cuda)
    except LocallearnError as err:
        print(f"gpu.py: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
    finally:
        fresh_accelerator("no", cuda)  # leave the process as it was found
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
