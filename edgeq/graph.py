"""FX-graph helpers shared by quantizers, numeric debugging and lowering.

One public home for how edgeq reads an exported graph: which planned layer a
node belongs to (through ``nn_module_stack``), and which ops fuse into the
conv/linear before them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: graph.meta key: node name -> largest float magnitude on the example input (edgeq.capture)
MAGNITUDES = "edgeq_magnitudes"
#: magnitudes above this are sentinels (an additive attention mask's dtype-minimum), not signal
SENTINEL = 1e6

#: ops that fuse into the conv/linear before them and so belong to its layer
FOLLOWERS = ("batch_norm", "relu", "hardtanh", "clamp", "getitem")


def module_path(path: str) -> str:
    """A ``nn_module_stack`` path as a module name: ``L['self'].features[0]`` -> ``features.0``."""
    path = path.replace("L['self'].", "").replace("L['self']", "")
    return path.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "").lstrip(".")


def is_follower(node: torch.fx.Node) -> bool:
    return any(key in str(node.target) for key in FOLLOWERS)


def layer_owners(graph: torch.fx.GraphModule, layers: list[str]) -> dict[torch.fx.Node, str]:
    """Map each node to the planned layer it belongs to.

    A node belongs to the innermost planned module in its ``nn_module_stack``;
    a BatchNorm or activation without one inherits its input's layer, so a
    conv -> BN -> ReLU chain is planned as one unit, as XNNPACK fuses it.
    """
    wanted = set(layers)
    owners: dict[torch.fx.Node, str] = {}
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        stack = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
        owned = [name for name in (module_path(p) for p in stack) if name in wanted]
        if owned:
            owners[node] = owned[-1]
        elif is_follower(node) and node.args:
            src = node.args[0]
            if isinstance(src, torch.fx.Node) and src in owners:
                owners[node] = owners[src]
    return owners


def sentinel_nodes(graph: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Ops that produce or read sentinel magnitudes (see :data:`SENTINEL`).

    An attention mask added to the scores as ``finfo.min`` where a token is
    padding makes that add's output span 3e38: one int8 scale over it leaves
    every real score on the same level and the softmax uniform (measured on
    MiniLM: cosine to float 0.41 with the add quantized). Such ops stay in
    float; the matmuls on either side are quantized as usual.
    """
    magnitudes = graph.meta.get(MAGNITUDES, {})
    big = {name for name, value in magnitudes.items() if value > SENTINEL}
    found = set()
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if node.name in big or any(isinstance(a, torch.fx.Node) and a.name in big for a in node.all_input_nodes):
            found.add(node)
    return found


def attr_tensor(graph: torch.fx.GraphModule, target: str) -> torch.Tensor:
    """The parameter or buffer a get_attr node names."""
    try:
        return graph.get_parameter(target)
    except AttributeError:
        return graph.get_buffer(target)


def call_names(graph: torch.fx.GraphModule) -> set[str]:
    """The targets of a graph's call_function nodes, as strings."""
    return {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}


#: ops whose second operand is a layer's weight, by layer kind
_WEIGHT_OPS = {
    "conv": ("aten.conv1d.", "aten.conv2d.", "aten.convolution."),
    # weight [in, out / groups, k...]: its output channels (and per-channel scales) are dim 1
    "conv_transpose": ("aten.conv_transpose1d.", "aten.conv_transpose2d."),
    "linear": ("aten.linear.", "aten.matmul.", "aten.mm.", "aten.addmm.", "aten.bmm."),
    "embedding": ("aten.embedding.",),
}
#: ops a weight may pass through on its way to the op (Hugging Face's Conv1D transposes it)
_WEIGHT_VIEWS = ("aten.t.", "aten.permute.", "aten.transpose.", "aten.view.", "aten.reshape.")


@dataclass(frozen=True)
class WeightLayer:
    """A plannable layer found in the exported graph: the module owning weight-bearing ops."""

    name: str
    kind: str
    params: int
    #: fully qualified names of the weight parameters its ops read
    weights: tuple[str, ...]
    #: output channels (table rows, for an embedding) of its first weight: each carries
    #: per-channel scales and a bias in the program
    channels: int = 0


def output_channels(weight: torch.Tensor, kind: str) -> int:
    """Output channels of a layer's weight (rows of a table): how many per-channel scales it carries."""
    if weight.dim() == 0:
        return 1
    return int(weight.shape[1 if kind == "conv_transpose" and weight.dim() > 1 else 0])


def layer_kind(node: torch.fx.Node) -> str | None:
    """The layer kind ("conv", "conv_transpose", "linear", "embedding") of a weight-bearing op, else None."""
    name = str(node.target)
    for kind, prefixes in _WEIGHT_OPS.items():
        if name.startswith(prefixes):
            return kind
    return None


def _weight_parameter(node: torch.fx.Node, parameters: dict[str, str]) -> str | None:
    """The parameter FQN a weight operand comes from (through view-like ops), or None."""
    target = str(node.target)
    operand_index = 2 if target.startswith("aten.addmm.") else 0 if target.startswith("aten.embedding.") else 1
    if len(node.args) <= operand_index:
        return None
    source = node.args[operand_index]
    for _ in range(3):
        if not isinstance(source, torch.fx.Node):
            return None
        if source.op == "placeholder":
            return parameters.get(source.name)
        if source.op == "call_function" and str(source.target).startswith(_WEIGHT_VIEWS) and source.args:
            source = source.args[0]
            continue
        return None
    return None


def weight_layers(model: torch.nn.Module, example_inputs: tuple) -> list[WeightLayer]:
    """Every conv, linear, weight-bearing matmul and embedding lookup in the exported graph, by owning module.

    A layer is the innermost module (``nn_module_stack``) that calls the op,
    whatever its class: subclassed convolutions, functional ``F.linear``
    inside a custom module, Hugging Face's ``Conv1D``. A module used twice is
    one layer; ops at the model's top level (no owning submodule) follow the
    target's default precision.
    """
    exported = torch.export.export(model, example_inputs)
    parameters = dict(exported.graph_signature.inputs_to_parameters)
    named = dict(model.named_parameters(remove_duplicate=False))
    found: dict[str, tuple[str, list[str]]] = {}
    for node in exported.graph.nodes:
        if node.op != "call_function":
            continue
        kind = layer_kind(node)
        if kind is None:
            continue
        weight = _weight_parameter(node, parameters)
        stack = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
        owner = module_path(stack[-1]) if stack else ""
        if weight is None or not owner:
            continue
        entry = found.setdefault(owner, (kind, []))
        if weight not in entry[1]:
            entry[1].append(weight)
    return [
        WeightLayer(
            name,
            kind,
            sum(int(named[w].numel()) for w in weights if w in named),
            tuple(weights),
            output_channels(named[weights[0]], kind) if weights[0] in named else 0,
        )
        for name, (kind, weights) in found.items()
    ]


def untie_shared_constants(graph: torch.fx.GraphModule) -> int:
    """Give each user of a shared weight or bias its own copy, in place; returns how many copies.

    A module applied twice (a shared or tied layer) leaves one get_attr node
    feeding several quantized ops. ExecuTorch's XNNPACK lowering (1.5.1)
    then computes the second use with constants prepared for the first (its
    int32 bias is scaled by the first call's input scale): measured on a
    Linear applied twice, the program was 9 dB from its own quantized
    reference, with a plain XNNPACKQuantizer as well. Copies make each call
    self-contained; the numbers the reference computes do not change.
    """
    copies = 0
    for node in list(graph.graph.nodes):
        if node.op != "get_attr" or len(node.users) < 2:
            continue
        tensor = _attr(graph, str(node.target))
        if not isinstance(tensor, torch.Tensor):
            continue
        for index, user in enumerate(list(node.users)[1:], start=1):
            name = f"{str(node.target).replace('.', '_')}_use{index}"
            while hasattr(graph, name):
                name += "_"
            graph.register_buffer(name, tensor.detach().clone())
            with graph.graph.inserting_before(user):
                copy = graph.graph.get_attr(name)
            copy.meta = dict(node.meta)
            user.replace_input_with(node, copy)
            copies += 1
    if copies:
        graph.graph.lint()
        graph.recompile()
    return copies


def _attr(graph: torch.fx.GraphModule, target: str) -> object:
    owner = graph
    *path, leaf = target.split(".")
    for part in path:
        owner = getattr(owner, part)
    return getattr(owner, leaf)


def drop_unused_attributes(graph: torch.fx.GraphModule) -> None:
    """Delete top-level tensors no node reads: an exported program would carry them as constants."""
    graph.graph.eliminate_dead_code()
    used = {str(n.target) for n in graph.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in graph.named_buffers()] + [n for n, _ in graph.named_parameters()]:
        if name not in used:
            path, _, attr = name.rpartition(".")
            owner = graph.get_submodule(path) if path else graph
            delattr(owner, attr)
    graph.delete_all_unused_submodules()
    graph.recompile()
