"""Activation memory of local learning: peak bytes saved for backward in one training step.

Prints, for ``e2e`` and for the local rules with the network cut into K parts
balanced by activation memory, a table of MiB and each one's ratio to
``e2e``'s:

- ``saved``: peak bytes saved for backward in one step, counted with
  ``torch.autograd.graph.saved_tensors_hooks``: the same number on any device.
- ``state``: the weights, buffers and optimizer state the step starts from
  (auxiliary nets included), counted from the tensors after a step.
- on CUDA only, ``cuda step``: the peak of ``torch.cuda.max_memory_allocated``
  over one training step (after one warm-up step) minus what was allocated just
  before it, so weights and optimizer state are left out; and ``cuda total``:
  that plus ``state``, close to the ``cuda_max_memory`` a run's record shows.
  On a CPU one line says these columns need a GPU.

For ``sequential`` each number is the largest over its phases (one part
trains at a time; earlier parts are frozen and drop their optimizer state, as
in training). ``infopro`` is reported at K = 2 and K = 4, with its heads
recomputed in backward (the default) and without (``kept``). Then two step
times: ``sequential`` on cached features (the frozen prefix's outputs, as
``--rule-opt cache_features=true`` trains on) against ``e2e``, and what
infopro's recomputation costs at K = 2.

Why the CUDA ratio is larger than the meter's (one H200, resnet18_cifar,
batch 256, layerwise K = 4: 0.337 by the meter, 0.53 for the step's
allocation, 0.62 for the whole peak): the meter counts only tensors saved for
backward, while the allocator also holds, during the step, the gradients of
the activations as backward passes through them (the largest are those of
the first blocks' 32x32 maps, a bigger share of one part's memory than of the
whole network's), the auxiliary nets' activations and gradients, and cuDNN's
workspace for the convolutions, none of which shrinks as 1/K; the total adds
the weights and optimizer state, auxiliary nets' included, which K does not
shrink either (and parameter gradients, which go the other way: a part holds
only its own). The caching allocator rounds every block up and keeps freed
blocks it cannot reuse: ``max_memory_allocated`` counts the rounding, and
``memory_reserved`` (what ``nvidia-smi`` shows) the fragmentation too.

    python benchmarks/memory.py                      # resnet18_cifar, batch 256, K = 4
    python benchmarks/memory.py --model vgg11_cifar --blocks 8
"""

from __future__ import annotations

import argparse
import statistics

import torch

from locallearn.bench import median_time, random_data, state_bytes, step_memory, trainer_for

RULES = ("e2e", "layerwise", "sequential", "dgl")
INFOPRO_K = (2, 4)  # InfoPro's paper: about 57% and 37% of E2E memory (ResNet-110)
MIB = 2 ** -20


def measure(trainer, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Bytes of ``trainer``'s step (saved, state; on CUDA step and total), the largest phase's."""
    phases = sorted({tuple(t) for t in trainer.schedule})
    worst = {"parts": len(trainer.parts), "phases": len(phases), "saved": 0, "state": 0,
             "step": None, "total": None}
    for phase in phases:
        for i in range(phase[0]):  # frozen by now: no optimizer state, as in training
            trainer.deactivate(i)
        saved, step = step_memory(trainer, x, y, list(phase))
        state = state_bytes(trainer)
        worst["saved"], worst["state"] = max(worst["saved"], saved), max(worst["state"], state)
        if step is not None:
            worst["step"] = max(worst["step"] or 0, step)
            worst["total"] = max(worst["total"] or 0, step + state)
    return worst


def table(rows: dict[str, dict], cuda: bool) -> list[str]:
    """The rows as text, MiB and ratios to the ``e2e`` row."""
    e2e = rows["e2e"]
    head = f"{'rule':24s} {'parts':>5s} {'phases':>6s} {'saved':>8s} {'x e2e':>6s} {'state':>7s}"
    if cuda:
        head += f" {'cuda step':>9s} {'x e2e':>6s} {'cuda total':>10s} {'x e2e':>6s}"
    lines = [head]
    for label, r in rows.items():
        line = (f"{label:24s} {r['parts']:5d} {r['phases']:6d} {r['saved'] * MIB:8.1f} "
                f"{r['saved'] / e2e['saved']:6.3f} {r['state'] * MIB:7.1f}")
        if cuda:
            line += (f" {r['step'] * MIB:9.1f} {r['step'] / e2e['step']:6.3f}"
                     f" {r['total'] * MIB:10.1f} {r['total'] / e2e['total']:6.3f}")
        lines.append(line)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18_cifar")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per phase (median)")
    args = p.parse_args()

    data = random_data(args.batch_size, args.image_size)
    rows, trainers = {}, {}
    for rule in RULES:
        torch.manual_seed(0)
        blocks = None if rule == "e2e" else args.blocks
        trainer = trainer_for(rule, args.model, data, args.batch_size, blocks,
                              epochs=args.blocks if rule == "sequential" else 1)
        trainers[rule] = trainer
        device = trainer.accelerator.device
        x, y = data.train_images.to(device), data.train_labels.to(device)
        rows[rule] = measure(trainer, x, y)
    infopro = {}
    for k in INFOPRO_K:
        for recompute in (True, False):
            torch.manual_seed(0)
            trainer = trainer_for("infopro", args.model, data, args.batch_size, k,
                                  rule_options={"recompute_heads": recompute})
            label = f"infopro K={k}" + ("" if recompute else " kept")
            rows[label] = measure(trainer, x, y)
            infopro[k, recompute] = trainer
    recomputed = {}  # --recompute-blocks: each fine block keeps only its input
    for rule, k in (("layerwise", args.blocks), ("infopro", INFOPRO_K[-1])):
        torch.manual_seed(0)
        trainer = trainer_for(rule, args.model, data, args.batch_size, k, recompute_blocks=True)
        rows[f"{rule} K={k} recompute"] = measure(trainer, x, y)
        recomputed[rule] = trainer
    cuda = device.type == "cuda"
    print(f"{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
          f"K = {args.blocks} (infopro as labelled), on {device.type}; MiB and ratios to e2e:")
    print("\n".join(table(rows, cuda)))
    if not cuda:
        print("(cuda step and cuda total, torch.cuda.max_memory_allocated over a step, "
              "need a GPU)")

    # Step time: e2e against sequential training on its cached prefix outputs.
    e2e, seq = trainers["e2e"], trainers["sequential"]
    images, step = e2e.make_step(x, y, e2e.eval_transform)
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

    # The price of --recompute-blocks: one more forward of every trained block per step.
    plain, again = trainers["layerwise"], recomputed["layerwise"]
    times = [median_time(lambda t=t: t.train_step(images, step, list(range(len(t.parts)))),
                         args.repeats, device) for t in (again, plain)]
    print(f"step time, layerwise (K = {args.blocks}) with blocks recomputed / without = "
          f"{times[0] * 1e3:.1f} ms / {times[1] * 1e3:.1f} ms = {times[0] / times[1]:.3f}")


if __name__ == "__main__":
    main()
