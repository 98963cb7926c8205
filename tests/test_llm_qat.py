"""QAT by distillation for decoders (edgeq.llm.qat), on the bundled tiny LM (real BPE tokenizer, real
text): the trained weights lower to the very grid QAT trained against, QAT lowers the held-out KL from
the rounded model's, and the float model it distils from is left as it was."""

from __future__ import annotations

import copy

import pytest
import torch

from edgeq.llm.evaluate import encode_windows
from edgeq.llm.export import LLMPlan, linear_names, quantize_layers
from edgeq.llm.qat import HeldOutKL, LLMQATConfig, distill


@pytest.fixture(scope="module")
def tiny():
    from edgeq.examples import tiny_lm
    from edgeq.llm.convert import executorch_params
    from edgeq.llm.recipe import llm_recipe_from_module

    recipe = llm_recipe_from_module(tiny_lm, "edgeq.examples.tiny_lm")
    model = recipe.model().eval()
    tokenizer = recipe.tokenizer_file()
    windows = encode_windows(tokenizer, recipe.texts(), 64, 64 * 48)
    plan = LLMPlan.uniform(linear_names(executorch_params(model, 128)), "w4g32", "float")
    return model, plan, windows, recipe


def test_qat_lowers_the_held_out_kl_and_ships_weights_on_its_own_grid(tiny):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    from edgeq.llm.export import linear_config
    from edgeq.llm.plan import linear_modules

    model, plan, windows, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    held_out, train = windows[:8], windows[8:]
    trained, result = distill(model, plan, train, held_out, LLMQATConfig(steps=24, lr=1e-4, checks=3))
    # the float model is the teacher and stays the float model (its tied head too)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert trained.lm_head.weight is not trained.get_input_embeddings().weight
    assert torch.equal(trained.get_input_embeddings().weight, model.get_input_embeddings().weight)
    # the rounded model is the step-0 check; a trained check must beat it on the held-out windows
    assert result.held_out_kl[result.best_step] < 0.85 * result.held_out_kl[0], result.held_out_kl
    assert result.best_step > 0 and set(result.held_out_kl) == {0, 8, 16, 24}
    # the fake quantizers are gone: plain linears that export and lowering read as any model's
    assert {type(m) for m in trained.modules() if isinstance(m, torch.nn.Linear)} == {torch.nn.Linear}

    # what ships is the grid QAT trained against: the trained weights quantized with the program's
    # own config (min-max scales) compute what the fake-quantized student computed
    names = linear_modules(trained)
    qat_plan = LLMPlan(plan.linears, "float", scales="minmax")
    fake = copy.deepcopy(trained)
    quantize_(
        fake,
        QATConfig(linear_config("w4g32", "minmax"), step="prepare"),
        filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn in names,
    )
    real = copy.deepcopy(trained)
    for hf, target in names.items():
        quantize_layers(real.get_submodule(hf), LLMPlan({"": qat_plan.linears[target]}, "float", "minmax"))
    ids = torch.tensor([held_out[0]])
    with torch.no_grad():
        assert torch.allclose(fake(input_ids=ids).logits, real(input_ids=ids).logits, atol=1e-3, rtol=1e-3)
    # and on that grid it is closer to the float model than the rounded model with HQQ's scales
    rounded = copy.deepcopy(model)
    for hf, target in names.items():
        quantize_layers(rounded.get_submodule(hf), LLMPlan({"": plan.linears[target]}, "float"))
    held_out_kl = HeldOutKL(model, held_out)
    assert held_out_kl(real) < held_out_kl(rounded)


def test_qat_that_never_beats_the_rounded_model_hands_the_build_the_float_model(tiny):
    """A rate that wrecks the weights: every check is worse than step 0, so the build lowers the original
    model (searched scales, GPTQ) instead of rounded weights on QAT's min-max grid."""
    from edgeq.llm.build import LLMBuildConfig, _qat

    model, plan, _, recipe = tiny
    config = LLMBuildConfig(qat=LLMQATConfig(steps=4, lr=1.0, window=64))
    lowered_from, result = _qat(model, recipe.tokenizer_file(), recipe.texts(), plan, config)
    assert result is not None and result.best_step == 0 and max(result.held_out_kl.values()) > result.held_out_kl[0]
    assert lowered_from is model


def test_a_qat_plan_lowers_to_the_grid_it_trained_against(tmp_path):
    """Real export, lowering and runtime: the program lowered from QAT's weights with min-max group scales
    computes what QAT's fake-quantized model computed, far closer than either is to the float model."""
    import dataclasses

    from test_llm import _tiny_llama, _tokenizer
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    from edgeq.llm.convert import executorch_params
    from edgeq.llm.evaluate import load_llm_program
    from edgeq.llm.export import linear_config, lower_llm
    from edgeq.llm.plan import linear_modules

    model = _tiny_llama(layers=1)  # every kind of linear, at half the lowering time
    plan = LLMPlan.uniform(linear_names(executorch_params(model, 32)), "w4g32", "float")
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 256, (10, 24), generator=gen).tolist()
    trained, result = distill(model, plan, windows[2:], windows[:2], LLMQATConfig(steps=8, lr=1e-3, checks=2))
    program = lower_llm(trained, _tokenizer(tmp_path, 256), 32, dataclasses.replace(plan, scales="minmax"),
                        {"get_bos_id": 0, "get_eos_ids": [0]})  # fmt: skip
    fake = copy.deepcopy(trained)
    names = linear_modules(fake)
    quantize_(fake, QATConfig(linear_config("w4g32", "minmax"), step="prepare"),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn in names)  # fmt: skip
    tokens = torch.tensor([windows[0][:12]])
    with torch.no_grad():
        simulated, floating = fake(tokens).logits[0, -1], model(tokens).logits[0, -1]
    ran = load_llm_program(program).execute([tokens, torch.tensor([0])])[0].reshape(-1, 256)[-1]
    # measured: 0.005 from the simulation (XNNPACK keeps group scales in bfloat16), 0.065 from float
    assert (ran - simulated).abs().max() < 0.25 * (simulated - floating).abs().max()
    assert result.best_step in result.held_out_kl
