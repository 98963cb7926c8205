"""PT2E prepare and convert: float graph -> fake-quant graph -> quantized reference (q/dq ops on floats)."""

from __future__ import annotations

from typing import Any

import torch

from edgeq import upstream


def prepare(graph: torch.fx.GraphModule, quantizer: Any, qat: bool = True) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    upstream.apply()
    return prepare_qat_pt2e(graph, quantizer) if qat else prepare_pt2e(graph, quantizer)


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The quantized reference: what the program computes, in float q/dq form."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    upstream.apply()
    return convert_pt2e(prepared)
