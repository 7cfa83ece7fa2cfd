"""The sizes docs/ARCHITECTURE.md relies on (issue #24): no function in hpsearch/ over 60 lines, no module over 400,
no import of a module on a higher floor of the map than the importer (cli -> session -> search -> training), and no
import circle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hpsearch"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_over_400_lines():
    lines = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in _modules()}
    assert {name: n for name, n in lines.items() if n > MAX_MODULE_LINES} == {}


def test_no_function_is_over_60_lines():
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(PACKAGE)}:{node.name}"] = lines
    assert long == {}


def _imports(path: Path) -> set[str]:
    """hpsearch modules ``path`` imports, at its top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hpsearch"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hpsearch"))
    return found


def test_nothing_below_the_cli_imports_it_and_the_search_does_not_import_the_sessions():
    upward = []
    sessions = {"hpsearch.session", "hpsearch.evaluate", "hpsearch.export", "hpsearch.reproduce", "hpsearch.report"}
    search = ("study", "objective", "stopping", "samplers", "warm_start", "trials", "train", "schedules", "accuracy",
              "preprocess", "strategies")
    for path in _modules():
        name = "hpsearch." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        imported = _imports(path)
        below_cli = name != "hpsearch.__main__" and not name.startswith("hpsearch.cli")
        if below_cli and any(m.startswith("hpsearch.cli") for m in imported):
            upward.append(f"{name} imports the CLI")
        if any(name == f"hpsearch.{s}" or name.startswith(f"hpsearch.{s}.") for s in search):
            upward += [f"{name} imports {m}" for m in sorted(imported & sessions)]
    assert upward == []


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(("hpsearch", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def _module_graph() -> dict[str, set[str]]:
    """Module -> the hpsearch modules it imports, anywhere in it (inside functions and ``if TYPE_CHECKING:`` too: a
    lazy import hides a circle from Python, not from the reader). ``from M import x`` names module ``M.x`` when there
    is one, else ``M`` (not ``_imports``' both: ``from hpsearch.data import _readers`` inside the data package would
    read as a circle with its own ``__init__``). The package ``hpsearch`` itself is left out: every ``from hpsearch
    import m`` imports it, and it only loads ``spec`` and ``saved_model`` on first use (its ``__getattr__``)."""
    paths = {_module_name(p): p for p in _modules()}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        if name == "hpsearch":
            continue
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hpsearch"):
                targets.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                               for a in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in paths)
        graph[name] = {t for t in targets if t in paths and t not in ("hpsearch", name)}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    graph = _module_graph()
    assert "hpsearch.stopping" in graph["hpsearch.objective"]  # the graph sees imports at all
    assert _circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
