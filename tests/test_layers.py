"""The layers point one way: memory_models <- pipelines <- serve, with the command line on top.

Read from the source with `ast` (every import, including those inside functions), so a lazy import
cannot hide an upward edge or a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("memory_models", "pipelines", "serve")
# The command line sits on top of everything: it may import any layer.
APP_MODULES = {"pipelines.cli", "pipelines.cli_jobs", "pipelines.main_job"}
LAYER_RANK = {"memory_models": 0, "pipelines": 1, "serve": 2, "app": 3}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    return "app" if module in APP_MODULES else module.split(".")[0]


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports anywhere in the file (resolved to the deepest module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _deepest_module(name, modules)
            if target is not None:
                found.add(target)
    return found


def _deepest_module(name: str, modules: dict[str, Path]) -> str | None:
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {name: imports_of(path, modules) for name, path in modules.items()}
    # A package's __init__ is imported on the way to any of its modules: not an edge of its own.
    return {name: {t for t in targets if t != name} for name, targets in graph.items()}


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{source} ({layer(source)}) imports {target} ({layer(target)})"
        for source, targets in import_graph().items()
        for target in targets
        if LAYER_RANK[layer(target)] > LAYER_RANK[layer(source)]
    ]
    assert not upward, "\n".join(upward)


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first walk, as the cycle it closes (`a -> b -> a`)."""
    cycles: list[str] = []
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_there_is_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path: Path):
    """The two checks above fail on what they are meant to catch (a lazy import included)."""
    source = "def lazy():\n    from serve.app import build_app\n    from pipelines.cli import app\n"
    fake = tmp_path / "fake.py"
    fake.write_text(source)
    found = imports_of(fake, project_modules())
    assert {"serve.app", "pipelines.cli"} <= found
    assert LAYER_RANK[layer("serve.app")] > LAYER_RANK[layer("pipelines.train.loop")]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("memory_models.registry", ("ray", "mlflow", "pipelines", "serve")),
        ("pipelines.checkpoint", ("ray",)),
        ("pipelines.train.loop", ("ray",)),
        ("serve.loading", ("ray.train", "ray.tune")),
    ],
)
def test_light_modules_do_not_pull_in_heavy_ones(module, forbidden):
    """Loading a model for serving or running the plain loop needs neither Ray Train nor Tune."""
    probe = (
        f"import sys, {module}\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {forbidden!r} "
        f"or any(m == f or m.startswith(f + '.') for f in {forbidden!r})]\n"
        "print(' '.join(sorted(bad)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"{module} imports {done.stdout.strip()}"
