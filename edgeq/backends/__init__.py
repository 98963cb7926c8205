"""Backends behind one interface, registered by the name a target file gives.

Adding a backend means one module here with a :class:`Backend` subclass, one
line in ``_BUILTIN`` (or :func:`register` from outside edgeq), a target file
naming it, and its tests; nothing else in edgeq changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgeq.backends.base import AppRuntime, Backend
from edgeq.errors import EdgeqError

if TYPE_CHECKING:
    from edgeq.planning.plan import Plan
    from edgeq.quant.configs import RangeConfig
    from edgeq.targets import Target

__all__ = ["AppRuntime", "Backend", "build_quantizer", "get_backend", "known_backends", "register"]

#: backend name (a target file's ``backend`` field) -> "module:Class"; imported on first use
_BUILTIN = {
    "xnnpack": "edgeq.backends.xnnpack:XnnpackBackend",
    "qnn": "edgeq.backends.qnn:QnnBackend",
}
_factories: dict[str, Callable[[], Backend]] = {}
_instances: dict[str, Backend] = {}


def register(name: str, factory: Callable[[], Backend]) -> None:
    """Make ``backend = "<name>"`` in a target file use ``factory()``."""
    _factories[name] = factory
    _instances.pop(name, None)


def known_backends() -> tuple[str, ...]:
    return tuple(sorted({*_BUILTIN, *_factories}))


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``, or a one-line error naming the known ones."""
    if name not in _instances:
        if name in _factories:
            _instances[name] = _factories[name]()
        elif name in _BUILTIN:
            module, cls = _BUILTIN[name].split(":")
            _instances[name] = getattr(importlib.import_module(module), cls)()
        else:
            raise EdgeqError(f"unknown backend '{name}'", f"use one of: {', '.join(known_backends())}")
    return _instances[name]


def build_quantizer(plan: Plan, target: Target, qat: bool = True, ranges: RangeConfig | None = None) -> Any:
    """A PT2E quantizer configured layer by layer from ``plan`` for ``target``'s backend."""
    from edgeq.quant.configs import RangeConfig

    quantizer = get_backend(target.backend).quantizer(plan, target, qat, ranges or RangeConfig())
    # Embedding tables, groupwise linear weights and float16 layers are handled by edgeq itself,
    # whatever the backend (edgeq.quant.embeddings, .groupwise, .half); prepare() reads these
    # from the quantizer.
    groupwise = {
        entry.name: (target.precisions[entry.precision].group_size, target.precisions[entry.precision].weight_bits)
        for entry in plan.layers
        if target.precisions[entry.precision].group_size
    }
    tables = {
        entry.name: target.precisions[entry.precision].weight_bits
        for entry in plan.layers
        if entry.kind == "embedding" and not target.precisions[entry.precision].is_float
    }
    half = {entry.name for entry in plan.layers if target.precisions[entry.precision].half}
    if groupwise:
        quantizer.edgeq_groupwise = groupwise
        quantizer.edgeq_ranges = ranges or RangeConfig()
    if half:
        quantizer.edgeq_half = half
    if tables:
        quantizer.edgeq_embedding_bits = tables
    return quantizer
