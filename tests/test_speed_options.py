"""The loop's speed options on CPU: fp16 with a scaler per part, channels-last, the
optimizer's kernels and torch.compile.

None of these may change what a step computes beyond float rounding; fp16's
scalers must keep the parts apart (a skipped step in one part leaves the
others' scale and steps alone) and resume exactly. Speeds are measured by
``benchmarks/gpu.py``, not here.
"""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradScalerKwargs

from locallearn import create_rule, split
from locallearn.checkpoint import Checkpointer
from locallearn.data import load_dataset
from locallearn.measure import SavedTensorMeter
from locallearn.trainer import TrainConfig, Trainer

BATCH, SIDE = 8, 8


@pytest.fixture(scope="module")
def tiny():
    """Two batches of the synthetic set, cropped to SIDE x SIDE."""
    data = load_dataset("synthetic")
    n = 2 * BATCH
    return dataclasses.replace(
        data, train_images=data.train_images[:n, :, :SIDE, :SIDE].contiguous(),
        train_labels=data.train_labels[:n],
        test_images=data.test_images[:BATCH, :, :SIDE, :SIDE].contiguous(),
        test_labels=data.test_labels[:BATCH])


INIT_SCALE = 2.0**8  # low enough that this tiny net's first fp16 gradients do not overflow


def _fresh_accelerate(mixed_precision: str = "no", **kwargs) -> Accelerator:
    """An Accelerator in ``mixed_precision`` (Accelerate keeps one setting per process)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=True, mixed_precision=mixed_precision, **kwargs)


@pytest.fixture
def fp16():
    """CPU fp16 (the Python API autocasts it itself; run.py refuses it without a GPU), with
    Accelerate's scaler settings, which every part's scaler takes."""
    yield _fresh_accelerate("fp16", kwargs_handlers=[GradScalerKwargs(init_scale=INIT_SCALE)])
    _fresh_accelerate()


def _trainer(data, accelerator=None, rule="layerwise", model="resnet32_cifar", epochs=1,
             **config) -> Trainer:
    torch.manual_seed(0)
    kwargs = {"widths": (8, 16, 16)} if model == "resnet32_cifar" else {
        "img_size": SIDE, "widths": (16, 16, 16)}
    net = timm.create_model(model, num_classes=data.num_classes, **kwargs)
    stack = split(net, "stage", 2, input_size=data.image_size)
    cfg = TrainConfig(**{"epochs": epochs, "batch_size": BATCH, "lr": 0.05, "progress": False,
                         **config})
    return Trainer(stack, create_rule(rule), data, cfg, accelerator=accelerator)


def _batch(trainer: Trainer, data):
    return trainer.make_step(data.train_images[:BATCH], data.train_labels[:BATCH],
                             trainer.eval_transform)


def _params(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.stack.parameters()] + [
        p.detach().clone() for part in trainer.parts for p in part.parameters()]


def test_fp16_gives_every_part_its_own_scaler_and_runs_in_half(fp16, tiny):
    trainer = _trainer(tiny, fp16)
    trained = trainer.schedule[0]
    scalers = [trainer.scalers[i] for i in trained]
    assert all(isinstance(s, torch.amp.GradScaler) for s in scalers)
    assert len({id(s) for s in scalers}) == len(trained)
    # Accelerate's shared scaler never steps a part's optimizer.
    assert all(trainer.optimizers[i].scaler is None for i in trained)
    dtypes = set()
    hook = trainer.stack.blocks[0].register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    x, step = _batch(trainer, tiny)
    losses, _, _ = trainer.train_step(x, step, trained)
    hook.remove()
    assert dtypes == {torch.float16}
    assert all(torch.isfinite(v) for v in losses.values())
    assert [s.get_scale() for s in scalers] == [INIT_SCALE] * len(trained)


@pytest.mark.parametrize("impl", ["auto", "fused"])  # fused: the check runs in the kernel
def test_an_overflow_in_one_part_skips_only_that_parts_step(fp16, tiny, impl):
    trainer = _trainer(tiny, fp16, optimizer_impl=impl)
    trained = trainer.schedule[0]
    first, rest = trainer.parts[trained[0]], [trainer.parts[i] for i in trained[1:]]
    before = {part.part_name: [p.detach().clone() for p in part.parameters()]
              for part in trainer.parts}
    poisoned = next(first.parameters())
    hook = poisoned.register_hook(lambda g: torch.full_like(g, float("inf")))
    x, step = _batch(trainer, tiny)
    trainer.train_step(x, step, trained)
    hook.remove()

    def changed(part):
        return any(not torch.equal(a, b) for a, b in
                   zip(before[part.part_name], part.parameters(), strict=True))

    assert not changed(first), "the overflowing part stepped"
    assert all(changed(part) for part in rest), "a part without overflow did not step"
    scales = [trainer.scalers[i].get_scale() for i in trained]
    assert scales == [INIT_SCALE / 2] + [INIT_SCALE] * len(rest)  # halved for that part only


def test_fp16_scalers_resume_with_the_checkpoint(fp16, tiny, tmp_path):
    trainer = _trainer(tiny, fp16, epochs=2)
    trained = trainer.schedule[0]
    hook = next(trainer.parts[trained[0]].parameters()).register_hook(
        lambda g: torch.full_like(g, float("inf")))
    trainer._train_epoch(0)
    hook.remove()
    trainer.history.append({"epoch": 1})
    saved = [trainer.scalers[i].state_dict() for i in trained]
    assert saved[0]["scale"] < saved[1]["scale"]  # the poisoned part lost scale every step
    identity = {"what": "test"}
    Checkpointer(tmp_path, 2, identity, "run").on_epoch_end(trainer, trainer.history[-1])

    again = _trainer(tiny, fp16, epochs=2)
    assert Checkpointer(tmp_path, 2, identity, "run").resume(again)
    assert [again.scalers[i].state_dict() for i in trained] == saved


def test_channels_last_changes_the_layout_not_the_step(tiny):
    plain, last = _trainer(tiny), _trainer(tiny, channels_last=True)
    x, step = _batch(last, tiny)
    assert x.is_contiguous(memory_format=torch.channels_last)
    conv = next(m for m in last.stack.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    trained = plain.schedule[0]
    for trainer in (plain, last):
        x, step = _batch(trainer, tiny)
        for _ in range(2):
            losses, _, _ = trainer.train_step(x, step, trained)
        trainer.final = losses
    for i in trained:  # convolutions sum in another order: rounding, nothing more
        torch.testing.assert_close(last.final[i], plain.final[i], rtol=1e-4, atol=1e-5)
    for a, b in zip(_params(plain), _params(last), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_every_optimizer_impl_takes_the_same_steps(tiny, optimizer):
    results = {}
    for impl in ("auto", "foreach", "fused", "loop"):
        trainer = _trainer(tiny, model="ff_mlp", optimizer=optimizer, optimizer_impl=impl)
        x, step = _batch(trainer, tiny)
        for _ in range(2):
            trainer.train_step(x, step, trainer.schedule[0])
        results[impl] = _params(trainer)
    # Same arithmetic in other kernels: agreement to float32 rounding.
    for impl in ("foreach", "fused", "loop"):
        for a, b in zip(results["auto"], results[impl], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in
               zip(results["auto"], _params(_trainer(tiny, model="ff_mlp", optimizer=optimizer)),
                   strict=True))


def test_compile_runs_each_trained_part_compiled_with_the_same_losses(tiny):
    # aot_eager traces and differentiates as inductor does, without compiling C++.
    runs = {}
    for mode in ("no", "default"):
        trainer = _trainer(tiny, rule="layerwise", model="ff_mlp", compile=mode,
                           compile_backend="aot_eager", epochs=2)  # still active after one
        entry = trainer._train_epoch(0)
        runs[mode] = (trainer, entry)
    compiled, entry = runs["default"]
    assert sorted(compiled.compiled) == compiled.schedule[0]
    assert all(type(m).__name__ == "OptimizedModule" for m in compiled.compiled.values())
    assert not runs["no"][0].compiled
    eager = runs["no"][1]
    assert entry["part_loss"].keys() == eager["part_loss"].keys()
    for name, loss in eager["part_loss"].items():
        assert entry["part_loss"][name] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert entry["saved_bytes_peak"] > 0
    compiled.deactivate(compiled.schedule[0][0])
    assert compiled.schedule[0][0] not in compiled.compiled


@pytest.mark.parametrize("model", ["resnet18", "resnet32_cifar"])
def test_recomputed_blocks_take_the_same_steps_and_save_less(tiny, model):
    # timm's resnet18 with stochastic depth: the recomputation must draw the same masks and
    # update batch-norm statistics once. resnet32_cifar keeps its 8 x 8 maps at full size:
    # a part of 8 blocks then keeps 8 inputs instead of every block's activations.
    def trainer(recompute: bool) -> Trainer:
        torch.manual_seed(0)
        kwargs = {"drop_path_rate": 0.2} if model == "resnet18" else {"widths": (8, 16, 16)}
        net = timm.create_model(model, num_classes=tiny.num_classes, **kwargs)
        stack = split(net, "block", 2, input_size=tiny.image_size)
        cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=0.05, progress=False,
                          recompute_blocks=recompute)
        return Trainer(stack, create_rule("layerwise"), tiny, cfg)

    runs = {}
    for recompute in (False, True):
        t = trainer(recompute)
        assert all(part.recompute_blocks == recompute for part in t.parts)
        x, step = _batch(t, tiny)
        torch.manual_seed(1)  # the same stochastic-depth masks in both runs
        with SavedTensorMeter(*t.parts) as meter:
            t.train_step(x, step, t.schedule[0])
        t.train_step(x, step, t.schedule[0])
        runs[recompute] = (t, meter.peak)
    (plain, plain_peak), (again, peak) = runs[False], runs[True]
    for a, b in zip(_params(plain), _params(again), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(plain.stack.buffers(), again.stack.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # running statistics
    if model == "resnet32_cifar":
        assert peak < 0.5 * plain_peak, (peak, plain_peak)
    else:
        assert peak <= plain_peak
