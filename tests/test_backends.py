"""Both promised backends: XNNPACK coverage reporting and Qualcomm without its SDK."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

CUMSUM_RECIPE = '''
"""A model with an op XNNPACK has no kernel for (cumsum) between two linear layers."""
import torch
from torch import nn
from sklearn.datasets import load_iris

_x, _y = load_iris(return_X_y=True)
_x = torch.tensor((_x - _x.mean(0)) / _x.std(0), dtype=torch.float32)
_y = torch.tensor(_y)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.b = nn.Linear(16, 3)
    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(torch.cumsum(h, dim=1) / 16)

def model():
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(net(_x), _y).backward()
        opt.step()
    return net.eval()

def example_inputs():
    return (torch.zeros(1, 4),)

def train_data():
    return [(_x[i::5], _y[i::5]) for i in range(5)]

def eval_data():
    return [(_x, _y)]
'''


def test_an_op_outside_xnnpack_is_named_and_the_program_runs(tmp_path):
    from edgeq.pipeline import BuildConfig, build
    from edgeq.quant.qat import QATConfig

    recipe = tmp_path / "cumsum_recipe.py"
    recipe.write_text(textwrap.dedent(CUMSUM_RECIPE))
    result = build(str(recipe), BuildConfig(out=tmp_path / "out", qat=QATConfig(steps=30), max_drop=5.0))
    outside = result.report["delegation"]["outside"]
    assert any("cumsum" in op for op in outside), outside
    assert all(reason for reason in outside.values())
    assert 0.0 < result.report["delegation"]["flops_in_delegate"] <= 1.0
    html = (result.out_dir / "report.html").read_text()
    assert "cumsum" in html
    # The program ran in ExecuTorch's runtime to produce this score.
    assert result.scores.program > 80.0


def test_qualcomm_build_quantizes_validates_and_stops_cleanly_without_the_sdk(tmp_path):
    from netguard import no_network_env

    # As on a machine without the qnn extra: no SDK, host runtime ignored.
    env, marker = no_network_env(tmp_path, EDGEQ_QNN_HOST_RUNTIME="off")
    env.pop("QNN_SDK_ROOT", None)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeq", "build", "--target", "qualcomm", "--steps", "20", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 4, proc.stderr[-3000:]
    error = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(error) == 1
    assert "quantized reference validated on the host" in error[0]
    assert "QNN_SDK_ROOT" in error[0] and "--allow-sdk-download" in error[0]
    assert not marker.exists(), marker.read_text()
    assert not out.exists()


def test_qnn_quantizer_uses_adaptive_ranges_per_layer():

    from edgeq.backends import load_target, quant_spec
    from edgeq.capture import capture
    from edgeq.planning.plan import uniform_plan
    from edgeq.quant.convert import prepare
    from edgeq.quant.fake_quant import AdaptiveRangeFakeQuantize
    from edgeq.recipe import load_recipe

    recipe = load_recipe(None)
    model = recipe.model()
    target = load_target("qualcomm-sm8550")
    plan = uniform_plan(model, target)
    plan.layers[-1].precision = "16a4w"
    prepared = prepare(capture(model, recipe.example_inputs()), quant_spec(plan, target))
    fqs = [m for m in prepared.modules() if isinstance(m, AdaptiveRangeFakeQuantize)]
    assert fqs
    # The head's weight is 4-bit, the stem's 8-bit.
    ranges = {(m.quant_min, m.quant_max) for m in fqs if m.ch_axis >= 0}
    assert (-7, 7) in ranges or (-8, 7) in ranges
    assert any(m.quant_max >= 127 for m in fqs if m.ch_axis >= 0)
    assert any(m.quant_max == 65535 for m in fqs if m.ch_axis < 0)  # 16-bit activations of the head


def test_a_bilinear_upsample_still_lowers_into_xnnpack():
    """edgeq skips XNNPACK's bilinear pattern matching on graphs without an upsample;
    a graph with one still goes through it, into the delegate, with eager's numbers."""
    import torch
    from torch import nn

    from edgeq.backends import load_target
    from edgeq.checks.validate import ProgramRunner
    from edgeq.lower import lower

    class Upsampler(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return nn.functional.interpolate(self.conv(x), scale_factor=2, mode="bilinear", align_corners=False)

    torch.manual_seed(0)
    model, x = Upsampler().eval(), torch.randn(1, 3, 8, 8)
    lowered = lower(model, (x,), load_target("android"))
    assert lowered.delegation.by_op.get("aten_upsample_bilinear2d_vec") == (1, 0)
    with torch.no_grad():
        assert torch.allclose(ProgramRunner(lowered.program)(x), model(x), atol=1e-5)


def test_qnn_rewrites_a_standalone_batch_norm_as_the_depthwise_conv_it_computes():
    """ExecuTorch's QNN lowering computes a batch norm that stands alone wrongly on the HTP (-10 dB
    against its reference on the simulator); the QNN backend hands the quantizer a depthwise 1x1
    convolution computing the same function instead, for 4-D and 3-D inputs, in PTQ and QAT graphs."""
    import torch
    from torch import nn

    from edgeq.backends import load_target
    from edgeq.backends.qnn import batch_norms_as_depthwise_convs
    from edgeq.capture import capture_for_quantization
    from edgeq.planning.plan import uniform_plan
    from edgeq.quant.convert import convert, prepare
    from edgeq.quant.spec import quant_spec
    from edgeq.upstream import move_to_eval, move_to_train

    def trained(norm: nn.Module) -> nn.Module:
        norm.running_mean.uniform_(-3, 3)
        norm.running_var.uniform_(0.5, 4)
        norm.weight.data.uniform_(0.5, 2)
        norm.bias.data.uniform_(-1, 1)
        return norm

    torch.manual_seed(0)
    image = nn.Sequential(trained(nn.BatchNorm2d(3)), nn.Conv2d(3, 4, 3), trained(nn.BatchNorm2d(4)), nn.ReLU())
    sequence = nn.Sequential(trained(nn.BatchNorm1d(5)), nn.Conv1d(5, 2, 1))
    for model, x in ((image.eval(), torch.randn(2, 3, 8, 8)), (sequence.eval(), torch.randn(2, 5, 7))):
        graph = capture_for_quantization(model, (x[:1],), False)
        assert batch_norms_as_depthwise_convs(graph) == 1
        # the one after a conv is left to torchao, which folds it into the conv
        left = [n for n in graph.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]
        assert all(str(n.args[0].target).startswith("aten.conv") for n in left)
        torch.testing.assert_close(graph(x[:1]), model(x[:1]), atol=1e-5, rtol=1e-5)

    target = load_target("qualcomm-sm8650")
    plan = uniform_plan(image, target, example_inputs=(torch.zeros(1, 3, 8, 8),))
    spec = quant_spec(plan, target, qat=True)
    prepared = prepare(capture_for_quantization(image, (torch.zeros(1, 3, 8, 8),), True), spec)
    assert not any(n.op == "call_function" and "batch_norm" in str(n.target) for n in prepared.graph.nodes)
    move_to_train(prepared)  # the batch norms it recorded are the ones left: none
    prepared(torch.randn(4, 3, 8, 8))
    move_to_eval(prepared)
    assert convert(prepared)(torch.randn(1, 3, 8, 8)).shape == (1, 4, 6, 6)
