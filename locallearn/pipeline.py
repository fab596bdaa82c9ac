"""The pipelined executor: a rule's parts split into stages, one stage per process.

Once no gradient crosses a part boundary, part k can learn from batch t while
part k+1 learns from batch t-1 (Belilovsky et al., "Decoupled Greedy Learning
of CNNs", ICML 2020). With P processes (``torchrun --nproc_per_node P``) the
parts are grouped into S contiguous stages balanced by measured step time
(S = P by default; ``--stages S`` with P = S x R gives each stage R data-parallel
replicas); each process keeps only its stage's parts, objectives and optimizers.
Stage 0 reads the data; every stage runs its parts on a batch (forward, backward
and step per part, as the serial loop does), then sends the detached output and
the batch's step context to the next stage (:mod:`locallearn.transport`),
with a bounded number of messages in flight, and goes on to the next batch.

With replicas, process ``p`` is stage ``p % S`` of replica ``p // S``: replica r's
stages are consecutive processes (on one machine when S fits there, so that
activations take the short way) and form a pipeline of their own, reading
replica r's shard of every batch as process r of a serial data-parallel run
does (Accelerate's sharding). The replicas of a stage average their parts'
gradients before every step, as DDP does, and take replica 0's buffers (batch
norm's running statistics) before evaluating, as DDP gives its modules process
0's; the weights are then the serial data-parallel run's on R processes.

With ``--replay-buffer M`` the stages run asynchronously instead (DGL's variant,
:mod:`locallearn.replay`): each stage after the first steps on samples drawn from
the last M messages it received, as fast as it can; the results then depend on
timing, and each epoch records the samples' staleness.

In step (the default), pipelining changes timing, not arithmetic: stage k's
forward of batch t uses its weights after t updates, exactly as in the serial
loop, so the final weights are the serial run's. The executor is orthogonal to the rule
(DESIGN principle 10): it needs only that every part trains in every epoch
and that the prediction at a depth is that part's own.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from contextlib import nullcontext
from typing import Any, Literal

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from .data import BatchTransform, ImageData, dropped_images, make_loaders
from .errors import ConfigError
from .measure import SavedTensorMeter
from .observers import Observer
from .optim import lr_factor, make_optimizer, scaled_step
from .replay import ReplayBuffer, fill, wait_end
from .rules.base import LocalPart, Rule
from .stages import cut, held_bytes, part_costs
from .step import Step
from .trainer import Diverged, TrainConfig
from .transport import BATCH, END, STEP_INTS, STEP_TENSORS, Sender, pack_step, receive, unpack_step

#: Messages a stage may have sent that its successor has not received yet.
IN_FLIGHT = 2


def replicas_of(processes: int, stages: int | None) -> int:
    """The data-parallel replicas of each stage when ``processes`` run ``stages`` stages
    (None: one stage per process).

    Raises:
        ConfigError: ``stages`` does not divide ``processes`` into stages x replicas of at
            least 2 stages; the line names the valid stage counts.
    """
    if stages is None:
        return 1
    valid = [s for s in range(2, processes + 1) if processes % s == 0]
    if stages not in valid:
        raise ConfigError(f"--stages {stages} does not divide the {processes} process"
                          f"{'es' * (processes != 1)} into stages x replicas (at least 2 "
                          f"stages); valid: {', '.join(map(str, valid)) or 'none'}")
    return processes // stages


def check_rule(rule: Rule, epochs: int, stages: int, num_parts: int | None = None) -> None:
    """Refuse what the pipelined executor cannot run, in one line each.

    Args:
        rule: the rule.
        epochs: the run's epochs (the schedule is asked for each).
        stages: the number of stages (one per process unless they have replicas).
        num_parts: the rule's part count, once known.

    Raises:
        ConfigError: one process; a schedule that does not train every part in
            every epoch (sequential); fewer parts than stages (e2e).
    """
    if stages < 2:
        raise ConfigError("--parallel parts runs one stage per process: start run.py with "
                          "torchrun --nproc_per_node P (P >= 2); this is 1 process")
    # Before the split, the schedule is asked about a nominal part count; a schedule
    # that refuses that count is asked again with the real one.
    n = num_parts if num_parts is not None else max(3, stages)
    for epoch in range(epochs):
        try:
            trained = list(rule.trained_parts(epoch, epochs, n))
        except ConfigError:
            if num_parts is None:
                break
            raise
        if trained != list(range(n)):
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
    """Refuse, before anything is built, what ``--parallel parts`` cannot run yet.

    The part count is only known once the model is split; :class:`PipelineTrainer`
    checks it then, still before anything is written.
    """
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes >= 2:  # (one process is refused by check_rule, whatever --stages says)
        replicas_of(processes, args.stages)
    check_rule(rule, args.epochs, (args.stages or processes) if processes >= 2 else 1)
    for flag, value in (("channels-last", args.channels_last), ("compile", args.compile)):
        if value not in (False, "no"):
            raise ConfigError(f"--parallel parts does not support --{flag} yet; drop it")
    check_replay(args.replay_buffer, args.max_reuse,
                 replicas_of(processes, args.stages) if processes >= 2 else 1)


def check_replay(size: int | None, max_reuse: int | None, replicas: int) -> None:
    """Refuse a replay cap without a buffer, and a buffer with data-parallel replicas.

    Raises:
        ConfigError: one line each.
    """
    if max_reuse is not None and size is None:
        raise ConfigError("--max-reuse caps the draws of each sample from --replay-buffer; add "
                          "--replay-buffer M or drop it")
    if size is not None and replicas > 1:
        raise ConfigError("--replay-buffer lets each stage step at its own pace, and "
                          "data-parallel replicas average every step: drop --stages (one "
                          "stage per process) or --replay-buffer")


def check_cut(stages: list[list[int]], num_parts: int, count: int) -> None:
    """Refuse a given stage cut that is not ``count`` contiguous, non-empty groups of
    the ``num_parts`` parts, in order.

    Raises:
        ConfigError: naming the cut, the part count and the stage count.
    """
    ok = (len(stages) == count and all(stages)
          and [i for stage in stages for i in stage] == list(range(num_parts)))
    if not ok:
        raise ConfigError(f"stage cut {stages} does not split {num_parts} parts into "
                          f"{count} contiguous stages")


class PipelineTrainer:
    """Trains a BlockStack by a rule, one stage of its parts per process.

    Same arguments and results as :class:`~locallearn.trainer.Trainer`
    (``fit()`` returns the run record's results; ``history``, ``parts`` and
    ``stack`` are there for the record; ``start_epoch``, ``elapsed`` and
    ``fit_seconds()`` for a checkpoint and its resume). Every process builds the whole
    network on the host, so initial weights are the serial run's without
    sending any; then it keeps its stage's parts on its device and moves the
    others' tensors to the ``meta`` device (freed; shapes kept for the
    record's parameter counts).

    Args:
        stages: the part indices of each stage, to use instead of a measured cut: a
            resumed run's, from its checkpoint (a new measurement could cut otherwise).
            Every process must pass the same.
        num_stages: S, the number of stages; the P processes must be S x R, and each
            stage then has R data-parallel replicas (default: S = P, R = 1).
        replay_buffer: M, to run the stages asynchronously: each stage after the first
            steps on samples drawn from the last M messages it received
            (:mod:`locallearn.replay`); None: in step, the serial run's weights.
        max_reuse: K, the most draws of one sample from the replay buffer (None: no cap).
    """

    def __init__(self, stack: nn.Module, rule: Rule, data: ImageData, config: TrainConfig,
                 accelerator: Accelerator, observers: tuple[Observer, ...] = (),
                 balance_by: Literal["time", "memory"] = "time",
                 stages: list[list[int]] | None = None, num_stages: int | None = None,
                 replay_buffer: int | None = None, max_reuse: int | None = None):
        if balance_by not in ("time", "memory"):
            raise ConfigError(f"unknown stage balance {balance_by!r}; valid: time, memory")
        self.stack, self.rule, self.data, self.config = stack, rule, data, config
        self.balance_by = balance_by
        self.accelerator = acc = accelerator
        self.observers = observers
        self.rank = acc.process_index  # this process; its neighbours are rank - 1 and rank + 1
        self.replicas = replicas_of(acc.num_processes, num_stages) if acc.num_processes > 1 \
            else 1
        self.stages_count = acc.num_processes // self.replicas
        self.stage, self.replica = self.rank % self.stages_count, self.rank // self.stages_count
        check_replay(replay_buffer, max_reuse, self.replicas)
        self.replay_size, self.max_reuse = replay_buffer, max_reuse
        self.train_transform = BatchTransform(data.mean, data.std, data.augment)
        self.eval_transform = BatchTransform(data.mean, data.std, "none")
        example = self.eval_transform(data.train_images[:2])
        self.parts: list[LocalPart] = rule.parts(stack, data.num_classes, example)
        check_rule(rule, config.epochs, self.stages_count, len(self.parts))
        self.dropped_images = dropped_images(len(data.train_labels), config.batch_size)
        self._check_batches()
        if stages is None:
            self.costs = self._measure_costs()
            stages = cut(self.costs, self.stages_count, self.balance_by)
        else:
            self.costs = None  # not measured: the cut is given
            check_cut(stages, len(self.parts), self.stages_count)
        self.stages = [list(s) for s in stages]
        # Which parts train when, as the serial Trainer says it: all, in every epoch.
        self.schedule = [list(range(len(self.parts)))] * config.epochs
        self.mine = self.stages[self.stage]
        for i, part in enumerate(self.parts):
            part.to(acc.device if i in self.mine else "meta")
            part.recompute_blocks = config.recompute_blocks
        self.first, self.last = self.stage == 0, self.stage == self.stages_count - 1
        self.replay = ReplayBuffer(replay_buffer, max_reuse) \
            if replay_buffer is not None and not self.first else None
        self.group = self._replica_group()
        self.train_loader, self.test_loader = make_loaders(
            data, config.batch_size, config.seed, config.eval_batch_size or None)
        self._order = self.train_loader.generator  # reseeded every epoch, as the serial loop's
        if self.replicas > 1:  # replica r reads what process r of a serial run on R would
            self.train_loader, self.test_loader = (prepare_data_loader(
                loader, num_processes=self.replicas, process_index=self.replica,
                put_on_device=False, rng_types=None, even_batches=even)
                # Test batches are not padded to equal counts: no image is scored twice.
                for loader, even in ((self.train_loader, True), (self.test_loader, False)))
        steps = len(self.train_loader)
        self.optimizers: dict[int, torch.optim.Optimizer] = {}
        self.schedulers: dict[int, torch.optim.lr_scheduler.LRScheduler] = {}
        # fp16: a gradient scaler per part, as the serial loop has (trainer.Trainer).
        self.scalers: dict[int, torch.amp.GradScaler] = {}
        for i in self.mine:
            if any(p.requires_grad for p in self.parts[i].parameters()):
                opt = make_optimizer(self.parts[i].parameters(), config, self.parts[i].lr_scale)
                self.optimizers[i] = opt
                if self.fp16:
                    kwargs = acc.scaler_handler.to_kwargs() if acc.scaler_handler else {}
                    self.scalers[i] = torch.amp.GradScaler(acc.device.type, **kwargs)
                # Every part trains in every epoch: one schedule over the run (restarting
                # it per part's own epochs gives the same clock).
                self.schedulers[i] = torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda s: lr_factor(config, s, steps, config.epochs))
        # gloo sends from host memory, NCCL from the GPU.
        self.wire = acc.device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.sender = None if self.last else Sender(self.rank + 1, self.wire, IN_FLIGHT)
        self.plane_blocks = self._plane_blocks()
        if self.plane_blocks is None and any(hasattr(o, "measure_range") for o in observers):
            raise ConfigError(f"rule {rule.name!r}: its parts do not hold every block once, "
                              "so the stages cannot measure the information plane; add "
                              "--no-plane")
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.elapsed = 0.0  # seconds fit() ran before this process (a resumed run)
        self._fit_start: float | None = None
        self.waited = 0.0  # seconds this stage waited for messages, this epoch

    #: The information plane asks this trainer to run the probe through its stages.
    measures_plane_in_stages = True

    def _replica_group(self):
        """The process group of this stage's replicas (None without replicas). Every
        process makes every stage's group, in the same order, as torch.distributed asks."""
        mine = None
        if self.replicas > 1:
            for stage in range(self.stages_count):
                group = dist.new_group([r * self.stages_count + stage
                                        for r in range(self.replicas)])
                mine = group if stage == self.stage else mine
        return mine

    def _average_grads(self, i: int) -> None:
        """Part ``i``'s gradients averaged over this stage's replicas, as DDP averages them
        (each scaled by 1/R, then summed), in one message."""
        if self.group is None:
            return
        grads = [p.grad for p in self.parts[i].parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads]).mul_(1.0 / self.replicas)
        dist.all_reduce(flat, group=self.group)
        at = 0
        for g in grads:
            g.copy_(flat[at:at + g.numel()].view_as(g))
            at += g.numel()

    def _share_buffers(self) -> None:
        """Replica 0's buffers (batch norm's running statistics) on every replica of this
        stage, as DDP gives its modules process 0's before they evaluate: in training the
        replicas only update them, and only replica 0's are kept."""
        if self.group is None:
            return
        for i in self.mine:
            for buffer in self.parts[i].buffers():
                dist.broadcast(buffer, self.stage, group=self.group)  # replica 0's rank

    def _plane_blocks(self) -> list[range] | None:
        """The blocks each stage measures on the information plane: its parts' blocks (a
        stage that holds only the model's head measures none); None unless the parts
        hold every block once, in order."""
        ranges = []
        for stage in self.stages:
            owned = sorted(k for i in stage for k in self.parts[i].block_ids)
            ranges.append(range(owned[0], owned[-1] + 1) if owned else range(0))
        if sorted(k for r in ranges for k in r) != list(range(len(self.stack.blocks))):
            return None
        return ranges

    def measure_plane(self, plane, epoch: int) -> list[dict[str, Any]]:
        """The information plane's entries of every block, measured across the stages.

        Each stage runs the probe set through its own blocks
        (:meth:`~locallearn.analysis.plane.InformationPlane.measure_range`): stage 0 from
        the images, a later stage from the previous stage's output, which it receives
        whole (``m`` samples, float32) and, once measured, sends on. The entries are
        gathered on every process, in block order: the serial run's numbers (the plane
        keeps them on the first process, as in a serial run).
        """
        blocks = self.plane_blocks[self.stage]
        entries: list[dict[str, Any]] = []
        if len(blocks) and self.replica == 0:  # the replicas' weights are replica 0's
            inputs = None
            if blocks[0] > 0:
                _, (inputs,), _ = receive(self.rank - 1, self.wire)
                inputs = inputs.cpu()
            entries, out = plane.measure_range(self.stack, epoch, blocks, inputs)
            if not self.last and len(self.plane_blocks[self.stage + 1]):
                self.sender.send(BATCH, [out.to(self.wire)], [])
                self.sender.flush()
        gathered: list[Any] = [None] * self.accelerator.num_processes
        dist.all_gather_object(gathered, entries)
        return sorted((e for stage in gathered for e in stage), key=lambda e: e["block"])

    @property
    def combines(self) -> bool:
        """Whether the rule combines every part's logits into its predictions (forward-
        forward sums goodness over layers): then each stage passes the logits of the parts
        before it on with the batch, and the last stage combines them all."""
        return type(self.rule).predictions is not Rule.predictions

    def _logits_of(self, i: int, z: torch.Tensor | None) -> torch.Tensor:
        if z is None:
            raise RuntimeError(f"rule {self.rule.name!r} combines every part's logits, but "
                               f"part {self.parts[i].part_name!r} gives none")
        return z

    def fit_seconds(self) -> float:
        """Seconds of fitting so far, earlier processes of a resumed run included."""
        now = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        return self.elapsed + now

    def _check_batches(self) -> None:
        """Refuse what the serial loop refuses: no training batch, or batches of one image
        under BatchNorm (every part trains here)."""
        n = len(self.data.train_labels)
        if n - self.dropped_images < 1:
            raise ConfigError(f"a training set of {n} image gives no training batch: a last "
                              "batch of one image is dropped, as BatchNorm needs at least 2 "
                              "images per training batch; train on at least 2 images")
        norm = next((m for part in self.parts for m in part.modules()
                     if isinstance(m, _BatchNorm)), None)
        if self.config.batch_size == 1 and norm is not None:
            raise ConfigError(f"--batch-size 1 cannot train {type(norm).__name__}: BatchNorm "
                              "needs at least 2 images per training batch; use --batch-size 2 "
                              "or more")

    def _measure_costs(self) -> list[float] | list[tuple[int, int]]:
        """Each part's cost on a training batch of up to 32 images
        (:func:`stages.part_costs`), measured on process 0 and shared, so every process
        cuts the same stages: seconds (``balance_by="time"``), or (resident, transient)
        bytes at the run's batch size (``"memory"``; deterministic). On the host, before
        the parts move to their devices, with the random state restored: training starts
        as the serial run does.
        """
        costs = None
        if self.rank == 0:
            size = min(self.config.batch_size, 32, len(self.data.train_labels))
            images = self.data.train_images[:size]
            labels = self.data.train_labels[:size]
            with torch.random.fork_rng(devices=[]):
                h, step = self.rule.make_step(images, labels, self.eval_transform,
                                              self.data.num_classes, None, True)
                costs = part_costs(self.parts, h, step, self.config, self.balance_by,
                                   scale=self.config.batch_size / size)
        shared = [costs]
        dist.broadcast_object_list(shared, 0)
        return shared[0]

    @property
    def fp16(self) -> bool:
        """Whether the parts autocast to float16 and scale their gradients, each its own."""
        return self.accelerator.mixed_precision == "fp16"

    def autocast(self):
        """Mixed precision for every part alike."""
        acc = self.accelerator
        if acc.mixed_precision == "no":
            return nullcontext()
        if self.fp16 and acc.scaler is None:  # Accelerate autocasts fp16 only where it scales
            return torch.autocast(acc.device.type, dtype=torch.float16)
        return acc.autocast()

    def stage_names(self) -> list[list[str]]:
        """The part names of each stage."""
        return [[self.parts[i].part_name for i in stage] for stage in self.stages]

    def _run_mine(self, h: torch.Tensor, step: Step, train: bool):
        """This stage's parts on one batch; trained parts step at once, as the serial loop."""
        losses, metrics, logits = {}, {}, {}
        with self.autocast():
            for i in self.mine:
                h, (loss, logits[i], metrics[i]) = self.parts[i](h.detach(), step)
                opt, scaler = self.optimizers.get(i), self.scalers.get(i)
                if train and opt is not None and loss.requires_grad:
                    if scaler is None:
                        loss.backward()
                        self._average_grads(i)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        self.schedulers[i].step()
                    else:  # skips the step where this part's gradients overflowed
                        scaled_step(loss, scaler, opt, self.schedulers[i],
                                    lambda i=i: self._average_grads(i))
                losses[i] = loss.detach()
        return h, losses, logits, metrics

    def _batches(self, loader, transform, generator, train: bool):
        """The (input, step, carried) triples this stage works on: read from the data on
        stage 0, received from the previous stage elsewhere, until the end of the pass.
        ``carried`` is the earlier stages' logits of the batch, stacked, where the rule
        combines them into its predictions (evaluation only; else None)."""
        device = self.accelerator.device
        if self.first:
            for images, y in loader:
                h, step = self.rule.make_step(images.to(device), y.to(device), transform,
                                              self.data.num_classes, generator, train)
                yield h, step, None
            return
        while True:
            t0 = time.perf_counter()
            got = self._receive()
            self.waited += time.perf_counter() - t0
            if got is None:
                return
            yield got[:3]

    def _receive(self):
        """The previous stage's next message as ``(input, step, carried, ints)``, on this
        stage's device; None at the end of its pass."""
        kind, tensors, ints = receive(self.rank - 1, self.wire)
        if kind == END:
            return None
        tensors = [t if t is None else t.to(self.accelerator.device) for t in tensors]
        h, step = unpack_step(tensors[:STEP_TENSORS], ints)
        return h, step, tensors[STEP_TENSORS] if len(tensors) > STEP_TENSORS else None, ints

    def _pass_on(self, h: torch.Tensor, step: Step, carried: torch.Tensor | None = None,
                 number: int = 0) -> None:
        """Send the batch on; ``number``: this stage's batch number in the pass (the
        replay buffer's stamp)."""
        if self.sender is not None:
            tensors, ints = pack_step(h.detach(), step)
            if carried is not None:
                tensors.append(carried)
            self.sender.send(BATCH, [t if t is None else t.to(self.wire) for t in tensors],
                             [*ints, number])

    def _replayed(self, steps: int):
        """Asynchronous stages: ``steps`` samples drawn from the replay buffer, which a
        thread fills with the previous stage's messages meanwhile (fewer only once that
        stage has ended and none can be drawn); then waits for the end of its pass."""
        buffer, device = self.replay, self.accelerator.device
        buffer.clear()

        def receive_one():  # on the receiving thread, whose current GPU is its own
            if device.type == "cuda":
                torch.cuda.set_device(device)
            got = self._receive()
            return None if got is None else ((got[0], got[1]), got[3][STEP_INTS])

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
                raise RuntimeError(f"rule {self.rule.name!r}: a part of stage {self.stage} "
                                   "changed its input in place, which a replay buffer may "
                                   "hand out again; make that operation out of place")
        self.waited += wait_end(thread)

    def _end_pass(self) -> None:
        if self.sender is not None:
            self.sender.send(END, [], [])
            self.sender.flush()

    def fit(self) -> dict[str, Any]:
        """Train for ``config.epochs`` epochs; returns the results for the run record."""
        cfg = self.config
        for obs in self.observers:
            obs.on_fit_start(self)
        self._fit_start = time.perf_counter()
        for epoch in range(self.start_epoch, cfg.epochs):
            entry = self._train_epoch(epoch)
            t0 = time.perf_counter()
            entry["test_acc"], entry["block_acc"] = self.evaluate()
            entry["eval_seconds"] = round(time.perf_counter() - t0, 3)
            self.history.append(entry)
            for obs in self.observers:
                obs.on_epoch_end(self, entry)
            if self.accelerator.is_main_process and cfg.progress:
                blocks = " ".join(f"{a:.3f}" for a in entry["block_acc"] if a is not None)
                tqdm.write(f"epoch {epoch + 1}/{cfg.epochs} [stages {self.stage_names()}]: "
                           f"loss {entry['train_loss']:.4f} test acc {entry['test_acc']:.4f} "
                           f"| per depth {blocks}")
        last = self.history[-1]
        result = {"test_acc": last["test_acc"], "block_acc": last["block_acc"],
                  "history": self.history, "seconds": round(self.fit_seconds(), 3)}
        for obs in self.observers:
            obs.on_fit_end(self, result)
        return result

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg = self.config
        for i in self.mine:
            self.parts[i].train()
        self._order.manual_seed(cfg.seed * 1_000_003 + epoch)
        # As the serial loop's process r: replica r augments with its own generator.
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 101 + self.replica)
        sums: dict[int, torch.Tensor] = {}
        metric_sums: dict[int, dict[str, torch.Tensor]] = {}
        hits, scored, seen, steps, saved_peak = 0, 0, 0, 0, 0
        bar = tqdm(total=len(self.train_loader), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", leave=False, dynamic_ncols=True,
                   disable=None if cfg.progress and self.accelerator.is_main_process
                   else True)
        if self.accelerator.device.type == "cuda":  # each epoch's peak, as the serial loop's
            torch.cuda.reset_peak_memory_stats(self.accelerator.device)
        dist.barrier()  # every stage's clock starts together
        self.waited = 0.0
        if self.sender is not None:
            self.sender.waited = 0.0
        t0 = time.perf_counter()
        source = self._replayed(len(self.train_loader)) if self.replay is not None else \
            self._batches(self.train_loader, self.train_transform, gen, True)
        for h, step, _ in source:
            if steps == 0:  # activation memory of this stage: peak bytes saved for backward
                with SavedTensorMeter(*(self.parts[i] for i in self.mine)) as meter:
                    out, losses, logits, metrics = self._run_mine(h, step, True)
                saved_peak = meter.peak
            else:
                out, losses, logits, metrics = self._run_mine(h, step, True)
            self._pass_on(out, step, number=steps)
            for i, loss in losses.items():
                sums[i] = sums[i] + loss if i in sums else loss
            for i, values in metrics.items():
                kept = metric_sums.setdefault(i, {})
                for key, value in values.items():
                    kept[key] = kept[key] + value if key in kept else value
            final = logits[self.mine[-1]]
            if self.last and final is not None:
                hits += int((final.argmax(1) == step.labels).sum())
                scored += len(step.labels)
            seen += len(step.labels)
            steps += 1
            bar.update()
        self._end_pass()
        seconds = time.perf_counter() - t0
        bar.close()
        self._share_buffers()
        mine = {"stage": self.stage, "steps": max(steps, 1),
                "loss": {i: s.item() for i, s in sums.items()},
                "metrics": {i: {k: v.item() for k, v in values.items()}
                            for i, values in metric_sums.items()},
                "hits": hits, "scored": scored, "seen": seen, "seconds": seconds,
                "saved": saved_peak,
                "state": held_bytes([self.parts[i] for i in self.mine],
                                    self.optimizers.values()),
                "cuda": torch.cuda.max_memory_allocated(self.accelerator.device)
                if self.accelerator.device.type == "cuda" else None,
                "waited": self.waited + (self.sender.waited if self.sender else 0.0),
                "replay": self.replay.summary() if self.replay is not None else None}
        stages = [None] * self.accelerator.num_processes
        dist.all_gather_object(stages, mine)
        # Each part's mean loss and metrics over the steps of its stage's replicas (every
        # replica takes as many), as the serial loop averages each process's over the
        # processes; asynchronous stages take steps of their own.
        steps = {i: sum(s["steps"] for s in stages if i in s["loss"])
                 for i in range(len(self.parts))}
        loss = {i: sum(s["loss"][i] for s in stages if i in s["loss"]) / steps[i]
                for i in range(len(self.parts)) if steps[i]}
        self._check_divergence(loss, epoch)
        final = {key: sum(s[key] for s in stages if s["stage"] == self.stages_count - 1)
                 for key in ("hits", "scored")}  # summed over the last stage's replicas
        seen = sum(s["seen"] for s in stages if s["stage"] == 0)  # the images read
        seconds = max(s["seconds"] for s in stages)  # the pipeline is as slow as its last stage
        names = [p.part_name for p in self.parts]
        entry = {
            "epoch": epoch + 1,
            "trained_parts": names,
            "train_loss": loss[len(self.parts) - 1],
            "part_loss": {names[i]: loss[i] for i in range(len(self.parts))},
            "train_acc": final["hits"] / final["scored"] if final["scored"] else None,
            "dropped_images": self.dropped_images,
            "seconds": round(seconds, 3),
            "images_per_s": round(seen / max(seconds, 1e-9), 1),
            # Per process: the largest stage's peak, the figure one device must hold.
            "saved_bytes_peak": max(s["saved"] for s in stages),
            "state_bytes": max(s["state"] for s in stages),
            # Per process: what it holds (its parts' weights, buffers and optimizer state,
            # after the epoch) and its peak bytes saved for backward (in the first step).
            "stage_state_bytes": [s["state"] for s in stages],
            "stage_saved_bytes": [s["saved"] for s in stages],
            "stages": self.stage_names(),
            "replicas": self.replicas,
            # Per process (stage s of replica r is process r * S + s): seconds blocked on
            # the previous stage's messages or on delivering its own (fill and drain,
            # imbalance, the wire), out of the epoch's seconds.
            "stage_wait_seconds": [round(s["waited"], 3) for s in stages],
        }
        if stages[0]["cuda"] is not None:  # the largest process's, as for saved_bytes_peak
            entry["cuda_max_memory"] = max(s["cuda"] for s in stages)
        if self.replay_size is not None:
            # Asynchronous stages: each later stage's steps and its samples' staleness.
            entry["replay"] = {"buffer": self.replay_size, "max_reuse": self.max_reuse,
                               "stages": [{"stage": s["stage"], "steps": s["steps"],
                                           **s["replay"]} for s in stages if s["replay"]]}
        metrics: dict[int, dict[str, float]] = {}
        for s in stages:
            for i, values in s["metrics"].items():
                kept = metrics.setdefault(i, {})
                for key, value in values.items():
                    kept[key] = kept.get(key, 0.0) + value / steps[i]
        keys = sorted({key for values in metrics.values() for key in values})
        if keys:
            entry["rule_metrics"] = {key: {names[i]: metrics.get(i, {}).get(key)
                                           for i in range(len(names))} for key in keys}
        return entry

    def _check_divergence(self, loss: dict[int, float], epoch: int) -> None:
        """Stop on a non-finite mean loss, or one above ``config.max_loss``, at the epoch's
        end (every stage sees every part's loss, so all stop together)."""
        for i, mean in sorted(loss.items()):
            name, where = self.parts[i].part_name, f"by the end of epoch {epoch + 1}"
            if not math.isfinite(mean):
                raise Diverged(f"rule {self.rule.name!r} diverged: part {name!r} has a "
                               f"non-finite loss {where}")
            if self.config.max_loss > 0 and mean > self.config.max_loss:
                raise Diverged(f"rule {self.rule.name!r} diverged: part {name!r} has a mean "
                               f"loss of {mean:.4g}, above --max-loss "
                               f"{self.config.max_loss:g}, {where}")

    @torch.no_grad()
    def evaluate(self) -> tuple[float, list[float | None]]:
        """Test accuracy of the final prediction and at each depth: every stage scores its
        own parts' logits, and the counts are gathered."""
        for i in self.mine:
            self.parts[i].eval()
        hits: dict[int, int] = {}
        total = 0
        for h, step, carried in self._batches(self.test_loader, self.eval_transform, None,
                                              False):
            out, _, logits, _ = self._run_mine(h, step, False)
            if self.combines:  # the last stage combines every part's logits
                ours = torch.stack([self._logits_of(i, logits[i]) for i in self.mine])
                carried = ours if carried is None else torch.cat([carried, ours])
                if self.last:
                    logits = dict(enumerate(self.rule.predictions(list(carried))))
            self._pass_on(out, step, carried if self.combines else None)
            if self.combines and not self.last:
                logits = {}  # scored where they are combined
            for i, z in logits.items():
                if z is not None:
                    hits[i] = hits.get(i, 0) + int((z.argmax(1) == step.labels).sum())
            total += len(step.labels)
        self._end_pass()
        gathered = [None] * self.accelerator.num_processes
        dist.all_gather_object(gathered, {"stage": self.stage, "hits": hits, "total": total})
        # Every stage of a replica sees the images its first stage read: the test set, once
        # over the replicas.
        total = sum(g["total"] for g in gathered if g["stage"] == 0)
        counts: dict[int, int] = {}
        for g in gathered:
            for i, n in g["hits"].items():
                counts[i] = counts.get(i, 0) + n
        acc = {i: n / max(total, 1) for i, n in counts.items()}
        last = len(self.parts) - 1
        if last not in acc:
            raise RuntimeError(f"rule {self.rule.name!r}: the last part gives no logits")
        block_acc: list[float | None] = [None] * len(self.stack.blocks)
        for i, part in enumerate(self.parts):
            if part.block_ids and i in acc:
                block_acc[part.block_ids[-1]] = acc[i]
        return acc[last], block_acc
