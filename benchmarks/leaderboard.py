"""Write docs/leaderboard.md, docs/leaderboard.csv and the plane figures from the run records.

    python benchmarks/leaderboard.py                       # benchmarks/results/ -> docs/
    python benchmarks/leaderboard.py --results runs/ --docs /tmp/board --no-figures

Same records, same files, byte for byte (see locallearn/leaderboard.py). Bad input
(an unknown flag, a missing folder, no complete record, a leaderboard that would
lose rows without --force) is one line on stderr, exit status 2, and nothing
written; a record that cannot be read is kept apart, with a warning line.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    from locallearn.errors import ConfigError, LocallearnError
    from locallearn.leaderboard import write_all
    from locallearn.settings import Parser

    p = Parser(prog="leaderboard.py", description=__doc__.splitlines()[0])
    p.add_argument("--results", metavar="DIR",
                   help="folder of run records (default benchmarks/results)")
    p.add_argument("--docs", metavar="DIR", default=str(ROOT / "docs"),
                   help="output folder (default docs)")
    p.add_argument("--no-figures", action="store_true", help="skip the information-plane figures")
    p.add_argument("--force", action="store_true",
                   help="replace leaderboard.csv even if rows or runs it has would be lost")
    warnings: list[str] = []
    try:
        try:
            args = p.parse_args(argv)
        except ConfigError as err:
            raise ConfigError(f"{err}; {' '.join(p.format_usage().split())}") from None
        for flag, value in (("--results", args.results), ("--docs", args.docs)):
            if value == "":
                raise ConfigError(f"{flag} needs a folder; got ''")
        results = Path(args.results) if args.results else ROOT / "benchmarks" / "results"
        if not results.is_dir():
            what = "is a file, not a folder" if results.exists() else "does not exist"
            raise ConfigError(f"no folder {str(results)!r} of run records: it {what}")
        source = args.results or "benchmarks/results"
        written = write_all(results, args.docs, source, figures=not args.no_figures,
                            force=args.force, warn=warnings.append)
    except (LocallearnError, OSError) as err:  # OSError: an output cannot be written
        print("leaderboard.py: error: " + " ".join(str(err).splitlines()), file=sys.stderr)
        return 2
    for line in warnings:
        print("leaderboard.py: warning: " + " ".join(line.splitlines()), file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
