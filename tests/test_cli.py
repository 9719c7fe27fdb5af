"""The README contract and the command-line surface."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    command = next(line for line in ci_lines if line.startswith("python3 -m venv"))
    readme = (ROOT / "README.md").read_text()
    assert command in readme
    assert command.endswith("&& pytest")
    assert command.replace("&& pytest", "&& memlab run") in readme
    assert "pip install torch==2.13.0 &&" in command  # torch first, pinned


def _commands() -> list[str]:
    return [c.name or c.callback.__name__ for c in app.registered_commands]


@pytest.mark.parametrize("command", [*_commands(), None])
def test_every_subcommand_has_help(command):
    args = [command, "--help"] if command else ["--help"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_bad_override_is_refused_before_any_work():
    result = runner.invoke(app, ["train", "--recipe", "debug-gru", "train.lrr=1"])
    assert result.exit_code == 2
    assert "train.lrr" in result.output


def test_unknown_recipe_names_the_known_ones():
    result = runner.invoke(app, ["train", "--recipe", "nope"])
    assert result.exit_code == 2
    assert "debug-gru" in result.output


def test_the_code_is_ruff_clean():
    import subprocess
    import sys

    command = [sys.executable, "-m", "ruff", "check", str(ROOT)]  # ruff comes with the dev extra
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
