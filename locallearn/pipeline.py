"""The pipelined executor (``--parallel parts``): a rule's parts cut into contiguous
stages, one stage per process, or S stages of R data-parallel replicas (``--stages S``).

Stage 0 reads the data; every stage steps its parts on a batch as the serial loop
does, then sends the detached output and the step context to the next stage
(:mod:`locallearn.transport`) and goes on; in step the weights are the serial run's.
With ``--replay-buffer M`` the stages run asynchronously (through a
:class:`~locallearn.transport.ReplayBuffer`).
The stages are cut from each part's measured cost (:func:`cut`): by time a stage costs
the sum of its parts'; by memory, its parts' weights and optimizer state plus the
largest of their activations. How, why, and what is measured: docs/parallel.md.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any, Literal

import torch
import torch.distributed as dist
from accelerate.data_loader import prepare_data_loader
from torch import nn

from .errors import ConfigError
from .measure import SavedTensorMeter
from .optim import make_optimizer
from .rules.base import Rule
from .step import Step
from .trainer import Trainer, all_gathered, held_bytes
from .transport import BATCH, END, ReplayBuffer, Sender, fill, pack_step, receive, unpack_step

#: Messages a stage may have sent that its successor has not received yet.
IN_FLIGHT = 2


def replicas_of(processes: int, stages: int | None) -> int:
    """The data-parallel replicas of each stage when ``processes`` run ``stages`` stages
    (None: one stage per process); refused unless they make at least 2 stages."""
    if stages is None:
        return 1
    valid = [s for s in range(2, processes + 1) if processes % s == 0]
    if stages not in valid:
        raise ConfigError(f"--stages {stages} does not divide the {processes} process"
                          f"{'es' * (processes != 1)} into stages x replicas (at least 2 "
                          f"stages); valid: {', '.join(map(str, valid)) or 'none'}")
    return processes // stages


def check_rule(rule: Rule, epochs: int, stages: int, num_parts: int | None = None) -> None:
    """Refuse, in one line each, one process, a schedule that does not train every part in
    every epoch (sequential) and, once ``num_parts`` is known, fewer parts than stages."""
    if stages < 2:
        raise ConfigError("--parallel parts runs one stage per process: start run.py with "
                          "torchrun --nproc_per_node P (P >= 2); this is 1 process")
    if rule.not_pipelined:
        raise ConfigError(f"rule {rule.name!r} cannot run under --parallel parts: "
                          f"{rule.not_pipelined} (docs/parallel.md)")
    if getattr(rule.config, "man", 0):
        raise ConfigError(f"rule {rule.name!r} with man: each part's auxiliary net averages "
                          "the weights of the next part, which the next stage holds at every "
                          "stage boundary (docs/parallel.md); drop --rule-opt man or "
                          "--parallel parts")
    # Before the split, the schedule is asked about a nominal part count; a schedule
    # that refuses that count is asked again with the real one.
    n = num_parts if num_parts is not None else max(3, stages)
    try:
        whole = all(list(rule.trained_parts(e, epochs, n)) == list(range(n))
                    for e in range(epochs))
    except ConfigError:
        if num_parts is not None:
            raise
        whole = True
    if not whole:
        raise ConfigError(f"rule {rule.name!r} does not train all its parts at once (its "
                          "schedule trains some parts in some epochs), so its stages cannot "
                          "overlap; --parallel parts takes layerwise, dgl, infopro or a "
                          "rule whose parts all train in every epoch")
    if num_parts is not None and num_parts < stages:
        raise ConfigError(f"rule {rule.name!r} has {num_parts} part{'s' * (num_parts != 1)}, "
                          f"fewer than the {stages} stages; use fewer stages (--stages, or "
                          "fewer processes), or a rule with more parts (layerwise, dgl, "
                          "infopro; --blocks K)")


def check_args(args: argparse.Namespace, rule: Rule) -> None:
    """Refuse, before anything is built, what ``--parallel parts`` cannot run yet (the
    part count, known once the model is split, is checked by :class:`PipelineExecutor`)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    several = processes >= 2  # (one process is refused by check_rule, whatever --stages says)
    replicas = replicas_of(processes, args.stages) if several else 1
    check_rule(rule, args.epochs, (args.stages or processes) if several else 1)
    for flag, value in (("channels-last", args.channels_last), ("compile", args.compile)):
        if value not in (False, "no"):
            raise ConfigError(f"--parallel parts does not support --{flag} yet; drop it")
    check_replay(args.replay_buffer, args.max_reuse, replicas)


def check_replay(size: int | None, max_reuse: int | None, replicas: int) -> None:
    """Refuse a replay cap without a buffer, and a buffer with data-parallel replicas."""
    if max_reuse is not None and size is None:
        raise ConfigError("--max-reuse caps the draws of each sample from --replay-buffer; add "
                          "--replay-buffer M or drop it")
    if size is not None and replicas > 1:
        raise ConfigError("--replay-buffer lets each stage step at its own pace, and "
                          "data-parallel replicas average every step: drop --stages (one "
                          "stage per process) or --replay-buffer")


class PipelineExecutor:
    """Runs one stage of a rule's parts per process: ``Trainer(..., executor=PipelineExecutor())``,
    with the interface of :class:`~locallearn.trainer.SerialExecutor`.

    Args:
        balance_by: how a measured cut balances the stages: ``"time"`` or ``"memory"``.
        stages: the part indices of each stage instead of a measured cut (a resumed
            run's, from its checkpoint; the same on every process).
        num_stages: S; the P processes are S x R, R data-parallel replicas per stage
            (default: S = P, R = 1).
        replay_buffer: M, to run the stages asynchronously through a replay buffer;
            None: in step, the serial run's weights.
        max_reuse: K, the most draws of one sample from the replay buffer (None: no cap).
    """

    def __init__(self, balance_by: Literal["time", "memory"] = "time",
                 stages: list[list[int]] | None = None, num_stages: int | None = None,
                 replay_buffer: int | None = None, max_reuse: int | None = None):
        self.balance_by, self.given, self.num_stages = balance_by, stages, num_stages
        self.replay_size, self.max_reuse = replay_buffer, max_reuse
        self.waited = 0.0  # seconds this stage waited for messages, this epoch
        self.sent = 0  # batches sent in this pass (the replay buffer's stamp)

    def bind(self, trainer: Trainer) -> list[int]:
        """Cut the stages (measuring the parts, on the host, unless a cut is given), check
        what this executor cannot run, and return this stage's parts."""
        self.trainer, acc = trainer, trainer.accelerator
        self.rank = acc.process_index  # this process; its neighbours are rank - 1 and rank + 1
        processes = acc.num_processes
        self.replicas = replicas_of(processes, self.num_stages) if processes > 1 else 1
        self.stages_count = processes // self.replicas
        self.stage, self.replica = self.rank % self.stages_count, self.rank // self.stages_count
        self.writes = self.replica == 0  # the replicas of a stage hold replica 0's weights
        check_replay(self.replay_size, self.max_reuse, self.replicas)
        n = len(trainer.parts)
        check_rule(trainer.rule, trainer.config.epochs, self.stages_count, n)
        # A resumed run's cut is its checkpoint's, whose identity (stages x replicas) matched.
        stages = self.given or cut(measure_costs(trainer, self.balance_by),
                                   self.stages_count, self.balance_by)
        self.stage_parts = [list(s) for s in stages]
        self.mine = self.stage_parts[self.stage]
        self.first, self.last = self.stage == 0, self.stage == self.stages_count - 1
        self.replay = ReplayBuffer(self.replay_size, self.max_reuse) \
            if self.replay_size is not None and not self.first else None
        self.group = replica_group(self.stage, self.stages_count, self.replicas)
        # gloo sends from host memory, NCCL from the GPU.
        self.wire = acc.device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.sender = None if self.last else Sender(self.rank + 1, self.wire, IN_FLIGHT)
        self.plane_blocks = plane_blocks(trainer, self.stage_parts)
        if self.plane_blocks is None and any(o.probes_blocks for o in trainer.observers):
            raise ConfigError(f"rule {trainer.rule.name!r}: its parts do not hold every block "
                              "once, so the stages cannot measure the information plane; add "
                              "--no-plane")
        return self.mine

    @property
    def files(self) -> tuple[str, str]:
        """This stage's checkpoint files: its weights and its optimizer and RNG states."""
        return f"stage{self.stage}.safetensors", f"stage{self.stage}.pt"

    def saved_modules(self) -> list[tuple[str, nn.Module]]:
        return [(f"part{i}", self.trainer.parts[i]) for i in self.mine]

    def prepare(self, obj: Any) -> Any:
        return obj  # no DDP: the replicas average their gradients in reduce_grads

    def prepare_loaders(self, train: Any, test: Any) -> tuple[Any, Any]:
        """Replica r reads what process r of a serial run on R processes would."""
        if self.replicas == 1:
            return train, test
        return tuple(prepare_data_loader(
            loader, num_processes=self.replicas, process_index=self.replica,
            put_on_device=False, rng_types=None, even_batches=even)
            # Test batches are not padded to equal counts: no image is scored twice.
            for loader, even in ((train, True), (test, False)))

    def reduce_grads(self, i: int) -> None:
        """Part ``i``'s gradients averaged over this stage's replicas, as DDP averages them
        (each scaled by 1/R, then summed), in one message."""
        if self.group is None:
            return
        grads = [p.grad for p in self.trainer.parts[i].parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads]).mul_(1.0 / self.replicas)
        dist.all_reduce(flat, group=self.group)
        at = 0
        for g in grads:
            g.copy_(flat[at:at + g.numel()].view_as(g))
            at += g.numel()

    def end_epoch(self, trained: list[int]) -> None:
        """Replica 0's buffers (batch norm's running statistics) on every replica of this
        stage, as DDP gives its modules process 0's before they evaluate."""
        if self.group is None:
            return
        for i in self.mine:
            for buffer in self.trainer.parts[i].buffers():
                dist.broadcast(buffer, self.stage, group=self.group)  # replica 0's rank

    def probe_blocks(self) -> range:
        """This stage's blocks on replica 0 (the replicas' weights are replica 0's)."""
        return self.plane_blocks[self.stage] if self.replica == 0 else range(0)

    def run_probe(self, measure: Callable[[range, torch.Tensor | None], tuple[list, Any]]
                  ) -> list[dict[str, Any]]:
        """The information plane's entries of every block, gathered on every process in
        block order: each stage measures its own blocks (``measure(blocks, inputs)``) on the
        previous stage's whole probe output (stage 0: the images), then sends its own on."""
        blocks = self.probe_blocks()
        entries: list[dict[str, Any]] = []
        if len(blocks):
            inputs = None
            if blocks[0] > 0:
                _, (inputs,), _ = receive(self.rank - 1, self.wire)
                inputs = inputs.cpu()
            entries, out = measure(blocks, inputs)
            if not self.last and len(self.plane_blocks[self.stage + 1]):
                self.sender.send(BATCH, [out.to(self.wire)], [])
                self.sender.flush()
        gathered = all_gathered(entries, self.trainer.accelerator.num_processes)
        return sorted((e for stage in gathered for e in stage), key=lambda e: e["block"])

    def train_batches(self, trained: list[int], generator: torch.Generator
                      ) -> tuple[Iterator[tuple], int]:
        """An epoch's training batches: read, received, or drawn from the replay buffer."""
        t = self.trainer
        if self.replay is not None:
            return self._replayed(len(t.train_loader)), 0
        return self.batches(t.train_loader, t.train_transform, generator, True), 0

    def batches(self, loader, transform, generator, train: bool) -> Iterator[tuple]:
        """The (input, step, carried) triples this stage works on: read from the data on
        stage 0, received from the previous stage elsewhere, until the end of the pass.
        ``carried`` is the earlier stages' logits of the batch, stacked, where the rule
        combines them into its predictions (evaluation only; else None)."""
        device = self.trainer.accelerator.device
        if self.first:
            for images, y in loader:
                yield *self.trainer.make_step(images.to(device), y.to(device), transform,
                                              generator, train), None
            return
        while True:
            t0 = time.perf_counter()
            got = self._receive()
            self.waited += time.perf_counter() - t0
            if got is None:
                return
            yield got[:3]

    def _receive(self):
        """The previous stage's next message as ``(input, step, carried, stamp)``, on this
        stage's device; None at the end of its pass."""
        kind, tensors, ints = receive(self.rank - 1, self.wire)
        if kind == END:
            return None
        device = self.trainer.accelerator.device
        return unpack_step([t if t is None else t.to(device) for t in tensors], ints)

    def pass_on(self, h: torch.Tensor, step: Step, carried: torch.Tensor | None = None
                ) -> None:
        """Send the batch on, numbered in its pass (the replay buffer's stamp)."""
        if self.sender is not None:
            tensors, ints = pack_step(h.detach(), step, carried, self.sent)
            self.sender.send(BATCH, [t if t is None else t.to(self.wire) for t in tensors], ints)
        self.sent += 1

    def _replayed(self, steps: int):
        """``steps`` samples drawn from the replay buffer while a thread fills it (fewer only
        once the previous stage has ended and none can be drawn), then that thread's end."""
        buffer, device = self.replay, self.trainer.accelerator.device
        buffer.clear()

        def receive_one():  # on the receiving thread, whose current GPU is its own
            if device.type == "cuda":
                torch.cuda.set_device(device)
            got = self._receive()
            return None if got is None else ((got[0], got[1]), got[3])

        thread = fill(buffer, receive_one)
        for _ in range(steps):
            t0 = time.perf_counter()
            drawn = buffer.draw()
            self.waited += time.perf_counter() - t0
            if drawn is None:
                break
            h, step = drawn
            version = h._version  # shared by the detached input the parts see
            yield h, step, None
            if h._version != version:  # a second draw would see the changed tensor
                raise RuntimeError(f"rule {self.trainer.rule.name!r}: a part of stage "
                                   f"{self.stage} changed its input in place, which a replay "
                                   "buffer may hand out again; make that operation out of place")
        t0 = time.perf_counter()
        thread.join()  # the end of the previous stage's pass
        self.waited += time.perf_counter() - t0

    def begin_epoch(self) -> None:
        dist.barrier()  # every stage's clock starts together
        self.waited = 0.0
        if self.sender is not None:
            self.sender.waited = 0.0

    def end_pass(self) -> None:
        if self.sender is not None:
            self.sender.send(END, [], [])
            self.sender.flush()
        self.sent = 0

    def stats(self) -> dict[str, Any]:
        return {"waited": self.waited + (self.sender.waited if self.sender else 0.0),
                "replay": self.replay.summary() if self.replay is not None else None}

    def fields(self, stats: list[dict[str, Any]]) -> dict[str, Any]:
        """The pipelined entry's fields, from every process's statistics."""
        fields = {  # per process, by rank (docs/records.md)
            "stage_state_bytes": [s["state"] for s in stats],
            "stage_saved_bytes": [s["saved"] for s in stats],
            "stages": [[self.trainer.parts[i].part_name for i in s] for s in self.stage_parts],
            "replicas": self.replicas,
            "stage_wait_seconds": [round(s["waited"], 3) for s in stats],
        }
        if self.replay_size is not None:
            # Asynchronous stages: each later stage's steps and its samples' staleness.
            fields["replay"] = {"buffer": self.replay_size, "max_reuse": self.max_reuse,
                                "stages": [{"stage": s["stage"], "steps": s["steps"],
                                            **s["replay"]} for s in stats if s["replay"]]}
        return fields


def replica_group(stage: int, stages: int, replicas: int):
    """The process group of ``stage``'s replicas (None without replicas). Every process
    makes every stage's group, in the same order, as torch.distributed asks."""
    mine = None
    if replicas > 1:
        for s in range(stages):
            group = dist.new_group([r * stages + s for r in range(replicas)])
            mine = group if s == stage else mine
    return mine


def plane_blocks(trainer: Trainer, stage_parts: list[list[int]]) -> list[range] | None:
    """The blocks each stage measures on the information plane: its parts' blocks (a
    stage that holds only the model's head measures none); None unless the parts hold
    every block once, in order."""
    ranges = []
    for stage in stage_parts:
        owned = sorted(k for i in stage for k in trainer.parts[i].block_ids)
        ranges.append(range(owned[0], owned[-1] + 1) if owned else range(0))
    if sorted(k for r in ranges for k in r) != list(range(len(trainer.stack.blocks))):
        return None
    return ranges


def measure_costs(trainer: Trainer, balance_by: str) -> list[float] | list[tuple[int, int]]:
    """Each part's cost (:func:`part_costs`) on a training batch of up to 32 images,
    measured on process 0 and shared, so every process cuts the same stages; on the
    host, with the random state restored, so training starts as the serial run does."""
    t, costs = trainer, None
    if t.accelerator.process_index == 0:
        size = min(t.config.batch_size, 32, len(t.data.train_labels))
        images, labels = t.data.train_images[:size], t.data.train_labels[:size]
        with torch.random.fork_rng(devices=[]):
            h, step = t.rule.make_step(images, labels, t.eval_transform,
                                       t.data.num_classes, None, True)
            costs = part_costs(t.parts, h, step, t.config, balance_by,
                               scale=t.config.batch_size / size)
    shared = [costs]
    dist.broadcast_object_list(shared, 0)
    return shared[0]


def cut(costs: list[float] | list[tuple[int, int]], count: int, by: str) -> list[list[int]]:
    """The part indices of each of ``count`` contiguous, non-empty stages, so that the
    costliest stage is as cheap as possible (exact dynamic programme; on a tie, the
    earliest cut), from :func:`part_costs`'s ``costs``. By time (``by="time"``) a stage
    costs the sum of its parts'; by memory (``"memory"``) all its parts' resident bytes
    and the largest of their transient bytes, as it steps one part at a time."""
    n = len(costs)
    prefix = list(itertools.accumulate(costs, initial=0.0)) if by == "time" else []
    resident, transient = ([], []) if by == "time" else zip(*costs, strict=True)

    def cost(a: int, b: int) -> float:  # of a stage of parts a..b-1
        if by == "time":
            return prefix[b] - prefix[a]
        return sum(resident[a:b]) + max(transient[a:b])

    # best[s][i]: the least largest cost cutting the first i parts into s stages;
    # start[s][i]: where the last of them starts.
    best = [[math.inf] * (n + 1) for _ in range(count + 1)]
    start = [[0] * (n + 1) for _ in range(count + 1)]
    best[0][0] = 0.0
    for s in range(1, count + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                worst = max(best[s - 1][j], cost(j, i))
                if worst < best[s][i]:
                    best[s][i], start[s][i] = worst, j
    bounds = [n]
    for s in range(count, 0, -1):
        bounds.append(start[s][bounds[-1]])
    return [list(range(a, b)) for a, b in itertools.pairwise(bounds[::-1])]


def part_costs(parts: list[nn.Module], h: torch.Tensor, step, config, by: str,
               repeats: int = 3, scale: float = 1.0) -> list[float] | list[tuple[int, int]]:
    """Each part's cost on one batch, the parts run in order from the first one's input
    ``h``, in eval mode, weights left as they were and gradients dropped: ``by="time"``,
    the median seconds of ``repeats`` forwards and backwards; ``by="memory"``, (resident,
    transient) bytes: weights, buffers and optimizer state after one step (undone); peak
    bytes saved for backward times ``scale`` (the run's batch over this one: activations
    grow with the batch, weights do not) plus the gradients' bytes."""
    costs = []
    for part in parts:
        was = part.training
        part.eval()
        times, meter = [], None
        for _ in range(1 if by == "memory" else repeats):
            # The meter's hooks cost time: only where memory is measured.
            meter = SavedTensorMeter(part) if by == "memory" else None
            t0 = time.perf_counter()
            with meter or nullcontext():
                out, scored = part(h.detach(), step)
                if scored.loss.requires_grad:
                    scored.loss.backward()
            times.append(time.perf_counter() - t0)
        if meter is None:
            costs.append(sorted(times)[len(times) // 2])
        else:
            grads = [p.grad for p in part.parameters() if p.grad is not None]
            kept = {k: v.clone() for k, v in part.state_dict().items()}
            opts = []
            if grads:  # the optimizer fills its state in its first step, undone below
                opts = [make_optimizer(part.parameters(), config, getattr(part, "lr_scale", 1.0))]
                opts[0].step()
            costs.append((held_bytes([part], opts), round(meter.peak * scale)
                          + sum(g.untyped_storage().nbytes() for g in grads)))
            part.load_state_dict(kept)
        for p in part.parameters():
            p.grad = None
        part.train(was)
        h = out.detach()
    return costs

