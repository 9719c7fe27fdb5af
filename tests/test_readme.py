"""Every command the README shows parses and validates as written; the cheap ones run for real;
its library example trains a model that recalls."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipelines.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CLI = typer.main.get_command(app)
# Run for real: quick, and they need no cluster.
CHEAP = {"--help", "recipes"}


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def readme_memlab_commands() -> list[list[str]]:
    """The argument lists of every `memlab ...` line in the README's bash blocks (without the
    comment after `#`, the leading environment assignments and a trailing `&`)."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words.pop(0)
            if words and words[0] == "memlab":
                commands.append([word for word in words[1:] if word != "&"])
            elif "&& memlab" in line:
                commands.append(words[words.index("memlab") + 1 :])
    return commands


def parse(args: list[str]) -> tuple[str, dict]:
    """Parse `memlab <args>` as the CLI would, down to the leaf command: (its path, its params).
    A bad option raises the CLI's own usage error."""
    command, ctx, path, rest = CLI, None, [], list(args)
    while hasattr(command, "list_commands"):  # a group (typer ships its own click)
        name, *rest = rest
        ctx = command.context_class(command, info_name=" ".join(["memlab", *path]), parent=ctx)
        found = command.get_command(ctx, name)
        if found is None:
            raise LookupError(f"no command {name!r}")
        command = found
        path.append(name)
    leaf = command.make_context(" ".join(path), rest, parent=ctx)
    return " ".join(path), leaf.params


def validate(path: str, params: dict) -> None:
    """What each command checks before any work: recipe and overrides, data config, serve args."""
    from pipelines.cli import _config
    from pipelines.data.config import config_from_overrides
    from serve.args import ServeArgs

    if "recipe" in params:
        _config(params["recipe"], params.get("overrides"))
    elif path == "prep":
        config_from_overrides(params["task"], params["overrides"])
    elif path == "serve":
        ServeArgs(model_uri=params["model_uri"], tracking_uri=params["tracking_uri"])
    elif path == "report":
        from pipelines.report.run import ReportSettings, report_bases

        keys = ("scale", "name", "from_sweep", "resume", "out", "grace_period")
        settings = {key: params[key] for key in keys}
        report_bases(ReportSettings(**settings, overrides=tuple(params["overrides"] or ())))
    elif path == "submit":
        inner_path, inner = parse([params["command"], *(params["args"] or [])])
        validate(inner_path, inner)


COMMANDS = readme_memlab_commands()


def test_the_readme_shows_the_commands_a_user_needs():
    shown = {tuple(words[:1]) for words in COMMANDS}
    for command in ("run", "train", "tune", "serve", "prep", "submit", "jobs", "zoo"):
        assert (command,) in shown, command


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_every_readme_command_parses_and_validates(args):
    if args != ["--help"]:
        validate(*parse(args))
    if args and args[0] in CHEAP:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output


def test_a_bad_readme_line_would_be_caught():
    with pytest.raises(Exception, match="recipie"):
        parse(["train", "--recipie", "debug-gru"])
    with pytest.raises(LookupError):
        parse(["trian", "--recipe", "debug-gru"])
    with pytest.raises(typer.BadParameter, match=r"train\.lrr"):
        validate(*parse(["train", "--recipe", "debug-gru", "train.lrr=1"]))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_library_example_trains_a_model_that_recalls(tmp_path: Path):
    (example,) = code_blocks("python")
    done = subprocess.run(
        [sys.executable, "-c", example],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert metrics["accuracy"] > 0.9, metrics
    assert not list(tmp_path.iterdir()), "the library path writes no files"
