"""Integer arithmetic in a model (attention-mask code) survives XNNPACK's quantizer preparation."""

from __future__ import annotations

import torch
from torch import nn

from edgeq.backends import load_target, quant_spec
from edgeq.planning.plan import uniform_plan
from edgeq.quant.convert import convert, prepare
from edgeq.runtime import ProgramRunner


class MaskedLinear(nn.Module):
    """What Hugging Face's mask code does: index a mask with ``arange(n) + offset``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1]) + 0
        keep = mask[:, positions].unsqueeze(-1).to(x.dtype)
        return self.proj(x) * keep


def test_scalar_constants_of_integer_ops_stay_integer_and_the_program_matches():
    from edgeq.lower import lower

    torch.manual_seed(0)
    model = MaskedLinear().eval()
    x = torch.randn(1, 64, 16)
    mask = torch.ones(1, 64, dtype=torch.long)
    mask[0, 40:] = 0
    target = load_target("android")
    for qat in (False, True):
        prepared = prepare(
            torch.export.export(model, (x, mask)).module(),
            quant_spec(uniform_plan(model, target), target, qat=qat),
        )
        constants = [n for n in prepared.graph.nodes if n.op == "get_attr" and "_tensor_constant_" in str(n.target)]
        assert constants and all(prepared.get_buffer(str(n.target)).dtype == torch.int64 for n in constants)
        prepared(x, mask)  # raised IndexError (float indices) before the fix
    reference = convert(prepared)
    expected = reference(x, mask)
    assert torch.all(expected[0, 40:] == 0)
    program = ProgramRunner(lower(reference, (x, mask), target).program)
    assert torch.allclose(program(x, mask), expected, atol=1e-5)


def test_float_scalar_constants_are_left_alone():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x) * 0.5 + 1

    model = Scale().eval()
    x = torch.randn(2, 8)
    target = load_target("android")
    prepared = prepare(
        torch.export.export(model, (x,)).module(),
        quant_spec(uniform_plan(model, target), target, qat=False),
    )
    constants = [n for n in prepared.graph.nodes if n.op == "get_attr" and "_tensor_constant_" in str(n.target)]
    assert constants and all(prepared.get_buffer(str(n.target)).dtype == torch.float32 for n in constants)
