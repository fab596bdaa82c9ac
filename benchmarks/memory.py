"""Activation memory of local learning: peak bytes saved for backward in one training step.

Prints the peak under ``e2e`` and under the local rules with the network cut
into K parts balanced by activation memory, and each one's ratio to ``e2e``.
For ``sequential`` the peak is the largest over its phases (one part trains at
a time), and the script also times its training step on cached features (the
frozen prefix's outputs, as ``--rule-opt cache_features=true`` trains on)
against the ``e2e`` step. ``infopro`` is reported at K = 2 and K = 4, with its
heads recomputed in backward (the default) and without, and the step time
that recomputation costs at K = 2. Bytes saved for backward are counted with
``torch.autograd.graph.saved_tensors_hooks``: the same number on any device.

    python benchmarks/memory.py                      # resnet18_cifar, batch 256, K = 4
    python benchmarks/memory.py --model vgg11_cifar --blocks 8
"""

from __future__ import annotations

import argparse
import statistics

import torch

from locallearn.bench import median_time, random_data, trainer_for
from locallearn.measure import step_peak_bytes

RULES = ("e2e", "layerwise", "sequential", "dgl")
INFOPRO_K = (2, 4)  # InfoPro's paper: about 57% and 37% of E2E memory (ResNet-110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18_cifar")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per phase (median)")
    args = p.parse_args()

    data = random_data(args.batch_size, args.image_size)
    x, y = data.train_images, data.train_labels
    peaks, trainers = {}, {}
    for rule in RULES:
        torch.manual_seed(0)
        blocks = None if rule == "e2e" else args.blocks
        trainer = trainer_for(rule, args.model, data, args.batch_size, blocks,
                              epochs=args.blocks if rule == "sequential" else 1)
        trainers[rule] = trainer
        phases = sorted({tuple(t) for t in trainer.schedule})
        peaks[rule] = max(step_peak_bytes(trainer, x, y, list(t)) for t in phases)
        print(f"{rule:10s} {len(trainer.parts)} parts, {len(phases)} phase(s): "
              f"peak saved for backward {peaks[rule] / 2**20:9.1f} MiB")
    print(f"{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
          f"K = {args.blocks}:")
    for rule in RULES[1:]:
        print(f"  {rule} / e2e = {peaks[rule] / peaks['e2e']:.3f}")
    infopro = {}
    for k in INFOPRO_K:
        for recompute in (True, False):
            torch.manual_seed(0)
            trainer = trainer_for("infopro", args.model, data, args.batch_size, k,
                                  rule_options={"recompute_heads": recompute})
            peak = step_peak_bytes(trainer, x, y)
            note = "" if recompute else ", recompute_heads=false"
            print(f"  infopro (K = {k}{note}) / e2e = {peak / peaks['e2e']:.3f}")
            infopro[k, recompute] = trainer

    # Step time: e2e against sequential training on its cached prefix outputs.
    e2e, seq = trainers["e2e"], trainers["sequential"]
    device = e2e.accelerator.device
    images, step = e2e.make_step(x.to(device), y.to(device), e2e.eval_transform)
    e2e_time = median_time(lambda: e2e.train_step(images, step, [0]), args.repeats, device)
    phase_times = []
    for trained in sorted({tuple(t) for t in seq.schedule}):
        trained = list(trained)
        for i in trained:
            seq.activate(i)
        with torch.no_grad():  # the cache holds what the frozen prefix outputs
            h = images
            for part in seq.parts[: trained[0]]:
                part.eval()
                h = part.run_blocks(h)
        phase_times.append(median_time(
            lambda h=h, t=trained: seq.train_step(h, step, t, t[0]), args.repeats, device
        ))
    seq_time = statistics.mean(phase_times)
    print(f"step time, sequential on cached features (mean over {len(phase_times)} phases) / "
          f"e2e = {seq_time * 1e3:.1f} ms / {e2e_time * 1e3:.1f} ms = {seq_time / e2e_time:.3f}")

    # The price of infopro's recomputed heads: one more forward of each head per step.
    times = {}
    for recompute in (True, False):
        trainer = infopro[INFOPRO_K[0], recompute]
        parts = list(range(len(trainer.parts)))
        times[recompute] = median_time(lambda t=trainer, p=parts: t.train_step(images, step, p),
                                       args.repeats, device)
    print(f"step time, infopro (K = {INFOPRO_K[0]}) with heads recomputed / without = "
          f"{times[True] * 1e3:.1f} ms / {times[False] * 1e3:.1f} ms = "
          f"{times[True] / times[False]:.3f}")


if __name__ == "__main__":
    main()
