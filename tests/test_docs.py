"""The docs cannot rot: their code runs, and every registered rule is documented."""

import re

from conftest import ROOT

from locallearn import list_rules
from locallearn.rules.base import RULES


def test_readme_python_example_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its record goes to runs/ here
    text = (ROOT / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "stem" in printed and "0." in printed
    assert "complete" in printed and (tmp_path / "runs" / "from_python.json").is_file()


def test_every_rule_has_a_section_in_rules_md_with_its_paper():
    text = (ROOT / "docs" / "rules.md").read_text()
    for name in list_rules():
        section = re.search(rf"^## {re.escape(name)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
        assert section, f"docs/rules.md has no section for rule {name!r}"
        first_author = RULES.get(name).meta["paper"].split()[0]
        assert first_author in section.group(1)


def test_every_registered_head_and_loss_is_in_its_table_in_rules_md():
    from locallearn.heads import HEADS
    from locallearn.losses import LOSSES

    text = (ROOT / "docs" / "rules.md").read_text()
    for title, registry in (("Heads", HEADS), ("Losses", LOSSES)):
        section = re.search(rf"^## {title}\n(.*?)(?=^## |\Z)", text, re.S | re.M).group(1)
        rows = set(re.findall(r"^\| `([a-z_0-9]+)` \|", section, re.M))
        assert rows == set(registry.names()), (title, rows ^ set(registry.names()))


def test_readme_shows_the_main_job_and_the_test_command():
    text = (ROOT / "README.md").read_text()
    assert "accelerate launch benchmarks/run.py --rule layerwise" in text
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = "pip install -e '.[test]' && python -m pytest -n auto"
    assert test_command in text and test_command in ci
