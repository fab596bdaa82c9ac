"""Every ``run.py`` example in README.md and docs/ runs as written, or says it is long.

An example is a command in an indented code block that runs ``benchmarks/run.py``
(through ``python``, ``accelerate launch`` or ``torchrun``). Either a ``# GPU-scale: ...``
or ``# long: ...`` comment that gives its expected time ends its line or follows it, or this
test runs it, verbatim, in a folder where ``data/cifar10`` is the CIFAR-10 copy and
the docs' plugin files exist. The README's quickstart has its own test
(``test_cli.py``); other scripts' examples (``suite.py``, ``plane.py``) are not run here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, plugins_undone
from test_plugins import tutorial_code

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LAUNCHERS = ("python benchmarks/run.py", "accelerate launch", "torchrun")
LONG = re.compile(r"#\s*(GPU-scale|long)\b.*\d+(\.\d+)?\s*(s|min|minutes|h|hours)\b")
# The docs' plugin files, by the name their commands use: (page, python block).
PLUGINS = {"my_rules.py": ("adding_a_rule.md", 0), "my_sparse.py": ("adding_a_rule.md", 1),
           "my_losses.py": ("adding_a_loss.md", 0), "my_heads.py": ("adding_a_loss.md", 1)}


def blocks(text: str) -> list[list[str]]:
    """The indented code blocks of a markdown page, outside fenced code."""
    found, current, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        indented = line.startswith("    ") and not fenced
        if indented:
            current.append(line.strip())
        elif current and not line.strip():
            continue  # a blank line inside a block
        elif current:
            found.append(current)
            current = []
    return found + ([current] if current else [])


def examples() -> list[tuple[str, str, bool]]:
    """``(page, command, long)`` for every run.py command in the docs."""
    out = []
    for page in PAGES:
        for block in blocks(page.read_text()):
            lines = "\n".join(block).replace("\\\n", " ").splitlines()
            for i, command in enumerate(lines):
                if not (command.startswith(LAUNCHERS) and "benchmarks/run.py" in command):
                    continue
                notes = [command]  # its own comment, then the comment lines after it
                for line in lines[i + 1:]:
                    if not line.startswith("#"):
                        break
                    notes.append(line)
                long = any(LONG.search(note) for note in notes)
                out.append((page.name, " ".join(shlex.split(command, comments=True)), long))
    return out


EXAMPLES = examples()


def test_the_docs_have_examples_and_long_ones_say_how_long():
    pages = {page for page, _, _ in EXAMPLES}
    assert {"README.md", "adding_a_rule.md", "adding_a_loss.md", "distributed.md"} <= pages
    assert sum(not long for _, _, long in EXAMPLES) >= 8
    for page, command, long in EXAMPLES:
        # every run of the full data or the default 10 epochs is marked as long
        small = "--preset quick" in command or "--list-" in command or "--check" in command
        assert small or long, f"{page}: {command!r} is neither quick nor marked long"


@pytest.mark.parametrize("page, command", [(p, c) for p, c, long in EXAMPLES if not long],
                         ids=[f"{p}: {c.split('run.py ')[-1]}" for p, c, long in EXAMPLES
                              if not long])
def test_example_runs_as_written(page, command, tmp_path, cifar10_path, capsys, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cifar10").symlink_to(cifar10_path)
    for name, (doc, block) in PLUGINS.items():
        (tmp_path / name).write_text(tutorial_code(doc, block))
    argv = command.split("benchmarks/run.py", 1)[1].split()
    script = str(ROOT / "benchmarks" / "run.py")
    if not command.startswith("torchrun"):
        # python or a one-process accelerate launch: run.py's main, in this process; a
        # plugin's registrations are undone after it (they would outlive the test)
        from locallearn.cli import main

        monkeypatch.chdir(tmp_path)
        with plugins_undone():
            status = main(argv)
        out = capsys.readouterr()
        assert status == 0, out.err[-3000:]
        check_outcome(command, out.out, tmp_path)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = shlex.split(command.split("benchmarks/run.py")[0])[1:]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "--master_addr",
           "127.0.0.1", "--master_port", str(port), script, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    check_outcome(command, done.stdout, tmp_path)


def check_outcome(command: str, stdout: str, folder) -> None:
    """A listing prints its entries; a run leaves one complete record of the quick preset."""
    if "--list-" in command:
        assert len(stdout.splitlines()) >= 3
        return
    (record,) = (folder / "runs").glob("*.json")
    record = json.loads(record.read_text())
    assert record["status"] == "complete" and record["config"]["preset"] == "quick"
    assert record["dataset"] == "imagefolder:data/cifar10"
