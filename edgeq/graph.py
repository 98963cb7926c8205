"""FX-graph helpers shared by quantizers, numeric debugging and lowering.

One public home for how edgeq reads an exported graph: which planned layer a
node belongs to (through ``nn_module_stack``), and which ops fuse into the
conv/linear before them.
"""

from __future__ import annotations

import torch

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


def call_names(graph: torch.fx.GraphModule) -> set[str]:
    """The targets of a graph's call_function nodes, as strings."""
    return {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
