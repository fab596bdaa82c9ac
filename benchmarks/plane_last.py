"""Print each record's last-epoch information plane, chance-adjusted, block by block.

    python benchmarks/plane_last.py benchmarks/results/nobp-cpu/*.json

One line per record: its file's run id and seed, then ``block: nHSIC(X;Z), nHSIC(Y;Z)``
in the adjusted form (0 = chance; docs/information_plane.md, "Which form to read"), the
numbers behind the docs' tables of planes over seeds.
"""

import sys
from pathlib import Path

from locallearn.analysis.plots import with_adjusted
from locallearn.errors import LocallearnError
from locallearn.records import read_record


def main(paths: list[str]) -> int:
    try:
        records = [(p, read_record(p)) for p in paths]
        for path, record in records:
            if not record.get("plane"):
                raise LocallearnError(f"{path}: the record has no 'plane' entries")
        records = [(p, with_adjusted(r)) for p, r in records]
    except LocallearnError as err:
        print("plane_last.py: error: " + " ".join(str(err).splitlines()), file=sys.stderr)
        return 2
    for path, record in records:
        last = max(e["epoch"] for e in record["plane"])
        names = (record.get("stack") or {}).get("blocks") or None
        cells = [f"{names[e['block']] if names else e['block']}: {e['nhsic_x_adj']:.3f}, "
                 f"{e['nhsic_y_adj']:.3f}" for e in record["plane"] if e["epoch"] == last]
        seed = (record.get("config") or {}).get("seed")
        print(f"{Path(path).name.split('__')[0]} seed {seed} epoch {last} | " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
