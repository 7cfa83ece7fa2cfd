"""The sizes docs/ARCHITECTURE.md relies on (issue #24): no function in hpsearch/ over 60 lines, no module over 400,
and no import of a module on a higher floor of the map than the importer (cli -> session -> search -> training)."""

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
