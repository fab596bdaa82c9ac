"""Behaviour kept: every rule's one-epoch record from two versions of locallearn, compared.

    python benchmarks/behaviour.py run OUT --data data/cifar10                 # this checkout
    python benchmarks/behaviour.py run OUT --data data/cifar10 --tree ../old   # another one
    python benchmarks/behaviour.py compare OLD NEW                             # exit 1 if apart

``run`` trains every registered rule (and e2e on ff_mlp, as the cpu-smoke preset does) for
one epoch at the cpu-smoke settings on a small subset of the CIFAR-10 copy (512 training and
256 test images, a probe of 128; ``sequential`` needs an epoch per part: 5 epochs of 256
images), one thread, one record per rule in OUT. ``--tree`` runs another checkout's
``benchmarks/run.py`` with its own package (a ``git worktree`` of an older commit, say), so
a refactoring can be checked against the code it replaces on one machine.

``compare`` holds every number of each record in OLD against NEW (history, accuracies,
plane, parameter counts, bytes) within ``--rtol`` (default 1e-6), and every other value
exactly; times, paths, versions, hardware and where each setting came from are left out.
It prints one line per record and each difference, and exits 1 if any record differs.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RULES = ("e2e", "layerwise", "sequential", "dgl", "infopro", "forward_forward")
# Fields that differ between any two runs (clocks, places, file names, machines), not by
# behaviour.
UNCOMPARED = {"seconds", "images_per_s", "eval_seconds", "started", "finished", "path",
              "run_id", "versions", "hardware", "seconds_per_epoch", "config_sources",
              "output", "name", "cache_dir", "data_root", "plane_seconds", "measure_seconds"}


def run(out: Path, data: str, tree: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    common = ["--preset", "cpu-smoke", "--dataset", f"imagefolder:{Path(data).resolve()}",
              "--train-subset", "512", "--test-subset", "256", "--epochs", "1",
              "--probe-size", "128", "--no-progress", "--overwrite", "--output", str(out)]
    runs = {rule: ["--rule", rule] for rule in RULES}
    runs["sequential"] += ["--epochs", "5", "--train-subset", "256"]
    runs["e2e-ff_mlp"] = ["--rule", "e2e", "--model", "ff_mlp", "--optimizer", "adamw",
                          "--lr", "0.001", "--weight-decay", "0", "--batch-size", "16"]
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "OMP_NUM_THREADS": "1"}
    failed = 0
    for name, args in runs.items():
        cmd = [sys.executable, str(tree / "benchmarks" / "run.py"), *common, *args,
               "--name", f"{name}.json"]
        done = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
        print(f"{name}: exit {done.returncode}")
        if done.returncode:
            print(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "")
            failed += 1
    return 1 if failed else 0


def differences(a, b, rtol: float, key: str = "") -> list[str]:
    """Where ``a`` and ``b`` differ: numbers beyond ``rtol``, anything else at all."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) if k not in UNCOMPARED
                for d in (differences(a[k], b[k], rtol, f"{key}.{k}") if k in a and k in b
                          else [f"{key}.{k}: only in {'old' if k in a else 'new'}"])]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{key}: {len(a)} items, then {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in
                differences(x, y, rtol, f"{key}[{i}]")]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if numbers and math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12) or a == b:
        return []
    return [f"{key}: {a!r}, then {b!r}"]


def compare(old: Path, new: Path, rtol: float) -> int:
    from locallearn.errors import ConfigError
    from locallearn.records import read_record

    records = sorted(old.glob("*.json"))
    if not records:
        raise ConfigError(f"no run records (*.json) in {str(old)!r}")
    apart = 0
    for path in records:
        if not (new / path.name).is_file():
            print(f"{path.stem}: no record in {new}")
            apart += 1
            continue
        found = differences(read_record(path), read_record(new / path.name), rtol)
        print(f"{path.stem}: {'the same' if not found else f'{len(found)} differences'}")
        for line in found[:20]:
            print(f"    {line}")
        apart += bool(found)
    return 1 if apart else 0


def main() -> int:
    from locallearn.errors import LocallearnError
    from locallearn.settings import Parser

    parser = Parser(prog="behaviour.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser("run", help="every rule's one-epoch record into OUT")
    p.add_argument("out", type=Path)
    p.add_argument("--data", required=True, help="the extracted CIFAR-10 copy")
    p.add_argument("--tree", type=Path, default=ROOT, help="the checkout to run (default: this)")
    c = sub.add_parser("compare", help="OLD's records against NEW's")
    c.add_argument("old", type=Path)
    c.add_argument("new", type=Path)
    c.add_argument("--rtol", type=float, default=1e-6)
    try:  # bad input: one line, status 2 (Parser raises ConfigError, read_record RecordError)
        args = parser.parse_args()
        if args.command == "run":
            return run(args.out, args.data, args.tree)
        return compare(args.old, args.new, args.rtol)
    except LocallearnError as err:
        print(f"behaviour.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
