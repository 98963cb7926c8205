"""fp16 linears in decoder programs: float16 weights and arithmetic where the plan keeps a linear out of
the 8-bit activations, lowered as XNNPACK's fp16 kernels between casts. Real export, lowering, runtime."""

from __future__ import annotations

import torch
from torch import nn

from edgeq.llm.export import LLMPlan, quantize_layers
from edgeq.quant.half import HalfLinear


def test_an_fp16_linear_is_the_float_linear_rounded_to_float16():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    half = quantize_layers(nn.Sequential(linear), LLMPlan({"0": "fp16"}, "float"))[0]
    assert isinstance(half, HalfLinear) and not isinstance(half, nn.Linear)  # no quantizer filter takes it
    assert half.weight.dtype == half.bias.dtype == torch.float16
    y = half(x)
    assert y.dtype == torch.float32
    expected = nn.functional.linear(x.half(), linear.weight.half(), linear.bias.half()).float()
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    error = float((y - linear(x)).abs().max() / linear(x).abs().max())
    assert 0 < error < 2e-3  # float16's 11 bits, not an integer grid


def test_stacked_fp16_siblings_compute_each_siblings_outputs():
    from edgeq.llm.fuse import _stack

    torch.manual_seed(0)
    siblings = [HalfLinear(nn.Linear(64, width, bias=False)) for width in (32, 16, 16)]
    stacked = _stack(siblings)
    assert isinstance(stacked, HalfLinear) and stacked.weight.dtype == torch.float16
    x = torch.randn(3, 64)
    torch.testing.assert_close(stacked(x), torch.cat([s(x) for s in siblings], -1), atol=0, rtol=0)


def test_a_decoder_with_fp16_linears_lowers_to_the_program_its_eager_twin_computes(tmp_path):
    """q/k/v and down_proj at fp16 (q/k/v stacked), the others quantized or float: the program holds the
    fp16 weights' float16 bytes and no float32 copy of them, and computes what the HF model with the
    same modules computes, through prefill and KV-cache decode steps."""
    from test_llm import _tiny_llama, _tokenizer, assert_program_computes

    from edgeq.llm.export import linear_names, lower_llm
    from edgeq.llm.plan import _swap, linear_modules, quantized_copy

    model = _tiny_llama(layers=1)
    precisions = {"attention.wq": "fp16", "attention.wk": "fp16", "attention.wv": "fp16", "attention.wo": "float",
                  "feed_forward.w1": "w8dyn", "feed_forward.w3": "w8dyn", "feed_forward.w2": "fp16"}  # fmt: skip
    names = linear_names({"n_layers": 1})
    plan = LLMPlan({n: precisions.get(n.removeprefix("layers.0."), "w4g32") for n in names}, "float")
    program = lower_llm(model, _tokenizer(tmp_path, 256), 32, plan, {"get_bos_id": 0, "get_eos_ids": [0]})

    names = linear_modules(model)
    modules = {target: model.get_submodule(name) for name, target in names.items()}
    for target in ("layers.0.attention.wv", "layers.0.feed_forward.w2", "layers.0.feed_forward.w1"):
        weight = modules[target].weight.detach()
        half = plan.linears[target] == "fp16"  # its float16 bytes in the program, and no float32 copy
        assert (weight.half().numpy().tobytes() in program) is half
        assert weight.numpy().tobytes() not in program

    for name, target in names.items():  # the HF model with the very modules the program was made from
        if plan.linears[target] != "float":
            _swap(model, name, quantized_copy(modules[target], target, plan.linears[target], None, False))
    assert sum(isinstance(m, HalfLinear) for m in model.modules()) == 4
    assert_program_computes(program, model, tolerance=5e-3)
