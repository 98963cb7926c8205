"""Asymmetric 4-bit groups on XNNPACK (edgeq.llm.zero_points): the split holds the asymmetric grid,
GPTQ fits it first, and the lowered program runs it in one delegate. Real torchao quantization,
real XNNPACK lowering, real runtime."""

from __future__ import annotations

import copy

import pytest
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


def xnnpack_calls(program: bytes) -> int:
    """How many delegate calls the program's forward makes."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    plan = deserialize_pte_binary(program).program.execution_plan
    forward = next(p for p in plan if p.name == "forward")
    return sum(type(i.instr_args).__name__ == "DelegateCall" for c in forward.chains for i in c.instructions)


def test_a_decoder_with_zero_points_lowers_to_the_program_its_eager_twin_computes(tmp_path):
    from test_llm import _tiny_llama, _tokenizer, assert_program_computes

    from edgeq.llm.export import linear_names, lower_llm
    from edgeq.llm.plan import _swap, linear_modules, quantized_copy

    model = _tiny_llama(layers=1)  # one block: every kind of linear, at half the lowering time
    names = linear_modules(model)
    plan = LLMPlan.uniform(linear_names({"n_layers": 1}), "w4g32", "float", zero_points=True)
    program = lower_llm(model, _tokenizer(tmp_path, 256), 32, plan, {"get_bos_id": 0, "get_eos_ids": [0]})
    # q/k/v and gate/up stacked, the norms and group means inside XNNPACK: the block runs in three
    # delegate calls between the ops XNNPACK lacks (rope's slices, the cache, SDPA), not a dozen
    assert xnnpack_calls(program) <= 5
    for name, target in names.items():  # the HF model with the very modules the program was made from
        _swap(model, name, quantized_copy(model.get_submodule(name), target, "w4g32", None, True))
    assert sum(isinstance(m, ZeroPointLinear) for m in model.modules()) == len(names)
    assert_program_computes(program, model, tolerance=2e-3)


def test_zero_points_are_refused_in_one_line_where_they_do_not_apply(tmp_path):
    from typer.testing import CliRunner

    from edgeq.cli import _group_sizes, app
    from edgeq.errors import EdgeqError
    from edgeq.llm.build import LLMBuildConfig
    from edgeq.llm.qat import LLMQATConfig

    with pytest.raises(EdgeqError, match="QAT trains against torchao's grids") as raised:
        LLMBuildConfig(zero_points=True, qat=LLMQATConfig(steps=8))
    assert "\n" not in str(raised.value)
    out = tmp_path / "digits"
    result = CliRunner().invoke(app, ["build", "--zero-points", "--out", str(out)])  # the bundled digits CNN
    assert result.exit_code != 0 and "--zero-points applies to LLM recipes only" in result.output
    result = CliRunner().invoke(app, ["build", "--head", "w8dyn", "--out", str(out)])
    assert result.exit_code != 0 and "--head applies to LLM recipes only" in result.output
    result = CliRunner().invoke(app, ["build", "--group-sizes", "32,64", "--out", str(out)])
    assert result.exit_code != 0 and "--group-sizes applies to LLM recipes only" in result.output
    for flags, flag in [(["--no-zero-points"], "--no-zero-points"), (["--min-agreement", "90"], "--min-agreement")]:
        result = CliRunner().invoke(app, ["build", *flags, "--out", str(out)])
        assert result.exit_code != 0 and f"{flag} applies to LLM recipes only" in result.output
    assert not out.exists()
    with pytest.raises(EdgeqError, match="is not a list of integers"):
        _group_sizes("32,big")
