"""The shape of the code, checked in CI: no import circles in pysim/, no function over 60 lines."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pysim"
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def imports_of(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The pysim modules ``name`` imports (at any depth of its body: a function-level import is
    an edge too, it just runs later)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def test_no_function_is_longer_than_60_lines():
    long = [f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for name, tree in modules().items() for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "split these into named helpers: " + "; ".join(long)


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph (as a path that returns to its start), or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_find_circle_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_the_import_graph_of_pysim_has_no_circle():
    trees = modules()
    known = set(trees)
    graph = {name: imports_of(name, tree, known) - {"pysim"} for name, tree in trees.items()}
    for name in graph:   # a package imports its own submodules to re-export them: not a circle
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    assert len(graph) > 30 and sum(map(len, graph.values())) > 50   # the graph was read
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)
