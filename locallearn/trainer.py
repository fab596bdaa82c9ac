"""One training loop under Hugging Face Accelerate for every rule and executor.

Each part runs on the detached output of the part before it and the batch's step
context, and its backward and optimizer step run before the next part's forward,
so one part's graph and gradients are alive at a time. Each part is prepared for
DDP on its own, has its optimizer only while it trains and, under fp16, a gradient
scaler of its own. Why, and what an executor supplies: docs/architecture.md ("The
loop", "Executors") and docs/speed.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from .data import BatchTransform, ImageData, dropped_images, make_loaders
from .errors import ConfigError, LocallearnError
from .measure import SavedTensorMeter
from .observers import Observer
from .optim import lr_factor, make_optimizer, scaled_step
from .rules.base import LocalPart, Rule
from .settings import TrainConfig  # the loop's settings, declared with their flags
from .step import Step


class Diverged(LocallearnError):
    """A local loss became non-finite."""


def check_plan(rule: Rule, parts: list[LocalPart], epochs: int, batch_size: int,
               train_size: int) -> list[list[int]]:
    """Check that ``rule``'s ``parts`` can train for ``epochs`` and return the schedule.

    The schedule (:meth:`Rule.trained_parts` of every epoch) must name existing
    parts in order; no parameter may belong to two parts; the training set must
    give a batch; and a batch of one image is refused where a part that trains
    (or a frozen one the rule runs in training mode) has BatchNorm: in training
    mode that breaks wherever a map is 1x1, and only after a whole epoch has run.

    A ConfigError where the batches cannot train; a RuntimeError where the rule is broken.
    """
    owner: dict[int, str] = {}
    for part in parts:
        for p in part.parameters():
            if id(p) in owner:
                raise RuntimeError(
                    f"rule {rule.name!r}: parts {owner[id(p)]!r} and {part.part_name!r} "
                    "share a parameter; each parameter must belong to one part"
                )
            owner[id(p)] = part.part_name
    n = len(parts)
    schedule = [rule.trained_parts(e, epochs, n) for e in range(epochs)]
    for epoch, trained in enumerate(schedule):
        if not trained or list(trained) != sorted(set(trained)) or trained[-1] >= n:
            raise RuntimeError(f"rule {rule.name!r}: bad trained parts {trained} "
                               f"in epoch {epoch + 1} of {n} parts")
    if train_size - dropped_images(train_size, batch_size) < 1:
        raise ConfigError(f"a training set of {train_size} image gives no training batch: a "
                          "last batch of one image is dropped, as BatchNorm needs at least 2 "
                          "images per training batch; train on at least 2 images")
    if batch_size > 1:
        return schedule
    trained = sorted({i for epoch_parts in schedule for i in epoch_parts})
    if rule.frozen_train_mode:
        trained = list(range(trained[-1] + 1))
    named = [m for i in trained for m in parts[i].named_modules(prefix=parts[i].part_name)]
    norm = next(((name, m) for name, m in named if isinstance(m, _BatchNorm)), None)
    if norm is not None:
        raise ConfigError(f"--batch-size 1 cannot train {type(norm[1]).__name__} "
                          f"{norm[0]!r}: BatchNorm needs at least 2 images per training "
                          "batch; use --batch-size 2 or more")
    return schedule


class SerialExecutor:
    """Runs every part in this process; several processes are data-parallel replicas (DDP).

    The executor interface (``bind``, ``batches``, ``reduce_grads``, ``run_probe``,
    ``files``, ...) is described in docs/architecture.md ("Executors").
    """

    stage, last = 0, True  # the first stage, and the last
    stage_parts: list[list[int]] | None = None  # no stage cut
    files = ("model.safetensors", "state.pt")

    def bind(self, trainer: Trainer) -> list[int]:
        self.trainer, acc = trainer, trainer.accelerator
        self.replicas, self.replica = acc.num_processes, acc.process_index
        self.writes = acc.is_main_process
        self.features: tuple[int, Any] | None = None  # (first part, loader) of cached inputs
        return list(range(len(trainer.parts)))

    def prepare(self, obj: Any) -> Any:
        return self.trainer.accelerator.prepare(obj)

    def prepare_loaders(self, train: Any, test: Any) -> tuple[Any, Any]:
        acc = self.trainer.accelerator
        # Test batches are not padded to equal counts: no image is scored twice.
        return acc.prepare(train), prepare_data_loader(
            test, acc.device, num_processes=acc.num_processes, process_index=acc.process_index,
            put_on_device=True, even_batches=False)

    def batches(self, loader, transform, generator, train: bool) -> Iterator[tuple]:
        for images, y in loader:
            yield *self.trainer.make_step(images, y, transform, generator, train), None

    def train_batches(self, trained: list[int], generator: torch.Generator
                      ) -> tuple[Iterator[tuple], int]:
        """An epoch's training batches and the part they go to first: the data, or the cached
        outputs of a frozen prefix (:meth:`cached_inputs`) with their images' step contexts."""
        t, first = self.trainer, trained[0]
        if not (t.rule.cache_inputs and first > 0):
            return self.batches(t.train_loader, t.train_transform, generator, True), 0

        def cached() -> Iterator[tuple]:
            for x, images, y in self.cached_inputs(first):
                yield t.layout(x), t.make_step(images, y, t.eval_transform)[1], None
        return cached(), first

    @torch.no_grad()
    def cached_inputs(self, first: int) -> Any:
        """A loader of the frozen prefix's outputs (parts before ``first``) on the training
        set, without augmentation, computed once per first trained part, so later parts do
        not run the prefix again every epoch."""
        t = self.trainer
        if self.features is not None and self.features[0] == first:
            return self.features[1]
        self.features = None  # free the previous cache first
        acc, cfg = t.accelerator, t.config
        for part in t.parts[:first]:
            part.eval()
        images, labels = t.data.train_images, t.data.train_labels
        chunks = []
        batch = cfg.eval_batch_size or 2 * cfg.batch_size
        with t.autocast():
            for k in range(0, len(images), batch):
                h = t.eval_transform(images[k:k + batch].to(acc.device))
                for part in t.parts[:first]:
                    h = part.run_blocks(h)
                chunks.append(h.float().cpu())
        features = torch.cat(chunks)
        if acc.is_main_process:
            tqdm.write(f"cached the inputs of part {t.parts[first].part_name!r}: "
                       f"{tuple(features.shape)}, {features.nbytes / 2**20:.0f} MiB")
        # The images travel with their features: each step's context holds the network input.
        dataset = torch.utils.data.TensorDataset(features, images, labels)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.batch_size, shuffle=True,
            drop_last=dropped_images(len(labels), cfg.batch_size) > 0,  # as the images' loader
            generator=torch.Generator().manual_seed(cfg.seed + first),
        )
        self.features = (first, acc.prepare(loader))
        return self.features[1]

    def pass_on(self, h: torch.Tensor, step: Step, carried: torch.Tensor | None = None): ...

    def begin_epoch(self) -> None: ...

    def end_pass(self) -> None: ...

    def reduce_grads(self, i: int) -> None: ...  # DDP averages them inside backward

    def end_epoch(self, trained: list[int]) -> None:
        """Give every process process 0's buffers of the frozen parts before ``trained``
        (run in training mode, unwrapped by DDP), as DDP does for the parts it wraps."""
        if self.trainer.rule.frozen_train_mode and self.replicas > 1:
            for part in self.trainer.parts[:trained[0]]:
                for buffer in part.buffers():
                    dist.broadcast(buffer, 0)

    def stats(self) -> dict[str, Any]:
        return {}

    def fields(self, stats: list[dict[str, Any]]) -> dict[str, Any]:
        return {}

    def probe_blocks(self) -> range:
        """Every block on the main process, none elsewhere."""
        main = self.trainer.accelerator.is_main_process
        return range(len(self.trainer.stack.blocks) if main else 0)

    def run_probe(self, measure: Callable[[range, torch.Tensor | None], tuple[list, Any]]
                  ) -> list[dict[str, Any]]:
        blocks = self.probe_blocks()
        return measure(blocks, None)[0] if len(blocks) else []

    def saved_modules(self) -> list[tuple[str, nn.Module]]:
        t = self.trainer
        return [("stack", t.stack)] + [(f"part{i}", p) for i, p in enumerate(t.parts)]


class Trainer:
    """Trains ``stack`` (a BlockStack) by ``rule`` on ``data`` (in memory) with the loop's
    ``config``, under ``accelerator`` (one is created if None), calling ``observers`` at
    fit start, epoch end and fit end. ``executor`` runs the parts: :class:`SerialExecutor`
    (default) or :class:`~locallearn.pipeline.PipelineExecutor`.
    """

    def __init__(self, stack: nn.Module, rule: Rule, data: ImageData, config: TrainConfig,
                 accelerator: Accelerator | None = None, observers: tuple[Observer, ...] = (),
                 executor: Any = None):
        self.stack, self.rule, self.data, self.config = stack, rule, data, config
        self.accelerator = acc = accelerator or Accelerator()
        self.observers = observers
        self.executor = executor or SerialExecutor()
        self.train_transform = BatchTransform(data.mean, data.std, data.augment)
        self.eval_transform = BatchTransform(data.mean, data.std, "none")
        example = self.eval_transform(data.train_images[:2])
        self.parts: list[LocalPart] = rule.parts(stack, data.num_classes, example)
        self.schedule = check_plan(rule, self.parts, config.epochs, config.batch_size,
                                   len(data.train_labels))
        n = len(self.parts)
        # Training images each epoch leaves out: a last batch of one image (see make_loaders).
        self.dropped_images = dropped_images(len(data.train_labels), config.batch_size)
        self.owned: list[int] = self.executor.bind(self)  # (it may measure the parts first)
        layout = torch.channels_last if config.channels_last else torch.preserve_format
        if len(self.owned) == n:
            stack.to(acc.device, memory_format=layout)
        for i, part in enumerate(self.parts):
            # Another process's parts keep their shapes (the record counts them), not memory.
            part.to(acc.device if i in self.owned else "meta", memory_format=layout)
            part.recompute_blocks = config.recompute_blocks
        train_loader, test_loader = make_loaders(
            data, config.batch_size, config.seed, config.eval_batch_size or None
        )
        # Reseeded every epoch, so epoch e's data order does not depend on earlier epochs.
        self._order = train_loader.generator
        self.train_loader, self.test_loader = self.executor.prepare_loaders(train_loader,
                                                                            test_loader)
        self.models: list[nn.Module] = list(self.parts)  # prepared while a part trains
        self.optimizers: list[torch.optim.Optimizer | None] = [None] * n
        self.schedulers: list[torch.optim.lr_scheduler.LRScheduler | None] = [None] * n
        self.scalers: list[torch.amp.GradScaler | None] = [None] * n  # fp16 only
        self.compiled: dict[int, nn.Module] = {}  # the trained parts under --compile
        self.history: list[dict[str, Any]] = []
        for i in self.schedule[0]:  # ready for train_step before fit
            self.activate(i)
        self.start_epoch = 0
        self.elapsed = 0.0  # seconds fit() ran before this process (a resumed run)
        self._fit_start: float | None = None

    def fit_seconds(self) -> float:
        """Seconds of fitting so far, earlier processes of a resumed run included."""
        running = self._fit_start is not None
        return self.elapsed + (time.perf_counter() - self._fit_start if running else 0.0)

    def state_dict(self) -> dict[str, Any]:
        """What this process saves to resume exactly, beside its weights and the RNG: its
        training parts' optimizer, schedule and fp16 scaler states (dropped after a part's
        last epoch), the history, the seconds of fitting and the observers' states."""
        return {
            "optimizers": {i: o.state_dict() for i, o in enumerate(self.optimizers) if o},
            "schedulers": {i: s.state_dict() for i, s in enumerate(self.schedulers) if s},
            "scalers": {i: s.state_dict() for i, s in enumerate(self.scalers) if s},
            "history": self.history, "seconds": self.fit_seconds(),
            "observers": [o.state_dict() if hasattr(o, "state_dict") else None
                          for o in self.observers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s ``state``: the parts that were training then train on
        (activated), the others are deactivated; fit() goes on after its history."""
        optimizers, schedulers = state["optimizers"], state["schedulers"]
        for i in self.owned:
            if i in optimizers:
                self.activate(i)
                self.optimizers[i].load_state_dict(optimizers[i])
                self.schedulers[i].load_state_dict(schedulers[i])
                if self.scalers[i] is not None:
                    self.scalers[i].load_state_dict(state["scalers"][i])
            else:
                self.deactivate(i)
        for obs, obs_state in zip(self.observers, state["observers"], strict=False):
            if obs_state is not None and hasattr(obs, "load_state_dict"):
                obs.load_state_dict(obs_state)
        self.history[:] = state["history"]
        self.elapsed = float(state["seconds"])
        self.start_epoch = len(self.history)

    def activate(self, i: int) -> None:
        """Prepare part ``i`` and give it an optimizer and a schedule (before it first trains)."""
        part, acc, cfg = self.parts[i], self.accelerator, self.config
        if (i not in self.owned or self.optimizers[i] is not None
                or not any(p.requires_grad for p in part.parameters())):
            return
        self.models[i] = self.executor.prepare(part)
        if cfg.compile != "no":
            self.compiled[i] = torch.compile(self.models[i], mode=cfg.compile,
                                             backend=cfg.compile_backend)
        optimizer = self.executor.prepare(make_optimizer(part.parameters(), cfg, part.lr_scale))
        if acc.mixed_precision == "fp16":  # the part's own scaler, not Accelerate's shared one
            optimizer.scaler = None
            kwargs = acc.scaler_handler.to_kwargs() if acc.scaler_handler else {}
            self.scalers[i] = torch.amp.GradScaler(acc.device.type, **kwargs)
        self.optimizers[i] = optimizer
        # Stepped once per optimizer step: over the part's own epochs where the rule restarts
        # it, else one schedule over the whole run, read at the epochs the part trains.
        epochs = [e for e, trained in enumerate(self.schedule) if i in trained]
        steps = len(self.train_loader)
        offset, horizon = ((0, len(epochs)) if self.rule.restart_schedule
                           else (epochs[0] * steps, cfg.epochs))
        self.schedulers[i] = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(cfg, offset + s, steps, horizon))

    def deactivate(self, i: int) -> None:
        """Unwrap part ``i`` and drop its optimizer state (after it last trains)."""
        acc = self.accelerator
        if self.optimizers[i] is None:
            return
        # Accelerate keeps references for save_state; drop them so the state is freed.
        for kept, obj in ((acc._optimizers, self.optimizers[i]), (acc._models, self.models[i])):
            if obj in kept:
                kept.remove(obj)
        self.models[i] = acc.unwrap_model(self.models[i])
        self.optimizers[i] = self.schedulers[i] = self.scalers[i] = None
        self.compiled.pop(i, None)

    def autocast(self):
        """Mixed precision for every part alike, prepared or not: Accelerate autocasts fp16
        only where it holds the scaler, and each part here has its own."""
        acc = self.accelerator
        if acc.mixed_precision == "no":
            return nullcontext()
        if acc.mixed_precision == "fp16" and acc.scaler is None:
            return torch.autocast(acc.device.type, dtype=torch.float16)
        return acc.autocast()

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the weights' memory format (channels-last for a 4-D input)."""
        if self.config.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def train_step(
        self, x: torch.Tensor, step: Step, trained: list[int], start: int = 0
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None, dict[int, dict[str, torch.Tensor]]]:
        """One batch from part ``start`` (or this process's first part) on input ``x``: forward
        part by part, each of the ``trained`` parts' (sorted) backward and step at once, the
        others without autograd, then the output handed on (to the next stage, if any).

        Returns the detached loss of every trained part, the logits of the last trained
        part, and the metrics each trained part's objective reported.
        """
        trained_set = set(trained)
        losses: dict[int, torch.Tensor] = {}
        metrics: dict[int, dict[str, torch.Tensor]] = {}
        logits, h = None, x
        with self.autocast():
            for i in range(start, trained[-1] + 1):
                if i not in self.owned:
                    continue
                if i not in trained_set:
                    with torch.no_grad():
                        h = self.parts[i].run_blocks(h)
                    continue
                model = self.compiled.get(i, self.models[i])
                h, (loss, logits, metrics[i]) = model(h.detach(), step)
                optimizer, scaler = self.optimizers[i], self.scalers[i]
                if optimizer is not None and loss.requires_grad and scaler is None:
                    self.accelerator.backward(loss)
                    self.executor.reduce_grads(i)  # (DDP reduces them inside backward)
                    self.parts[i].after_backward()  # MAN's EMA update: here, as its reference
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    self.schedulers[i].step()
                elif optimizer is not None and loss.requires_grad:  # fp16: skips the step
                    # where this part's gradients overflowed; Accelerate's optimizer wraps
                    bare = getattr(optimizer, "optimizer", optimizer)  # the bare one
                    scaled_step(loss, scaler, bare, self.schedulers[i],
                                lambda i=i: self.executor.reduce_grads(i))
                    # (after part i's step, which changes neither its EMA nor part i + 1)
                    self.parts[i].after_backward()
                losses[i] = loss.detach()
        self.executor.pass_on(h, step)
        return losses, logits, metrics

    def make_step(self, images: torch.Tensor, labels: torch.Tensor, transform: Any,
                  generator: torch.Generator | None = None, train: bool = True
                  ) -> tuple[torch.Tensor, Step]:
        """The rule's first input and step context for a batch of uint8 images."""
        x, step = self.rule.make_step(images, labels, transform, self.data.num_classes,
                                      generator, train)
        return self.layout(x), step

    def fit(self) -> dict[str, Any]:
        """Train for ``config.epochs`` epochs; returns the results for the run record."""
        cfg, acc = self.config, self.accelerator
        for obs in self.observers:
            obs.on_fit_start(self)
        self._fit_start = time.perf_counter()
        for epoch in range(self.start_epoch, cfg.epochs):
            entry = self._train_epoch(epoch)
            t0 = time.perf_counter()
            entry["test_acc"], entry["block_acc"] = evaluate(self)
            entry["eval_seconds"] = round(time.perf_counter() - t0, 3)
            self.history.append(entry)
            for obs in self.observers:
                obs.on_epoch_end(self, entry)
            if acc.is_main_process:  # also without progress bars: a job's log needs its epochs
                tqdm.write(epoch_line(entry, cfg.epochs))
        last = self.history[-1]
        result = {"test_acc": last["test_acc"], "block_acc": last["block_acc"],
                  "history": self.history, "seconds": round(self.fit_seconds(), 3)}
        for obs in self.observers:
            obs.on_fit_end(self, result)
        return result

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, acc, ex = self.config, self.accelerator, self.executor
        trained = self.schedule[epoch]
        for i in trained:
            self.activate(i)
        for i in self.owned:
            self.models[i].train(i in trained or self.rule.frozen_train_mode)
        self._order.manual_seed(cfg.seed * 1_000_003 + epoch)
        # One generator per epoch and replica: augmentation is reproducible and not shared.
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 101 + ex.replica)
        source, start = ex.train_batches(trained, gen)
        sums = EpochSums(acc.device, trained[-1] in self.owned)
        alone = len(self.owned) == len(self.parts)  # sees every loss, so it may stop alone
        bar = tqdm(
            source, total=len(self.train_loader), desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="batch", leave=False, dynamic_ncols=True,
            # None hides the bar where stderr is not a terminal (logs keep the epoch lines).
            disable=None if cfg.progress and acc.is_main_process else True,
        )
        cuda = acc.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(acc.device)
        ex.begin_epoch()
        t0 = time.perf_counter()
        saved_peak = 0
        for x, context, _ in bar:
            if sums.steps == 0:  # activation memory: peak bytes saved for backward in one step
                with SavedTensorMeter(*(self.parts[i] for i in self.owned)) as meter:
                    out = self.train_step(x, context, trained, start)
                saved_peak = meter.peak
            else:
                out = self.train_step(x, context, trained, start)
            sums.add(*out, context.labels)
            if sums.steps % cfg.log_every == 0 and sums.sums:
                means = sums.means()
                if alone:
                    check_divergence(self, means, f"by epoch {epoch + 1}, step {sums.steps}")
                shown = {"loss": f"{means[max(means)]:.3f}"}
                if sums.scored:  # a rule whose steps give no logits (forward-forward): no acc
                    shown["acc"] = f"{sums.hits.item() / sums.scored:.3f}"
                img_s = sums.seen * ex.replicas / (time.perf_counter() - t0)
                bar.set_postfix(shown | {"img_s": f"{img_s:.0f}"})
        ex.end_pass()
        seconds = time.perf_counter() - t0
        bar.close()
        ex.end_epoch(trained)
        mine = {**sums.summary(), "stage": ex.stage, "seconds": seconds, "saved": saved_peak,
                # What this process holds: weights, buffers and optimizer state, before
                # the parts that train no more drop their optimizers.
                "state": held_bytes([self.parts[i] for i in self.owned],
                                    [opt for opt in self.optimizers if opt is not None]),
                "cuda": torch.cuda.max_memory_allocated(acc.device) if cuda else None,
                **ex.stats()}
        for i in trained:
            if not any(i in later for later in self.schedule[epoch + 1:]):
                self.deactivate(i)
        return epoch_entry(self, epoch, trained, mine)


@torch.no_grad()
def evaluate(trainer: Trainer) -> tuple[float, list[float | None]]:
    """Test accuracy of the final prediction and of the prediction at each block's depth.

    Each process scores its parts' logits (where the rule combines every part's, as
    forward-forward does, the parts' logits travel with the batch and the last stage
    scores the combined ones), and the hit counts of every process are summed.
    """
    ex, combines = trainer.executor, type(trainer.rule).predictions is not Rule.predictions
    for i in trainer.owned:
        trainer.models[i].eval()
    hits: dict[int, torch.Tensor] = {}
    total = 0
    for h, step, carried in ex.batches(trainer.test_loader, trainer.eval_transform, None, False):
        logits = {}
        with trainer.autocast():
            for i in trainer.owned:
                h, scored = trainer.models[i](h, step)
                logits[i] = scored.logits
        if combines:
            every = [*(carried if carried is not None else ()), *logits.values()]
            if ex.last:
                logits = dict(enumerate(trainer.rule.predictions(every)))
            else:
                logits, carried = {}, torch.stack(every)  # passed on, to be combined
        ex.pass_on(h, step, carried)
        for i, z in logits.items():
            if z is not None:
                hits[i] = hits.get(i, 0) + (z.argmax(1) == step.labels).sum()
        total += len(step.labels)
    ex.end_pass()
    mine = {"stage": ex.stage, "total": total, "hits": {i: int(n) for i, n in hits.items()}}
    gathered = all_gathered(mine, trainer.accelerator.num_processes)
    total = sum(g["total"] for g in gathered if g["stage"] == 0)  # the images read
    counts: dict[int, int] = {}
    for g in gathered:
        for i, n in g["hits"].items():
            counts[i] = counts.get(i, 0) + n
    acc = {i: n / max(total, 1) for i, n in counts.items()}
    last = len(trainer.parts) - 1
    depth: list[float | None] = [None] * len(trainer.stack.blocks)
    if last not in acc:
        if trainer.rule.label_free:  # the linear probe gives its accuracy
            return None, depth
        raise RuntimeError(f"rule {trainer.rule.name!r}: the last part gives no logits")
    # The accuracy at each block's depth: a part's, at its last block (None elsewhere).
    for i, part in enumerate(trainer.parts):
        if part.block_ids and i in acc:
            depth[part.block_ids[-1]] = acc[i]
    return acc[last], depth


class EpochSums:
    """One process's running sums over an epoch, on the device and read once at the end:
    each trained part's loss (key ``""``) and metrics, the hits of the final logits (where
    this process runs the last trained part, ``scores``), the images seen and scored."""

    def __init__(self, device: torch.device, scores: bool):
        self.sums: dict[int, dict[str, torch.Tensor]] = {}
        self.hits, self.scores = torch.zeros((), device=device), scores
        self.scored = self.seen = self.steps = 0

    def add(self, losses: dict[int, torch.Tensor], logits: torch.Tensor | None,
            metrics: dict[int, dict[str, torch.Tensor]], labels: torch.Tensor) -> None:
        for i, loss in losses.items():
            kept = self.sums.setdefault(i, {})
            for key, value in {"": loss, **metrics.get(i, {})}.items():
                kept[key] = kept[key] + value if key in kept else value
        if logits is not None and self.scores:
            self.hits += (logits.argmax(1) == labels).sum()
            self.scored += len(labels)
        self.seen += len(labels)
        self.steps += 1

    def means(self) -> dict[int, float]:
        """Each part's mean loss so far (one device sync)."""
        means = (torch.stack([s[""] for s in self.sums.values()]) / self.steps).tolist()
        return dict(zip(self.sums, means, strict=True))

    def summary(self) -> dict[str, Any]:
        return {"steps": max(self.steps, 1), "seen": self.seen, "scored": self.scored,
                "hits": int(self.hits.item()),
                "sums": {i: {k: v.item() for k, v in s.items()} for i, s in self.sums.items()}}


def epoch_entry(trainer: Trainer, epoch: int, trained: list[int], mine: dict[str, Any]
                ) -> dict[str, Any]:
    """The epoch's history entry from every process's statistics (``mine`` here,
    gathered): each part's mean loss and metrics over the steps of the processes that hold
    it (data-parallel replicas take as many; asynchronous stages take steps of their own).
    Raises Diverged on a non-finite mean loss or one above ``--max-loss``, on every process
    alike (each sees every part's loss), so all stop together.
    """
    stats = all_gathered(mine, trainer.accelerator.num_processes)
    steps = {i: sum(s["steps"] for s in stats if i in s["sums"]) for i in trained}
    loss = {i: sum(s["sums"][i][""] for s in stats if i in s["sums"]) / steps[i]
            for i in trained}
    check_divergence(trainer, loss, f"by the end of epoch {epoch + 1} "
                                    f"(step {max(s['steps'] for s in stats)})")
    hits, scored = (sum(s[key] for s in stats) for key in ("hits", "scored"))
    seen = sum(s["seen"] for s in stats if s["stage"] == 0)  # the images read
    seconds = max(s["seconds"] for s in stats)  # as slow as the slowest process
    names = [p.part_name for p in trainer.parts]
    entry = {
        "epoch": epoch + 1,
        "trained_parts": [names[i] for i in trained],
        "train_loss": loss[trained[-1]],
        "part_loss": {names[i]: loss[i] for i in trained},
        # null, not 0, where no step of the epoch gave logits (on any process)
        "train_acc": hits / scored if scored else None,
        "dropped_images": trainer.dropped_images,
        "seconds": round(seconds, 3),
        "images_per_s": round(seen / max(seconds, 1e-9), 1),
        # The largest process's peak and holdings: the figures one device must hold.
        "saved_bytes_peak": max(s["saved"] for s in stats),
        "state_bytes": max(s["state"] for s in stats),
        **trainer.executor.fields(stats),
    }
    if stats[0]["cuda"] is not None:
        entry["cuda_max_memory"] = max(s["cuda"] for s in stats)
    metrics: dict[int, dict[str, float]] = {}
    for s in stats:
        for i, values in s["sums"].items():
            kept = metrics.setdefault(i, {})
            for key, value in values.items():
                if key:  # (not the loss)
                    kept[key] = kept.get(key, 0.0) + value / steps[i]
    keys = sorted({key for values in metrics.values() for key in values})
    if keys:  # each part's metrics averaged over the epoch's steps; null where not trained
        entry["rule_metrics"] = {key: {names[i]: metrics.get(i, {}).get(key)
                                       for i in range(len(names))} for key in keys}
    return entry


def held_bytes(modules: Iterable[nn.Module], optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """Bytes of the modules' parameters and buffers and the optimizers' state tensors,
    each storage once (a tensor shared by two modules counts once; ``meta`` tensors,
    which hold no memory, count nothing)."""
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    tensors += [v for opt in optimizers for state in opt.state.values()
                for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if not t.is_meta}
    storages.pop(0, None)  # empty tensors
    return sum(storages.values())


def all_gathered(obj: Any, processes: int) -> list[Any]:
    """``obj`` of every process, by rank."""
    if processes == 1:
        return [obj]
    gathered: list[Any] = [None] * processes
    dist.all_gather_object(gathered, obj)
    return gathered


def check_divergence(trainer: Trainer, means: dict[int, float], where: str) -> None:
    """Stop on a non-finite mean loss, or one above ``config.max_loss``."""
    rule, max_loss = trainer.rule.name, trainer.config.max_loss
    for i, mean in sorted(means.items()):
        name = trainer.parts[i].part_name
        if not math.isfinite(mean):
            raise Diverged(f"rule {rule!r} diverged: part {name!r} has a non-finite loss {where}")
        if max_loss > 0 and mean > max_loss:
            raise Diverged(f"rule {rule!r} diverged: part {name!r} has a mean loss of "
                           f"{mean:.4g}, above --max-loss {max_loss:g}, {where}")


def epoch_line(entry: dict[str, Any], epochs: int) -> str:
    """The line an epoch prints: what trained, its loss and its accuracy at each depth."""
    blocks = " ".join(f"{a:.3f}" for a in entry["block_acc"] if a is not None)
    where = f"stages {entry['stages']}" if "stages" in entry else \
        ", ".join(entry["trained_parts"])
    final = "-" if entry["test_acc"] is None else f"{entry['test_acc']:.4f}"
    return (f"epoch {entry['epoch']}/{epochs} [{where}]: loss {entry['train_loss']:.4f} "
            f"final-head acc {final} | per depth {blocks}")
