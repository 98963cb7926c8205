"""Asymmetric 4-bit groups on XNNPACK (edgeq.llm.zero_points): the split holds the asymmetric grid,
GPTQ fits it first, and the lowered program runs it in one delegate. Real torchao quantization,
real XNNPACK lowering, real runtime."""

from __future__ import annotations

import copy

import torch
from torch import nn

from edgeq.llm.export import LLMPlan, quantize_layers
from edgeq.llm.gptq import Hessians
from edgeq.llm.zero_points import ZeroPointLinear

GROUP = 32


def _on_an_asymmetric_grid(rows: int = 64, columns: int = 128) -> torch.Tensor:
    """Weights as llama.cpp's Q4_1 holds them: per group of 32 a minimum and a step, all 16 levels used;
    groups straddle zero off centre (torchao's min-max range always takes zero in)."""
    generator = torch.Generator().manual_seed(0)
    step = torch.rand(rows, columns // GROUP, 1, generator=generator) * 0.02 + 0.005
    low = -torch.rand(rows, columns // GROUP, 1, generator=generator) * 0.07
    levels = torch.randint(0, 16, (rows, columns // GROUP, GROUP), generator=generator).float()
    levels[..., 0], levels[..., 1] = 0, 15
    return (low + step * levels).reshape(rows, columns)


def _effective_weight(split: ZeroPointLinear) -> torch.Tensor:
    """What the split computes as one weight: the symmetric part plus each group's offset."""
    main = split.main.weight.dequantize()
    offsets = split.offsets.weight.dequantize() / split.group  # the offsets' weights carry the mean's 1/group
    return main + offsets.repeat_interleave(split.group, dim=1)


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    linear.weight.data = weight.clone()
    return linear


def test_the_split_holds_an_asymmetric_grid_that_a_symmetric_one_cannot():
    weight = _on_an_asymmetric_grid()
    split = quantize_layers(_linear(weight), LLMPlan({"": "w4g32"}, "float", scales="minmax", zero_points=True))
    assert isinstance(split, ZeroPointLinear) and split.group == GROUP
    main = split.main.weight
    assert not main.zero_point.any() and int(main.qdata.min()) >= -8 and int(main.qdata.max()) <= 7
    symmetric = quantize_layers(_linear(weight), LLMPlan({"": "w4g32"}, "float", scales="minmax"))
    peak = weight.abs().max()
    split_error = (_effective_weight(split) - weight).abs().max() / peak
    symmetric_error = (symmetric.weight.dequantize() - weight).abs().max() / peak
    # left: the bfloat16 steps and the offsets' 8-bit rounding; a symmetric grid misses by a step
    assert split_error < 0.01 < 0.05 < symmetric_error


def test_gptq_fits_the_asymmetric_grid_before_the_split():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 128, generator=generator) * 0.05 + 0.02  # float weights, off any grid
    mixing = torch.randn(128, 128, generator=generator)
    inputs = torch.randn(2048, 128, generator=generator) @ mixing / 8  # correlated inputs: GPTQ has work to do
    hessians = Hessians({"layer": inputs.T @ inputs / len(inputs)}, {"layer": weight})
    errors = {}
    for name, given in (("nearest", None), ("gptq", hessians)):
        module = nn.ModuleDict({"layer": _linear(weight)})
        quantize_layers(module, LLMPlan({"layer": "w4g32"}, "float", zero_points=True), given)
        assert isinstance(module["layer"], ZeroPointLinear)
        errors[name] = float((inputs @ (_effective_weight(module["layer"]) - weight).T).square().mean())
    assert errors["gptq"] < 0.8 * errors["nearest"]


def test_the_lowered_program_runs_the_split_in_one_xnnpack_delegate_as_eager_does():
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from edgeq.runtime import ProgramRunner

    module = nn.ModuleDict({"layer": _linear(_on_an_asymmetric_grid())})
    quantize_layers(module, LLMPlan({"layer": "w4g32"}, "float", zero_points=True))

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = copy.deepcopy(module)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner["layer"](x)

    wrapped = Wrapped().eval()
    x = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(2))
    lowered = to_edge_transform_and_lower(torch.export.export(wrapped, (x,)), partitioner=[XnnpackPartitioner()])
    graph = lowered.exported_program().graph_module.graph
    calls = [node.target for node in graph.nodes if node.op == "call_function"]
    assert sum("executorch_call_delegate" in str(target) for target in calls) == 1, calls
    assert all("executorch_call_delegate" in str(t) or "getitem" in str(t) for t in calls), calls
    runner = ProgramRunner(lowered.to_executorch().buffer)
    try:
        got = runner.execute(x)[0]
    finally:
        runner.close()
    torch.testing.assert_close(got, wrapped(x), atol=1e-4, rtol=1e-4)
