"""The per-layer analysis scores a change from the changed linear's block on (edgeq.llm.suffix), and
measures 4-bit moves on both grids, the build keeping the plan that checked better."""

from __future__ import annotations

import copy

import pytest
import torch
from test_llm import _tiny_llama, word_texts

from edgeq.llm.plan import linear_modules
from edgeq.llm.suffix import BlockInputs, token_losses


def _windows(count: int = 2, length: int = 24, vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(count)]


def test_a_change_scored_from_its_block_is_what_the_whole_model_computes():
    model = _tiny_llama(layers=3)
    windows = _windows()
    inputs = BlockInputs(model, windows)
    assert inputs.enabled
    assert torch.allclose(inputs.base, token_losses(model, windows), atol=1e-6)
    blocks = {}
    for name, target in linear_modules(model).items():
        module = model.get_submodule(name)
        block = blocks[target] = inputs.block_of(module)
        changed = copy.deepcopy(module)
        with torch.no_grad():
            changed.weight.mul_(4.0)  # a random tiny model's 4-bit error barely moves its loss
        model.set_submodule(name, changed)
        try:
            suffix, whole = inputs.losses(block), token_losses(model, windows)
        finally:
            model.set_submodule(name, module)
        assert not torch.allclose(whole, inputs.base, atol=1e-4)  # the change shows
        assert torch.allclose(suffix, whole, atol=1e-5), target
    assert blocks["layers.0.attention.wq"] == 0 and blocks["layers.2.feed_forward.w2"] == 2
    assert blocks["output"] == 3  # the head: the norm and the head only
    assert inputs.block_of(torch.nn.Linear(2, 2)) == 0


def test_a_model_whose_forward_does_more_to_its_embeddings_is_scored_whole():
    """A decoder whose forward changes the embeddings before its first block (Gemma scaled them in its
    forward until transformers moved that into the embedding): blocks fed the recorded states would
    compute something else, so the recording notices and every measurement runs the whole model."""
    from transformers import LlamaModel

    class ScaledLlama(LlamaModel):
        def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
            if inputs_embeds is None:
                inputs_embeds = self.embed_tokens(input_ids)
            return super().forward(inputs_embeds=inputs_embeds * 8.0, **kwargs)

    model = _tiny_llama(layers=2)
    scaled = ScaledLlama(model.config).eval()
    scaled.load_state_dict(model.model.state_dict())
    model.model = scaled
    windows = _windows()
    inputs = BlockInputs(model, windows)
    assert not inputs.enabled and inputs.block_of(model.model.layers[1].mlp.up_proj) == 0
    assert torch.allclose(inputs.losses(1), token_losses(model, windows), atol=1e-6)


def test_the_plan_takes_the_4_bit_grid_that_checked_better(tmp_path):
    """Unless --[no-]zero-points says which, every linear's 4-bit moves are measured on both grids, a
    plan is made and checked on each, and the smaller one ships (the lower measured perplexity when
    their sizes are within 1%); --no-zero-points, --zero-points and QAT measure one grid only."""
    from edgeq.llm.build import LLMBuildConfig, _plan
    from edgeq.llm.convert import executorch_params
    from edgeq.llm.qat import LLMQATConfig

    model = _tiny_llama(layers=1)
    tokenizer, texts = word_texts(tmp_path)
    params = executorch_params(model, 64)

    def plan(**settings):
        build = LLMBuildConfig(gptq_tokens=0, analysis_tokens=64, check_tokens=64, max_drop=2.0, **settings)
        return _plan(model, tokenizer, texts, params, 64, build, None)

    chosen, planning = plan()
    analysis = planning["analysis"]
    assert analysis["zero_points"] is None and analysis["from_block"]
    for layer in analysis["layers"]:  # each 4-bit move measured on both grids, fp16 and w8dyn once
        assert set(layer["zero_point_losses"]) == {"w4g32"} and set(layer["losses"]) == {"fp16", "w8dyn", "w4g32"}
        assert layer["zero_point_losses"]["w4g32"] != layer["losses"]["w4g32"]
    grids = planning["grids"]
    assert set(grids) == {"symmetric", "zero points"} and planning["zero_points"] == chosen.zero_points
    mine = grids["zero points" if chosen.zero_points else "symmetric"]
    other = grids["symmetric" if chosen.zero_points else "zero points"]
    assert mine["linear_bytes"] <= 1.01 * other["linear_bytes"]
    assert mine["linear_bytes"] < other["linear_bytes"] or mine["perplexity_ratio"] <= other["perplexity_ratio"]
    assert mine["perplexity_ratio"] <= 1.02 + 1e-9 and planning["planned_linear_bytes"] == mine["linear_bytes"]
    # under a size budget both plans fit it, and the one of lower perplexity on the check text ships
    budgeted, planning = plan(size_budget=0.5)
    grids = planning["grids"]
    mine = grids["zero points" if budgeted.zero_points else "symmetric"]
    assert (
        mine["perplexity_ratio"]
        == min(g["perplexity_ratio"] for g in grids.values())
        == planning["measured_perplexity_ratio"]
    )
    assert all(g["linear_bytes"] > 0 for g in grids.values()) and "lower measured perplexity" in planning["grid_rule"]
    qat = LLMQATConfig(steps=4, window=64)  # QAT: symmetric, the grid torchao trains against
    for settings, grid in [({"zero_points": False}, False), ({"zero_points": True}, True), ({"qat": qat}, False)]:
        one, planning = plan(**settings)
        assert "grids" not in planning and one.zero_points == grid
        assert planning["analysis"]["zero_points"] == grid
        assert all(not layer["zero_point_losses"] for layer in planning["analysis"]["layers"])


@pytest.mark.parametrize("zero_points", [False, True])
def test_an_analysis_of_both_grids_plans_on_either(tmp_path, zero_points):
    from edgeq.llm.plan import analyze_llm, plan_llm

    model = _tiny_llama(layers=1)
    both = analyze_llm(model, _windows(), zero_points=None)
    with pytest.raises(ValueError, match="both 4-bit grids"):
        plan_llm(both, "e8", 0.05, None)
    one = both.on(zero_points)
    plan, prediction = plan_llm(one, "e8", 10.0, None)  # everything that can move does
    assert plan.zero_points is zero_points and set(plan.linears.values()) == {"w4g32"}
    for layer, measured in zip(one.layers, both.layers):
        expected = measured.zero_point_losses["w4g32"] if zero_points else measured.losses["w4g32"]
        assert layer.narrow_loss == layer.losses["w4g32"] == expected
        assert layer.losses["w8dyn"] == measured.losses["w8dyn"]
