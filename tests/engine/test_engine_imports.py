"""The engine's modules import one another downward only: no cycle, no late import to dodge one."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

import rallypoint.engine

ENGINE = Path(rallypoint.engine.__file__).parent
MODULES = sorted(path.stem for path in ENGINE.glob("_*.py") if path.stem != "__init__")


def sibling_imports(module: str) -> list[tuple[str, bool]]:
    """`(sibling, at_top_level)` for every import of another engine module in `module`'s source."""
    tree = ast.parse((ENGINE / f"{module}.py").read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.module else [alias.name for alias in node.names]
            if node.level == 1:
                found += [(name.split(".")[0], id(node) in top) for name in names if name.split(".")[0] in MODULES]
            elif node.module and node.module.startswith("rallypoint.engine."):
                found.append((node.module.split(".")[2], id(node) in top))
    return found


def test_the_engine_has_modules_to_check() -> None:
    assert {"_message", "_rules", "_sessions", "_table"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_no_function_level_import_of_a_sibling(module: str) -> None:
    late = [sibling for sibling, at_top in sibling_imports(module) if not at_top]
    assert late == [], f"{module} imports {late} inside a function: import it at the top, downward only"


def test_the_imports_between_engine_modules_form_no_cycle() -> None:
    graph = {module: {sibling for sibling, _ in sibling_imports(module)} for module in MODULES}
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert order.index("_message") < order.index("_rules") < order.index("_sessions") < order.index("_table")


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    # The package __init__ runs first whatever is asked for; importing the module under its own name first,
    # alone, is what a cycle would break.
    code = f"import importlib; importlib.import_module('rallypoint.engine.{module}'); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, "ok"), out.stderr
