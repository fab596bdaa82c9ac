"""One training loop under Hugging Face Accelerate for every rule.

The loop runs a rule's parts in order on each batch. Each part gets the
detached output of the part before it and the batch's step context (a
:class:`~locallearn.step.Step`, made once per batch by the rule's input hook
and passed on every path), and its loss is backpropagated and its
optimizer stepped *before* the next part runs, so only one part's autograd
graph (and one part's gradients) is alive at a time: that is where local
learning saves memory. Each part is prepared separately, since DDP expects one
forward and one backward per wrapped module and step.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any

import torch
from accelerate import Accelerator
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
from .stages import held_bytes
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

    Raises:
        ConfigError: the rule's schedule refuses ``epochs``, or the batches cannot train.
        RuntimeError: the rule is broken (a bad schedule, a shared parameter).
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


class Trainer:
    """Trains a BlockStack by a rule.

    Args:
        stack: the network, split into blocks.
        rule: partitions the stack into parts with local objectives and a schedule.
        data: the data set, in memory.
        config: the loop's options.
        accelerator: an Accelerator (one is created if None).
        observers: called at fit start, epoch end and fit end.

    A part is prepared (wrapped for DDP under several processes) and gets its
    optimizer when it first trains, and is unwrapped and loses its optimizer
    state after it last trains, so a frozen part holds no graph, no gradients
    and no optimizer state.

    Under fp16 each trained part has a gradient scaler of its own: a step one
    part skips for an overflow lowers only that part's scale, and the scale
    of every part grows on its own steps (one shared scaler would be updated
    K times per batch, and one part's overflow would shrink the others' scale).
    """

    def __init__(
        self,
        stack: nn.Module,
        rule: Rule,
        data: ImageData,
        config: TrainConfig,
        accelerator: Accelerator | None = None,
        observers: tuple[Observer, ...] = (),
    ):
        self.stack, self.rule, self.data, self.config = stack, rule, data, config
        self.accelerator = acc = accelerator or Accelerator()
        self.observers = observers
        self.train_transform = BatchTransform(data.mean, data.std, data.augment)
        self.eval_transform = BatchTransform(data.mean, data.std, "none")
        example = self.eval_transform(data.train_images[:2])
        self.parts: list[LocalPart] = rule.parts(stack, data.num_classes, example)
        self.schedule = check_plan(rule, self.parts, config.epochs, config.batch_size,
                                   len(data.train_labels))
        n = len(self.parts)
        # Training images each epoch leaves out: a last batch of one image (see make_loaders).
        self.dropped_images = dropped_images(len(data.train_labels), config.batch_size)
        layout = torch.channels_last if config.channels_last else torch.preserve_format
        stack.to(acc.device, memory_format=layout)
        for part in self.parts:
            part.to(acc.device, memory_format=layout)
            part.recompute_blocks = config.recompute_blocks
        train_loader, test_loader = make_loaders(
            data, config.batch_size, config.seed, config.eval_batch_size or None
        )
        # Reseeded every epoch, so epoch e's data order does not depend on earlier epochs.
        self._order = train_loader.generator
        self.train_loader, self.test_loader = acc.prepare(train_loader, test_loader)
        self.models: list[nn.Module] = list(self.parts)  # prepared while a part trains
        self.optimizers: list[torch.optim.Optimizer | None] = [None] * n
        self.schedulers: list[torch.optim.lr_scheduler.LRScheduler | None] = [None] * n
        self.scalers: list[torch.amp.GradScaler | None] = [None] * n  # fp16 only
        self.compiled: dict[int, nn.Module] = {}  # the trained parts under --compile
        self.history: list[dict[str, Any]] = []
        self._features: tuple[int, Any] | None = None  # (first part, loader) of cached inputs
        for i in self.schedule[0]:  # ready for train_step before fit
            self.activate(i)
        self.start_epoch = 0
        self.elapsed = 0.0  # seconds fit() ran before this process (a resumed run)
        self._fit_start: float | None = None

    def fit_seconds(self) -> float:
        """Seconds of fitting so far, earlier processes of a resumed run included."""
        now = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        return self.elapsed + now

    def activate(self, i: int) -> None:
        """Prepare part ``i`` and give it an optimizer and a schedule (before it first trains)."""
        part, acc, cfg = self.parts[i], self.accelerator, self.config
        if self.optimizers[i] is not None or not any(p.requires_grad for p in part.parameters()):
            return
        self.models[i] = acc.prepare(part)
        if cfg.compile != "no":
            self.compiled[i] = torch.compile(self.models[i], mode=cfg.compile,
                                             backend=cfg.compile_backend)
        optimizer = acc.prepare(make_optimizer(part.parameters(), cfg, part.lr_scale))
        if self.fp16:  # the part's own scaler, not Accelerate's shared one
            optimizer.scaler = None
            kwargs = acc.scaler_handler.to_kwargs() if acc.scaler_handler else {}
            self.scalers[i] = torch.amp.GradScaler(acc.device.type, **kwargs)
        epochs = [e for e, trained in enumerate(self.schedule) if i in trained]
        steps = len(self.train_loader)
        if self.rule.restart_schedule:  # the schedule runs over this part's own epochs
            offset, horizon = 0, len(epochs)
        else:  # one schedule over the whole run, read at this part's epochs
            offset, horizon = epochs[0] * steps, cfg.epochs
        self.optimizers[i] = optimizer
        self.schedulers[i] = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(cfg, offset + s, steps, horizon)
        )

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

    @property
    def fp16(self) -> bool:
        """Whether the loop autocasts to float16 and scales each part's gradients."""
        return self.accelerator.mixed_precision == "fp16"

    def autocast(self):
        """Mixed precision for every part alike, prepared or not."""
        acc = self.accelerator
        if acc.mixed_precision == "no":
            return nullcontext()
        if self.fp16 and acc.scaler is None:  # Accelerate autocasts fp16 only where it scales
            return torch.autocast(acc.device.type, dtype=torch.float16)
        return acc.autocast()

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory format of the weights (channels-last for a 4-D input under
        ``channels_last``)."""
        if self.config.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def train_step(
        self, x: torch.Tensor, step: Step, trained: list[int], start: int = 0
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None, dict[int, dict[str, torch.Tensor]]]:
        """One batch: forward part by part, each trained part's backward and step at once.

        Args:
            x: the input of part ``start`` (the rule's first input when ``start`` is 0).
            step: the batch's step context, given to every part.
            trained: indices of the parts that learn (sorted); the others run without autograd.
            start: the first part to run.

        Returns:
            The detached loss of every trained part, the logits of the last
            trained part, and the metrics each trained part's objective reported.
        """
        trained_set = set(trained)
        losses: dict[int, torch.Tensor] = {}
        metrics: dict[int, dict[str, torch.Tensor]] = {}
        logits = None
        h = x
        with self.autocast():
            for i in range(start, trained[-1] + 1):
                if i not in trained_set:
                    with torch.no_grad():
                        h = self.parts[i].run_blocks(h)
                    continue
                model = self.compiled.get(i, self.models[i])
                h, (loss, logits, metrics[i]) = model(h.detach(), step)
                optimizer, scaler = self.optimizers[i], self.scalers[i]
                if optimizer is not None and loss.requires_grad:
                    if scaler is None:
                        self.accelerator.backward(loss)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        self.schedulers[i].step()
                    else:  # skips the step where this part's gradients overflowed
                        scaled_step(loss, scaler, optimizer.optimizer, self.schedulers[i])
                losses[i] = loss.detach()
        return losses, logits, metrics

    def make_step(self, images: torch.Tensor, labels: torch.Tensor, transform: Any,
                  generator: torch.Generator | None = None, train: bool = True
                  ) -> tuple[torch.Tensor, Step]:
        """The rule's first input and step context for a batch of uint8 images."""
        x, step = self.rule.make_step(images, labels, transform, self.data.num_classes,
                                      generator, train)
        return self.layout(x), step

    @torch.no_grad()
    def evaluate(self) -> tuple[float, list[float | None]]:
        """Test accuracy of the final prediction and of the prediction at each block's depth."""
        for model in self.models:
            model.eval()
        correct, total, has_logits = None, 0, []
        for x, y in self.test_loader:
            h, step = self.make_step(x, y, self.eval_transform, None, train=False)
            logits = []
            with self.autocast():
                for model in self.models:
                    h, scored = model(h, step)
                    logits.append(scored.logits)
            logits = self.rule.predictions(logits)
            has_logits = [z is not None for z in logits]
            preds = [z.argmax(1) if z is not None else torch.full_like(y, -1) for z in logits]
            preds, y = self.accelerator.gather_for_metrics((torch.stack(preds, 1), y))
            hits = (preds == y[:, None]).sum(0)
            correct = hits if correct is None else correct + hits
            total += len(y)
        if not has_logits or not has_logits[-1]:
            raise RuntimeError(f"rule {self.rule.name!r}: the last part gives no logits")
        acc = (correct.double() / total).tolist()
        block_acc: list[float | None] = [None] * len(self.stack.blocks)
        for i, part in enumerate(self.parts):
            if part.block_ids and has_logits[i]:
                block_acc[part.block_ids[-1]] = acc[i]
        return acc[-1], block_acc

    def fit(self) -> dict[str, Any]:
        """Train for ``config.epochs`` epochs; returns the results for the run record."""
        cfg, acc = self.config, self.accelerator
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
            if acc.is_main_process and cfg.progress:
                blocks = " ".join(f"{a:.3f}" for a in entry["block_acc"] if a is not None)
                tqdm.write(
                    f"epoch {epoch + 1}/{cfg.epochs} [{', '.join(entry['trained_parts'])}]: "
                    f"loss {entry['train_loss']:.4f} test acc {entry['test_acc']:.4f} "
                    f"| per depth {blocks}"
                )
        last = self.history[-1]
        result = {
            "test_acc": last["test_acc"],
            "block_acc": last["block_acc"],
            "history": self.history,
            "seconds": round(self.fit_seconds(), 3),
        }
        for obs in self.observers:
            obs.on_fit_end(self, result)
        return result

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, acc = self.config, self.accelerator
        trained = self.schedule[epoch]
        for i in trained:
            self.activate(i)
        for i, model in enumerate(self.models):
            model.train(i in trained or self.rule.frozen_train_mode)
        loader, start = self.train_loader, 0
        if self.rule.cache_inputs and trained[0] > 0:
            loader, start = self._cached_inputs(trained[0])
        self._order.manual_seed(cfg.seed * 1_000_003 + epoch)
        # One generator per epoch and process: augmentation is reproducible and not shared.
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 101 + acc.process_index)
        sums = torch.zeros(len(trained), device=acc.device)
        metric_sums: dict[int, dict[str, torch.Tensor]] = {}
        hits = torch.zeros((), device=acc.device)
        seen = scored = 0  # images trained on; those of them in steps that gave logits
        bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
            # None hides the bar where stderr is not a terminal (logs keep the epoch lines).
            disable=None if cfg.progress and acc.is_main_process else True,
            leave=False, dynamic_ncols=True,
        )
        cuda = acc.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(acc.device)
        saved_peak = 0
        t0 = time.perf_counter()
        for step, batch in enumerate(bar):
            if start == 0:
                images, y = batch
                x, context = self.make_step(images, y, self.train_transform, gen)
            else:  # cached inputs of part `start`, with the (un-augmented) images they came from
                x, images, y = batch
                x = self.layout(x)
                _, context = self.make_step(images, y, self.eval_transform)
            if step == 0:  # activation memory: peak bytes saved for backward in one step
                with SavedTensorMeter(*self.parts) as meter:
                    losses, logits, metrics = self.train_step(x, context, trained, start)
                saved_peak = meter.peak
            else:
                losses, logits, metrics = self.train_step(x, context, trained, start)
            sums += torch.stack([losses[i] for i in trained])
            for i, values in metrics.items():
                kept = metric_sums.setdefault(i, {})
                for key, value in values.items():
                    kept[key] = kept[key] + value if key in kept else value
            if logits is not None:
                hits += (logits.argmax(1) == y).sum()
                scored += len(y)
            seen += len(y)
            if (step + 1) % cfg.log_every == 0:
                self._check_divergence(sums, trained, epoch, step)
                shown = {"loss": f"{sums[-1].item() / (step + 1):.3f}"}
                if scored:  # a rule whose steps give no logits (forward-forward) has no accuracy
                    shown["acc"] = f"{hits.item() / scored:.3f}"
                shown["img_s"] = f"{seen * acc.num_processes / (time.perf_counter() - t0):.0f}"
                bar.set_postfix(shown)
        seconds = time.perf_counter() - t0
        bar.close()
        steps = max(1, len(loader))
        self._check_divergence(sums, trained, epoch, steps - 1)
        sums = acc.reduce(sums, "mean") / steps  # every process's mean loss, averaged
        # Summed over processes: hits, images in steps with logits, images.
        counts = acc.reduce(torch.stack([
            hits, torch.tensor(scored, device=acc.device), torch.tensor(seen, device=acc.device),
        ]), "sum").tolist()
        if self.rule.frozen_train_mode and acc.num_processes > 1:
            self._share_frozen_buffers(trained[0])
        # What this process holds: weights, buffers and optimizer state, before the parts
        # that train no more drop their optimizers.
        state = held_bytes(self.parts, [opt for opt in self.optimizers if opt is not None])
        for i in trained:
            if not any(i in later for later in self.schedule[epoch + 1:]):
                self.deactivate(i)
        names = [self.parts[i].part_name for i in trained]
        part_loss = dict(zip(names, sums.tolist(), strict=True))
        entry = {
            "epoch": epoch + 1,
            "trained_parts": names,
            "train_loss": sums[-1].item(),
            "part_loss": part_loss,
            # null, not 0, where no step of the epoch gave logits (on any process)
            "train_acc": counts[0] / counts[1] if counts[1] > 0 else None,
            "dropped_images": self.dropped_images,
            "seconds": round(seconds, 3),
            "images_per_s": round(counts[2] / max(seconds, 1e-9), 1),
            "saved_bytes_peak": saved_peak,
            "state_bytes": state,
        }
        if cuda:
            entry["cuda_max_memory"] = torch.cuda.max_memory_allocated(acc.device)
        keys = sorted({key for values in metric_sums.values() for key in values})
        if keys:  # each part's metrics averaged over the epoch's steps; null where not trained
            entry["rule_metrics"] = {key: {
                part.part_name: metric_sums[i][key].item() / steps
                if key in metric_sums.get(i, {}) else None
                for i, part in enumerate(self.parts)} for key in keys}
        return entry

    def _share_frozen_buffers(self, first: int) -> None:
        """Give every process process 0's buffers of the frozen parts before ``first``.

        Frozen parts are not wrapped by DDP; run in training mode, each process's
        BatchNorm statistics would follow its own shard. DDP keeps a wrapped
        part's buffers as process 0 has them, and so does this, once per epoch.
        """
        for part in self.parts[:first]:
            for buffer in part.buffers():
                torch.distributed.broadcast(buffer, 0)

    @torch.no_grad()
    def _cached_inputs(self, first: int):
        """A loader of the frozen prefix's outputs (parts before ``first``) on the training set.

        Computed once per first trained part, without augmentation, so later
        parts do not run the prefix again every epoch.
        """
        if self._features is not None and self._features[0] == first:
            return self._features[1], first
        self._features = None  # free the previous cache first
        acc, cfg = self.accelerator, self.config
        for part in self.parts[:first]:
            part.eval()
        images, labels = self.data.train_images, self.data.train_labels
        chunks = []
        batch = cfg.eval_batch_size or 2 * cfg.batch_size
        with self.autocast():
            for k in range(0, len(images), batch):
                h = self.eval_transform(images[k:k + batch].to(acc.device))
                for part in self.parts[:first]:
                    h = part.run_blocks(h)
                chunks.append(h.float().cpu())
        features = torch.cat(chunks)
        if acc.is_main_process and cfg.progress:
            tqdm.write(f"cached the inputs of part {self.parts[first].part_name!r}: "
                       f"{tuple(features.shape)}, {features.nbytes / 2**20:.0f} MiB")
        # The images travel with their features: each step's context holds the network input.
        dataset = torch.utils.data.TensorDataset(features, images, labels)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.batch_size, shuffle=True,
            drop_last=dropped_images(len(labels), cfg.batch_size) > 0,  # as the images' loader
            generator=torch.Generator().manual_seed(cfg.seed + first),
        )
        self._features = (first, acc.prepare(loader))
        return self._features[1], first

    def _check_divergence(
        self, sums: torch.Tensor, trained: list[int], epoch: int, step: int
    ) -> None:
        """Stop on a non-finite loss, or a mean loss above ``config.max_loss``."""
        means = (sums / (step + 1)).tolist()
        for i, mean in zip(trained, means, strict=True):
            where = f"by epoch {epoch + 1}, step {step + 1}"
            name = self.parts[i].part_name
            if not math.isfinite(mean):
                raise Diverged(f"rule {self.rule.name!r} diverged: part {name!r} has a "
                               f"non-finite loss {where}")
            if self.config.max_loss > 0 and mean > self.config.max_loss:
                raise Diverged(f"rule {self.rule.name!r} diverged: part {name!r} has a mean "
                               f"loss of {mean:.4g}, above --max-loss {self.config.max_loss:g}, "
                               f"{where}")
