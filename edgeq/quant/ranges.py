"""The voting range tracker of ``shared/spec/adaptive-ranges.md`` (claims 1-6).

A committed value ``P`` (one per tracked bound, vectorised over channels)
moves only when a clear majority of the observations since the last commit
disagree with it, then the vote starts over. :func:`apply_vote` applies one
observation to a state and is the rule's reference; :func:`decide` is the
commit it makes. The fake-quantize module in :mod:`edgeq.quant.fake_quant`
calls :func:`decide` for the general path but keeps two fast routes of its own
(scalar bounds, per-channel NumPy bounds) that tests/test_ranges.py and
tests/test_fake_quant.py hold equal to this reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgeq.configs import RULES, Rule, VoteConfig

__all__ = ["RULES", "Rule", "VoteConfig", "VoteState", "accumulate", "apply_vote", "decide", "steps_to_decision"]

Array = torch.Tensor | np.ndarray


@dataclass
class VoteState:
    """Votes since the last commit, one entry per tracked value.

    The arrays are torch tensors or NumPy arrays; the rule below works on
    either, so the fake-quant can vote in NumPy on the CPU (small arrays cost
    a microsecond an operation there, a few in torch) and in torch on a GPU.
    """

    n: Array  # observations
    g: Array  # observations greater than P
    l: Array  # observations smaller than P  # noqa: E741 (the spec's name)
    s: Array  # sum of observations

    @classmethod
    def zeros_like(cls, committed: Array) -> VoteState:
        def zero() -> Array:
            if isinstance(committed, torch.Tensor):
                return torch.zeros_like(committed, dtype=torch.float32)
            return np.zeros_like(committed, dtype=np.float32)

        return cls(zero(), zero(), zero(), zero())


def _xp(array: Array):
    return torch if isinstance(array, torch.Tensor) else np


def accumulate(committed: Array, state: VoteState, observation: Array) -> None:
    """Count observations' votes into ``state`` (in place); non-finite ones cast none.

    ``observation`` has the shape of ``committed`` (one step) or a leading
    axis of steps. Counting several steps at once is exact as long as no
    commit could fall between them (fewer than ``min_votes`` votes), because
    the votes compare against the same committed value.
    """
    xp = _xp(committed)
    obs = observation
    if obs.ndim == committed.ndim:
        obs = obs[None]
    valid = xp.isfinite(obs)
    obs = xp.where(valid, obs, committed)  # an invalid vote equals P: neither above nor below
    state.n += valid.sum(0)
    state.g += (obs > committed).sum(0)
    state.l += (obs < committed).sum(0)
    state.s += xp.where(valid, obs, 0.0).sum(0)


def decide(committed: Array, state: VoteState, config: VoteConfig) -> tuple[Array, Array]:
    """Commit where the votes so far call for it; reset those votes (claim 6) and stale ones."""
    xp = _xp(committed)
    p = committed
    ready = state.n >= config.min_votes
    # g / n > ratio, written without a division so nothing is computed twice.
    up = ready & (state.g > config.up_ratio * state.n)
    down = ready & ~up & (state.l > config.down_ratio * state.n)
    commits = up | down
    stale = (state.n >= config.window) if config.window else None
    if not bool(commits.any()) and (stale is None or not bool(stale.any())):
        # The usual step once the vote is split: nothing moves, nothing resets.
        return committed, commits
    n_safe = xp.clip(state.n, 1.0, None)
    if config.rule == "mean":
        blend = config.keep * p + (1.0 - config.keep) * (state.s / n_safe)
        raised, lowered = xp.maximum(p, blend), xp.minimum(p, blend)
    else:
        delta = config.step * xp.clip(abs(p), config.eps, None)
        raised, lowered = p + delta, p - delta
    new_p = xp.where(up, raised, xp.where(down, lowered, p))
    reset = commits if stale is None else commits | stale
    keep_votes = ~reset
    state.n *= keep_votes
    state.g *= keep_votes
    state.l *= keep_votes
    state.s *= keep_votes
    return new_p.astype(committed.dtype) if xp is np else new_p.to(committed.dtype), commits


def steps_to_decision(state: VoteState, config: VoteConfig) -> int:
    """How many more observations can arrive before :func:`decide` could change anything.

    Until then no value can commit or expire, whatever the observations are:
    a commit up needs ``g + m > up_ratio * (n + m)`` after ``m`` more votes,
    one down ``l + m > down_ratio * (n + m)``, either needs ``n + m >=
    min_votes``, and expiry ``n + m >= window``. The answer is one step early
    rather than late where floating point rounding could matter, and at least
    1. Counting the observations in between together is exact (see
    :func:`accumulate`), and that is what makes the tracker cheap per step.
    """
    xp = _xp(state.n)
    n = state.n
    need = xp.clip(config.min_votes - n, 1, None)
    up = (config.up_ratio * n - state.g) / (1.0 - config.up_ratio)
    down = (config.down_ratio * n - state.l) / (1.0 - config.down_ratio)
    earliest = xp.maximum(need, xp.clip(xp.floor(xp.minimum(up, down)), 1, None))
    if config.window:
        earliest = xp.minimum(earliest, xp.clip(config.window - n, 1, None))
    return max(1, int(earliest.min()))


def apply_vote(
    committed: Array,
    state: VoteState,
    observation: Array,
    config: VoteConfig,
) -> tuple[Array, Array]:
    """Apply one observation to ``state`` (in place) and return the new P.

    Returns ``(committed, commits)`` where ``commits`` is a bool mask of the
    values that moved this step. Non-finite observations cast no vote.
    Works on torch tensors and NumPy arrays alike.
    """
    accumulate(committed, state, observation)
    return decide(committed, state, config)
