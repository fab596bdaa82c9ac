"""Draw information-plane figures from run records; see ``python benchmarks/plane.py --help``.

    python benchmarks/plane.py runs/e2e.json -o plane.png                  # one run's plane
    python benchmarks/plane.py runs/e2e.json runs/layerwise.json -o cmp.png  # side by side
    python benchmarks/plane.py runs/*.json --kind depth -o depth.png       # by depth, last epoch
"""

import sys

from locallearn.analysis.plots import main

if __name__ == "__main__":
    sys.exit(main())
