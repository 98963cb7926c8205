"""Backends behind one interface, registered by the name a target file gives.

Adding a backend means one module here with a :class:`Backend` subclass, one
line in ``_BUILTIN`` (or :func:`register` from outside edgeq), a target file
naming it, and its tests; nothing else in edgeq changes.

A target is resolved once (:func:`load_target` / :func:`resolve_target`): the
backend's own checks run on the parsed file and the target carries the
backend object from then on (``target.impl``, or :func:`backend_of`).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path

from edgeq.backends.base import AppRuntime, Backend
from edgeq.errors import EdgeqError
from edgeq.quant.spec import quant_spec
from edgeq.targets import Target, read_target

__all__ = [
    "AppRuntime",
    "Backend",
    "backend_of",
    "get_backend",
    "known_backends",
    "load_target",
    "quant_spec",
    "register",
    "resolve_target",
]

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


def resolve_target(target: Target) -> Target:
    """``target`` with its backend's own checks run and the backend object attached."""
    if target.impl is not None:
        return target
    if target.backend not in known_backends():
        raise EdgeqError(
            f"{target.path or target.name}: unknown backend '{target.backend}'",
            f"use one of: {', '.join(known_backends())}",
        )
    backend = get_backend(target.backend)
    backend.check_target(target.raw, target.precisions, target.path or target.name)
    return dataclasses.replace(target, impl=backend)


def load_target(spec: str | Path | Target) -> Target:
    """A built-in target by name, or a user's TOML file by path, checked and resolved."""
    return resolve_target(read_target(spec))


def backend_of(target: Target) -> Backend:
    """The backend a target runs on (resolving the target if it was only parsed)."""
    impl = target.impl if target.impl is not None else resolve_target(target).impl
    assert isinstance(impl, Backend)
    return impl
