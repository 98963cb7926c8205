"""AdaptiveRangeFakeQuantize as a module: calibration, voting, qparams, state, distributed."""

from __future__ import annotations

import math

import pytest
import torch
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver

from edgeq.quant.fake_quant import AdaptiveRangeFakeQuantize

AFFINE = dict(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)
PER_CHANNEL = dict(dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric, ch_axis=0)


def calibrated(batches, **kwargs):
    fq = AdaptiveRangeFakeQuantize(**kwargs)
    for b in batches:
        fq(b)
    fq.start_tracking()
    return fq


def test_is_a_torchao_fake_quant_buildable_from_with_args():
    ctr = AdaptiveRangeFakeQuantize.with_args(up_ratio=0.6, min_votes=4)
    fq = ctr(**AFFINE)
    assert isinstance(fq, FakeQuantizeBase)
    assert fq.config.up_ratio == 0.6 and fq.config.min_votes == 4


def test_calibration_sets_the_union_range_and_qparams_match_torchao():
    torch.manual_seed(0)
    batches = [torch.randn(16, 8) * (i + 1) for i in range(4)]
    fq = calibrated(batches, **AFFINE)
    obs = MinMaxObserver(dtype=torch.qint8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine, eps=2**-12)
    for b in batches:
        obs(b)
    lo, hi = fq.committed_range()
    assert float(lo) == pytest.approx(float(obs.min_val)) and float(hi) == pytest.approx(float(obs.max_val))
    scale, zp = fq.calculate_qparams()
    ref_scale, ref_zp = obs.calculate_qparams()
    assert torch.allclose(scale, ref_scale) and torch.equal(zp.int(), ref_zp.int())


def test_per_channel_qparams_match_torchao_and_channels_vote_independently():
    w = torch.randn(4, 3, 3, 3)
    fq = calibrated([w], min_votes=2, **PER_CHANNEL)
    ref = PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric, eps=2**-12
    )
    ref(w)
    assert torch.allclose(fq.calculate_qparams()[0], ref.calculate_qparams()[0])
    before = fq.committed.clone()
    grown = w.clone()
    grown[1] *= 3  # only channel 1 grows
    fq(grown)
    fq(grown)
    moved = (fq.committed != before)[0]
    assert moved.tolist() == [False, True, False, False]
    assert fq.commit_count[0].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_grid_stays_fixed_until_the_vote_commits():
    x = torch.linspace(-1, 1, 100)
    fq = calibrated([x], min_votes=3, **AFFINE)
    scale0 = fq.scale.clone()
    out0 = fq(x * 2)  # one wider batch: a vote, not a move
    assert torch.equal(fq.scale, scale0)
    assert float(out0.max()) <= 1.0 + float(scale0)  # still clipped to the committed grid
    fq(x * 2)
    fq(x * 2)  # third vote above: commit
    assert float(fq.scale) > float(scale0) and fq.commits() == 2  # low and high bound both moved


def test_non_finite_observations_are_ignored():
    x = torch.linspace(-1, 1, 10)
    fq = calibrated([x], min_votes=1, **AFFINE)
    committed = fq.committed.clone()
    fq(torch.tensor([math.nan, 0.5]))
    fq(torch.tensor([math.inf, -math.inf]))
    assert torch.equal(fq.committed, committed)
    # A NaN during calibration does not poison the range either.
    fq2 = AdaptiveRangeFakeQuantize(**AFFINE)
    fq2(torch.tensor([1.0, 2.0]))
    fq2(torch.tensor([math.nan, math.nan]))
    assert fq2.committed_range()[1].item() == 2.0


def test_range_contains_zero_and_scale_is_positive():
    fq = calibrated([torch.full((8,), 3.0)], **AFFINE)
    scale, zp = fq.calculate_qparams()
    assert float(scale) > 0 and int(zp) == -128  # min clamped to 0 -> zero point at quant_min
    fq0 = calibrated([torch.zeros(8)], **AFFINE)
    assert float(fq0.calculate_qparams()[0]) > 0


def test_bounds_that_pass_each_other_on_a_narrow_far_band_still_give_a_valid_range():
    """Each bound of an affine range follows its own votes: on values in a narrow band far from
    zero (ESPNet's decoder sits near -6,000) step moves of |P| * step can carry the lower bound
    over the upper one. The range is then the two in order, never torchao's min > max assertion."""
    torch.manual_seed(0)
    fq = calibrated([torch.linspace(-6200.0, -5700.0, 64)], min_votes=2, rule="step", **AFFINE)
    for _ in range(40):
        fq(-5950.0 + 5.0 * torch.randn(64))  # the band narrows to the middle: both bounds move inwards
    low, high = fq.committed_range()
    assert float(low) <= float(high)
    scale, zero_point = fq.calculate_qparams()  # torchao's formula, which asserts min <= max
    assert float(scale) > 0
    observer = fq.activation_post_process
    observer.committed.copy_(torch.tensor([[-5748.4], [-6119.7]]))  # the pair measured on ESPNet
    assert (float(observer.min_val), float(observer.max_val)) == pytest.approx((-6119.7, -5748.4))
    fq.calculate_qparams()


def test_observer_and_fake_quant_switch_off():
    x = torch.linspace(-1, 1, 50)
    fq = calibrated([x], min_votes=1, **AFFINE)
    fq.disable_observer()
    committed = fq.committed.clone()
    fq(x * 10)
    assert torch.equal(fq.committed, committed)
    fq.disable_fake_quant()
    y = torch.randn(20)
    assert torch.equal(fq(y), y)


@pytest.mark.parametrize("qmin,qmax", [(-7, 7), (-8, 7), (-(2**15), 2**15 - 1), (0, 255)])
def test_any_integer_width(qmin, qmax):
    x = torch.randn(64)
    fq = calibrated(
        [x],
        dtype=torch.int8 if qmax < 256 else torch.int16,
        quant_min=qmin,
        quant_max=qmax,
        qscheme=torch.per_tensor_affine,
    )
    y = fq(x)
    levels = torch.unique(torch.round((y / fq.scale) + fq.zero_point))
    assert levels.min() >= qmin and levels.max() <= qmax


def test_gradient_is_straight_through_inside_the_range():
    fq = calibrated([torch.linspace(-1, 1, 10)], **AFFINE)
    x = torch.tensor([0.3, -0.2, 5.0], requires_grad=True)
    fq(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("scheme", [PER_CHANNEL, AFFINE], ids=["per-channel", "per-tensor"])
def test_state_dict_round_trip_restores_every_buffer(scheme):
    w = torch.randn(6, 4)
    fq = calibrated([w], min_votes=2, **scheme)
    fq(w * 2)
    fq(w * 2)
    fq(w * 3)  # one pending vote
    state = fq.state_dict()
    for key in ("committed", "n", "g", "l", "s", "commit_count", "mode", "scale", "zero_point"):
        assert f"activation_post_process.{key}" in state  # the observer holds the range, as in torchao
    fresh = AdaptiveRangeFakeQuantize(min_votes=2, **scheme)
    fresh.load_state_dict(state)
    for key, value in fq.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # Both continue identically.
    for factor in (3, 3, 0.5, 4, 4, 4):
        assert torch.equal(fresh(w * factor), fq(w * factor))
        assert torch.equal(fresh.committed, fq.committed)
    assert fresh.commits() == fq.commits() > 1


def _rank_votes(rank: int):
    fq = AdaptiveRangeFakeQuantize(min_votes=2, **AFFINE)
    # Each rank sees different data; rank 1 also sees a NaN batch.
    fq(torch.tensor([-1.0 - rank, 1.0 + 2 * rank]))
    fq.start_tracking()
    for step in range(4):
        data = torch.tensor([-0.5, 4.0 * (rank + 1)])
        if rank == 1 and step == 0:
            data = torch.tensor([math.nan, math.nan])
        fq(data)
    return fq.committed.tolist(), fq.commits()


def test_distributed_observations_are_reduced_so_ranks_agree():
    from gloo import run_ranks

    results = run_ranks(_rank_votes, world=2)
    assert results[0] == results[1]
    committed, commits = results[0]
    # Calibration over both ranks: [-2, 3]. Step 0 (rank 1's NaN drops out): lo -0.5, hi 4;
    # step 1: lo -0.5, hi 8 -> commit lo = (-2 - 0.5)/2 = -1.25, hi = (3 + 6)/2 = 4.5;
    # steps 2-3: lo -0.5, hi 8 -> commit lo = (-1.25 - 0.5)/2, hi = (4.5 + 8)/2.
    assert committed == [[-0.875], [6.25]]
    assert commits == 4


def test_cpu_numpy_path_matches_the_torch_path():
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, generator=gen) * (1 + 0.01 * i) for i in range(200)]
    a = calibrated(batches[:4], min_votes=4, **AFFINE)
    b = calibrated(batches[:4], min_votes=4, **AFFINE)
    b.cpu_numpy = False  # the torch path, the one GPUs take
    for x in batches[4:]:
        assert torch.allclose(a(x), b(x), atol=1e-6)
    assert a.commits() == b.commits() > 0
    assert torch.allclose(a.committed, b.committed, rtol=1e-6)
    sa, sb = a.activation_post_process.state_dict(), b.activation_post_process.state_dict()
    for key in ("n", "g", "l"):
        assert torch.equal(sa[key], sb[key]), key
    assert torch.allclose(sa["s"], sb["s"], rtol=1e-5)


def test_per_channel_numpy_path_matches_the_torch_path():
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(8, 4, generator=gen) * (1 + 0.02 * i) for i in range(120)]
    a = calibrated(weights[:2], min_votes=3, **PER_CHANNEL)
    b = calibrated(weights[:2], min_votes=3, **PER_CHANNEL)
    b.cpu_numpy = False
    # The torch path sums batched votes in another order: equal up to float rounding.
    for w in weights[2:]:
        assert torch.allclose(a(w), b(w), atol=1e-5)
    assert a.commits() == b.commits() > 0
    assert torch.allclose(a.committed, b.committed, rtol=1e-5)
    # The NumPy path updates the scale in place; it must equal calculate_qparams() exactly.
    assert torch.equal(a.scale, a.calculate_qparams()[0])


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"min_votes": 3},
        {"rule": "step"},
        {"window": 12, "min_votes": 4},
        {"up_ratio": 0.7, "down_ratio": 0.9},
    ],
)
@pytest.mark.parametrize("numpy_path", [True, False])
@pytest.mark.parametrize("scheme", ["per-tensor", "per-channel"])
def test_fast_paths_commit_at_the_same_steps_as_the_rule_applied_step_by_step(knobs, numpy_path, scheme):
    """The module's fast paths (Python floats per tensor, in-place NumPy per channel, lazy
    counting in torch) against the rule applied observation by observation (apply_vote):
    the same commits at the same steps, the same committed values."""
    from edgeq.quant.ranges import VoteConfig, VoteState, apply_vote

    gen = torch.Generator().manual_seed(3)
    shape = (64,) if scheme == "per-tensor" else (6, 16)
    batches = [torch.randn(shape, generator=gen) * (1 + 0.3 * math.sin(i / 9)) for i in range(300)]
    batches[50] = torch.full(shape, math.nan)
    batches[80][2] = math.inf
    fq = calibrated(batches[:4], **(AFFINE if scheme == "per-tensor" else PER_CHANNEL), **knobs)
    fq.cpu_numpy = numpy_path
    p = fq.committed.clone()
    state = VoteState.zeros_like(p)
    cfg = VoteConfig(**knobs)
    commits = 0
    for x in batches[4:]:
        fq(x)
        if scheme == "per-tensor":
            lo, hi = torch.aminmax(x)
            obs = torch.stack([lo, hi]).reshape(2, 1)
        else:
            obs = x.abs().amax(dim=1).reshape(1, -1)
        p, moved = apply_vote(p, state, obs, cfg)
        commits += int(moved.sum())
        assert fq.commits() == commits
        # Votes counted together sum in another order: equal up to float rounding.
        assert torch.allclose(fq.committed, p, rtol=1e-6, atol=0)
    assert commits >= 3


@pytest.mark.parametrize("kind", ["affine", "symmetric", "int4"])
def test_scalar_qparams_equal_torchaos_formula_bit_for_bit(kind):
    """Per-tensor ranges refresh their qparams in float32 NumPy scalars; convert_pt2e
    calls calculate_qparams() (torchao's tensor code): the two must agree exactly."""
    kwargs = {
        "affine": AFFINE,
        "symmetric": dict(dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_tensor_symmetric),
        "int4": dict(dtype=torch.int8, quant_min=-8, quant_max=7, qscheme=torch.per_tensor_affine),
    }[kind]
    gen = torch.Generator().manual_seed(5)
    for _ in range(300):
        lo, hi = sorted((torch.randn(2, generator=gen) * torch.rand(1, generator=gen) * 10).tolist())
        if kind == "affine" and torch.rand(1, generator=gen) < 0.2:
            lo = abs(lo)  # a range above zero still contains zero after the min/max formulas
        fq = calibrated([torch.tensor([lo, hi])], **kwargs)
        fq.activation_post_process._refresh_qparams()
        scale, zero_point = fq.calculate_qparams()
        assert torch.equal(fq.scale, scale.float()), (lo, hi)
        assert torch.equal(fq.zero_point.long(), zero_point.long()), (lo, hi)


@pytest.mark.parametrize("numpy_path", [True, False])
def test_the_scale_trained_is_calculate_qparams_after_every_commit_bf16_groups_included(numpy_path):
    """Every refresh route computes what calculate_qparams() (what convert_pt2e reads) computes.
    Groupwise weights were trained on float32 scales once tracking committed while the program
    stores bf16 ones (the fast per-channel route skipped the rounding): measured before the fix,
    the buffer differed from calculate_qparams() after 160 commits."""
    from edgeq.quant.groupwise import GroupwiseFakeQuantize

    gen = torch.Generator().manual_seed(7)
    w = torch.randn(16, 64, generator=gen)
    for fq in (GroupwiseFakeQuantize(32, 4), calibrated([w], **PER_CHANNEL)):
        fq.cpu_numpy = numpy_path
        if isinstance(fq, GroupwiseFakeQuantize):
            fq(w)
            fq.start_tracking()
        for i in range(40):
            fq(w * (1.3 + 0.01 * i))
            assert torch.equal(fq.scale, fq.calculate_qparams()[0]), i
        assert fq.commits() > 0
        if isinstance(fq, GroupwiseFakeQuantize):
            assert torch.equal(fq.scale, fq.scale.to(torch.bfloat16).float())


def test_the_committed_range_is_the_observers_min_val_and_max_val():
    from torchao.quantization.pt2e.observer import UniformQuantizationObserverBase

    fq = calibrated([torch.tensor([-1.5, 3.0])], **AFFINE)
    observer = fq.activation_post_process
    assert isinstance(observer, UniformQuantizationObserverBase)
    assert (float(observer.min_val), float(observer.max_val)) == (-1.5, 3.0)
    sym = calibrated([torch.randn(4, 3)], **PER_CHANNEL).activation_post_process
    assert torch.equal(sym.max_val, -sym.min_val) and torch.equal(sym.max_val, sym.committed[0])
