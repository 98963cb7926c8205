"""The planner alone, on synthetic analyses: no model, no data, exact expectations."""

from __future__ import annotations

import pytest

from edgeq.errors import EdgeqError
from edgeq.planning.analysis import Analysis, LayerAnalysis
from edgeq.planning.planner import make_plan
from edgeq.targets import parse_target

MENU = {
    "int8": {
        "weight_bits": 8,
        "activation_bits": 8,
        "activations": "static",
        "ops": ["conv", "linear"],
        "weight_bytes": 1.0,
    },
    "w4": {
        "weight_bits": 4,
        "activation_bits": 8,
        "activations": "static",
        "ops": ["conv", "linear"],
        "weight_bytes": 0.5,
    },
    "float": {
        "weight_bits": 32,
        "activation_bits": 32,
        "activations": "float",
        "ops": ["conv", "linear"],
        "weight_bytes": 4.0,
    },
}
TARGET = parse_target(
    {"name": "synthetic", "backend": "xnnpack", "default_precision": "int8", "precisions": MENU}, "synthetic.toml"
)


def layer(name: str, params: int, drop_int8: float, drop_w4: float, outlier: float = 2.0) -> LayerAnalysis:
    return LayerAnalysis(
        name=name,
        kind="conv",
        params=params,
        weight_min=-1,
        weight_max=1,
        weight_absmax=1,
        channel_spread=1.5,
        channel_absmax=[1.0],
        act_min=0,
        act_max=1,
        act_p999=1,
        act_p9999=1,
        outlier_ratio=outlier,
        metric_drop={"int8": drop_int8, "w4": drop_w4},
        loss_delta={"int8": 0.0, "w4": 0.0},
    )


def analysis(*layers: LayerAnalysis) -> Analysis:
    return Analysis(target="synthetic", float_loss=0.1, float_metric=90.0, batches=1, layers=list(layers))


FLOAT_BYTES = 4 * 3000 + 1000  # 1000 bytes of program overhead


def test_narrows_the_cheapest_layer_per_byte_first_and_stops_at_max_drop():
    a = analysis(layer("a", 1000, 0.0, 0.2), layer("b", 1000, 0.0, 0.9), layer("c", 1000, 0.0, 0.5))
    planned = make_plan(a, TARGET, FLOAT_BYTES, max_drop=0.8)
    chosen = {entry.name: entry.precision for entry in planned.plan.layers}
    # a (0.2) then c (0.5) fit under 0.8; b would push the prediction to 1.6.
    assert chosen == {"a": "w4", "b": "int8", "c": "w4"}
    assert planned.predicted_drop == pytest.approx(0.7)
    assert planned.program_bytes == 1000 + 500 + 1000 + 500
    assert [p.program_bytes for p in planned.considered] == [4000, 3500, 3000]
    assert "over --max-drop" in next(e.reason for e in planned.plan.layers if e.name == "b")


def test_size_budget_is_met_whatever_the_predicted_drop():
    a = analysis(layer("a", 1000, 0.0, 0.2), layer("b", 1000, 0.0, 0.9), layer("c", 1000, 0.0, 0.5))
    planned = make_plan(a, TARGET, FLOAT_BYTES, size_budget=2600)
    assert planned.program_bytes <= 2600
    assert all(e.precision == "w4" for e in planned.plan.layers)


def test_impossible_budget_is_one_line_error():
    a = analysis(layer("a", 1000, 0.0, 0.2))
    with pytest.raises(EdgeqError, match="no plan fits --size-budget") as info:
        make_plan(a, TARGET, 5000, size_budget=100)
    assert "\n" not in str(info.value)


def test_outlier_layer_stays_wide():
    a = analysis(layer("a", 1000, 0.0, 0.0, outlier=50.0), layer("b", 1000, 0.0, 0.0))
    chosen = {e.name: e for e in make_plan(a, TARGET, FLOAT_BYTES, max_drop=1.0).plan.layers}
    assert chosen["a"].precision == "int8" and "outlier-heavy input" in chosen["a"].reason
    assert chosen["b"].precision == "w4"


def test_layer_too_sensitive_even_at_int8_goes_to_float():
    a = analysis(layer("a", 1000, 3.0, 5.0), layer("b", 1000, 0.1, 0.3))
    chosen = {e.name: e for e in make_plan(a, TARGET, FLOAT_BYTES, max_drop=1.0).plan.layers}
    assert chosen["a"].precision == "float" and "over --max-drop" in chosen["a"].reason
    assert chosen["b"].precision == "w4"


def test_time_budgeted_sensitivities_never_send_a_layer_to_float_on_their_own():
    """A few dozen samples flip a prediction or two per layer: noise, not a reason for float.
    The build's measured fallback decides those instead (tests/test_fallback.py)."""
    import dataclasses

    noisy = dataclasses.replace(
        analysis(layer("a", 1000, 5.0, 6.0), layer("b", 1000, 0.0, 0.1)), full_sensitivity=False
    )
    chosen = {entry.name: entry.precision for entry in make_plan(noisy, TARGET, FLOAT_BYTES, max_drop=1.0).plan.layers}
    assert chosen["a"] == "int8"


def test_the_sensitivity_share_keeps_whole_batches_then_slices_one():
    import torch

    from edgeq.planning.analysis import _share

    batches = [(torch.zeros(25, 3), torch.zeros(25, dtype=torch.long)) for _ in range(4)]
    kept = _share(batches, 0.3)  # 30 of 100 samples: one batch of 25 and 5 rows of the next
    assert [len(x) for x, _ in kept] == [25, 5] and [len(y) for _, y in kept] == [25, 5]
    assert sum(len(x) for x, _ in _share(batches, 0.001)) == 8  # never fewer than 8 samples


def test_a_same_size_precision_that_hurts_less_replaces_the_default():
    dyn = dict(MENU["int8"], activations="dynamic", ops=["linear"])
    target = parse_target(
        {"name": "t", "backend": "xnnpack", "default_precision": "int8", "precisions": {**MENU, "w8dyn": dyn}}, "t.toml"
    )
    outlier_bound = layer("attn", 1000, 3.0, 9.0)
    outlier_bound.kind = "linear"
    outlier_bound.metric_drop["w8dyn"] = 0.1
    calm = layer("conv", 1000, 0.1, 0.2)
    planned = make_plan(analysis(outlier_bound, calm), target, 8000, max_drop=1.0)
    assert planned.plan.precision_of("attn") == "w8dyn"
    assert "as small as int8" in planned.plan.layers[0].reason
    assert planned.plan.precision_of("conv") == "w4"  # 0.1 + 0.2 fits; the conv still narrows


def test_plan_other_ops_round_trips_and_is_checked(tmp_path):
    from edgeq.planning.plan import Plan

    plan = Plan(target="android", other_ops="float")
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").other_ops == "float"
    with pytest.raises(EdgeqError, match="other_ops is 'int4'.*use one of: quantized, float"):
        Plan.from_dict({"target": "android", "layers": [], "other_ops": "int4"})


def test_a_layer_sent_to_float_gets_fp16_unless_its_activations_overflow_it():
    half = {"weight_bits": 16, "activation_bits": 16, "activations": "float", "ops": ["conv"], "weight_bytes": 2.0}
    target = parse_target(
        {"name": "half", "backend": "xnnpack", "default_precision": "int8", "precisions": {**MENU, "fp16": half}},
        "half.toml",
    )
    big = layer("big", 1000, 3.0, 5.0)
    big.act_max = 1e5  # beyond float16's 65504 once summed: fp32
    a = analysis(layer("a", 1000, 3.0, 5.0), big, layer("b", 1000, 0.1, 0.3))
    chosen = {e.name: e for e in make_plan(a, target, FLOAT_BYTES, max_drop=1.0).plan.layers}
    assert chosen["a"].precision == "fp16" and chosen["a"].reason.startswith("fp16: quantizing it alone")
    assert chosen["big"].precision == "float"
