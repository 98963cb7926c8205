"""The per-layer precision plan: what each quantizable layer runs at, and why.

``plan.json`` is written by every build and is meant to be edited by hand;
``edgeq build --plan plan.json`` validates an edited plan against the model
and the target before using it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from edgeq.errors import EdgeqError
from edgeq.graph import WeightLayer, output_channels, weight_layers
from edgeq.targets import Precision, Target

PLAN_VERSION = 1


@dataclass
class LayerPlan:
    name: str  # qualified module name in the float model, e.g. "features.3.conv"
    kind: str  # "conv" | "conv_transpose" | "linear" | "embedding"
    precision: str  # a name from the target's precision menu
    reason: str = ""
    params: int = 0
    #: output channels (embedding rows): per-channel scales and biases cost bytes too
    channels: int = 0


@dataclass
class Plan:
    target: str
    layers: list[LayerPlan] = field(default_factory=list)
    #: QAT runs layers below 8 bits at this weight width first (0: off)
    intermediate_bits: int = 8
    #: ops outside the planned layers (adds, pooling, matmuls of two activations): "quantized" at the
    #: target's default precision, or left "float" (a transformer's residual adds and attention)
    other_ops: str = "quantized"
    #: ops kept in float whatever other_ops says, by exported-graph node name: output concatenations
    #: whose inputs' ranges one int8 scale cannot hold (edgeq.planning.concats), or added by hand
    float_ops: list[str] = field(default_factory=list)
    #: node name -> a precision of the target whose activations the op takes instead of the default's
    #: (16-bit on the HTP, which runs no float op: its answer to a mixed-range concatenation)
    wide_ops: dict[str, str] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def precision_of(self, layer: str) -> str:
        for entry in self.layers:
            if entry.name == layer:
                return entry.precision
        raise KeyError(layer)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict, where: str = "plan") -> Plan:
        try:
            layers = [LayerPlan(**entry) for entry in data["layers"]]
            return cls(
                target=str(data["target"]),
                layers=layers,
                intermediate_bits=int(data.get("intermediate_bits", 8)),
                other_ops=_other_ops(data.get("other_ops", "quantized"), where),
                float_ops=[str(name) for name in data.get("float_ops", [])],
                wide_ops={str(k): str(v) for k, v in dict(data.get("wide_ops", {})).items()},
                version=int(data.get("version", PLAN_VERSION)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EdgeqError(
                f"{where} is not a valid plan ({type(exc).__name__}: {exc})",
                "start from a plan.json written by `edgeq build` and edit only the precision fields",
            ) from exc

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise EdgeqError(f"plan file {path} not found", "check the path given to --plan")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise EdgeqError(f"plan file {path} is not valid JSON: {exc}", "fix its syntax") from exc
        return cls.from_dict(data, str(path))


OTHER_OPS = ("quantized", "float")


def _other_ops(value: object, where: str) -> str:
    if value not in OTHER_OPS:
        raise EdgeqError(f"{where}: other_ops is {value!r}", f"use one of: {', '.join(OTHER_OPS)}")
    return str(value)


_KINDS: tuple[tuple[type, str], ...] = (
    (nn.Conv1d, "conv"),
    (nn.Conv2d, "conv"),
    (nn.ConvTranspose1d, "conv_transpose"),
    (nn.ConvTranspose2d, "conv_transpose"),
    (nn.Linear, "linear"),
    (nn.Embedding, "embedding"),
)


def model_layers(model: nn.Module, example_inputs: tuple | None = None) -> list[WeightLayer]:
    """The plannable layers of ``model``, from its exported graph when example inputs are given.

    From the graph, a layer is any module owning a conv, linear or
    weight-bearing matmul, whatever its class (see :func:`edgeq.graph.weight_layers`).
    Without inputs, modules that are (subclasses of) Conv1d, Conv2d, their transposed forms, Linear
    or Embedding.
    """
    if example_inputs is not None:
        return weight_layers(model, example_inputs)
    layers = []
    for name, module in model.named_modules():
        for cls, kind in _KINDS:
            if isinstance(module, cls):
                weight = module.weight  # type: ignore[attr-defined]
                layers.append(
                    WeightLayer(name, kind, int(weight.numel()), (f"{name}.weight",), output_channels(weight, kind))
                )
                break
    return layers


def quantizable_layers(
    model: nn.Module, example_inputs: tuple | None = None, target: Target | None = None
) -> list[WeightLayer]:
    """The layers a quantizer can take (on ``target``'s menu)."""
    kinds = target.kinds if target is not None else None
    return [layer for layer in model_layers(model, example_inputs) if kinds is None or layer.kind in kinds]


def uniform_plan(
    model: nn.Module,
    target: Target,
    precision: str | None = None,
    reason: str = "",
    example_inputs: tuple | None = None,
) -> Plan:
    """Every layer at one precision (the target's default unless named)."""
    precision = precision or target.default_precision
    spec = target.precision(precision)
    layers = []
    for found in quantizable_layers(model, example_inputs, target):
        name, kind, params, channels = found.name, found.kind, found.params, found.channels
        if kind in spec.ops:
            layers.append(LayerPlan(name, kind, precision, reason or f"uniform {precision}", params, channels))
        else:
            fallback = target.default_precision if kind in target.precision(target.default_precision).ops else "float"
            why = f"{precision} does not run {kind} layers on {target.name}"
            layers.append(LayerPlan(name, kind, fallback, why, params, channels))
    return Plan(target=target.name, layers=layers)


def validate_plan(plan: Plan, model: nn.Module, target: Target, example_inputs: tuple | None = None) -> Plan:
    """Refuse a plan that names unknown layers or precisions the target cannot run."""
    known = {found.name: found for found in quantizable_layers(model, example_inputs, target)}
    unknown = [entry.name for entry in plan.layers if entry.name not in known]
    if unknown:
        raise EdgeqError(
            f"plan names unknown layers: {', '.join(unknown)}",
            f"valid layers are: {', '.join(known)}",
        )
    channels: dict[str, int] | None = None
    for entry in plan.layers:
        if entry.precision not in target.precisions:
            raise EdgeqError(
                f"plan gives layer '{entry.name}' precision '{entry.precision}', "
                f"which target '{target.name}' cannot run",
                f"use one of: {', '.join(target.precisions)}",
            )
        kind = known[entry.name].kind
        spec = target.precisions[entry.precision]
        if kind not in spec.ops:
            valid = [p for p, s in target.precisions.items() if kind in s.ops]
            raise EdgeqError(
                f"plan gives {kind} layer '{entry.name}' precision '{entry.precision}', "
                f"which {target.name} runs only for {', '.join(spec.ops)} layers",
                f"use one of: {', '.join(valid)}",
            )
        if spec.group_size:
            if channels is None:
                channels = _input_channels(model, example_inputs)
            inputs = channels.get(entry.name, 0)
            if inputs % spec.group_size:
                fits = [p for p, s in target.precisions.items() if kind in s.ops and inputs % max(s.group_size, 1) == 0]
                raise EdgeqError(
                    f"plan gives layer '{entry.name}' precision '{entry.precision}' (groups of {spec.group_size} "
                    f"input channels), but its {inputs} input channels do not split into such groups",
                    f"use one of: {', '.join(fits)}",
                )
        entry.kind, entry.params, entry.channels = kind, known[entry.name].params, known[entry.name].channels
    # Layers the plan leaves out keep the target's default, and say so.
    named = {entry.name for entry in plan.layers}
    for name, found in known.items():
        if name not in named:
            plan.layers.append(
                LayerPlan(
                    name,
                    found.kind,
                    target.default_precision,
                    "not in the plan: target default",
                    found.params,
                    found.channels,
                )
            )
    if plan.target != target.name:
        plan.target = target.name
    return plan


def _input_channels(model: nn.Module, example_inputs: tuple | None) -> dict[str, int]:
    """Layer name -> input channels of its (first) weight."""
    return {
        found.name: int(model.get_parameter(found.weights[0]).flatten(1).shape[1])
        for found in model_layers(model, example_inputs)
        if found.weights
    }


def budget_in_bytes(size_budget: float, float_program_bytes: float) -> float:
    """--size-budget in bytes: given as bytes (> 1) or as a fraction of the float program (<= 1)."""
    return size_budget * float_program_bytes if size_budget <= 1 else size_budget


def weight_bytes(plan: Plan, target: Target) -> float:
    """Bytes the plan's quantizable weights take in the program, beyond what their float32 biases take.

    Per weight the precision's ``weight_bytes``; per output channel (embedding row) its
    ``channel_bytes`` for the kind: scales and zero points, and a bias narrower than float32.
    """
    return sum(
        layer_bytes(entry.params, entry.channels, entry.kind, target.precisions[entry.precision])
        for entry in plan.layers
    )


def layer_bytes(params: int, channels: int, kind: str, precision: Precision) -> float:
    """Program bytes of one layer's weights at ``precision``, counted as :func:`weight_bytes` does."""
    return params * precision.weight_bytes + channels * precision.channel_cost(kind)
