"""Dynamically quantized activations, per token, as the program computes them.

PT2E describes a dynamically quantized input (``is_dynamic=True`` specs: the
``w8dyn``/``w4dyn``/``w4g32`` precisions) with one scale per tensor, chosen on
each call: ``choose_qparams.tensor`` -> ``quantize_per_tensor.tensor`` ->
``dequantize_per_tensor.tensor``. XNNPACK has no per-tensor dynamic
quantization: ExecuTorch lowers that pattern to XNNPACK's ``qd8`` conversion,
which picks one asymmetric int8 scale per row, i.e. per token of a transformer
(executorch/backends/xnnpack/operators/node_visitor.py: "We use per_token
quantization for per_tensor quantization"). So the converted reference and the
QAT fake-quant quantized over the whole tensor (every token of every sentence
in the batch, padding included) while the program quantizes each token alone:
on all-MiniLM-L6-v2 at ``w8dyn`` the reference scored cosine 0.993 and its
program 0.997, and every decision taken on the reference (candidates, plan,
accuracy fallback) was taken on the wrong numbers.

Here both sides use the program's grid:

- :class:`PerTokenFakeQuantize` is the QAT fake-quant of a dynamic input: the
  per-token asymmetric int8 grid of ``quantized_decomposed.
  choose_qparams_per_token_asymmetric`` (which follows XNNPACK's own
  computation), straight-through gradient. It reports ``is_dynamic`` and a
  per-tensor qscheme, so ``convert_pt2e`` writes its usual dynamic nodes;
- :func:`per_token_activations` rewrites those nodes of a converted reference
  into ``choose_qparams_per_token_asymmetric`` / ``quantize_per_token`` /
  ``dequantize_per_token``, which XNNPACK's partitioner lowers to the same
  ``qd8`` conversion.
"""

from __future__ import annotations

import operator

import torch
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

_qd = torch.ops.quantized_decomposed


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """``x`` on the per-token asymmetric int8 grid, with an identity gradient."""
    if x.numel() == 0:
        return x
    with torch.no_grad():
        # The op per_token_activations writes into the reference: one choice of qparams for both.
        scale, zero_point = _qd.choose_qparams_per_token_asymmetric.default(x.detach().float(), torch.int8)
        scale, zero_point = scale.to(x.dtype), zero_point.to(x.dtype)
        q = (x.detach() * (1.0 / scale) + zero_point).round().clamp(-128, 127)
        fake = (q - zero_point) * scale
    # Every value lies inside its own row's range, so nothing clips: the gradient is the identity.
    return x + (fake - x).detach()


class PerTokenFakeQuantize(FakeQuantizeBase):
    """Fake-quantize each row of the last dimension with its own asymmetric int8 scale, every call."""

    def __init__(self, dtype: torch.dtype = torch.int8, eps: float = 2**-12, **unused: object) -> None:
        super().__init__()
        if dtype != torch.int8:
            raise ValueError(f"per-token dynamic quantization is int8 (XNNPACK qd8), not {dtype}")
        self.dtype = dtype
        self.quant_min, self.quant_max = -128, 127
        # What convert_pt2e reads to write its (per-tensor) dynamic nodes; per_token_activations
        # then turns them into the per-token ones this module simulates.
        self.qscheme = torch.per_tensor_affine
        self.is_dynamic = True
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled[0]:
            return x
        return fake_quant_per_token(x)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        raise RuntimeError("dynamic quantization chooses its qparams on every call in the program")

    def extra_repr(self) -> str:
        return "per-token asymmetric int8 (XNNPACK qd8)"


def per_token_activations(reference: torch.fx.GraphModule) -> int:
    """Rewrite the per-tensor dynamic q/dq nodes of a converted graph to per-token ones; returns how many."""
    graph = reference.graph
    done = 0
    for choose in list(graph.nodes):
        if choose.op != "call_function" or choose.target != _qd.choose_qparams.tensor:
            continue
        source, dtype = choose.args[0], choose.args[4]
        if dtype != torch.int8:
            continue
        getters = {user.args[1]: user for user in choose.users if user.target is operator.getitem}
        if set(getters) != {0, 1} or len(choose.users) != 2:
            continue
        scale, zero_point = getters[0], getters[1]
        with graph.inserting_before(choose):
            token = graph.call_function(_qd.choose_qparams_per_token_asymmetric.default, (source, dtype))
        scale.args, zero_point.args = (token, 0), (token, 1)
        for user in list(scale.users):
            x, _, _, qmin, qmax, qdtype = user.args[:6]
            args: tuple = (x, scale, zero_point, qmin, qmax, qdtype)
            if user.target == _qd.quantize_per_tensor.tensor:
                new_target = _qd.quantize_per_token.default
            elif user.target == _qd.dequantize_per_tensor.tensor:
                new_target = _qd.dequantize_per_token.default
                args += (user.kwargs.get("out_dtype", torch.float32),)
            else:
                continue
            with graph.inserting_before(user):
                swapped = graph.call_function(new_target, args)
            swapped.meta = dict(user.meta)
            user.replace_all_uses_with(swapped)
            graph.erase_node(user)
        graph.erase_node(choose)
        done += 1
    if done:
        graph.lint()
        reference.recompile()
    return done
