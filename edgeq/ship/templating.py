"""Jinja2 environment for the generated artifacts (report page, Kotlin class, bundle README)."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import jinja2


def fmt(value: Any) -> str:
    """A table cell: floats to 3 decimals (thousands separated when large), ints separated."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def kotlin_floats(value: Any, count: int = 1) -> str:
    values = value if isinstance(value, (list, tuple)) else [value] * count
    return ", ".join(f"{float(v)}f" for v in values)


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("edgeq.ship", "templates"),
        # HTML is escaped; Kotlin and Markdown are not (they carry no markup).
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = fmt
    env.filters["kotlin_floats"] = kotlin_floats
    env.filters["cpp_floats"] = kotlin_floats  # the same literal: 0.5f
    env.filters["tojson"] = json.dumps
    env.filters["output_rows"] = lambda rows: [
        [r["output"], str(r["shape"]), round(r["float_vs_program_db"], 1), "yes" if r["scored"] else ""] for r in rows
    ]
    env.filters["humanize_pair"] = lambda kv: [str(kv[0]).replace("_", " "), kv[1]]
    env.filters["zip_ops"] = lambda _layers, ops: [
        [op["layer"] or "(model)", op["op"], "—" if op["program_vs_float_db"] is None else op["program_vs_float_db"]]
        for op in ops
    ]
    env.filters["concat_row"] = lambda c: [
        c["node"],
        ", ".join(f"[{lo:.3g}, {hi:.3g}]" for lo, hi in c["inputs"]),
        f"{c['narrowest_levels']:.1f}",
        c["reason"],
    ]
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


def schema_text() -> str:
    """The published JSON Schema of manifest.json."""
    return resources.files("edgeq.ship").joinpath("templates", "manifest.schema.json").read_text()


def manifest_schema() -> dict[str, Any]:
    return json.loads(schema_text())
