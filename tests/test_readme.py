"""The README: its quickstart runs as written, and every path and make target it names exists in a clone."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quickstart_runs_and_trains(capsys):
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    exec(compile(code, "README quickstart", "exec"), {})
    loss = float(capsys.readouterr().out.split()[-1])
    assert loss < 0.05


ROOT = README.parent
#: Backticked paths under these folders name files of the repository; `runs/` and `data/` are made by runs.
REPO_FOLDERS = ("docs/", "tests/", "benchmarks/", "samopt/", ".ci/")


def test_the_readme_names_only_paths_and_make_targets_that_exist():
    text = README.read_text()
    links = re.findall(r"\]\(([^)#]+)\)", text)
    named = [p for p in re.findall(r"`([^`\s]+)`", text) if p.startswith(REPO_FOLDERS)]
    assert len(links) >= 15 and len(named) >= 1, (links, named)
    missing = [p for p in links + named if not p.startswith("http") and not (ROOT / p).exists()]
    assert not missing, missing
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.M))
    assert set(re.findall(r"make ([a-z]+)", text)) <= targets
    assert len(text.splitlines()) <= 150  # the reference lives in docs/


def test_no_example_points_outside_the_repository():
    pages = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    # docs/benchmarks.md records the exact commands that were run, on the machine they ran on
    outside = [p.name for p in pages if p.name != "benchmarks.md" and re.search(r"(^|[\s=`'\"])\.\./", p.read_text())]
    assert not outside, outside
