"""Worker for tests/test_pipeline.py: train a few steps serially or pipelined, save the weights.

    python tests/pipeline_worker.py serial MODEL[,MODEL] OUT_DIR
    torchrun --nproc_per_node K tests/pipeline_worker.py parts-time|parts-memory MODEL[,MODEL] OUT

MODEL is ``vit`` (a tiny ViT) or ``cnn`` (resnet32_cifar in 3 blocks), trained by
``layerwise``, or ``MODEL:RULE`` for another rule (``cnn:infopro``: its decoder reads
the network input from the step context, which crosses the stages). Each process
saves, for each model, the parameters and buffers of the parts it trained, by part index:
one launch trains several models, as starting Python costs more here than training.
Every run measures the information plane too (each stage its own blocks).
"""

import sys
from pathlib import Path

import timm
import torch
from accelerate import Accelerator

from locallearn import TrainConfig, Trainer, create_rule, load_dataset, split
from locallearn.analysis import InformationPlane
from locallearn.pipeline import PipelineTrainer


def build(model: str, data):
    torch.manual_seed(0)
    if model == "vit":  # layer norm: nothing depends on the batch's other images' statistics
        net = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2,
                                embed_dim=32, num_heads=2, num_classes=data.num_classes)
        return split(net, input_size=data.image_size)
    # A CNN: batch norm's statistics and running buffers must match too.
    net = timm.create_model("resnet32_cifar", num_classes=data.num_classes)
    return split(net, "stage", 3, input_size=data.image_size)


def train(mode: str, spec: str, accelerator: Accelerator) -> dict:
    model, _, rule = spec.partition(":")
    data = load_dataset("synthetic", train_subset=64, test_subset=40, seed=0)
    stack = build(model, data)
    # Two epochs: the data order is reseeded and the test set evaluated in between.
    config = TrainConfig(epochs=2, batch_size=16, lr=0.05, schedule="cosine", progress=False)
    rule = create_rule(rule or "layerwise")
    # The plane on 24 probe images in batches of 10: measured at epochs 0, 1 and 2.
    plane = InformationPlane(probe_size=24, batch_size=10)
    if mode == "serial":
        trainer = Trainer(stack, rule, data, config, accelerator, (plane,))
    else:  # parts-time or parts-memory: how the stages are balanced
        trainer = PipelineTrainer(stack, rule, data, config, accelerator, (plane,),
                                  balance_by=mode.removeprefix("parts-"))
    result = trainer.fit()
    mine = range(len(trainer.parts)) if mode == "serial" else trainer.mine
    state = {i: torch.cat([t.detach().double().flatten() for t in
                           [*trainer.parts[i].parameters(), *trainer.parts[i].buffers()]
                           if t.is_floating_point()])
             for i in mine}
    return {"parts": state, "test_acc": result["test_acc"], "block_acc": result["block_acc"],
            "history": result["history"], "num_parts": len(trainer.parts),
            "plane": plane.entries}


def main(mode: str, models: str, out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    results = {model: train(mode, model, accelerator) for model in models.split(",")}
    torch.save(results, out / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
