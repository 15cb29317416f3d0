"""The README's promises: its quick start is what CI runs, and its Python examples run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _quick_start() -> list[str]:
    section = re.search(r"^## Quick start$(.*?)^## ", README, re.S | re.M).group(1)
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_commands_main_job_then_tests():
    main_job, tests = _quick_start()
    assert "fastrms bench" in main_job
    assert "pytest" in tests


def test_ci_runs_the_readme_quick_start_in_order():
    main_job, tests = _quick_start()
    ci = (ROOT / ".ci" / "run").read_text()
    assert main_job in ci and tests in ci
    assert ci.index(main_job) < ci.index(tests)


EXAMPLES = [
    block
    for block in re.findall(r"```python\n(.*?)```", README, re.S)
    if "cupy" not in block and "torch" not in block  # GPU examples need a device
]


@pytest.mark.parametrize("code", EXAMPLES, ids=lambda c: c.splitlines()[-1][:40])
def test_python_examples_run(code):
    exec(compile(code, "README.md", "exec"), {})
