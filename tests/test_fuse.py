"""Sibling projections stacked into one linear (edgeq.llm.fuse): the same numbers, one linear."""

import copy

import pytest
import torch
from torch import nn

from edgeq.llm.export import LLMPlan, quantize_layers
from edgeq.llm.fuse import Slice, fuse_projections, merge_duplicates


class _Attention(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.wq, self.wk, self.wv = (nn.Linear(64, width, bias=bias) for width in (64, 32, 32))

    def forward(self, x):
        return self.wq(x) + torch.cat([self.wk(x), self.wv(x)], -1)


class _FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(64, 96, bias=False), nn.Linear(64, 96, bias=False)
        self.w2 = nn.Linear(96, 64, bias=False)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class _Block(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.attention, self.feed_forward = _Attention(bias), _FeedForward()

    def forward(self, x):
        x = x + self.attention(x)
        return x + self.feed_forward(x)


class _Stack(nn.Module):
    """ExecuTorch's transformer's names for the linears of two blocks."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([_Block(bias), _Block(bias)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _names(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("zero_points", [False, True])
def test_stacked_quantized_siblings_compute_the_same_numbers(zero_points):
    model = _Stack()
    precisions = {name: "w4g32" for name in _names(model)}
    precisions["layers.1.attention.wk"] = "w8dyn"  # this block's q/k/v differ: left as they are
    quantized = quantize_layers(model, LLMPlan(precisions, "float", zero_points=zero_points))
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = quantized(x)
        fused = copy.deepcopy(quantized)
        stacked = fuse_projections(fused, precisions, 2)
        after = fused(x)
    assert stacked == ["layers.0.attention.wq", "layers.0.feed_forward.w1", "layers.1.feed_forward.w1"]
    assert isinstance(fused.layers[0].attention.wk, Slice) and not isinstance(fused.layers[1].attention.wk, Slice)
    assert torch.equal(before, after)


def test_stacked_float_siblings_keep_their_biases():
    model = _Stack(bias=True)
    x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
        assert len(fuse_projections(model, {}, 2)) == 4
        assert torch.equal(before, model(x))


def test_the_exported_graph_holds_each_stacked_linear_once():
    model = _Stack()
    fuse_projections(model, {}, 2)
    graph_module = torch.export.export(model, (torch.randn(1, 3, 64),)).module()
    linears = [n for n in graph_module.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert len(linears) == 2 * (3 + 2 + 1)  # the shared linear traced once per slice
    merge_duplicates(graph_module)
    linears = [n for n in graph_module.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert len(linears) == 2 * 3  # q/k/v, gate/up, down
    x = torch.randn(1, 3, 64)
    assert torch.equal(graph_module(x), model(x))


def test_merging_leaves_writes_alone():
    def twice(buffer, x):
        a = torch.ops.aten.add_.Tensor(buffer, x)
        b = torch.ops.aten.add_.Tensor(buffer, x)
        return torch.ops.aten.mul.Tensor(a, 2) + torch.ops.aten.mul.Tensor(b, 2)

    graph_module = torch.fx.symbolic_trace(twice)
    for node in graph_module.graph.nodes:  # what export records: each call's value
        node.meta["val"] = torch.empty(2)
    assert merge_duplicates(graph_module) == 0
    # both writes happen: the buffer holds 2 when either product reads it (merged, it would hold 1)
    assert torch.equal(graph_module(torch.zeros(2), torch.ones(2)), torch.tensor([8.0, 8.0]))


@pytest.mark.parametrize("unit_offset", [False, True])
def test_the_linear_mean_norm_computes_executorchs_rms_norm(unit_offset):
    from executorch.examples.models.llama.norm import RMSNorm

    from edgeq.llm.norm import LinearMeanRMSNorm, replace_rms_norms

    norm = RMSNorm(96, eps=1e-5, add_unit_offset=unit_offset)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=torch.Generator().manual_seed(4)))
    holder = nn.Sequential(norm)
    x = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(5)) * 3
    with torch.no_grad():
        expected = holder(x)
        assert replace_rms_norms(holder) == 1 and isinstance(holder[0], LinearMeanRMSNorm)
        torch.testing.assert_close(holder(x), expected, atol=1e-5, rtol=1e-5)


def test_group_means_are_the_means_of_each_group_of_columns():
    from edgeq.llm.zero_points import group_means

    x = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(group_means(x, 32), x.reshape(1, 5, 4, 32).mean(-1))
    torch.testing.assert_close(group_means(x[0], 64), x[0].reshape(5, 2, 64).mean(-1))
