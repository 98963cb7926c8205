"""The LLM planner's methods: GPTQ on torchao's 8da4w / 8da8w tensors (integers that keep each
linear's output, on the grid torchao chose) and the whole-plan check that makes --max-drop hold."""

from __future__ import annotations

import math

import pytest
import torch

from edgeq.llm.export import LLMPlan, quantize_layers
from edgeq.llm.gptq import Hessians, apply_gptq, gptq_integers


def _correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a few outlier channels and correlated features, as transformer activations are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5 + torch.eye(features)
    x = torch.randn(tokens, features, generator=g) @ mix
    x[:, :4] *= 8.0
    return x


@pytest.mark.parametrize("precision", ["w4g32", "w4g128", "w8dyn"])
def test_gptq_keeps_the_grid_and_lowers_the_output_error(precision):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, bias=False)
    weight = linear.weight.detach().clone()
    x, held = _correlated_inputs(2560, 128).split([2048, 512])  # one distribution, two samples
    quantized = quantize_layers(torch.nn.Sequential(linear), LLMPlan({"0": precision}, "float"))[0]
    rtn = quantized.weight.dequantize().clone()
    scale = quantized.weight.scale.clone()
    hessians = Hessians({"proj": x.T @ x / len(x)}, {"proj": weight}, len(x))
    assert apply_gptq(quantized, "proj", hessians)
    after = quantized.weight
    bits = 4 if precision.startswith("w4") else 8
    # only the integers move (4-bit group scales first go to the bfloat16 XNNPACK stores them in)
    assert torch.equal(after.scale, scale.to(torch.bfloat16).float() if bits == 4 else scale)
    assert int(after.qdata.min()) >= -(2 ** (bits - 1)) and int(after.qdata.max()) <= 2 ** (bits - 1) - 1
    error = lambda w: float(((held @ w.T) - (held @ weight.T)).square().mean())  # noqa: E731
    assert error(after.dequantize()) < 0.8 * error(rtn)  # on inputs GPTQ never saw
    assert not apply_gptq(quantized, "other", hessians)  # no Hessian: left as it is


def test_gptq_is_round_to_nearest_when_the_inputs_are_uncorrelated():
    """With H = I no column can compensate another: GPTQ must give exactly round-to-nearest."""
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    scale = weight.abs().reshape(16, 2, 32).amax(-1) / 7.5
    integers = gptq_integers(weight, torch.eye(64), scale, torch.zeros_like(scale), -8, 7, damping=0.0)
    nearest = torch.clamp(torch.round(weight / scale.repeat_interleave(32, dim=1)), -8, 7)
    assert torch.equal(integers, nearest)


def _every_linear_moved(layers: int = 2):
    """A random tiny Llama, windows of random tokens, and a plan moving every linear to 8 bits and then 4."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgeq.llm.export import linear_names
    from edgeq.llm.plan import linear_modules

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        rope_theta=100000.0,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 256, (48,), generator=g).tolist() for _ in range(4)]
    names = [name for name in linear_names({"n_layers": layers}) if name in linear_modules(model).values()]
    plan = LLMPlan({name: "w4g32" for name in names}, "e8")
    return model, windows, names, plan, names + names, ["w8dyn"] * len(names) + ["w4g32"] * len(names)


def test_the_plan_check_backs_off_to_the_longest_prefix_within_the_limit():
    """Moving every linear of a random tiny Llama to 8 bits and then 4 costs far more than a 0.2%
    limit allows: the check keeps the longest prefix of the planner's moves that measures within it,
    and undoes the moves after it (a linear goes back to its last kept precision, or float); the
    model is left as it was."""
    from edgeq.llm.plan import _loss, check_plan

    model, windows, names, plan, order, steps = _every_linear_moved()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept, check = check_plan(model, plan, order, windows, 0.002, steps)
    assert check.planned == len(order) and check.measured[len(order)] > 1.002
    assert 0 <= check.kept < len(order)
    assert check.measured.get(check.kept, 1.0) <= 1.002
    assert check.measured[check.kept + 1] > 1.002  # the bisection's boundary was measured
    expected = {name: "float" for name in names} | dict(zip(order[: check.kept], steps[: check.kept]))
    assert kept.linears == expected
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert abs(_loss(model, windows) - check.float_loss) < 1e-6


def test_the_plan_check_also_backs_off_to_the_agreement_asked_for():
    """--min-agreement: a prefix must also agree with the float model's next tokens that well on the
    check's text; with a perplexity limit nothing reaches, agreement alone decides the back-off."""
    from edgeq.llm.plan import check_plan

    model, windows, _, plan, order, steps = _every_linear_moved()
    _, loose = check_plan(model, plan, order, windows, 10.0, steps)
    assert loose.kept == len(order) and loose.agreement[len(order)] < 99.0
    target = (100.0 + loose.agreement[len(order)]) / 2
    _, check = check_plan(model, plan, order, windows, 10.0, steps, min_agreement=target)
    assert check.kept < len(order) and check.agreement.get(check.kept, 100.0) >= target
    assert check.agreement[check.kept + 1] < target and check.measured[check.kept + 1] < 11.0
    assert check.to_dict()["min_agreement"] == target and str(check.kept + 1) in check.to_dict()["agreement"]


def test_head_keeps_the_users_precision_in_uniform_and_planned_plans(tmp_path):
    """--head: the output head at its own precision whatever --precision says, and out of the
    per-layer plan: not narrowed, not in the planner's order, its bytes counted in the budget."""
    from test_llm import word_texts
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgeq.errors import EdgeqError
    from edgeq.llm.build import LLMBuildConfig, _plan
    from edgeq.llm.convert import executorch_params, executorch_state_dict
    from edgeq.llm.export import HEAD
    from edgeq.llm.plan import linear_modules, weight_bytes

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    _, texts = word_texts(tmp_path)
    params = executorch_params(model, 64)

    def plan(**settings):
        build = LLMBuildConfig(gptq_tokens=0, analysis_tokens=64, check_tokens=64, **settings)
        return _plan(model, tmp_path / "tokenizer.json", texts, params, 64, build, None)

    uniform, _ = plan(linear="w4g32", head="w8dyn")
    assert uniform.linears[HEAD] == "w8dyn" and {p for n, p in uniform.linears.items() if n != HEAD} == {"w4g32"}
    without, _ = plan(linear="w4g32")
    assert without.linears[HEAD] == "w4g32"
    # a budget the other linears meet only with most of them at 4 bits (the float token table is 0.23x)
    planned, planning = plan(size_budget=0.4, head="w8dyn", embedding="float")
    assert planned.linears[HEAD] == "w8dyn" and HEAD not in planning["order"]
    assert HEAD not in {layer["name"] for layer in planning["analysis"]["layers"]}
    # the program as priced: planned linears + the head at 8 bits + everything else at float, within 0.4x
    float_bytes = 4.0 * sum(v.numel() for v in executorch_state_dict(model).values())
    linear_params = sum(model.get_submodule(n).weight.numel() for n in linear_modules(model))
    head = model.lm_head.weight
    priced = planning["linear_bytes"] + weight_bytes(head.numel(), head.shape[0], "w8dyn")
    assert priced + float_bytes - 4.0 * linear_params <= 0.4 * float_bytes
    assert planning["narrow_layers"] >= 4
    with pytest.raises(EdgeqError, match="unknown head precision 'w3'"):
        LLMBuildConfig(head="w3")


def test_the_planner_steps_each_linear_down_its_convex_hull_of_group_sizes():
    """Several 4-bit group sizes: a linear moves float -> w8dyn -> w4g32 -> ... only along the lower
    convex hull of its (bytes, loss) points, the cheapest loss per byte first across all linears; a
    budget takes the moves until it fits, --max-drop the ones that keep the prediction within it. An
    analysis that did not measure w8dyn prices it at no loss (as the planner once assumed)."""
    from edgeq.llm.plan import LayerCost, LLMAnalysis, _moves, plan_llm, weight_bytes

    params, rows = 64 * 64, 64
    bytes_at = {p: weight_bytes(params, rows, p) for p in ("w8dyn", "w4g32", "w4g64", "w4g128")}
    # "bent": w4g64 costs more per byte saved than going on to w4g128, so the hull skips it
    bent = LayerCost("bent", params, rows, 0.010, {"w4g32": 0.010, "w4g64": 0.030, "w4g128": 0.031})
    straight = LayerCost("straight", params, rows, 0.001, {"w4g32": 0.001, "w4g64": 0.002, "w4g128": 0.004})
    assert [m[0] for m in _moves(bent, False)] == ["w8dyn", "w4g32", "w4g128"]
    assert [m[0] for m in _moves(straight, False)] == ["w8dyn", "w4g32", "w4g64", "w4g128"]
    for layer in (bent, straight):  # each step costs at least as much per byte as the one before
        ratios = [bound / saved for _, saved, _, bound in _moves(layer, False)]
        assert ratios == sorted(ratios) and all(saved > 0 for _, saved, _, _ in _moves(layer, False))
    analysis = LLMAnalysis(0.0, 100, [bent, straight])

    everything, prediction = plan_llm(analysis, "e8", None, 0.0)  # a budget nothing meets: every move
    assert everything.linears == {"bent": "w4g128", "straight": "w4g128"}
    # cheapest per byte first (the free moves to w8dyn before any other)
    assert prediction["order"] == ["bent", "straight", "straight", "straight", "bent", "straight", "bent"]
    assert prediction["steps"] == ["w8dyn", "w8dyn", "w4g32", "w4g64", "w4g32", "w4g128", "w4g128"]
    assert abs(prediction["predicted_perplexity_ratio"] - math.exp(0.004 + 0.031)) < 1e-9
    assert prediction["linear_bytes"] == 2 * bytes_at["w4g128"]
    # just below w4g32 everywhere: both linears at w4g32, then the cheapest next move (straight's w4g64)
    fits, _ = plan_llm(analysis, "e8", None, 2 * bytes_at["w4g32"] - 1)
    assert fits.linears == {"bent": "w4g32", "straight": "w4g64"}
    # --max-drop 1.2%: straight all the way (0.4%), bent's first step (1.0%) does not fit after it
    within, prediction = plan_llm(analysis, "e8", 0.012, None)
    assert within.linears == {"bent": "w8dyn", "straight": "w4g128"}
    assert prediction["narrow_layers"] == 1
    # one group size (the default): the same plan as moving each linear w8dyn -> w4g32 by loss per byte
    single = LLMAnalysis(0.0, 100, [LayerCost(n.name, params, rows, n.narrow_loss) for n in (bent, straight)])
    one, prediction = plan_llm(single, "e8", 0.005, None)
    assert one.linears == {"bent": "w8dyn", "straight": "w4g32"}
    assert prediction["steps"] == ["w8dyn", "w8dyn", "w4g32"]


def test_the_planner_keeps_float_or_fp16_where_8_bit_activations_cost_more_than_the_budget():
    """Every precision measured: a linear whose w8dyn costs more loss than --max-drop allows stays at
    fp16 (when fp16 is nearly free) or float; fp16 is priced at 2 bytes a weight, and a size budget
    moves every linear down through fp16 first when fp16 costs least per byte."""
    from edgeq.llm.plan import LayerCost, LLMAnalysis, plan_llm, weight_bytes

    params, rows = 64 * 64, 64
    assert weight_bytes(params, rows, "fp16") == 2 * params == weight_bytes(params, rows, "float") / 2
    quiet = LayerCost("quiet", params, rows, 0.002, {"fp16": 0.0, "w8dyn": 0.0005, "w4g32": 0.002})
    loud = LayerCost("loud", params, rows, 0.08, {"fp16": 0.00001, "w8dyn": 0.03, "w4g32": 0.08})
    rough = LayerCost("rough", params, rows, 0.09, {"fp16": 0.03, "w8dyn": 0.031, "w4g32": 0.09})
    analysis = LLMAnalysis(0.0, 100, [quiet, loud, rough])
    plan, prediction = plan_llm(analysis, "e8", 0.02, None)
    assert plan.linears == {"quiet": "w4g32", "loud": "fp16", "rough": "float"}
    assert prediction["precisions"] == {"float": 1, "fp16": 1, "w4g32": 1} and prediction["narrow_layers"] == 1
    assert abs(prediction["predicted_perplexity_ratio"] - math.exp(0.002 + 0.00001)) < 1e-12
    assert prediction["linear_bytes"] == sum(weight_bytes(params, rows, p) for p in ("w4g32", "fp16", "float"))
    assert "float down through fp16/w8dyn/w4g32" in prediction["rule"]
    # a budget two fp16 moves meet: the nearly free ones come first ("rough" skips fp16 on its hull:
    # w8dyn costs little more for twice the saving)
    halves, _ = plan_llm(analysis, "e8", None, 2 * weight_bytes(params, rows, "fp16") + 4 * params)
    assert halves.linears == {"quiet": "fp16", "loud": "fp16", "rough": "float"}


def test_moves_measured_below_their_noise_are_not_taken_ahead_of_small_sure_ones():
    """On a few hundred tokens a 4-bit move can measure a negative loss change: priced by its mean it
    is free and goes before fp16's small sure cost; priced by mean + standard error it goes after."""
    from edgeq.llm.plan import LayerCost, LLMAnalysis, plan_llm

    params, rows = 64 * 64, 64
    losses = {"noisy": {"fp16": 0.0, "w8dyn": -0.001, "w4g32": -0.002}, "sure": {"fp16": 1e-5, "w8dyn": 0.01}}
    errors = {"noisy": {"fp16": 0.0, "w8dyn": 0.002, "w4g32": 0.004}, "sure": {"fp16": 1e-6, "w8dyn": 1e-3}}

    def order(with_errors: bool) -> list[tuple[str, str]]:
        layers = [LayerCost(n, params, rows, losses[n].get("w4g32", math.inf), losses[n],
                            errors[n] if with_errors else {}) for n in losses]  # fmt: skip
        _, prediction = plan_llm(LLMAnalysis(0.0, 256, layers), "e8", None, 0.0)
        return list(zip(prediction["order"], prediction["steps"]))

    assert order(False)[:2] == [("noisy", "w4g32"), ("sure", "fp16")]  # straight to 4 bits, "free"
    assert order(True) == [("noisy", "fp16"), ("sure", "fp16"), ("noisy", "w8dyn"), ("noisy", "w4g32"),
                           ("sure", "w8dyn")]  # fmt: skip
    layers = [LayerCost(n, params, rows, losses[n].get("w4g32", math.inf), losses[n], errors[n]) for n in losses]
    _, prediction = plan_llm(LLMAnalysis(0.0, 256, layers), "e8", 0.05, None)
    # the prediction sums the means (each never below a wider precision's): noisy's moves add nothing
    assert abs(prediction["predicted_perplexity_ratio"] - math.exp(0.01)) < 1e-12  # sure at w8dyn


def test_group_sizes_are_measured_planned_and_checked_on_a_real_decoder(tmp_path):
    """--group-sizes 32,64,128 on a tiny Llama: the analysis scores each linear at each size, the plan
    uses them, and the plan check backs off through the same moves; bad sizes are one-line errors."""
    from test_llm import _tiny_llama, word_texts

    from edgeq.errors import EdgeqError
    from edgeq.llm.build import LLMBuildConfig, _plan
    from edgeq.llm.convert import executorch_params

    model = _tiny_llama(layers=1)
    _, texts = word_texts(tmp_path)
    build = LLMBuildConfig(gptq_tokens=0, analysis_tokens=64, check_tokens=64, max_drop=1.0, group_sizes=(32, 64, 128))
    plan, planning = _plan(model, tmp_path / "tokenizer.json", texts, executorch_params(model, 64), 64, build, None)
    layers = planning["analysis"]["layers"]
    # groups of 128 only where they divide the input (down_proj's 128; the others read 64)
    assert layers and all({"w4g32", "w4g64"} <= set(layer["losses"]) for layer in layers)
    assert {layer["name"] for layer in layers if "w4g128" in layer["losses"]} == {"layers.0.feed_forward.w2"}
    assert len(planning["order"]) == len(planning["steps"]) >= 1
    assert set(plan.linears.values()) <= {"w8dyn", "w4g32", "w4g64", "w4g128"}
    check = planning["check"]
    assert check["planned"] == len(planning["order"]) and check["kept"] <= check["planned"]
    for bad in [(64, 128), (32, 16)]:
        with pytest.raises(EdgeqError, match="group sizes"):
            LLMBuildConfig(group_sizes=bad)


def test_the_analysis_and_the_plan_check_read_training_text_gptq_did_not(tmp_path):
    """GPTQ fits its integers to the first gptq_tokens of text(); the analysis scores the tokens after
    them and the plan check the ones after those (on GPTQ's own tokens its linears look better than
    anywhere else); text that ends within GPTQ's tokens is a one-line error."""
    from test_llm import word_texts

    from edgeq.errors import EdgeqError
    from edgeq.llm.build import LLMBuildConfig, _planning_windows
    from edgeq.llm.evaluate import encode_windows

    path, texts = word_texts(tmp_path, seed=0, words=300)
    config = LLMBuildConfig(gptq_tokens=200, analysis_tokens=100, check_tokens=150)
    gptq = encode_windows(path, texts, 64, 200)
    analysis, check = _planning_windows(path, texts, 64, config, after_gptq=True)
    assert sum(len(w) - 1 for w in analysis) == 100 and 145 <= sum(len(w) - 1 for w in check) <= 150
    # in order and disjoint: GPTQ's windows, then the analysis's, then the check's (each split drops
    # the one token its cut would have scored twice)
    text = [t for w in encode_windows(path, texts, 64, 10_000) for t in w]

    def at(window: list[int]) -> int:
        return next(i for i in range(len(text)) if text[i : i + len(window)] == window)

    assert at(gptq[-1]) + len(gptq[-1]) <= at(analysis[0]) + 1
    assert at(analysis[-1]) + len(analysis[-1]) <= at(check[0]) + 1
    without, _ = _planning_windows(path, texts, 64, config, after_gptq=False)
    assert without[0] == encode_windows(path, texts, 64, 100)[0]  # no GPTQ: from the start
    short = LLMBuildConfig(gptq_tokens=5_000)
    with pytest.raises(EdgeqError, match="ends within the 5,000 tokens GPTQ reads"):
        _planning_windows(path, texts, 64, short, after_gptq=True)
