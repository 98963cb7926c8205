"""The package's shape: imports flow one way, and functions stay small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edgeq"
#: the core layer: settings, the target schema and precision menu, the plan dataclasses
CORE = {"edgeq.configs", "edgeq.errors", "edgeq.targets", "edgeq.planning.plan", "edgeq.graph"}
#: the fake-quant's constructor mirrors torchao's FakeQuantize keywords, which PT2E passes (with_args)
#: fake-quant constructors mirror torchao's keywords; a typer command's parameters are its flags
#: (`edgeq validate`: where it runs, what it compares against, what fails it)
EXEMPT_PARAMETERS = {("edgeq/quant/fake_quant.py", "__init__"), ("edgeq/cli.py", "validate")}
EXEMPT_LENGTH: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> edgeq modules it imports, at any depth (inside functions and TYPE_CHECKING blocks too)."""
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                found = owner(target) if target.startswith("edgeq") else None
                if found and found != name and found != "edgeq":
                    graph[name].add(found)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_anywhere_in_the_package():
    assert _cycles(import_graph()) == []


def test_the_checker_sees_a_circle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_the_core_imports_nothing_above_it():
    graph = import_graph()
    above = {module: sorted(graph[module] - CORE) for module in CORE}
    assert above == {module: [] for module in CORE}


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield where, node


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    extra = (args.vararg is not None) + (args.kwarg is not None)
    return len([n for n in names if n not in ("self", "cls")]) + extra


def _too_big(where: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    lines = node.end_lineno - node.lineno + 1
    found = []
    if lines > 80 and (where, node.name) not in EXEMPT_LENGTH:
        found.append(f"{lines} lines")
    if _parameters(node) > 8 and (where, node.name) not in EXEMPT_PARAMETERS:
        found.append(f"{_parameters(node)} parameters")
    return found


def test_no_function_over_80_lines_or_8_parameters():
    offenders = [f"{where}:{node.lineno} {node.name} ({', '.join(why)})" for where, node in _functions()
                 if (why := _too_big(where, node))]  # fmt: skip
    assert offenders == []


def test_the_size_check_sees_a_long_function():
    source = "def f(a, b, c, d, e, f, g, h, i):\n" + "    x = 1\n" * 81
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.FunctionDef)
    assert _too_big("edgeq/x.py", node) == ["82 lines", "9 parameters"]
