"""Worker for tests/test_distributed.py: train a few steps, save this rank's parameters.

Run under ``torchrun --nproc_per_node N`` or as one plain process:

    python tests/distributed_worker.py RULE BATCH OUT_DIR
"""

import sys
from pathlib import Path

import timm
import torch
from accelerate import Accelerator

from locallearn import TrainConfig, Trainer, create_rule, load_dataset, split


def main(rule: str, batch_size: int, out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    data = load_dataset("synthetic")  # no augmentation, so processes see the same inputs
    torch.manual_seed(0)
    options, epochs = {}, 1
    if rule == "sequential":  # frozen blocks in training mode: their BN statistics move
        options, epochs = {"frozen_mode": "train"}, 2
    if rule in ("infopro", "sequential"):  # a CNN in 2 parts (batch norm: ranks agree only)
        model = timm.create_model("resnet18_cifar", num_classes=data.num_classes)
        stack = split(model, "stage", 2, input_size=data.image_size)
    else:
        # A tiny ViT: layer norm is per sample, so 2 x B and 1 x 2B give the same gradients
        # (batch norm would normalise over each process's half batch instead).
        model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2,
                                  embed_dim=32, num_heads=2, num_classes=data.num_classes)
        stack = split(model, input_size=data.image_size)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=0.05, schedule="constant",
                         progress=False)
    trainer = Trainer(stack, create_rule(rule, **options), data, config, accelerator)
    result = trainer.fit()
    flat = torch.cat([p.detach().flatten() for part in trainer.parts for p in part.parameters()])
    first = [b.double().flatten() for b in trainer.parts[0].buffers()]  # BN statistics
    torch.save({"params": flat, "first_part_buffers": torch.cat(first) if first else None,
                "test_acc": result["test_acc"],
                "train_loss": result["history"][0]["train_loss"],
                "num_processes": accelerator.num_processes,
                "distributed_type": str(accelerator.distributed_type)},
               out / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # tear the process group down before exiting


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
