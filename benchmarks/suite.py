"""Run a preset's grid (every run x seed), one or several at a time; see ``--help``.

    python benchmarks/suite.py --preset cpu-smoke            # into benchmarks/results/cpu-smoke/
    python benchmarks/suite.py --preset cpu-smoke --dry-run  # list the runs and what is done
    python benchmarks/suite.py --preset paper-resnet18 --epochs 5 --seeds 0
    python benchmarks/suite.py --preset cpu-smoke -- --mixed-precision bf16   # any run.py flag
    python benchmarks/suite.py --preset gpu-short --jobs 6   # six runs share one GPU

Each run is ``benchmarks/run.py`` in a subprocess, so one run's memory and
state never leak into the next. A run whose record already exists with
status ``complete`` (or ``diverged``: a final outcome too) is skipped, so an
interrupted grid resumes where it stopped; ``--redo`` runs everything again.
Every run's arguments are checked before the first one starts.

With ``--jobs N`` up to N runs go at once: one GPU runs several small jobs
well (five 10-epoch resnet18_cifar runs shared one H200 in about 200 s), and
each line a run prints is shown prefixed with its label. Children run in
sessions of their own, so a Ctrl-C reaches this script only, and it sends
each running child one SIGINT: each writes its record as interrupted.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from locallearn.settings import Parser, positive_int

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "benchmarks" / "run.py"
DONE = ("complete", "diverged")


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be integers, e.g. 0,1; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="suite.py", description="Run every run x seed of a preset, skip done ones.",
                epilog="Flags after -- go to every run.py run, after the preset's.")
    p.add_argument("--preset", required=True, help="a name in benchmarks/presets/ or a .json file")
    p.add_argument("--data", metavar="PATH", help="an image folder (--dataset imagefolder:PATH)")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--seeds", type=_seeds, help="override the preset's seeds, e.g. 0,1")
    p.add_argument("--rules", help="only these rules or run ids, comma-separated")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results"),
                   help="records go to OUTPUT/<preset>/ (default benchmarks/results)")
    p.add_argument("--redo", action="store_true", help="run again even runs that are done")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                   help="run up to N runs at once (default 1); with N > 1 each line a run "
                   "prints starts with its label, and each run gets OMP_NUM_THREADS = "
                   "max(1, cores // N) unless OMP_NUM_THREADS is set, so that runs on a CPU "
                   "do not oversubscribe its cores (on a CPU, N > 1 seldom pays)")
    return p


def plan(args: argparse.Namespace, extra: list[str]) -> tuple[object, list[dict], list[str]]:
    """The preset, one item per run x seed (argv, record path, status), and skip messages."""
    from locallearn import cli
    from locallearn.errors import ConfigError, LocallearnError
    from locallearn.outputs import flag_tags
    from locallearn.plugins import load_plugins
    from locallearn.presets import load_preset
    from locallearn.records import read_record, record_name
    from locallearn.rules import list_rules

    preset = load_preset(args.preset)
    ref = str(Path(args.preset).resolve()) if preset.path.stem != args.preset else args.preset
    load_plugins(preset.args.get("plugin", []))
    runs, skipped = preset.runs(list_rules())
    if args.rules:
        wanted = {r.strip() for r in args.rules.split(",") if r.strip()}
        runs = [r for r in runs if r.rule in wanted or r.run_id in wanted]
    overrides = []
    if args.data:
        overrides += ["--dataset", f"imagefolder:{args.data}"]
    if args.epochs:
        overrides += ["--epochs", str(args.epochs)]
    folder = _short(Path(args.output) / preset.name)
    items = []
    for run in runs:
        for seed in args.seeds or preset.seeds:
            argv = [*preset.argv(run, ref), "--seed", str(seed), *overrides, *extra]
            try:
                parsed = cli.parse_args(argv)
                # Flags after -- name the records: a grid run again with other ones writes
                # records of its own instead of skipping the first grid's as done.
                name = record_name(run.run_id, parsed.model, parsed.dataset, seed,
                                   flag_tags(extra))
                # The grid owns its folder: it decides what to run again (see DONE, --redo).
                argv += ["--output", str(folder), "--name", name, "--overwrite"]
                parsed = cli.parse_args(argv)
                cli._check(parsed)  # names, options, paths: fail before any run starts
            except LocallearnError as err:
                raise ConfigError(f"run {run.run_id}, seed {seed}: {err}") from err
            path = folder / name
            try:
                status = read_record(path)["status"]
            except Exception:  # absent, unreadable or foreign: run it
                status = "absent"
            items.append({"id": run.run_id, "seed": seed, "argv": argv, "path": path,
                          "status": status})
    return preset, items, skipped


def _short(path: Path) -> Path:
    """``path`` relative to the working directory when it lies below it (shorter commands)."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def _command(item: dict, jobs: int) -> tuple[list[str], dict | None]:
    """run.py's arguments for ``item`` and its environment (None: this one's).

    A child's progress bars stay off at any ``jobs``: its output is a pipe, not a
    terminal, and every bar hides then (tqdm's ``disable=None``), while its epoch
    lines still come. With several at once, unbuffered output shows each run's
    lines as they come rather than in bursts, and each gets its share of the cores.
    """
    if jobs == 1:
        return item["argv"], None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return item["argv"], env


def _start(argv: list[str], env: dict | None, item: dict, lines: queue.Queue) -> subprocess.Popen:
    """Start run.py; a thread puts ``(item, line)`` on ``lines`` for each line, then ``None``."""
    # A session of its own: a Ctrl-C reaches this script only, which passes one SIGINT on.
    proc = subprocess.Popen([sys.executable, str(RUN_PY), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                            start_new_session=True)

    def pump() -> None:
        for line in proc.stdout:
            lines.put((item, line.rstrip()))
        lines.put((item, None))

    threading.Thread(target=pump, daemon=True).start()
    return proc


def _label(item: dict) -> str:
    return f"{item['id']} seed {item['seed']}"


def _execute(todo: list[dict], jobs: int, bar) -> list[str]:
    """Run ``todo``, up to ``jobs`` at a time; returns the failed runs' descriptions.

    A Ctrl-C sends each running child SIGINT, waits for them (they write their
    records) and raises KeyboardInterrupt.
    """
    lines: queue.Queue = queue.Queue()
    waiting, running, failed = list(todo), {}, []
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                item = waiting.pop(0)
                argv, env = _command(item, jobs)
                bar.write(f"{_label(item)}: python benchmarks/run.py {' '.join(argv)}")
                running[id(item)] = _start(argv, env, item, lines)
                bar.set_postfix_str(_label(item) if jobs == 1 else f"{len(running)} running")
            item, line = lines.get()
            if line is not None:
                bar.write(f"  {line}" if jobs == 1 else f"{_label(item)} | {line}")
                continue
            code = running.pop(id(item)).wait()
            if code not in (0, 3):  # 3: diverged, recorded as such
                failed.append(f"{_label(item)} (exit status {code})")
            if jobs > 1:
                bar.set_postfix_str(f"{len(running)} running")
            bar.update()
    except KeyboardInterrupt:
        for proc in running.values():
            proc.send_signal(signal.SIGINT)
        for proc in running.values():
            proc.wait()
        raise
    return failed


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2: bad input, 1: a run failed)."""
    from locallearn.errors import LocallearnError

    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    try:
        args = build_parser().parse_args(own)
        preset, items, skipped = plan(args, extra)
    except LocallearnError as err:
        print(f"suite.py: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
    for message in skipped:
        print(f"suite.py: {message}")
    todo = [i for i in items if args.redo or i["status"] not in DONE]
    if args.dry_run:
        print(f"preset {preset.name}: {preset.about}\n")
        for item in items:
            state = "to run" if item in todo else f"done ({item['status']})"
            print(f"{item['id']:24s} seed {item['seed']}  {state:18s} {item['path']}")
            print(f"    python benchmarks/run.py {' '.join(item['argv'])}")
        print(f"\n{len(todo)} of {len(items)} runs to go")
        return 0
    from tqdm.auto import tqdm

    started = time.perf_counter()
    bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="run",
               desc=f"{preset.name}", dynamic_ncols=True)
    try:
        failed = _execute(todo, args.jobs, bar)
    except KeyboardInterrupt:
        bar.close()
        print("suite.py: interrupted; run it again to resume", file=sys.stderr)
        return 130
    bar.close()
    minutes = (time.perf_counter() - started) / 60
    print(f"{preset.name}: {len(todo) - len(failed)} run(s) in {minutes:.1f} min, "
          f"{len(items) - len(todo)} already done, {len(failed)} failed; records in "
          f"{Path(args.output) / preset.name}")
    for f in failed:
        print(f"  failed: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
