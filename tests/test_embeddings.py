"""Embedding tables at 8 and 4 bits per row: the grid QAT sees is the table the program ships."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgeq.backends import get_backend, load_target, quant_spec
from edgeq.capture import capture
from edgeq.lower import lower, lower_float
from edgeq.planning.plan import uniform_plan
from edgeq.quant.convert import convert, prepare
from edgeq.quant.embeddings import pack_4bit


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(300, 64)
        self.head = nn.Linear(64, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(ids).mean(1))


@pytest.mark.parametrize("precision,op,per_weight", [("int8", "embedding_byte", 1.0), ("w4dyn", "embedding_4bit", 0.5)])
def test_a_quantized_table_is_simulated_exactly_and_runs_in_the_program(precision, op, per_weight):
    torch.manual_seed(0)
    model = Bag().eval()
    ids = torch.randint(0, 300, (8, 12))
    target = load_target("android")
    plan = uniform_plan(model, target, "float", example_inputs=(ids[:1],))
    for entry in plan.layers:
        if entry.kind == "embedding":
            entry.precision = precision
    original = model.table.weight.detach().clone()
    prepared = prepare(capture(copy.deepcopy(model), (ids[:1],)), quant_spec(plan, target, qat=True))
    table = prepared.get_parameter("table.weight")
    assert not table.requires_grad, "a quantized table must stay on its grid during QAT"
    assert torch.equal(model.table.weight, original), "the float model's table changed"
    steps = 2 ** (8 if precision == "int8" else 4)
    assert max(len(torch.unique(row)) for row in table) <= steps
    reference = convert(copy.deepcopy(prepared))
    ops = {str(n.target) for n in reference.graph.nodes if n.op == "call_function"}
    assert f"quantized_decomposed.{op}.default" in ops and "aten.embedding.default" not in ops
    with torch.no_grad():
        assert torch.allclose(prepared(ids), reference(ids), atol=1e-6)
    lowered = lower(reference, (ids[:1],), target)
    runner = get_backend("xnnpack").runner(lowered.program)
    with torch.no_grad():
        assert torch.allclose(runner(ids[:2]), reference(ids[:2]), atol=1e-5)
    float_bytes = len(lower_float(model, (ids[:1],), target))
    saved = float_bytes - len(lowered.program)
    # 4 bytes per float weight become per_weight bytes, plus one fp32 scale per row.
    expected = 300 * 64 * (4 - per_weight) - 300 * 4
    assert abs(saved - expected) / expected < 0.02, (saved, expected)


def test_4bit_packing_is_what_the_kernel_reads():
    q = torch.tensor([[-8, 7, 0, -1]], dtype=torch.int8)
    packed = pack_4bit(q)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[(0 << 4) | 15, (8 << 4) | 7]]
