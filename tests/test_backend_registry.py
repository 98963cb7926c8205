"""The backend interface: one registry keyed by a target file's ``backend`` field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgeq.backends import AppRuntime, Backend, backend_of, get_backend, known_backends, register, resolve_target
from edgeq.errors import EdgeqError
from edgeq.targets import parse_target


def _target(backend: str) -> dict:
    return {
        "name": "t",
        "backend": backend,
        "default_precision": "int8",
        "chipset": "SM8650",
        "precisions": {
            "int8": {
                "weight_bits": 8,
                "activation_bits": 8,
                "activations": "static",
                "ops": ["conv", "linear"],
                "weight_bytes": 1.0,
                "backend_dtype": "use_8a8w",
            }
        },
    }


def test_builtin_backends_are_registered():
    assert {"xnnpack", "qnn"} <= set(known_backends())
    assert get_backend("xnnpack").name == "xnnpack" and get_backend("qnn").name == "qnn"
    assert get_backend("xnnpack") is get_backend("xnnpack")


def test_unknown_backend_in_a_target_file_is_one_line_naming_the_known_ones():
    with pytest.raises(EdgeqError) as info:
        resolve_target(parse_target(_target("coreml"), "my.toml"))
    message = str(info.value)
    assert "\n" not in message and "unknown backend 'coreml'" in message
    assert "qnn" in message and "xnnpack" in message


def test_a_third_backend_plugs_in_without_touching_edgeq():
    class Echo(Backend):
        name = "echo"
        title = "Echo"

        def quantizer(self, plan, target, qat, ranges):
            return ("quantizer", target.name)

        def partitioners(self, target, allow_download=False):
            return []

        def float_partitioners(self):
            return []

        def check_target(self, data, precisions, where):
            if "chipset" not in data:
                raise EdgeqError(f"{where}: echo needs a chipset", "add chipset")

        def app_runtime(self, manifest):
            return AppRuntime(gradle=("com.example:echo:1",), note="echo runtime")

    register("echo", Echo)
    try:
        target = resolve_target(parse_target(_target("echo"), "echo.toml"))
        assert backend_of(target) is get_backend("echo") and target.impl is get_backend("echo")
        from edgeq.backends import quant_spec
        from edgeq.planning.plan import Plan

        spec = quant_spec(Plan(target="t", layers=[]), target)
        assert spec.quantizer == ("quantizer", "t") and not spec.groupwise and not spec.half and not spec.tables
        assert get_backend("echo").per_op_partitioners(target) is None  # program debugging: unsupported
        data = _target("echo")
        del data["chipset"]
        with pytest.raises(EdgeqError, match="echo needs a chipset"):  # the backend's own check, at resolution
            resolve_target(parse_target(data, "echo.toml"))
    finally:
        from edgeq import backends

        backends._factories.pop("echo")
        backends._instances.pop("echo", None)


def test_qnn_target_checks_live_in_the_qnn_backend():
    data = _target("qnn")
    del data["chipset"]
    with pytest.raises(EdgeqError, match="chipset"):
        resolve_target(parse_target(data, "q.toml"))
    data = _target("qnn")
    del data["precisions"]["int8"]["backend_dtype"]
    with pytest.raises(EdgeqError, match="backend_dtype"):
        resolve_target(parse_target(data, "q.toml"))


def test_a_backend_must_provide_what_the_pipeline_calls():
    class Partial(Backend):
        name = "partial"
        title = "Partial"

        def quantizer(self, plan, target, qat, ranges):
            return None

        def partitioners(self, target, allow_download=False):
            return []

        def app_runtime(self, manifest):
            return AppRuntime(gradle=(), note="")

    with pytest.raises(TypeError, match="check_target|float_partitioners"):
        Partial()


def test_no_backend_string_dispatch_outside_backends(repo_root: Path):
    pattern = re.compile(r"""backend\s*(==|!=|in)\s*\(?["']""")
    offenders = []
    for path in (repo_root / "edgeq").rglob("*.py"):
        if "backends" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(repo_root)}:{number}: {line.strip()}")
    assert not offenders


def test_package_has_no_import_cycles(repo_root: Path):
    """Module-level imports between edgeq modules form no cycle (function-level imports are lazy by design)."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in (repo_root / "edgeq").rglob("*.py"):
        rel = path.relative_to(repo_root).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        deps = graph.setdefault(name, set())
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgeq"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If):  # TYPE_CHECKING blocks are not imports at run time
                continue
    modules = set(graph)
    edges = {m: {d for d in ds if d in modules and d != m} for m, ds in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in edges[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
