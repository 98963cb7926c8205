"""The voting rule, on hand-computed observation sequences (spec claims 1-6)."""

from __future__ import annotations

import math

import pytest
import torch

from edgeq.quant.ranges import VoteConfig, VoteState, apply_vote


def run(seq, p0, **knobs):
    """Feed a scalar sequence; returns the committed value after each step and commit flags."""
    cfg = VoteConfig(**knobs)
    p = torch.tensor([p0])
    state = VoteState.zeros_like(p)
    history, flags = [], []
    for o in seq:
        p, moved = apply_vote(p, state, torch.tensor([float(o)]), cfg)
        history.append(float(p))
        flags.append(bool(moved))
    return history, flags, state


def test_increase_with_mean_rule():
    # 3 votes, all above P=1: g/n = 1 > 0.5 at n=3; mean = 3; P = 0.5*1 + 0.5*3 = 2.
    hist, flags, state = run([2, 3, 4], 1.0, min_votes=3, keep=0.5)
    assert hist == [1.0, 1.0, 2.0]
    assert flags == [False, False, True]
    assert float(state.n) == 0 and float(state.g) == 0 and float(state.s) == 0  # claim 6: reset after commit


def test_decrease_with_mean_rule_needs_down_ratio():
    # P=10; votes 2, 4, 12: l/n = 2/3 = 0.667 < 0.7, g/n = 1/3 < 0.5 -> no commit at n=3.
    hist, flags, _ = run([2, 4, 12], 10.0, min_votes=3, down_ratio=0.7)
    assert flags == [False, False, False] and hist[-1] == 10.0
    # A fourth vote below: l/n = 3/4 = 0.75 > 0.7 -> mean (2+4+12+6)/4 = 6; P = 0.5*10 + 0.5*6 = 8.
    hist, flags, _ = run([2, 4, 12, 6], 10.0, min_votes=3, down_ratio=0.7)
    assert flags == [False, False, False, True] and hist[-1] == pytest.approx(8.0)


def test_no_change_when_vote_is_split():
    # Alternating votes: g/n never exceeds 2/3 < up_ratio 0.7, l/n never exceeds 0.5 < 0.7.
    hist, flags, state = run([2, 0, 2, 0, 2, 0], 1.0, min_votes=2, up_ratio=0.7)
    assert not any(flags) and hist[-1] == 1.0
    assert float(state.n) == 6 and float(state.g) == 3 and float(state.l) == 3


def test_min_votes_delays_the_first_commit():
    hist, flags, _ = run([5] * 8, 1.0, min_votes=8)
    assert flags.index(True) == 7


def test_mean_rule_never_moves_against_the_vote():
    # Majority above P but the mean is below (one large negative outlier): increase = max(P, blend) keeps P.
    hist, flags, _ = run([1.1, 1.1, -100.0, 1.1], 1.0, min_votes=4, up_ratio=0.5)
    assert flags[-1] and hist[-1] == 1.0


def test_step_rule():
    # Claim 5: P + step * max(|P|, eps) on an up-vote, P - step * max(|P|, eps) on a down-vote.
    hist, _, _ = run([5, 5], 2.0, min_votes=2, rule="step", step=0.25)
    assert hist[-1] == pytest.approx(2.5)
    hist, _, _ = run([0, 0], 2.0, min_votes=2, rule="step", step=0.25)
    assert hist[-1] == pytest.approx(1.5)
    hist, _, _ = run([1, 1], 0.0, min_votes=2, rule="step", step=0.5, eps=0.01)
    assert hist[-1] == pytest.approx(0.005)


def test_window_forgets_stale_votes():
    # Split votes accumulate; with window=4 the state empties at n=4, so the
    # later unanimous run of 4 commits on its own.
    seq = [2, 0, 2, 0, 5, 5, 5, 5]
    hist, flags, _ = run(seq, 1.0, min_votes=4, window=4)
    assert flags == [False] * 7 + [True]
    assert hist[-1] == pytest.approx(0.5 * 1 + 0.5 * 5)
    # Without a window the old votes still count: at n=5, g/n = 3/5 > 0.5, and
    # the stale zeros pull the mean down.
    hist, flags, _ = run(seq, 1.0, min_votes=4, window=0)
    assert flags.index(True) == 4
    assert hist[4] == pytest.approx(0.5 * 1 + 0.5 * (2 + 0 + 2 + 0 + 5) / 5)


def test_non_finite_observations_cast_no_vote():
    hist, flags, state = run([math.nan, math.inf, -math.inf, 3.0], 1.0, min_votes=2)
    assert not any(flags) and float(state.n) == 1
    hist, flags, _ = run([math.nan, 3.0, math.inf, 3.0], 1.0, min_votes=2)
    assert flags == [False, False, False, True] and hist[-1] == pytest.approx(2.0)


def test_values_vote_independently():
    cfg = VoteConfig(min_votes=2)
    p = torch.tensor([1.0, 1.0, 1.0])
    state = VoteState.zeros_like(p)
    for obs in ([3.0, 0.0, 1.0], [3.0, 0.0, 1.0]):
        p, moved = apply_vote(p, state, torch.tensor(obs), cfg)
    assert moved.tolist() == [True, True, False]
    assert p.tolist() == pytest.approx([2.0, 0.5, 1.0])
    assert state.n.tolist() == [0.0, 0.0, 2.0]


@pytest.mark.parametrize(
    "bad", [dict(rule="median"), dict(up_ratio=1.0), dict(min_votes=0), dict(window=2, min_votes=4), dict(keep=2.0)]
)
def test_invalid_knobs_are_refused(bad):
    with pytest.raises(ValueError):
        VoteConfig(**bad)


@pytest.mark.parametrize(
    "knobs",
    [dict(), dict(rule="step", step=0.1), dict(window=12, min_votes=4), dict(up_ratio=0.3, down_ratio=0.5, keep=0.8)],
)
def test_numpy_and_torch_give_the_same_votes(knobs):
    import numpy as np

    cfg = VoteConfig(**knobs)
    gen = torch.Generator().manual_seed(0)
    seq = torch.randn(400, 3, generator=gen) * 0.3 + torch.linspace(1, 3, 400)[:, None]
    seq[50, 0] = math.nan
    seq[51, 1] = math.inf
    p_t = torch.ones(3)
    state_t = VoteState.zeros_like(p_t)
    p_n = np.ones(3, dtype=np.float32)
    state_n = VoteState.zeros_like(p_n)
    commits = 0
    for o in seq:
        p_t, moved_t = apply_vote(p_t, state_t, o, cfg)
        p_n, moved_n = apply_vote(p_n, state_n, o.numpy(), cfg)
        assert moved_t.tolist() == moved_n.tolist()
        assert np.array_equal(p_t.numpy(), p_n)
        for name in "ngls":
            assert np.array_equal(getattr(state_t, name).numpy(), getattr(state_n, name)), name
        commits += int(moved_n.sum())
    assert commits > 15


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"min_votes": 3},
        {"up_ratio": 0.7, "down_ratio": 0.9},
        {"window": 12, "min_votes": 4},
        {"up_ratio": 0.0, "down_ratio": 0.0},
    ],
)
def test_steps_to_decision_is_never_late(knobs):
    """No sequence of fewer observations than steps_to_decision() can make decide() commit or expire
    anything; the extreme sequences (every vote above, every vote below) are the ones that could."""
    from edgeq.quant.ranges import decide, steps_to_decision

    cfg = VoteConfig(**knobs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = torch.randint(0, 40, (5,), generator=gen).float()
        g = torch.floor(torch.rand(5, generator=gen) * (n + 1))
        l = torch.floor(torch.rand(5, generator=gen) * (n - g + 1))
        state = VoteState(n, g, l, torch.zeros(5))
        if bool(decide(torch.zeros(5), VoteState(n.clone(), g.clone(), l.clone(), torch.zeros(5)), cfg)[1].any()):
            continue  # a state decide() would already have acted on never waits
        if cfg.window and bool((n >= cfg.window).any()):
            continue
        m = steps_to_decision(state, cfg)
        assert m >= 1
        for above in (True, False):
            for k in range(1, m):
                trial = VoteState(n + k, g + (k if above else 0), l + (0 if above else k), torch.zeros(5))
                moved = decide(torch.zeros(5), trial, cfg)[1]
                assert not bool(moved.any()), (n, g, l, m, k, above)
                if cfg.window:
                    assert not bool((trial.n >= cfg.window).any())


def _random_config(gen: torch.Generator):
    from edgeq.quant.ranges import VoteConfig

    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=gen))]  # noqa: E731
    min_votes = pick([1, 2, 3, 8])
    return VoteConfig(
        up_ratio=pick([0.0, 0.5, 0.7]),
        down_ratio=pick([0.5, 0.7, 0.9]),
        min_votes=min_votes,
        window=pick([0, min_votes, 3 * min_votes]),
        rule=pick(["mean", "step"]),
        keep=pick([0.0, 0.5, 0.9]),
        step=pick([0.05, 0.2]),
    )


@pytest.mark.parametrize("seed", range(12))
def test_three_implementations_of_the_rule_agree_with_the_reference_on_random_votes(seed):
    """ScalarVotes (Python floats), ChannelVotes (in-place NumPy) and LazyVotes (torch, counted
    lazily) against apply_vote, observation by observation: the same commits at the same steps,
    the same committed values up to float32 rounding (the scalar route blends in double before
    rounding to float32; the lazy route sums votes counted together in another order), the same
    vote counts at the end. Random knobs, shapes (one value, a [low, high] pair, channels), NaN
    and inf observations."""
    from edgeq.quant.ranges import ChannelVotes, LazyVotes, ScalarVotes, VoteState, apply_vote

    gen = torch.Generator().manual_seed(seed)
    config = _random_config(gen)
    rows, columns = [(1, 1), (2, 1), (1, 7), (2, 5)][seed % 4]
    start = torch.randn(rows, columns, generator=gen).abs() + 0.5
    reference, ref_state = start.clone(), VoteState.zeros_like(start)
    kinds = [ChannelVotes, LazyVotes] + ([ScalarVotes] if columns == 1 else [])
    trackers = []
    for kind in kinds:
        committed, counts = start.clone(), torch.zeros(rows, columns)
        state = VoteState(*(torch.zeros(rows, columns) for _ in range(4)))
        trackers.append((kind(config, committed, state, counts), committed, state, counts))
    total = torch.zeros(rows, columns)
    for step in range(400):
        obs = start * torch.exp(torch.randn(rows, columns, generator=gen) * 0.5)
        if step % 37 == 5:
            obs[0, 0] = math.nan
        if step % 53 == 7:
            obs[-1, -1] = math.inf
        reference, moved = apply_vote(reference, ref_state, obs, config)
        total += moved
        for tracker, committed, _, counts in trackers:
            tracker.observe(obs.clone())
            assert torch.equal(counts, total), (type(tracker).__name__, step)
            assert torch.allclose(committed, reference, rtol=1e-6, atol=0), (type(tracker).__name__, step)
    assert total.sum() > 0
    for tracker, _, state, _ in trackers:
        tracker.flush()
        for name in "ngl":
            assert torch.equal(getattr(state, name), getattr(ref_state, name)), (type(tracker).__name__, name)
        # Sums of votes counted together may round in another order.
        assert torch.allclose(state.s, ref_state.s, rtol=1e-5), type(tracker).__name__
