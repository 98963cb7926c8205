"""Decoders on Qualcomm's HTP (edgeq.llm.htp): ExecuTorch's QNN LLM model holding a Hugging Face decoder's
weights, quantized per layer with QnnQuantizer, lowered with the QNN backend and run on the host's HTP
simulator. The bundled tiny LM (real BPE tokenizer, real text) is the model."""

from __future__ import annotations

import pytest
import torch

SEQ = 64


@pytest.fixture(scope="module")
def tiny():
    from edgeq.examples import tiny_lm
    from edgeq.llm.evaluate import encode_windows
    from edgeq.llm.recipe import llm_recipe_from_module

    recipe = llm_recipe_from_module(tiny_lm, "edgeq.examples.tiny_lm")
    texts, eval_texts, _ = recipe.split_texts()
    tokenizer = recipe.tokenizer_file()
    calibration = encode_windows(tokenizer, texts, SEQ, 16 * SEQ)
    windows = encode_windows(tokenizer, eval_texts, SEQ, 4 * SEQ)
    return recipe.model().eval(), calibration, windows


def _plan(model, wide: tuple[str, ...]):
    from edgeq.llm.convert import executorch_params
    from edgeq.llm.export import LLMPlan, linear_names

    names = linear_names(executorch_params(model, SEQ))
    return LLMPlan({name: "w8dyn" if name.endswith(wide) else "w4g32" for name in names}, "e8")


def test_the_qnn_flows_static_llama_computes_the_hugging_face_models_scores(tiny):
    from edgeq.llm.evaluate import score_float
    from edgeq.llm.htp import score_static, static_decoder

    model, _, windows = tiny
    decoder = static_decoder(model, SEQ)
    with torch.no_grad():
        static = score_static(decoder, windows, SEQ)
    reference = score_float(model, windows)
    assert static.tokens == reference.tokens > 200
    assert torch.allclose(static.nll, reference.nll, atol=1e-4)
    assert torch.equal(static.predictions, reference.predictions)


def test_the_static_llama_continues_a_prompt_as_the_hugging_face_model_does(tiny):
    """Greedy generation by re-running the batch-prefill window (how an HTP program without a KV cache
    generates) gives the Hugging Face model's own greedy tokens."""
    from edgeq.errors import EdgeqError
    from edgeq.llm.htp import generate_static, static_decoder

    model, _, windows = tiny
    decoder = static_decoder(model, SEQ)
    prompt = windows[0][:12]
    with torch.no_grad():
        ours = generate_static(decoder, prompt, SEQ, 8)
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert ours == theirs[0, len(prompt) :].tolist()
    with pytest.raises(EdgeqError, match="do not fit the program's 64"):
        generate_static(decoder, windows[0][:60], SEQ, 8)


def test_each_linear_gets_the_htp_weight_width_of_its_place_in_the_plan(tiny):
    """4-bit linears quantize in blocks of 32 input channels to [-7, 7] (QnnQuantizer's 16a4w_block, as
    the plan's w4g32 groups) and 8-bit ones per channel to [-127, 127]: the plan reaches QnnQuantizer by
    module name."""
    from edgeq.llm.htp import quantize_static, static_decoder

    model, calibration, _ = tiny
    plan = _plan(model, ("feed_forward.w2",))
    quantized = quantize_static(static_decoder(model, SEQ), plan, calibration[:2], SEQ)
    weights = [
        tuple(a for a in node.args[1:] if not isinstance(a, torch.fx.Node))
        for node in quantized.graph.nodes
        if node.op == "call_function"
        and str(node.target).startswith(("torchao.dequantize_affine", "quantized_decomposed.dequantize_per_channel"))
    ]
    wide = sum(1 for p in plan.linears.values() if p == "w8dyn")
    assert sum(1 for w in weights if w[1:3] == (-127, 127)) == wide > 0
    assert sum(1 for w in weights if w[0] == (1, 32, 1, 1) and w[2:4] == (-7, 7)) == len(plan.linears) - wide


def test_a_plan_naming_a_linear_the_decoder_lacks_is_one_line(tiny):
    from edgeq.errors import EdgeqError
    from edgeq.llm.export import LLMPlan
    from edgeq.llm.htp import quantize_static, static_decoder

    model, calibration, _ = tiny
    with pytest.raises(EdgeqError) as raised:
        quantize_static(static_decoder(model, SEQ), LLMPlan({"layers.9.attention.wq": "w4g32"}), calibration[:1], SEQ)
    assert "layers.9.attention.wq" in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.slow
def test_an_htp_program_of_a_planned_decoder_runs_on_the_simulator_near_float(tiny):
    """Real QNN lowering and Qualcomm's HTP simulator: the program's teacher-forced perplexity on held-out
    text is within 10% of the float model's and it agrees on most next tokens."""
    from test_qnn import REASON

    if REASON is not None:
        pytest.skip(REASON)
    import copy

    from edgeq.llm.evaluate import score_float
    from edgeq.llm.htp import build_htp, generate_on_htp

    model, calibration, windows = tiny
    # the float reference is the model given as reference (the float one when the lowered weights were trained)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.model.norm.weight.mul_(1.01)
    plan = _plan(model, ("feed_forward.w2", "output"))
    program, result = build_htp(model, plan, calibration, windows, SEQ, reference=reference)
    accuracy = result.accuracy
    own = score_float(model, [w[:SEQ] for w in windows]).perplexity
    assert accuracy["float_perplexity"] == pytest.approx(score_float(reference, [w[:SEQ] for w in windows]).perplexity)
    assert accuracy["float_perplexity"] != pytest.approx(own, rel=1e-4)
    assert result.program_bytes == len(program) and result.qnn
    assert accuracy["tokens"] == sum(len(w[:SEQ]) - 1 for w in windows)
    assert accuracy["perplexity_ratio"] < 1.1 and accuracy["agreement"] > 80.0, accuracy
    low, high = accuracy["perplexity_ratio_interval"]
    assert low <= accuracy["perplexity_ratio"] <= high
    assert set(result.precisions.values()) == {"16a4w_block", "16a8w"} and result.precisions["output"] == "16a8w"
    # the program generates on the simulator; its first greedy tokens are the float model's
    prompt = windows[1][:12]
    (generated,) = generate_on_htp(program, [prompt], SEQ, 6)
    with torch.no_grad():
        float_tokens = model.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert len(generated) == 6 and generated[:2] == float_tokens[0, len(prompt) : len(prompt) + 2].tolist()
