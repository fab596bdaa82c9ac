"""Tabulate the linear probes of run records by depth, over seeds; ``-o`` also draws them.

    python benchmarks/probes.py benchmarks/results/ssl-cpu/*.json -o docs/figures/ssl_probes.png

A row per run (records that differ only in their seed are one run): the probes' test
accuracy per block after the last epoch and before training, mean ± sd over the seeds.
"""

import sys

from locallearn.analysis.probe_report import main

if __name__ == "__main__":
    sys.exit(main())
