"""Property-based: any command line either passes the checks or fails with one clean line."""

import contextlib
import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locallearn.cli import main

FLAGS = ["--rule", "--rule-opt", "--model", "--model-opt", "--dataset", "--epochs",
         "--batch-size", "--lr", "--blocks", "--granularity", "--optimizer", "--seed",
         "--train-subset", "--milestones", "--probe-size", "--schedule", "--name"]
VALUES = st.one_of(
    st.sampled_from(["e2e", "layerwise", "dgl", "sequential", "aux_hidden=3", "aux=cnn",
                     "lr_scales=1,2", "epochs_per_part=1", "0", "-1", "1e-3", "nan", "inf",
                     "synthetic", "cifar10", "imagefolder:", "resnet18_cifar", "x=", "=",
                     "stage", "block", "sgd", "0.5,0.75", ""]),
    st.text(max_size=12),
)
ARGV = st.lists(st.one_of(st.sampled_from(FLAGS), VALUES), max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ARGV)
def test_any_command_line_runs_or_fails_in_one_line(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([*argv, "--check", "--dataset", "synthetic", *argv])
        except SystemExit as exit_:  # --help and argparse's own exits
            status = exit_.code
    lines = err.getvalue().strip().splitlines()
    assert status in (0, 2), (argv, status, err.getvalue())
    if status == 2:
        assert len(lines) == 1 and lines[0].startswith("run.py: error: "), err.getvalue()
    else:
        assert "Traceback" not in err.getvalue()
