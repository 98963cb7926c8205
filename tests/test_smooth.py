"""Activation smoothing (edgeq.llm.smooth): the float function kept, the quantized error cut where
inputs have loud channels, GPTQ's statistics rescaled to the smoothed model."""

from __future__ import annotations

import copy

import torch

from edgeq.llm.export import LLMPlan, linear_names
from edgeq.llm.gptq import collect_hessians
from edgeq.llm.plan import linear_modules, quantized_copy
from edgeq.llm.smooth import GROUP, smooth_activations


def _loud_llama():
    """A tiny tied Llama whose norms make a channel 30x louder than the rest and whose linears read it
    with 30x smaller weights, as trained LLMs' residual streams have (a random model has none)."""
    from test_llm import _tiny_llama

    model = _tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 30.0
            layer.post_attention_layernorm.weight[40] = 30.0
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                linear.weight[:, 5] /= 30.0
            for linear in (layer.mlp.gate_proj, layer.mlp.up_proj):
                linear.weight[:, 40] /= 30.0
        model.model.norm.weight[3] = 30.0
        model.lm_head.weight[:, 3] /= 30.0
    return model


def _windows(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (48,), generator=g).tolist() for _ in range(count)]


def _plan(model, linear: str, zero_points: bool = False) -> LLMPlan:
    names = [n for n in linear_names({"n_layers": 2}) if n in linear_modules(model).values()]
    return LLMPlan({n: ("w8dyn" if n == "output" else linear) for n in names}, "e8", zero_points=zero_points)


def _quantized_error(model, plan: LLMPlan, tokens: torch.Tensor, reference: torch.Tensor) -> float:
    quantized = copy.deepcopy(model)
    for name, target in linear_modules(quantized).items():
        quantized.set_submodule(name, quantized_copy(quantized.get_submodule(name), target,
                                                     plan.linears[target], None, plan.zero_points))  # fmt: skip
    with torch.no_grad():
        logits = quantized(tokens).logits
    return float((logits - reference).norm() / reference.norm())


def test_smoothing_keeps_the_float_function_and_cuts_the_quantized_error():
    """8-bit weights, so the 8-bit dynamic activations are most of the error, as on SmolLM2's own
    (4-bit with zero points) grid."""
    model = _loud_llama()
    plan = _plan(model, "w8dyn")
    tokens = torch.tensor(_windows(2, seed=7))  # not the windows the scales are searched on
    with torch.no_grad():
        reference = model(tokens).logits
    before = _quantized_error(model, plan, tokens, reference)
    table = model.get_input_embeddings().weight.detach().clone()

    smoothed = copy.deepcopy(model)
    result = smooth_activations(smoothed, _windows(4, seed=1), plan)

    with torch.no_grad():
        torch.testing.assert_close(smoothed(tokens).logits, reference, atol=1e-4, rtol=1e-4)
    assert torch.equal(smoothed.get_input_embeddings().weight, table)  # the head was untied, not the table scaled
    assert smoothed.get_output_embeddings().weight is not smoothed.get_input_embeddings().weight
    assert len(result.alphas) == 2 * 3 + 1  # per block: attention, MLP, down_proj's input; the head's
    # the loud inputs are smoothed, and the search never keeps what measured worse than leaving them
    assert result.alphas["layers.0.attention.wq"] > 0 and result.alphas["output"] > 0
    assert result.error_after < result.error_before
    for scales in result.scales.values():  # one scale per group of input channels: 4-bit groups keep their grid
        assert torch.equal(scales.view(-1, GROUP), scales.view(-1, GROUP)[:, :1].expand(-1, GROUP))
    after = _quantized_error(smoothed, plan, tokens, reference)
    assert after < 0.9 * before, (before, after)


def test_the_rescaled_gptq_statistics_are_the_smoothed_models_own():
    model = _loud_llama()
    plan = _plan(model, "w4g32", zero_points=True)
    names = linear_modules(model)
    windows = _windows(3, seed=2)
    hessians = collect_hessians(model, windows, names)
    smoothed = copy.deepcopy(model)
    result = smooth_activations(smoothed, _windows(4, seed=1), plan)
    assert result.scales and result.error_after < result.error_before
    weights = {target: smoothed.get_submodule(name).weight.detach() for name, target in names.items()}
    rescaled = hessians.rescaled(result.scales, weights)
    measured = collect_hessians(smoothed, windows, names)
    for name, matrix in measured.matrices.items():
        torch.testing.assert_close(rescaled.matrices[name], matrix, rtol=1e-3, atol=1e-4)
        assert torch.equal(rescaled.weights[name], measured.weights[name])


def test_a_plan_without_quantized_linears_smooths_nothing():
    model = _loud_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = LLMPlan({n: "float" for n in _plan(model, "w4g32").linears}, "e8")
    result = smooth_activations(model, _windows(2, seed=1), plan)
    assert not result.alphas and not result.scales
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
