"""The README's two quick-start commands refer only to files that exist (or that setup_env.sh creates),
and .ci/run runs exactly the README's test command."""
from __future__ import annotations

import re
import shlex

from conftest import ROOT

VENV_TOOLS = {"python", "python3", "pip"}  # what `python -m venv` (setup_env.sh) puts in .venv/bin


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has no bash block under '## Quick start'"
    commands = [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, commands
    return commands


def referenced_paths(command: str) -> list[str]:
    words = shlex.split(command.replace("(", " ").replace(")", " ").replace("&&", " ").replace("||", " "))
    return [w for w in words if w.endswith((".sh", ".py")) or w.startswith(".venv/")]


def test_quick_start_commands_use_existing_files():
    for command in quick_start_commands():
        for path in referenced_paths(command):
            if path.startswith(".venv/bin/"):
                assert path.split("/")[-1] in VENV_TOOLS, f"README runs {path}, which setup_env.sh does not create"
            else:
                assert (ROOT / path).is_file(), f"README runs {path}, which does not exist"


def test_first_command_runs_the_pipeline_and_ci_runs_the_second():
    first, second = quick_start_commands()
    assert "setup_env.sh" in first and "run_pipeline.sh" in first
    assert "pytest" in second
    assert second in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
