"""A layer planned in float lowers and runs beside quantized ones, padding in between included."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeq import upstream
from edgeq.backends import load_target


class PaddedBlock(nn.Module):
    """conv -> ReLU6 -> static "same" pad -> stride-2 depthwise conv, as in EfficientNet-Lite."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, groups=16)
        self.project = nn.Conv2d(16, 8, 1)
        self.act = nn.ReLU6()  # exported as hardtanh, which edgeq fuses into the conv before it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.expand(x))
        x = self.act(self.dw(F.pad(x, (0, 1, 0, 1))))
        return self.project(x)


def test_a_float_conv_after_a_pad_lowers_and_runs_as_its_reference():
    from test_relu6 import _quantize

    from edgeq.backends import get_backend, quant_spec
    from edgeq.lower import lower
    from edgeq.planning.plan import uniform_plan

    upstream.apply()
    torch.manual_seed(0)
    model = PaddedBlock().eval()
    data = torch.randn(16, 3, 16, 16)
    target = load_target("android")
    plan = uniform_plan(model, target, "int8", example_inputs=(data[:1],))
    for entry in plan.layers:
        if entry.name == "dw":
            entry.precision = "float"
    reference = _quantize(model, quant_spec(plan, target, qat=False), data)
    lowered = lower(reference, (data[:1],), target)  # failed in ExecuTorch's InsertPadQDQPass before the patch
    runner = get_backend("xnnpack").runner(lowered.program)
    with torch.no_grad():
        expected = reference(data[:1])
        step = float(expected.max() - expected.min()) / 255
        assert float((runner(data[:1]) - expected).abs().max()) <= 3 * step
