"""Android plans that mix precisions: static int8 conv beside 4-bit and 8-bit dynamic linears and float.

Real stack: PT2E prepare with edgeq's quantizers, QAT with adaptive ranges,
convert, ExecuTorch lowering with the XNNPACK delegate, executorch.runtime.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from edgeq.backends import get_backend, load_target, quant_spec
from edgeq.capture import capture
from edgeq.checks.evaluate import sqnr_db
from edgeq.errors import EdgeqError
from edgeq.lower import lower, lower_float
from edgeq.planning.plan import uniform_plan, validate_plan, weight_bytes
from edgeq.quant.configs import RangeConfig
from edgeq.quant.convert import convert, prepare
from edgeq.quant.fake_quant import TRACKING
from edgeq.quant.groupwise import EMA_VOTE, GroupwiseFakeQuantize
from edgeq.quant.qat import QATConfig, narrow_weight_quants, run_qat, to_eval
from edgeq.recipe import Recipe

MIX = {"conv": "int8", "fc1": "w4dyn", "fc2": "w8dyn", "fc3": "float", "head": "int8"}


class ConvMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 8 * 8, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.head(torch.relu(self.fc3(x)))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = ConvMLP().eval()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(6)]
    recipe = Recipe(
        name="convmlp",
        model=lambda: copy.deepcopy(model),
        example_inputs=lambda: (torch.zeros(1, 3, 8, 8),),
        train_data=lambda: data,
        eval_data=lambda: data[:2],
    )
    target = load_target("android")
    plan = uniform_plan(model, target, "int8", example_inputs=(data[0][0][:1],))
    for entry in plan.layers:
        entry.precision = MIX[entry.name]
    plan = validate_plan(plan, model, target, (data[0][0][:1],))
    return model, recipe, target, plan, data


def test_a_mixed_plan_trains_converts_and_runs_as_simulated(setup):
    model, recipe, target, plan, data = setup
    config = QATConfig(
        steps=10, calibration_batches=2, checkpoint_every=0, ranges=RangeConfig(), lr=1e-3, loss="task", patience=0
    )
    prepared = prepare(capture(model, recipe.example_inputs()), quant_spec(plan, target, ranges=config.ranges))
    # The 4-bit linear's weights train at the intermediate width first, like a 4-bit conv's.
    assert narrow_weight_quants(prepared), "the w4dyn weight fake-quant is not seen as narrow"
    report = run_qat(prepared, recipe, config)
    assert report.steps == 10
    reference = convert(copy.deepcopy(prepared))
    simulated = to_eval(prepared)
    x = torch.cat([b[0] for b in data[:2]])
    with torch.no_grad():
        # Dynamic inputs are measured per call in both; a frozen dynamic range fails this.
        assert sqnr_db(reference(x), simulated(x)) >= 30.0
        assert sqnr_db(reference(x[:1]), simulated(x[:1])) >= 30.0
    ops = {str(n.target) for n in reference.graph.nodes if n.op == "call_function"}
    assert any("choose_qparams" in op for op in ops), "no dynamically quantized input in the converted graph"

    lowered = lower(reference, recipe.example_inputs(), target)
    runner = get_backend("xnnpack").runner(lowered.program)
    with torch.no_grad():
        expected = reference(x[:1])
        got = runner(x[:1])
    assert sqnr_db(expected, got) >= 30.0
    assert not [n for n in lowered.edge.exported_program().graph.nodes if "linear" in str(n.target)], (
        "a planned linear stayed outside the delegate"
    )

    # The menu's byte costs predict the program: weights at their planned widths, per-channel
    # scales (channel_bytes) and the float program's overhead, within 1% (what is left: activation
    # scales and the delegate's own tables).
    float_bytes = len(lower_float(model, recipe.example_inputs(), target))
    float_weights = 4.0 * sum(e.params for e in plan.layers)
    predicted = weight_bytes(plan, target) + (float_bytes - float_weights)
    assert abs(len(lowered.program) - predicted) / len(lowered.program) < 0.01, (len(lowered.program), predicted)


def test_fp16_layers_run_in_their_own_xnnpack_partitions(setup):
    """Two float16 linears beside quantized layers: trained through the float16 rounding,
    stored in 2 bytes a weight, run by XNNPACK's fp16 kernels between casts."""
    model, recipe, target, plan, data = setup
    half = copy.deepcopy(plan)
    for entry in half.layers:
        entry.precision = {"fc1": "fp16", "fc2": "fp16"}.get(entry.name, entry.precision)
    config = QATConfig(steps=4, calibration_batches=2, checkpoint_every=0, lr=1e-3, loss="task", patience=0)
    prepared = prepare(capture(model, recipe.example_inputs()), quant_spec(half, target, ranges=config.ranges))
    before = prepared.fc2.weight.detach().clone()
    run_qat(prepared, recipe, config)
    assert prepared.fc2.weight.dtype == torch.float32 and not torch.equal(prepared.fc2.weight, before)
    reference = convert(copy.deepcopy(prepared))
    stored = {name: t.dtype for name, t in reference.named_buffers()}
    assert stored.get("fc1_weight_fp16") == stored.get("fc2_weight_fp16") == torch.float16
    assert not any(name.startswith(("fc1.", "fc2.")) for name, _ in reference.named_parameters()), (
        "a float32 copy of an fp16 weight stayed in the program"
    )
    x = torch.cat([b[0] for b in data[:2]])
    with torch.no_grad():
        assert sqnr_db(reference(x), to_eval(prepared)(x)) >= 60.0
    lowered = lower(reference, recipe.example_inputs(), target)
    graph = lowered.edge.exported_program().graph
    assert not [n for n in graph.nodes if "conv" in str(n.target) or "linear" in str(n.target)], (
        "a layer stayed outside the delegate"
    )
    casts = [n for n in graph.nodes if "_to_dim_order_copy" in str(n.target)]
    assert len(casts) == 4, "expected a cast into and out of each fp16 partition"
    assert list(lowered.delegation.outside) == ["dim_order_ops__to_dim_order_copy_default"]
    assert "dtype cast" in lowered.delegation.outside["dim_order_ops__to_dim_order_copy_default"]
    with torch.no_grad():
        assert sqnr_db(reference(x[:1]), get_backend("xnnpack").runner(lowered.program)(x[:1])) >= 35.0
    # ExecuTorch's ETDump logs no float16 tensor: the per-layer program debugging says so in one line.
    from edgeq.checks.program_debug import debug_program

    with pytest.raises(EdgeqError, match="not available for plans with fp16 layers.*--reference-only"):
        debug_program(model, reference, recipe, target, samples=2)
    float_bytes = len(lower_float(model, recipe.example_inputs(), target))
    predicted = weight_bytes(half, target) + float_bytes - 4.0 * sum(e.params for e in half.layers)
    assert abs(len(lowered.program) - predicted) / len(lowered.program) < 0.01, (len(lowered.program), predicted)


def test_post_training_mix_runs(setup):
    model, recipe, target, plan, data = setup
    prepared = prepare(capture(model, recipe.example_inputs()), quant_spec(plan, target, qat=False))
    with torch.no_grad():
        for x, _ in data:
            prepared(x)
    reference = convert(prepared)
    lowered = lower(reference, recipe.example_inputs(), target)
    x = data[0][0][:1]
    with torch.no_grad():
        assert sqnr_db(reference(x), get_backend("xnnpack").runner(lowered.program)(x)) >= 30.0


def test_a_conv_at_a_linear_only_precision_is_refused(setup):
    model, _, target, plan, data = setup
    bad = copy.deepcopy(plan)
    bad.layers[0].precision = "w4dyn"
    with pytest.raises(
        EdgeqError, match="conv layer 'conv' precision 'w4dyn'.*runs only for linear, embedding layers.*use one of"
    ):
        validate_plan(bad, model, target, (data[0][0][:1],))


def test_converting_a_copy_needs_its_annotations_rebound(setup):
    """Upstream behaviour edgeq.quant.convert.rebind_annotations works around: when this
    starts passing without the rebinding, torchao fixed it and the workaround can go."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    model, recipe, target, plan, _ = setup
    prepared = prepare(capture(model, recipe.example_inputs()), quant_spec(plan, target))
    prepared(torch.randn(4, 3, 8, 8))
    with pytest.raises(Exception, match="PortNodeMetaForQDQ"):
        convert_pt2e(copy.deepcopy(prepared))
    assert convert(copy.deepcopy(prepared)) is not None


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(128, 256)
        self.fc2 = nn.Linear(256, 96)
        self.odd = nn.Linear(96, 10)  # 96 input channels: groups of 64 do not fit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.odd(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_groupwise_4bit_linears_train_convert_and_run_as_simulated():
    torch.manual_seed(0)
    model = Wide().eval()
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(16, 128, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(4)]
    recipe = Recipe(
        name="wide",
        model=lambda: copy.deepcopy(model),
        example_inputs=lambda: (torch.zeros(1, 128),),
        train_data=lambda: data,
        eval_data=lambda: data[:2],
    )
    target = load_target("android")
    plan = uniform_plan(model, target, "w4g32", example_inputs=recipe.example_inputs())
    config = QATConfig(steps=6, calibration_batches=2, checkpoint_every=0, lr=1e-2, loss="task", patience=0)
    graph = capture(copy.deepcopy(model), recipe.example_inputs())
    prepared = prepare(graph, quant_spec(plan, target, ranges=config.ranges))
    groups = {n: m for n, m in prepared.named_modules() if isinstance(m, GroupwiseFakeQuantize)}
    assert len(groups) == 3
    # 4-bit groups train at the intermediate 8-bit width first, like every 4-bit weight.
    assert set(groups) <= set(narrow_weight_quants(prepared))
    before = prepared.fc1.weight.detach().clone()
    run_qat(prepared, recipe, config)
    assert not torch.equal(prepared.fc1.weight, before), "the groupwise weights did not train"
    for module in groups.values():
        assert int(module.mode) == TRACKING and (module.quant_min, module.quant_max) == (-8, 7)
        assert torch.equal(module.scale, module.scale.to(torch.bfloat16).float()), "scales off XNNPACK's bf16"
    assert groups["edgeq_groupwise_0"].scale.shape == (256 * 128 // 32,)  # one tracked range per group
    reference = convert(copy.deepcopy(prepared))
    simulated = to_eval(prepared)
    ops = [str(n.target) for n in reference.graph.nodes if n.op == "call_function"]
    assert ops.count("quantized_decomposed.dequantize_per_channel_group.default") == 3
    x = torch.cat([b[0] for b in data[:2]])
    with torch.no_grad():
        assert sqnr_db(reference(x), simulated(x)) >= 40.0  # one grid: the same weights in both
    lowered = lower(reference, recipe.example_inputs(), target)
    with torch.no_grad():
        assert sqnr_db(reference(x[:1]), get_backend("xnnpack").runner(lowered.program)(x[:1])) >= 30.0
    float_bytes = len(lower_float(model, recipe.example_inputs(), target))
    predicted = weight_bytes(plan, target) + float_bytes - 4.0 * sum(e.params for e in plan.layers)
    # A 38 KB program: the delegate's fixed tables weigh more here than in a real model.
    assert abs(len(lowered.program) - predicted) / len(lowered.program) < 0.05, (len(lowered.program), predicted)


def test_groupwise_ranges_vote_or_follow_a_moving_average():
    """One tracked absmax per group: with the vote it moves only on a majority, with ema every step."""
    torch.manual_seed(0)
    weight = torch.randn(4, 64)
    adaptive, ema = GroupwiseFakeQuantize(32), GroupwiseFakeQuantize(32, vote=EMA_VOTE)
    for module in (adaptive, ema):
        module(weight)  # calibration: the groups' absmax
        module.start_tracking()
    calibrated = adaptive.committed.clone()
    wider = weight * 1.5
    for _ in range(3):
        adaptive(wider)
        ema(wider)
    assert torch.equal(adaptive.committed, calibrated), "fewer votes than min_votes moved the range"
    assert torch.allclose(ema.committed, calibrated * (1 + 0.5 * (1 - 0.99**3)), rtol=1e-5)
    # The program's integer weight on the module's grid reproduces the fake-quantized weight exactly.
    adaptive.eval()
    adaptive.disable_observer()
    q, scales = adaptive.integer_weight(wider)
    program = torch.ops.quantized_decomposed.dequantize_per_channel_group.default(
        q, scales, torch.zeros_like(scales, dtype=torch.int8), -8, 7, torch.int8, 32, torch.float32
    )
    assert torch.equal(program, adaptive(wider))


def test_a_group_size_that_does_not_divide_the_layer_is_refused():
    model = Wide().eval()
    target = load_target("android")
    spec = target.precisions["w4g32"]
    wide_groups = dataclasses.replace(spec, name="w4g64", group_size=64)
    target = dataclasses.replace(target, precisions={**target.precisions, "w4g64": wide_groups})
    plan = uniform_plan(model, target, "w8dyn", example_inputs=(torch.zeros(1, 128),))
    plan.layers[-1].precision = "w4g64"
    with pytest.raises(EdgeqError, match="'odd' precision 'w4g64' .groups of 64 input channels., but its 96 input"):
        validate_plan(plan, model, target, (torch.zeros(1, 128),))


def test_an_xnnpack_group_size_off_its_multiple_is_refused():
    from edgeq.backends import resolve_target
    from edgeq.targets import parse_target

    menu = {
        "int8": {"weight_bits": 8, "activation_bits": 8, "activations": "static", "ops": ["linear"], "weight_bytes": 1}
    }
    menu["w4g48"] = {**menu["int8"], "weight_bits": 4, "activations": "dynamic", "group_size": 48, "weight_bytes": 0.6}
    with pytest.raises(EdgeqError, match="group_size 48 .* multiple of 32"):
        resolve_target(
            parse_target({"name": "t", "backend": "xnnpack", "default_precision": "int8", "precisions": menu}, "t.toml")
        )
