"""The folder list is the architecture: imports only point down, and nothing imports in a cycle.

Layers, from the bottom (docs/architecture.md, "How it runs"):

    plan  <  observe  <  runtime  <  pipesched.pipeline, distributed  <  pipesched.gpipe, tune  <  cli

(``pipesched.gpipe`` is torchgpipe's ``GPipe`` over ``Pipeline``, so it sits
above it: siblings may not import each other.)

A module may import its own layer and the layers below it, never above:
every ``import`` counts, also one inside a function or under
``TYPE_CHECKING``. Schedule plug-ins import only ``pipesched.plan``, and the
plan layer imports no torch, anyio or structlog, so plug-ins, the simulator
and ``pipesched schedule show`` load without them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"plan": 0, "observe": 1, "runtime": 2, "pipeline": 3, "distributed": 3, "gpipe": 4, "tune": 4, "cli": 5}
HEAVY = ("torch", "anyio", "structlog")


def module_name(path: Path, root: Path) -> str:
    """``pipesched.runtime.tasks`` for ``<root>/pipesched/runtime/tasks.py`` (schedules/ installs as pipesched.schedules)."""
    relative = path.relative_to(root).with_suffix("")
    parts = list(relative.parts)
    if parts[0] == "schedules":
        parts = ["pipesched", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The layer a ``pipesched.*`` module belongs to (``None``: the package root, ``__main__``)."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    if parts[1] == "schedules":
        return "schedules"
    return parts[1] if parts[1] in LAYERS else None


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """Every module ``path`` imports: (name, line, at module level)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    found: list[tuple[str, int, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno, id(node) in top_level))
            # "from pipesched.plan import lowering" imports the module pipesched.plan.lowering
            found += [(f"{node.module}.{alias.name}", node.lineno, id(node) in top_level)
                      for alias in node.names if node.module.startswith("pipesched")]
    return found


def sources(root: Path) -> list[Path]:
    return sorted([*(root / "pipesched").rglob("*.py"), *(root / "schedules").rglob("*.py")])


def violations(root: Path) -> list[str]:
    """Every upward import, heavy import in the plan layer, and non-plan import in a schedule."""
    known = {module_name(p, root) for p in sources(root)}
    found = []
    for path in sources(root):
        name = module_name(path, root)
        layer = layer_of(name)
        for target, line, _ in imports(path):
            where = f"{path.relative_to(root)}:{line} imports {target}"
            root_name = target.split(".")[0]
            if layer in ("plan", "schedules") and root_name in HEAVY:
                found.append(f"{where}: the {layer} layer must not import {root_name}")
            if root_name != "pipesched" or target not in known and target.rsplit(".", 1)[0] not in known:
                continue
            target_layer = layer_of(target)
            if layer == "schedules":
                if target_layer != "plan" and target != "pipesched.plan":
                    found.append(f"{where}: a schedule plug-in imports only pipesched.plan")
            elif layer in LAYERS and target_layer in LAYERS and LAYERS[target_layer] > LAYERS[layer]:
                found.append(f"{where}: {layer} must not import the {target_layer} layer above it")
            elif layer in LAYERS and target_layer in LAYERS and LAYERS[target_layer] == LAYERS[layer] \
                    and target_layer != layer:
                found.append(f"{where}: {layer} and {target_layer} are siblings; neither imports the other")
    return found


def cycles(root: Path, within: str = "pipesched", lazy_too: bool = False) -> list[list[str]]:
    """Import cycles among the modules under ``within``, through module-level imports.

    ``lazy_too`` also follows imports inside functions: Python resolves those at
    call time, so they load, but the two modules still lean on each other (a
    lazy import is how the ``dependencies`` alias hid a cycle between
    ``plan.action`` and ``plan.lowering``).
    """
    known = {name: p for p in sources(root)
             if (name := module_name(p, root)) == within or name.startswith(within + ".")}
    graph = {
        name: sorted({t if t in known else t.rsplit(".", 1)[0] for t, _, top in imports(path) if top or lazy_too}
                     & (set(known) - {name}))
        for name, path in known.items()
    }
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for succ in graph[node]:
            if state.get(succ) == "open":
                found.append(stack[stack.index(succ):] + [succ])
            elif succ not in state:
                visit(succ, stack)
        stack.pop()
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])
    # the package root re-exports its children lazily; a child importing the root is not a cycle
    return [c for c in found if "pipesched" not in c]


def test_imports_point_down_only():
    assert violations(ROOT) == []


def test_no_import_cycles():
    assert cycles(ROOT) == []


def test_action_and_lowering_import_each_other_no_more():
    """The plan layer is a stack, not a knot: no cycle, not even through an import inside a function."""
    assert cycles(ROOT, within="pipesched.plan", lazy_too=True) == []


def test_the_check_catches_an_upward_import(tmp_path):
    """The checks above can fail: a plan module reaching into the runtime, a heavy import, a cycle."""
    for package in ("pipesched", "pipesched/plan", "pipesched/runtime", "schedules"):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "pipesched/runtime/tasks.py").write_text("import pipesched.plan.action\n")
    (tmp_path / "pipesched/plan/action.py").write_text(
        "import torch\n\ndef later():\n    from pipesched.runtime.tasks import run\n")
    (tmp_path / "schedules/mine.py").write_text("from pipesched.runtime import tasks\n")
    (tmp_path / "pipesched/plan/a.py").write_text("import pipesched.plan.b\n")
    (tmp_path / "pipesched/plan/b.py").write_text("from pipesched.plan import a\n")
    found = violations(tmp_path)
    assert any("plan/action.py:1 imports torch" in v for v in found), found
    assert any("plan/action.py:4 imports pipesched.runtime.tasks: plan must not import the runtime" in v
               for v in found), found
    assert any("schedules/mine.py" in v and "only pipesched.plan" in v for v in found), found
    assert ["pipesched.plan.a", "pipesched.plan.b", "pipesched.plan.a"] in cycles(tmp_path)
    # a cycle closed by an import inside a function: invisible at module level, caught with lazy_too
    (tmp_path / "pipesched/plan/c.py").write_text("import pipesched.plan.d\n")
    (tmp_path / "pipesched/plan/d.py").write_text("def later():\n    from pipesched.plan.c import x\n")
    lazy = ["pipesched.plan.c", "pipesched.plan.d", "pipesched.plan.c"]
    assert lazy not in cycles(tmp_path)
    assert lazy in cycles(tmp_path, within="pipesched.plan", lazy_too=True)


@pytest.mark.parametrize("module", ["pipesched.plan", "pipesched.schedules.gpipe", "pipesched.plan.chart"])
def test_the_plan_layer_loads_without_torch(module):
    """In a fresh interpreter: the plan layer (and so every schedule plug-in) pulls in no torch."""
    code = (
        f"import sys, {module}\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        f"upper = sorted(m for m in sys.modules if m.startswith('pipesched.') and m.split('.')[1] in "
        f"('runtime', 'observe', 'distributed', 'cli', 'pipeline'))\n"
        f"print(heavy, upper)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[] []", out.stdout
