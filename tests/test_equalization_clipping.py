"""Cross-layer equalization and the activation clipping search, on real export and PT2E graphs."""

from __future__ import annotations

import torch
from torch import nn
from torchao.quantization.pt2e.observer import HistogramObserver, MinMaxObserver

from edgeq import upstream
from edgeq.quant.candidates import candidate_label, complexity, methods_of
from edgeq.quant.clipping import _search, search_clipping
from edgeq.quant.equalization import equalize


class _Separable(nn.Module):
    """conv -> BN -> ReLU -> depthwise conv -> BN -> ReLU6 -> pointwise conv: the first pair can be
    equalized, the second cannot (ReLU6 clamps)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.project = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.expand(x)))
        x = nn.functional.pad(x, (0, 0, 0, 0))
        return self.project(nn.functional.relu6(self.bn1(self.depthwise(x))))


def _separable() -> _Separable:
    torch.manual_seed(0)
    model = _Separable()
    with torch.no_grad():
        # channels whose ranges differ by 100x, as a depthwise layer's do
        model.expand.weight.mul_(torch.logspace(-1, 1, 8).view(-1, 1, 1, 1))
        for bn in (model.bn0, model.bn1):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_equalization_keeps_the_function_and_equalizes_the_pair_it_may_touch():
    model = _separable()
    x = torch.randn(4, 3, 8, 8)
    equalized, result = equalize(model, (x,))
    assert list(result.pairs) == ["expand -> depthwise"]
    assert result.blocked_by_clamp == 1  # depthwise -> project sits behind ReLU6
    with torch.no_grad():
        torch.testing.assert_close(equalized(x), model(x), rtol=1e-4, atol=1e-5)
    bn = equalized.bn0
    folded = equalized.expand.weight.abs().flatten(1).amax(1) * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs()
    after = equalized.depthwise.weight.abs().flatten(1).amax(1)
    torch.testing.assert_close(folded, after, rtol=1e-4, atol=0)  # each channel's two ranges meet
    row = result.pairs["expand -> depthwise"]
    assert row["spread_after"] < row["spread_before"] / 5
    # the ReLU6 pair and the original model are untouched
    torch.testing.assert_close(equalized.project.weight, model.project.weight)
    assert not torch.equal(equalized.expand.weight, model.expand.weight) or not torch.equal(bn.weight, model.bn0.weight)
    assert torch.equal(model.bn0.weight, _separable().bn0.weight)


def _quantization_error(x: torch.Tensor, lo: float, hi: float) -> float:
    scale = (hi - lo) / 255
    zero_point = round(-128 - lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero_point, -128, 127)
    return float(((q - zero_point) * scale - x).pow(2).sum())


def test_clipping_search_beats_the_histogram_observers_own_range_on_heavy_tails():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.3, 1.0).sample((100_000,))
    observer = HistogramObserver(dtype=torch.int8, quant_min=-128, quant_max=127)
    observer(x)
    scale, zero_point = (float(v) for v in observer.calculate_qparams())
    own = ((-128 - zero_point) * scale, (127 - zero_point) * scale)
    lo, hi, before, after = _search(observer)
    assert after < before and lo <= 0 <= hi
    # measured on the values themselves, not on the histogram's estimate
    assert _quantization_error(x, lo, hi) < 0.95 * _quantization_error(x, *own)


class _Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.relu(self.a(x)), 3 * self.b(x) ** 3], dim=1))


def test_clipping_replaces_calibrated_observers_and_keeps_shared_ones_shared():
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    upstream.apply()
    torch.manual_seed(0)
    model = _Branches().eval()
    x = torch.randn(16, 3, 6, 6)
    graph = torch.export.export(model, (x,)).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(graph, quantizer)
    prepared(x)
    observers = {n: m for n, m in prepared.named_modules(remove_duplicate=False) if isinstance(m, HistogramObserver)}
    groups = {}
    for name, module in observers.items():
        groups.setdefault(id(module), []).append(name)
    result = search_clipping(prepared)
    assert result.changed and result.summary()["narrowed"] >= 1
    after = dict(prepared.named_modules(remove_duplicate=False))
    for names in groups.values():
        # every name of one shared observer now points at one and the same replacement (or the original)
        assert len({id(after[n]) for n in names}) == 1
    assert any(isinstance(after[n], MinMaxObserver) for n in observers)
    converted = convert_pt2e(prepared)
    with torch.no_grad():
        error = (converted(x) - model(x)).abs().mean()
    assert error < 0.1 * model(x).abs().mean()


def test_candidate_names_list_their_methods():
    assert methods_of("ptq") == [] and methods_of("ptq+clipping+rounding") == ["clipping", "rounding"]
    assert complexity("ptq") < complexity("ptq+rounding") < complexity("ptq+clipping+rounding") < complexity("qat")
    assert candidate_label("ptq+clipping") == "PTQ + activation clipping search"
    assert candidate_label("ptq") == "PTQ, calibration only"
