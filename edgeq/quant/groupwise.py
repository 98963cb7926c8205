"""Linear weights quantized in groups of input channels (one scale per group), trained and shipped.

PT2E's quantizers have no groupwise weight spec, but XNNPACK runs a linear
whose weight comes through ``quantized_decomposed::dequantize_per_channel_group``
(4-bit weights, bf16 scales per group, dynamic 8-bit activations: its qb4w
kernels). edgeq leaves such a layer's weight out of PT2E and:

1. :func:`insert_fake_quants`, on the prepared graph, puts a
   :class:`GroupwiseFakeQuantize` between the weight and the linear: the
   voting range tracker of the spec with one tracked absmax per group (a
   group is a "channel" of the weight seen as ``[out * in / group, group]``),
   scales rounded to bf16 as XNNPACK stores them. Like every weight
   fake-quant it calibrates, tracks, trains at the intermediate width first
   and freezes, so QAT and every check see the grid that ships;
2. :func:`lower_groups`, before ``convert_pt2e`` (which would otherwise turn
   the module into per-channel q/dq ops), replaces it with the integer weight,
   its committed scales and ``dequantize_per_channel_group``, computing the
   same numbers, and drops the float weight from the program.

With ``ranges="ema"`` the tracked absmax is a moving average (PT2E's 0.01
averaging constant) instead of a vote, for comparison.
"""

from __future__ import annotations

import torch

from edgeq.configs import RangeConfig
from edgeq.graph import attr_tensor, layer_owners
from edgeq.quant.fake_quant import AdaptiveRangeFakeQuantize, vote_kwargs
from edgeq.quant.ranges import VoteConfig

#: graph.meta key: layer name -> (group size, bits) for the layers quantized here
GROUPS = "edgeq_groupwise"
#: a vote that commits every observation as a 0.99 / 0.01 blend: PT2E's moving-average range
EMA_VOTE = VoteConfig(up_ratio=0.0, down_ratio=0.0, min_votes=1, rule="mean", keep=0.99)
RANGES = {4: (-8, 7)}
#: XNNPACK packs groups of a multiple of this many input channels
GROUP_MULTIPLE = 32


class GroupwiseFakeQuantize(AdaptiveRangeFakeQuantize):
    """The adaptive-range fake-quant over groups of ``group`` input channels of a 2-D weight.

    The weight ``[out, in]`` is fake-quantized as ``[out * in / group, group]``
    per row, so each group's absmax is one tracked value; scales are rounded
    to bf16, as XNNPACK stores them, so the grid trained is the grid shipped.
    """

    def __init__(self, group: int, bits: int = 4, vote: VoteConfig | None = None) -> None:
        qmin, qmax = RANGES[bits]
        vote = vote or VoteConfig()
        super().__init__(
            dtype=torch.int8,
            quant_min=qmin,
            quant_max=qmax,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
            # XNNPACK stores group scales in bf16: the observer's qparams, on every refresh, are bf16 too.
            scale_dtype=torch.bfloat16,
            **vote_kwargs(vote),
        )
        self.group = group
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, inp = x.shape
        return super().forward(x.reshape(out * inp // self.group, self.group)).reshape(out, inp)

    def integer_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 weight on this grid, [out, in / group] scales): what the program stores."""
        out, inp = weight.shape
        scale = self.scale.detach().float()
        grouped = weight.detach().float().reshape(out * inp // self.group, self.group)
        # Through the fake-quant op itself: its rounding (x * 1/scale) is the one QAT saw.
        fake = torch.fake_quantize_per_channel_affine(
            grouped, scale, torch.zeros_like(scale, dtype=torch.int32), 0, self.quant_min, self.quant_max
        )
        q = torch.round(fake / scale[:, None]).clamp(self.quant_min, self.quant_max).to(torch.int8)
        return q.reshape(out, inp), scale.reshape(out, inp // self.group)

    def extra_repr(self) -> str:
        return f"group={self.group}, bits={self.bits}, " + super().extra_repr()


def _linears(graph: torch.fx.GraphModule, layers: dict[str, tuple[int, int]]) -> list[tuple[torch.fx.Node, str]]:
    owners = layer_owners(graph, list(layers))
    return [
        (node, owners[node])
        for node in graph.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("aten.linear.") and owners.get(node) in layers
    ]


def insert_fake_quants(
    graph: torch.fx.GraphModule, layers: dict[str, tuple[int, int]], ranges: RangeConfig | None = None
) -> int:
    """Put a groupwise fake-quant on the weight of each listed layer's linear; returns how many."""
    if not layers:
        return 0
    ranges = ranges or RangeConfig()
    vote = ranges.vote if ranges.mode == "adaptive" else EMA_VOTE
    done = 0
    for node, layer in _linears(graph, layers):
        weight = node.args[1]
        if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
            continue
        group, bits = layers[layer]
        name = f"edgeq_groupwise_{done}"
        graph.add_submodule(name, GroupwiseFakeQuantize(group, bits, vote))
        with graph.graph.inserting_before(node):
            fake = graph.graph.call_module(name, (weight,))
        fake.meta = dict(weight.meta)
        node.replace_input_with(weight, fake)
        done += 1
    graph.meta[GROUPS] = dict(layers)
    graph.recompile()
    return done


def lower_groups(graph: torch.fx.GraphModule) -> int:
    """Replace each groupwise fake-quant with the integer weight and dequantize_per_channel_group.

    Runs on the prepared graph before ``convert_pt2e``, which would read the
    module as a per-channel fake-quant of the un-grouped weight.
    """
    modules = dict(graph.named_modules())
    swapped = 0
    for node in list(graph.graph.nodes):
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(module, GroupwiseFakeQuantize):
            continue
        source = node.args[0]
        assert isinstance(source, torch.fx.Node)
        target = str(source.target)
        q, scales = module.integer_weight(attr_tensor(graph, target))
        stem = target.replace(".", "_")
        graph.register_buffer(f"{stem}_q{module.bits}g{module.group}", q)
        graph.register_buffer(f"{stem}_gscales", scales)
        graph.register_buffer(f"{stem}_gzeros", torch.zeros_like(scales, dtype=torch.int8))
        with graph.graph.inserting_before(node):
            args = [
                graph.graph.get_attr(f"{stem}_{name}")
                for name in (f"q{module.bits}g{module.group}", "gscales", "gzeros")
            ]
            dequant = graph.graph.call_function(
                torch.ops.quantized_decomposed.dequantize_per_channel_group.default,
                (*args, module.quant_min, module.quant_max, torch.int8, module.group, torch.float32),
            )
        dequant.meta = dict(node.meta)
        node.replace_all_uses_with(dequant)
        graph.graph.erase_node(node)
        swapped += 1
    # The float weights stay until convert() drops unused attributes from the reference: here,
    # on the prepared graph, that would also take the observers' buffers.
    return swapped
