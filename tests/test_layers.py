"""The import graph of ``portattn/`` runs one way: each module imports only its own layer or lower
ones, and no import chain comes back to where it started. Function-level imports count too: a lazy
import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "portattn"

# Lowest first. A module belongs to the first layer one of whose prefixes names it or a package above it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("spec", ("portattn.spec", "portattn.extras", "portattn.reference", "portattn.timing", "portattn.version",
              "portattn.memo")),
    ("devices", ("portattn.devices",)),
    ("tiling", ("portattn.tiling",)),
    ("backends", ("portattn.backends",)),
    ("inputs/dispatch", ("portattn.arrays", "portattn.inputs", "portattn.dispatch", "portattn.call", "portattn.autograd",
                         "portattn.torch_ops", "portattn.tuning", "portattn.status", "portattn.capabilities")),
    ("api", ("portattn.api", "portattn.sdpa", "portattn.sdpa_mask_grad", "portattn.kvcache")),
    ("integrations, bench, cli", ("portattn.integrations", "portattn.bench", "portattn.cli", "portattn.__main__",
                                  "portattn.distributed")),
    ("package", ("portattn",)),  # __init__.py: re-exports only
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "portattn"):
            return index
    if module == "portattn":
        return len(LAYERS) - 1
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def imports_of(module: str) -> set[str]:
    """The portattn modules ``module`` imports, at module level or inside functions."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "portattn"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "portattn":
                continue
            for alias in node.names:  # "from package import submodule" depends on the submodule
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_downward(module):
    mine = layer_of(module)
    upward = sorted(m for m in GRAPH[module] if layer_of(m) > mine)
    assert not upward, (f"{module} (layer {LAYERS[mine][0]!r}) imports higher layers: "
                        + ", ".join(f"{m} ({LAYERS[layer_of(m)][0]!r})" for m in upward))


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str):
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    # the graph must include a lazy import: api's autograd import happens inside a function
    assert "portattn.autograd" in GRAPH["portattn.api"] or "portattn.call" in GRAPH["portattn.api"]
    assert "portattn.spec" in GRAPH["portattn.backends.base"]
