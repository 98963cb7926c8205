"""Dynamically quantized inputs are simulated per token, the grid XNNPACK runs.

A token sequence with one loud token (a transformer's [CLS] or padding row):
quantized over the whole tensor it would drown the quiet tokens; the program
quantizes each token alone. Real stack: PT2E, convert, ExecuTorch lowering,
executorch.runtime.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgeq.backends import get_backend, load_target, quant_spec
from edgeq.capture import capture
from edgeq.checks.evaluate import sqnr_db
from edgeq.errors import EdgeqError
from edgeq.lower import lower
from edgeq.planning.plan import uniform_plan
from edgeq.quant.convert import convert, prepare
from edgeq.quant.dynamic import PerTokenFakeQuantize, fake_quant_per_token, per_token_activations
from edgeq.quant.qat import QATConfig, run_qat, to_eval
from edgeq.recipe import Recipe

_qd = torch.ops.quantized_decomposed


class TokenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _tokens(seed: int, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 64, generator=gen)
    x[:, 0] *= 40.0  # one loud token per sequence
    return x


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = TokenMLP().eval()
    data = [(_tokens(i, 4), _tokens(100 + i, 4)[..., :64]) for i in range(4)]
    recipe = Recipe(
        name="tokens",
        model=lambda: copy.deepcopy(model),
        example_inputs=lambda: (_tokens(99),),
        train_data=lambda: data,
        eval_data=lambda: data[:2],
        loss=lambda out, target: torch.nn.functional.mse_loss(out, target),
    )
    return model, recipe, load_target("android")


def _ptq(model, recipe, target, precision: str) -> torch.fx.GraphModule:
    plan = uniform_plan(model, target, precision, example_inputs=recipe.example_inputs())
    prepared = prepare(capture(model, recipe.example_inputs()), quant_spec(plan, target, qat=False))
    with torch.no_grad():
        prepared(*recipe.example_inputs())
    return convert(prepared)


@pytest.mark.parametrize("precision", ["w8dyn", "w4dyn", "w4g32"])
def test_reference_quantizes_each_token_as_the_program_does(setup, precision):
    model, recipe, target = setup
    reference = _ptq(model, recipe, target, precision)
    ops = [n.target for n in reference.graph.nodes if n.op == "call_function"]
    assert ops.count(_qd.choose_qparams_per_token_asymmetric.default) == 2
    assert _qd.choose_qparams.tensor not in ops
    lowered = lower(reference, recipe.example_inputs(), target)
    assert not lowered.delegation.outside, lowered.delegation.outside
    x = _tokens(7)
    with torch.no_grad():
        got = get_backend("xnnpack").runner(lowered.program)(x)
        # Per-tensor, the reference sat ~30 dB from this program; per token it is the same computation.
        assert sqnr_db(reference(x), got) >= 80.0
        assert sqnr_db(model(x), got) >= (30.0 if precision == "w8dyn" else 15.0)  # 4-bit weights cost more


def test_executorch_still_runs_per_tensor_dynamic_inputs_per_token(setup):
    """Why per_token_activations exists: ExecuTorch lowers PT2E's per-tensor dynamic pattern to
    XNNPACK's per-row qd8 conversion. When this fails, ExecuTorch runs per-tensor dynamic
    quantization as written and edgeq's rewrite must go (or become a precision of its own)."""
    model, recipe, target = setup
    reference = _ptq(model, recipe, target, "w8dyn")
    per_tensor = copy.deepcopy(reference)
    # Undo the rewrite: the graph convert_pt2e writes.
    for node in list(per_tensor.graph.nodes):
        if node.target == _qd.choose_qparams_per_token_asymmetric.default:
            node.target, node.args = _qd.choose_qparams.tensor, (node.args[0], -128, 127, 2**-12, torch.int8)
        elif node.target == _qd.quantize_per_token.default:
            node.target = _qd.quantize_per_tensor.tensor
        elif node.target == _qd.dequantize_per_token.default:
            node.target, node.args = _qd.dequantize_per_tensor.tensor, node.args[:6]
    per_tensor.recompile()
    x = _tokens(8)
    with torch.no_grad():
        program = get_backend("xnnpack").runner(lower(per_tensor, recipe.example_inputs(), target).program)(x)
        assert sqnr_db(per_tensor(x), program) < 40.0  # the per-tensor graph is not what runs
        assert sqnr_db(reference(x), program) >= 80.0  # the per-token one is
    assert per_token_activations(per_tensor) == 2


def test_qat_fake_quant_is_the_converted_grid(setup):
    model, recipe, target = setup
    plan = uniform_plan(model, target, "w8dyn", example_inputs=recipe.example_inputs())
    config = QATConfig(steps=4, calibration_batches=2, checkpoint_every=0, lr=1e-3, loss="task", patience=0)
    prepared = prepare(capture(model, recipe.example_inputs()), quant_spec(plan, target, ranges=config.ranges))
    tokens = [m for m in prepared.modules() if isinstance(m, PerTokenFakeQuantize)]
    assert len(tokens) == 2
    run_qat(prepared, recipe, config)
    reference = convert(copy.deepcopy(prepared))
    x = _tokens(9, 3)
    with torch.no_grad():
        assert sqnr_db(reference(x), to_eval(prepared)(x)) >= 80.0


def test_per_token_fake_quant_matches_the_decomposed_ops():
    x = _tokens(3, 2).requires_grad_(True)
    scale, zero_point = _qd.choose_qparams_per_token_asymmetric.default(x.detach(), torch.int8)
    q = _qd.quantize_per_token.default(x.detach(), scale, zero_point, -128, 127, torch.int8)
    expected = _qd.dequantize_per_token.default(q, scale, zero_point, -128, 127, torch.int8, torch.float32)
    got = fake_quant_per_token(x)
    assert torch.allclose(got, expected, atol=1e-6 * float(x.abs().max()))
    # Quiet tokens keep their own resolution: a per-tensor scale would round them to a few levels.
    assert sqnr_db(x[:, 1:].detach(), got[:, 1:].detach()) >= 35.0
    got.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_dynamic_activations_other_than_8_bits_are_refused(tmp_path):
    from pathlib import Path

    original = Path(load_target("android").path).read_text()
    text = original.replace(
        'weight_bits = 8\nactivation_bits = 8\nactivations = "dynamic"',
        'weight_bits = 8\nactivation_bits = 4\nactivations = "dynamic"',
    )
    assert text != original
    path = tmp_path / "android.toml"
    path.write_text(text)
    with pytest.raises(EdgeqError, match="dynamic activations are 8-bit, not 4.*activation_bits = 8"):
        load_target(path)


def test_program_debugging_reads_per_token_layers(setup):
    """Per-layer debugging sees each dynamic linear, and its kernel equals the reference's ops."""
    from edgeq.checks.program_debug import debug_program

    model, recipe, target = setup
    report = debug_program(model, _ptq(model, recipe, target, "w8dyn"), recipe, target, samples=2)
    linears = [layer for layer in report.layers if "linear" in layer.ops]
    assert [layer.name for layer in linears] == ["fc1", "fc2"]
    assert all(layer.kernel_vs_reference_db >= 80.0 for layer in linears), linears
