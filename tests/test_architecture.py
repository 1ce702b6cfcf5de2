"""The package layout: each stage imports only the stages before it, and nothing imports in a cycle.

Function-level imports count too (they are how commands stay fast to start): a cycle hidden
in a function body is still a cycle. docs/architecture.md describes the stages.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "infd"

# Each stage, first to last; a module may import its own stage's modules and earlier stages'.
STAGES = [
    ("errors", "system"),
    ("geometry", "files"),
    ("images",),
    ("data",),
    ("models",),
    ("rendering",),
    ("store",),
    ("latents",),
    ("diffusion",),
    ("training",),
    ("evaluation",),
    ("viewer",),
    ("inversion",),
    ("stable_diffusion", "official"),
    ("commands",),
    ("app",),  # the web app reuses the commands' checks (loopback, CLIP, generators)
    ("cli",),
]
STAGE_OF = {name: rank for rank, names in enumerate(STAGES) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The infd modules a file imports anywhere in it (`from infd.x import y` counts infd.x.y when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("infd")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("infd") and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in modules}
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}


def stage(module: str) -> int:
    parts = module.split(".")
    return STAGE_OF[parts[1]] if len(parts) > 1 else -1


def test_every_module_belongs_to_a_stage():
    unplaced = sorted(m for m in import_graph() if m != "infd" and m.split(".")[1] not in STAGE_OF)
    assert not unplaced, f"add these to STAGES (and docs/architecture.md): {unplaced}"


def test_no_stage_imports_a_later_one():
    upward = sorted(f"{m} -> {d}" for m, deps in import_graph().items() for d in deps if m != "infd" and stage(d) > stage(m))
    assert not upward, upward


def test_no_import_cycles():
    graph, state, cycles = import_graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


@pytest.mark.parametrize("module", ["infd.commands.render", "infd.commands.train", "infd.commands.viewer"])
def test_commands_never_import_the_cli(module):
    assert "infd.cli" not in import_graph()[module]
