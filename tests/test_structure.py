"""The package's shape, checked from its source: imports only run downward through the layers below, nothing
outside ``cli/`` imports from ``cli/``, there are no import cycles (deferred imports inside functions included),
no module holds λ as state, and no source file grows far beyond 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "dynamicrafter"

# Layers, bottom to top: a module may import from its own layer and the ones below, never from above.
LAYERS = [
    # 0: data, errors and pure math (settings, presets, schedules, windows, files, photos, tokens, the toy world)
    {"errors", "config", "settings", "presets", "files", "tokenizer", "images", "long_video", "sampling", "devices",
     "cil", "toy"},
    # 1: the networks, their weights, and the writers of videos and pictures
    {"models", "checkpoint", "hub", "video", "pictures", "measures", "offload"},
    # 2: the pipeline's stages; a request, and a batch's items, checked before any model loads
    {"conditioning", "memory", "pipeline", "request", "items", "toon"},
    # 3: λ sweeps (a pipeline run per λ batch)
    {"sweep"},
    # 4: the public API
    {"api", "__init__"},
    # 5: what stands on the API: batches and their engines, the benchmark, conformance, reports, the web UI
    {"batch", "ray_engine", "bench", "verify", "report", "ui", "ui_jobs"},
    # 6: the front end
    {"cli"},
]
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top(name: str) -> str:
    """dynamicrafter.models.unet -> models; dynamicrafter -> __init__."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(name: str) -> int:
    t = top(name)
    return next(i for i, group in enumerate(LAYERS) if t in group)


def imports(path: Path) -> set[str]:
    """Every dynamicrafter module ``path`` imports, at the top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dynamicrafter")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("dynamicrafter"):
                continue
            for alias in node.names:  # "from . import pipeline" imports a module, not a name
                sub = f"{target}.{alias.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() else target)
    return found - {name}


SOURCES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {module_name(p): imports(p) for p in SOURCES}


def test_every_module_has_a_layer() -> None:
    for name in GRAPH:
        layer(name)  # StopIteration: a new top-level module needs a place in LAYERS


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_run_downward(name: str) -> None:
    upward = sorted(d for d in GRAPH[name] if layer(d) > layer(name))
    assert not upward, f"{name} imports from a layer above it: {upward}"


def test_nothing_outside_cli_imports_cli() -> None:
    offenders = {n: sorted(d for d in deps if top(d) == "cli") for n, deps in GRAPH.items() if top(n) != "cli"}
    assert not {n: d for n, d in offenders.items() if d}


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(GRAPH.get(node, ())):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if dep in GRAPH and dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


def test_the_rules_catch_violations() -> None:
    """The checker itself works: an upward import and a cycle are seen."""
    assert layer("dynamicrafter.cli.app") > layer("dynamicrafter.api") > layer("dynamicrafter.pipeline")
    assert "dynamicrafter.api" in GRAPH["dynamicrafter.batch"]
    assert "dynamicrafter.pipeline" in GRAPH["dynamicrafter.api"]  # deferred (inside a method) imports count


def test_lambda_is_not_module_state() -> None:
    """λ travels with the projected context; no module keeps an image-scale attribute or a context cache."""
    for path in (PACKAGE / "models").glob("*.py"):
        text = path.read_text()
        assert "self.image_cross_attention_scale" not in text, path
        assert "weakref" not in text and "_memo" not in text, path


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines; split it by job"
