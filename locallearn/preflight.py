"""What a run checks before it loads data or writes a file: the model it will train, built
and split once (:func:`build_stack`), and the rule's parts tried on a probe batch
(:func:`check_setup`), so a setup that would fail seconds into training fails here, in
one line. docs/architecture.md ("Errors") says what is tried and why the run after it
is the same as without it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .blocks import BlockStack, split
from .data import BatchTransform, DataInfo
from .errors import ConfigError, LocallearnError
from .rules.base import Rule
from .trainer import check_plan

#: Images in the probe batch: the fewest for which train-mode BatchNorm is defined.
PROBE_IMAGES = 2


@dataclass
class Built:
    """The run's model, built and split under its seed (:func:`build_stack`).

    Attributes:
        stack: what the run trains.
        model_options: the options given, plus ``img_size`` where the model needed the data's.
        rng: the CPU random state just after the split, where the run's goes on from.
    """

    stack: BlockStack
    model_options: dict[str, Any]
    rng: torch.Tensor


def build_stack(model: str, model_options: dict[str, Any], info: DataInfo, *,
                granularity: str, num_blocks: int | None, split_after: Sequence[str] | None,
                seed: int) -> Built:
    """Build ``model`` for the data (:func:`build_model`) and split it, seeded by ``seed``.

    The caller's random state is kept (the work runs under a forked one); the state
    after the split comes back in :attr:`Built.rng`, so a run that sets it before
    building its rule's parts continues exactly as if it had built the model itself.
    """
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(seed)
        net, options = build_model(model, info.num_classes, model_options, info.image_size)
        stack = split(net, granularity, num_blocks, input_size=info.image_size,
                      split_after=split_after)
        return Built(stack, options, torch.get_rng_state())


def check_setup(rule: Rule, stack: nn.Module, info: DataInfo, *, epochs: int, batch_size: int,
                train_size: int, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, model: str = "") -> None:
    """Let ``rule`` build its parts on a copy of ``stack`` and run one training pass (as the
    trainer does: each part on its predecessor's detached output, its loss backpropagated
    at once, no optimizer step) and one evaluation pass of :data:`PROBE_IMAGES` random
    images, after :func:`~locallearn.trainer.check_plan`. ``mean``/``std``: None for a
    neutral normalisation (the images are random); ``model``: its name, for messages.
    The copy and a forked random state keep the run's stack and draws as they were.

    Raises:
        LocallearnError: as the rule raised it, or a one-line :class:`ConfigError` for any
            other error, naming the rule, the model and the error's first line.
    """
    channels, num_classes = info.image_size[0], info.num_classes
    transform = BatchTransform(mean or (0.5,) * channels, std or (0.25,) * channels)
    images = torch.randint(0, 256, (PROBE_IMAGES, *info.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    labels = torch.arange(PROBE_IMAGES) % num_classes
    with torch.random.fork_rng(devices=[]), _one_thread():
        try:
            parts = rule.parts(copy.deepcopy(stack), num_classes, transform(images))
            check_plan(rule, parts, epochs, batch_size, train_size)
            x, step = rule.make_step(images, labels, transform, num_classes, None, train=True)
            for part in parts:
                part.train()
                x, scored = part(x.detach(), step)
                if scored.loss.requires_grad:
                    scored.loss.backward()
            with torch.no_grad():
                x, step = rule.make_step(images, labels, transform, num_classes, None,
                                         train=False)
                logits = []
                for part in parts:
                    x, scored = part.eval()(x, step)
                    logits.append(scored.logits)
            predictions = rule.predictions(logits)
            if not rule.label_free and (not predictions or predictions[-1] is None):
                raise RuntimeError("the last part gives no logits, so the network predicts "
                                   "nothing")
            for z in predictions:
                if z is not None and tuple(z.shape) != (PROBE_IMAGES, num_classes):
                    raise RuntimeError(f"a prediction has shape {tuple(z.shape)}; expected "
                                       f"({PROBE_IMAGES}, {num_classes}): one score per class")
        except LocallearnError:
            raise
        except Exception as err:  # noqa: BLE001 - a rule (a plugin's too) may raise anything
            first = " ".join(str(err).split("\n", 1)[0].split())[:200]
            on = f" on model {model!r}" if model else ""
            size = "x".join(map(str, info.image_size))
            raise ConfigError(f"rule {rule.name!r}{on} fails on a probe batch of "
                              f"{PROBE_IMAGES} {size} images: {type(err).__name__}: "
                              f"{first}") from err


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread inside: two probe images gain little from more, and several
    processes probing at once (torchrun on a CPU host, a shared machine) would otherwise
    oversubscribe the cores, which made a check several times slower in our measurements."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub's host answers a TCP connection within ``timeout``."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def build_model(name: str, num_classes: int, options: dict[str, Any], image_size
                ) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model``, and a forward pass on two blank images of the data's size,
    so options or data that break the model are named as the cause, in one line.

    A model that fails on the data's images, and was given no ``img_size``, is built
    again from the same random state with the data's (``ff_mlp``, ViTs): run.py knows the
    size, so the user need not repeat it.

    Returns:
        The model and the options it was built with (``img_size`` added if it was).
    """
    state = torch.get_rng_state()
    model = _create(name, num_classes, options)
    failure = _fails_on(model, image_size)
    if failure and "img_size" not in options:
        sized = {**options, "img_size": image_size[1] if image_size[1] == image_size[2]
                 else tuple(image_size[1:])}
        torch.set_rng_state(state)  # initialised as if given img_size from the start
        with contextlib.suppress(Exception):  # it takes no img_size: the first failure stands
            model = _create(name, num_classes, sized)
            if not _fails_on(model, image_size):
                return model, sized
    if failure:
        cause = " with --model-opt " + _given(options) if options else ""
        raise ConfigError(f"model {name!r}{cause} fails on the data's "
                          f"{'x'.join(map(str, image_size))} images: {failure}")
    return model, options


def _given(options: dict[str, Any]) -> str:
    return " ".join(f"{k}={v!r}" for k, v in options.items())


def _create(name: str, num_classes: int, options: dict[str, Any]) -> nn.Module:
    import timm
    from huggingface_hub import constants

    offline = bool(options.get("pretrained")) and not _hub_reachable()
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or offline  # the cache only: no minute of retries
    try:
        return timm.create_model(name, num_classes=num_classes, **options)
    except Exception as err:  # noqa: BLE001 - timm and the hub raise many kinds
        if offline:
            raise ConfigError(f"model {name!r}: the Hugging Face Hub is unreachable and its "
                              "pretrained weights are not cached; download them where there "
                              "is a network (timm caches them) or drop pretrained=True") from None
        if not options:
            raise
        raise ConfigError(f"model {name!r} rejected --model-opt {_given(options)}: "
                          f"{_first_line(err)}") from None
    finally:
        constants.HF_HUB_OFFLINE = before


def _fails_on(model: nn.Module, image_size) -> str | None:
    """Why ``model`` fails on two blank images of ``image_size`` (its first line), or None."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *image_size))
    except Exception as err:  # noqa: BLE001 - whatever the options or the data broke
        return _first_line(err)
    return None


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())[:160] or type(err).__name__
