"""The README's Quickstart is what CI runs: keep the two in sync."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart\s+```bash\n(.*?)```", text, re.S)
    assert block, "README has no Quickstart bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_quickstart_has_exactly_two_lines() -> None:
    lines = quickstart_lines()
    assert len(lines) == 2
    assert lines[0].startswith("pip install -e . && peftc compile")
    assert "pytest" in lines[1]


def test_ci_runs_the_readme_test_line() -> None:
    test_line = quickstart_lines()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_line in [line.strip() for line in ci], ".ci/run must run the README's test line verbatim"
