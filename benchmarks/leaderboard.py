"""Write docs/leaderboard.md, docs/leaderboard.csv and the plane figures from the run records.

    python benchmarks/leaderboard.py                       # benchmarks/results/ -> docs/
    python benchmarks/leaderboard.py --results runs/ --docs /tmp/board --no-figures

Same records, same files, byte for byte (see locallearn/leaderboard.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    from locallearn.leaderboard import write_all

    p = argparse.ArgumentParser(prog="leaderboard.py", description=__doc__.splitlines()[0])
    p.add_argument("--results", help="folder of run records (default benchmarks/results)")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="output folder (default docs)")
    p.add_argument("--no-figures", action="store_true", help="skip the information-plane figures")
    args = p.parse_args(argv)
    results = Path(args.results) if args.results else ROOT / "benchmarks" / "results"
    if not results.is_dir():
        print(f"leaderboard.py: error: no folder {str(results)!r}", file=sys.stderr)
        return 2
    source = args.results or "benchmarks/results"
    for path in write_all(results, args.docs, source, figures=not args.no_figures):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
