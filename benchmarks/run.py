"""Train a timm backbone by a local-learning rule; see ``python benchmarks/run.py --help``.

Run directly or under ``accelerate launch benchmarks/run.py ...``.
"""

import sys

from locallearn.cli import main

if __name__ == "__main__":
    sys.exit(main())
