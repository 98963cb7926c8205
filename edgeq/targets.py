"""Deployment targets as declarative TOML files.

Each file in the repository's ``targets/`` folder (shipped in the wheel as
``edgeq._targets``) names a backend, a chipset, the precision menu the planner
may choose from, and the delegate's known per-op limits. Users can pass their
own file with ``--target path/to/file.toml``.

This module parses and checks the common schema only; what a backend needs
beyond it is checked when the target is resolved (``edgeq.backends.resolve_target``,
which ``edgeq.load_target`` calls), and the resolved target carries its backend.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgeq.errors import EdgeqError

ACTIVATION_MODES = ("static", "dynamic", "float")
#: activations beyond this may overflow float16 (65504) once a layer sums over its inputs
FP16_SAFE_MAGNITUDE = 65504.0 / 16
OP_KINDS = ("conv", "conv_transpose", "linear", "embedding")


@dataclass(frozen=True)
class Precision:
    """One entry of a target's precision menu."""

    name: str
    description: str
    weight_bits: int
    activation_bits: int
    activations: str  # "static" | "dynamic" | "float"
    ops: tuple[str, ...]
    weight_bytes: float
    #: backend-specific name (e.g. a QnnQuantizer QuantDtype); empty for xnnpack
    backend_dtype: str = ""
    #: weights quantized in groups of this many input channels, one scale per group (0: per channel)
    group_size: int = 0
    #: program bytes per output channel (embedding row) beyond the float32 layer's (its bias):
    #: scales, zero points, a narrower bias; (kind, bytes) pairs, kind "" for every kind
    channel_bytes: tuple[tuple[str, float], ...] = ()

    def channel_cost(self, kind: str) -> float:
        costs = dict(self.channel_bytes)
        return costs.get(kind, costs.get("", 0.0))

    @property
    def is_float(self) -> bool:
        return self.activations == "float"

    @property
    def half(self) -> bool:
        """Float arithmetic in float16 (weights stored in 2 bytes) rather than float32."""
        return self.is_float and self.weight_bits == 16


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    backend: str
    chipset: str
    default_precision: str
    precisions: dict[str, Precision]
    op_limits: dict[str, str] = field(default_factory=dict)
    soc_model: str = ""
    path: str = ""
    #: the resolved backend object (an ``edgeq.backends.Backend``), attached by
    #: ``edgeq.backends.resolve_target``; None on a target only parsed
    impl: Any = field(default=None, compare=False, repr=False)
    #: the parsed TOML table, for the backend's own checks at resolution
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def kinds(self) -> set[str]:
        """Layer kinds some precision of the menu runs; layers of other kinds are left as they are."""
        return {kind for p in self.precisions.values() for kind in p.ops}

    def narrowest_float(self, kind: str, magnitude: float = 0.0) -> str:
        """The float precision with the fewest bytes for ``kind`` whose range holds activations
        of ``magnitude`` (fp16 before fp32 where the menu has both)."""
        fits = [
            name
            for name, p in self.precisions.items()
            if p.is_float and kind in p.ops and not (p.half and magnitude > FP16_SAFE_MAGNITUDE)
        ]
        return min(fits, key=lambda name: self.precisions[name].weight_bytes)

    def precision(self, name: str) -> Precision:
        if name not in self.precisions:
            raise EdgeqError(
                f"target '{self.name}' cannot run precision '{name}'",
                f"use one of: {', '.join(self.precisions)}",
            )
        return self.precisions[name]


def _targets_dir() -> Path:
    try:
        root = resources.files("edgeq._targets")
        path = Path(str(root))
        if path.is_dir():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    # Running from a source checkout without installing.
    return Path(__file__).resolve().parent.parent / "targets"


def builtin_targets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(_targets_dir().glob("*.toml"))}


def _need(table: dict, key: str, kind: type | tuple, where: str) -> Any:
    if key not in table:
        raise EdgeqError(f"{where}: missing field '{key}'", f"add '{key}' to the target file")
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise EdgeqError(
            f"{where}: field '{key}' must be {want}, got {type(value).__name__} {value!r}",
            "fix the target file",
        )
    return value


def _channel_bytes(value: Any, ops: list[str], where: str) -> tuple[tuple[str, float], ...]:
    """``channel_bytes = 8`` (every kind) or ``channel_bytes = { linear = 8, embedding = 4 }``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (("", float(value)),) if value else ()
    if isinstance(value, dict) and all(
        k in ops and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in value.items()
    ):
        return tuple((str(k), float(v)) for k, v in value.items())
    raise EdgeqError(
        f"{where}: field 'channel_bytes' is {value!r}",
        f"give bytes per output channel, or a table by kind of: {', '.join(ops)}",
    )


def parse_target(data: dict[str, Any], where: str) -> Target:
    """Validate a parsed TOML table against the common target schema (the backend's own checks
    run in ``edgeq.backends.resolve_target``)."""
    name = _need(data, "name", str, where)
    backend = _need(data, "backend", str, where)
    menu = _need(data, "precisions", dict, where)
    if not menu:
        raise EdgeqError(f"{where}: field 'precisions' is empty", "declare at least one precision")
    precisions: dict[str, Precision] = {}
    for pname, table in menu.items():
        pwhere = f"{where}: precisions.{pname}"
        if not isinstance(table, dict):
            raise EdgeqError(f"{pwhere} must be a table", "write it as [precisions." + pname + "]")
        activations = _need(table, "activations", str, pwhere)
        if activations not in ACTIVATION_MODES:
            raise EdgeqError(
                f"{pwhere}: field 'activations' is '{activations}'", f"use one of: {', '.join(ACTIVATION_MODES)}"
            )
        ops = _need(table, "ops", list, pwhere)
        bad = [op for op in ops if op not in OP_KINDS]
        if bad or not ops:
            raise EdgeqError(f"{pwhere}: field 'ops' has {bad or 'nothing'}", f"use some of: {', '.join(OP_KINDS)}")
        wbits = _need(table, "weight_bits", int, pwhere)
        abits = _need(table, "activation_bits", int, pwhere)
        for key, bits in (("weight_bits", wbits), ("activation_bits", abits)):
            if bits not in (2, 4, 8, 16, 32):
                raise EdgeqError(f"{pwhere}: field '{key}' is {bits}", "use 2, 4, 8, 16 or 32")
        if activations == "dynamic" and abits != 8:
            # Dynamic inputs are quantized per token to int8 (XNNPACK's qd8; see edgeq.quant.dynamic).
            raise EdgeqError(f"{pwhere}: dynamic activations are 8-bit, not {abits}", "set activation_bits = 8")
        group_size = int(table.get("group_size", 0))
        if group_size < 0 or (group_size and (ops != ["linear"] or activations != "dynamic")):
            raise EdgeqError(
                f"{pwhere}: group_size {group_size} needs a dynamic precision for linear layers only",
                'set ops = ["linear"] and activations = "dynamic", or drop group_size',
            )
        wbytes = float(_need(table, "weight_bytes", (int, float), pwhere))
        if wbytes <= 0:
            raise EdgeqError(f"{pwhere}: field 'weight_bytes' must be positive", "fix the target file")
        channel_bytes = _channel_bytes(table.get("channel_bytes", 0.0), ops, pwhere)
        precisions[pname] = Precision(
            name=pname,
            description=str(table.get("description", "")),
            weight_bits=wbits,
            activation_bits=abits,
            activations=activations,
            ops=tuple(ops),
            weight_bytes=wbytes,
            backend_dtype=str(table.get("backend_dtype", "")),
            group_size=group_size,
            channel_bytes=channel_bytes,
        )
    default = _need(data, "default_precision", str, where)
    if default not in precisions:
        raise EdgeqError(
            f"{where}: default_precision '{default}' is not in the menu",
            f"use one of: {', '.join(precisions)}",
        )
    limits = data.get("op_limits", {})
    if not isinstance(limits, dict):
        raise EdgeqError(f"{where}: field 'op_limits' must be a table", "write it as [op_limits]")
    return Target(
        name=name,
        description=str(data.get("description", "")),
        backend=backend,
        chipset=str(data.get("chipset", "")),
        default_precision=default,
        precisions=precisions,
        op_limits={str(k): str(v) for k, v in limits.items()},
        soc_model=str(data.get("soc_model", "")),
        path=where,
        raw=data,
    )


def read_target(spec: str | Path | Target) -> Target:
    """A built-in target by name, or a user's TOML file by path, parsed (not resolved)."""
    if isinstance(spec, Target):
        return spec
    text = str(spec)
    builtin = builtin_targets()
    if text in builtin:
        path = builtin[text]
    elif text.endswith(".toml") or Path(text).exists():
        path = Path(text)
        if not path.is_file():
            raise EdgeqError(f"target file {text} not found", "check the path given to --target")
    else:
        raise EdgeqError(
            f"unknown target '{text}'",
            f"use one of: {', '.join(builtin)} (see `edgeq targets`), or a path to a .toml file",
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise EdgeqError(f"target file {path} is not valid TOML: {exc}", "fix its syntax") from exc
    return parse_target(data, str(path))
