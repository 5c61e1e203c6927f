"""runtime/'s modules import in one direction only (DEVELOPERS.md: imports only go down).

Each module's imports are read with ``ast`` from its source: every ``import`` and ``from ...
import`` anywhere in the file, function-level and ``if TYPE_CHECKING:`` ones included (a
function-level import is still an edge: it is how the dit -> streaming -> memory -> dit circle
hid). The graph of runtime modules must have no cycle, and runtime may import only itself and
kernels/ from the package (never pipelines/, benchmarking/, cli.py or the lazy top package).
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "longcat_native"
RUNTIME = PACKAGE / "runtime"


def _imports(path: pathlib.Path, modules):
    """(runtime modules imported, other longcat_native modules imported) by the file ``path``."""
    inside, outside = set(), set()
    here = ["longcat_native", "runtime"]

    def add(dotted: str) -> None:
        parts = dotted.split(".")
        if parts[:2] == here and len(parts) > 2:
            inside.add(parts[2])
        elif parts[:2] == here:
            pass  # the runtime package itself: its __init__ imports nothing
        elif parts[0] == "longcat_native":
            outside.add(".".join(parts[:2]))

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = node.module.split(".")
            dotted = ".".join(target)
            add(dotted)
            if target == here:  # ``from . import streaming``: the names are modules
                for alias in node.names:
                    if alias.name in modules:
                        inside.add(alias.name)
    inside.discard(path.stem)
    return inside, outside


def _graph():
    modules = {p.stem for p in RUNTIME.glob("*.py") if p.stem != "__init__"}
    graph, upward = {}, {}
    for m in sorted(modules):
        inside, outside = _imports(RUNTIME / f"{m}.py", modules)
        graph[m] = inside & modules
        upward[m] = sorted(o for o in outside if o != "longcat_native.kernels")
    return graph, upward


def find_cycle(graph):
    """A cycle of ``graph`` ({node: set of nodes it imports}) as a list [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"dit": {"streaming"}, "streaming": {"memory"}, "memory": {"dit"}}) == [
        "dit", "streaming", "memory", "dit"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_the_parser_sees_function_level_and_relative_imports(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("from . import streaming, lora\nfrom .weights import a\n"
                   "def f():\n    from .dit import LongCatDiT\n    from ..pipelines import run\n"
                   "    import longcat_native.runtime.memory\n")
    inside, outside = _imports(src, {"streaming", "lora", "weights", "dit", "memory"})
    assert inside == {"streaming", "lora", "weights", "dit", "memory"}
    assert outside == {"longcat_native.pipelines"}


def test_runtime_imports_have_no_cycle():
    graph, _ = _graph()
    assert {"dit", "streaming", "memory", "quantize"} <= set(graph)
    assert {"streaming", "quantize"} <= graph["dit"] and "dit" in graph["memory"]  # edges the parser must see
    cycle = find_cycle(graph)
    assert cycle is None, "runtime/ imports in a circle: " + " -> ".join(cycle) + (
        " (move what the lower module needs further down, or pass it in; see DEVELOPERS.md)")


@pytest.mark.parametrize("module", sorted(p.stem for p in RUNTIME.glob("*.py") if p.stem != "__init__"))
def test_runtime_imports_only_itself_and_kernels(module):
    _, upward = _graph()
    assert upward[module] == [], f"runtime/{module}.py imports {upward[module]}: runtime/ sits below those layers"
