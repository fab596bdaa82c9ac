"""Worker for tests/test_pipeline.py: train a few steps serially or pipelined, save the weights.

    [torchrun --nproc_per_node R] tests/pipeline_worker.py serial MODEL[,MODEL] OUT_DIR
    torchrun --nproc_per_node P tests/pipeline_worker.py parts-time|parts-memory[/S] \
        MODEL[,MODEL] OUT [RESUMED]
    torchrun --nproc_per_node P tests/pipeline_worker.py replay MODEL OUT

MODEL is ``vit`` (a tiny ViT), ``cnn`` (resnet32_cifar in 3 blocks) or ``mlp`` (a small
ff_mlp), trained by
``layerwise``, or ``MODEL:RULE`` for another rule (``cnn:infopro``: its decoder reads
the network input from the step context, which crosses the stages); ``vit:fp16`` is
the ViT under fp16. Each process
saves, for each model, the parameters and buffers of the parts it trained, by part index:
one launch trains several models, as starting Python costs more here than training.
Every run measures the information plane too (each stage its own blocks). ``/S`` cuts
S stages, each with P / S replicas; ``serial`` under torchrun is the serial loop's
data parallelism (DDP) on R processes.

The pipelined run of the model named RESUMED saves a checkpoint after each epoch
(``OUT/ckpt-MODEL``); then, in the same processes, a fresh trainer resumes from the
epoch-1 checkpoint alone (copied to ``OUT/resumed-MODEL``) as ``run.py --resume``
does (the saved stage cut, :meth:`Checkpointer.resume`), trains epoch 2, and its
weights are saved too (``"resumed"``); last, every process tries a copy of that
checkpoint whose stage-1 weights are cut short (``"damaged"``: the error it got).

``replay`` trains MODEL with asynchronous stages (a replay buffer) in each of the
:data:`REPLAY` scenarios, one stage slowed down by a sleep before each training step,
and saves each scenario's results under its name; first, it trains MODEL once in step
with the progress bar on and stderr a terminal (``"progress"``: what each process drew).
"""

import io
import shutil
import sys
import time
from pathlib import Path

import timm
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradScalerKwargs

from locallearn import TrainConfig, Trainer, checkpoint, create_rule, load_dataset, split
from locallearn.analysis import InformationPlane
from locallearn.pipeline import PipelineExecutor

FP16 = "vit:fp16"  # the results' key of the fp16 run
IDENTITY = {"test": "pipeline_worker"}  # what the checkpoints must match
RUN_ID = "pipeline-worker"
# Asynchronous stages: scenario -> (buffer M, max reuse K, the stage slowed down). Starved:
# the stages after the first wait for every batch and may draw it once, so they step on
# each batch once, in order; slow: the last stage falls behind and skips batches; fast:
# the stages after the first outrun the first and draw batches again.
REPLAY = {"starved": (4, 1, 0), "slow": (2, None, -1), "fast": (4, None, 0)}
DELAY = 0.3  # seconds of sleep before each training step of the slowed stage


def build(model: str, data):
    torch.manual_seed(0)
    if model == "vit":  # layer norm: nothing depends on the batch's other images' statistics
        net = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2,
                                embed_dim=32, num_heads=2, num_classes=data.num_classes)
        return split(net, input_size=data.image_size)
    if model == "mlp":  # forward-forward's: its prediction sums every layer's goodness
        net = timm.create_model("ff_mlp", num_classes=data.num_classes, img_size=16,
                                widths=(32, 32, 32))
        return split(net, input_size=data.image_size)
    # A CNN: batch norm's statistics and running buffers must match too.
    net = timm.create_model("resnet32_cifar", num_classes=data.num_classes)
    return split(net, "stage", 3, input_size=data.image_size)


def setup(spec: str):
    """The stack, rule, data and loop settings of ``spec`` (``MODEL[:RULE]``), built afresh."""
    model, _, rule = spec.partition(":")
    data = load_dataset("synthetic", train_subset=64, test_subset=40, seed=0)
    # Two epochs: the data order is reseeded and the test set evaluated in between.
    config = TrainConfig(epochs=2, batch_size=16, lr=0.05, schedule="cosine", progress=False)
    return build(model, data), create_rule(rule or "layerwise"), data, config


def weights(trainer, parts) -> dict[int, torch.Tensor]:
    """The float parameters and buffers of ``parts``, each part's as one float64 vector."""
    return {i: torch.cat([t.detach().double().flatten() for t in
                          [*trainer.parts[i].parameters(), *trainer.parts[i].buffers()]
                          if t.is_floating_point()])
            for i in parts}


def train(mode: str, spec: str, accelerator: Accelerator, checkpoints: Path | None = None
          ) -> dict:
    mode, _, stages = mode.partition("/")
    stages = int(stages) if stages else None
    stack, rule, data, config = setup(spec)
    # The plane on 24 probe images in batches of 10: measured at epochs 0, 1 and 2.
    plane = InformationPlane(probe_size=24, batch_size=10)
    if mode == "serial":
        trainer = Trainer(stack, rule, data, config, accelerator, (plane,))
    else:  # parts-time or parts-memory: how the stages are balanced
        saver = (checkpoint.Checkpointer(checkpoints, 2, IDENTITY, RUN_ID),) if checkpoints \
            else ()
        executor = PipelineExecutor(balance_by=mode.removeprefix("parts-"), num_stages=stages)
        trainer = Trainer(stack, rule, data, config, accelerator, (plane, *saver), executor)
    # fp16: each part's scaler, kept before the parts drop them after the last epoch.
    scalers = dict(enumerate(trainer.scalers))
    result = trainer.fit()
    out = {"parts": weights(trainer, trainer.owned), "test_acc": result["test_acc"],
           "block_acc": result["block_acc"], "history": result["history"],
           "num_parts": len(trainer.parts), "plane": plane.entries,
           "scales": {i: s.get_scale() for i, s in scalers.items() if s is not None},
           "mine": list(trainer.owned)}
    if checkpoints:
        out |= resume(spec, accelerator, checkpoints, stages)
    return out


def resume(spec: str, accelerator: Accelerator, checkpoints: Path, stages: int | None
           ) -> dict:
    """Resume ``spec``'s run after epoch 1 in a fresh trainer, as ``run.py --resume`` does."""
    folder = checkpoints.parent / f"resumed-{spec}"
    damaged = checkpoints.parent / f"damaged-{spec}"
    if accelerator.is_main_process:  # epoch 1's checkpoint alone, so it is the newest there
        shutil.copytree(checkpoints / "epoch0001", folder / "epoch0001")
        shutil.copytree(checkpoints / "epoch0001", damaged / "epoch0001")
        stage1 = damaged / "epoch0001" / "stage1.safetensors"
        stage1.write_bytes(stage1.read_bytes()[:100])
    accelerator.wait_for_everyone()
    stack, rule, data, config = setup(spec)
    count = stages or accelerator.num_processes
    cut = checkpoint.saved_stages(folder, IDENTITY, count, accelerator.num_processes // count)
    saver = checkpoint.Checkpointer(folder, 2, IDENTITY, RUN_ID)
    trainer = Trainer(stack, rule, data, config, accelerator, (saver,),
                      PipelineExecutor(stages=cut, num_stages=stages))
    start = saver.resume(trainer)
    result = trainer.fit()
    resumed = {"parts": weights(trainer, trainer.owned), "start_epoch": start,
               "stages": trainer.executor.stage_parts, "history": list(result["history"])}
    try:  # every process must refuse it, though only stage 1's file is damaged
        checkpoint.load(trainer, damaged / "epoch0001", IDENTITY, RUN_ID)
        error = None
    except checkpoint.CheckpointError as err:
        error = str(err)
    return {"resumed": resumed, "damaged": error}


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so that tqdm draws its bar into it."""

    def isatty(self) -> bool:
        return True


def progress(spec: str, accelerator: Accelerator) -> str:
    """What ``spec``'s pipelined run with the progress bar on writes to a terminal's stderr."""
    stack, rule, data, config = setup(spec)
    config.progress = True
    trainer = Trainer(stack, rule, data, config, accelerator, executor=PipelineExecutor())
    terminal, kept = Terminal(), sys.stderr
    sys.stderr = terminal
    try:
        trainer.fit()
    finally:
        sys.stderr = kept
    return terminal.getvalue()


def replay(spec: str, accelerator: Accelerator) -> dict:
    """``spec`` trained with asynchronous stages in each :data:`REPLAY` scenario, and once in
    step with the progress bar drawn."""
    out = {"progress": progress(spec, accelerator)}
    for name, (size, cap, slow) in REPLAY.items():
        stack, rule, data, config = setup(spec)
        executor = PipelineExecutor(replay_buffer=size, max_reuse=cap)
        trainer = Trainer(stack, rule, data, config, accelerator, executor=executor)
        if executor.stage == slow % executor.stages_count:
            run = trainer.train_step

            def slowed(*args, run=run):
                time.sleep(DELAY)
                return run(*args)

            trainer.train_step = slowed
        result = trainer.fit()
        out[name] = {"parts": weights(trainer, trainer.owned), "test_acc": result["test_acc"],
                     "block_acc": result["block_acc"], "history": result["history"],
                     "num_parts": len(trainer.parts), "stage": executor.stage}
    return out


def fresh_accelerator(mixed_precision: str = "no") -> Accelerator:
    """An Accelerator in ``mixed_precision`` (Accelerate keeps one setting per process; the
    process group stays). fp16 on the CPU: the loops autocast it themselves, and every part's
    scaler starts at 2**8, low enough that these tiny nets' first gradients do not overflow."""
    AcceleratorState._reset_state()
    GradientState._reset_state()
    handlers = [GradScalerKwargs(init_scale=2.0**8)] if mixed_precision == "fp16" else []
    return Accelerator(cpu=True, mixed_precision=mixed_precision, kwargs_handlers=handlers)


def main(mode: str, models: str, out: Path, resumed: str | None = None) -> None:
    accelerator = Accelerator(cpu=True)
    results = replay(models, accelerator) if mode == "replay" else {}
    for model in models.split(",") if mode != "replay" else ():
        if model == FP16:  # a gradient scaler per part
            results[model] = train(mode, "vit", fresh_accelerator("fp16"))
            accelerator = fresh_accelerator()
        else:
            results[model] = train(mode, model, accelerator,
                                   out / f"ckpt-{model}" if model == resumed else None)
    torch.save(results, out / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), *sys.argv[4:5])
