"""The voting range tracker of ``shared/spec/adaptive-ranges.md`` (claims 1-6).

A committed value ``P`` (one per tracked bound, vectorised over channels)
moves only when a clear majority of the observations since the last commit
disagree with it, then the vote starts over. :func:`apply_vote` applies one
observation to a state and is the rule's reference. The observer in
:mod:`edgeq.quant.fake_quant` runs one of three implementations of it (below):
Python floats for a per-tensor range, in-place NumPy for per-channel ranges on
the CPU, lazily counted torch on a GPU; one differential test holds all three
to the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from edgeq.configs import RULES, Rule, VoteConfig

__all__ = [
    "RULES", "ChannelVotes", "LazyVotes", "Rule", "ScalarVotes", "VoteConfig", "VoteState", "Votes", "accumulate",
    "apply_vote", "decide", "steps_to_decision",
]  # fmt: skip

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


# --------------------------------------------------------------------------------------------
# Three implementations of the rule for a tracker's hot loop, one interface: each holds the
# committed values, the vote state and the commit counts of one tracked tensor (views of its
# observer's buffers), takes one observation at a time (rows like the committed array, one
# column per channel) and says whether anything committed. They differ only in speed;
# tests/test_ranges.py feeds all three and apply_vote the same random vote sequences.


class Votes(Protocol):
    def observe(self, observation: torch.Tensor) -> bool:
        """Count one observation; commit where the votes call for it. True when a value moved."""
        ...

    def flush(self) -> None:
        """Bring the vote buffers up to date (before a state_dict, a device move or a freeze)."""
        ...


class ScalarVotes:
    """A per-tensor range is one or two numbers: the rule on Python floats, cheaper than any array
    library at that size. The buffers are written on every commit and by :meth:`flush`."""

    def __init__(self, config: VoteConfig, committed: torch.Tensor, state: VoteState, counts: torch.Tensor) -> None:
        self.config, self.committed, self.state, self.counts = config, committed, state, counts
        self.p = committed.view(-1).tolist()
        self.votes = [getattr(state, k).view(-1).tolist() for k in "ngls"]

    def observe(self, observation: torch.Tensor) -> bool:
        return self.observe_values(observation.reshape(-1).tolist())

    def observe_values(self, values: list[float]) -> bool:
        p = self.p
        n, g, l, s = self.votes  # noqa: E741 (the spec's names)
        cfg = self.config
        moved: list[int] = []
        for i, o in enumerate(values):
            if o - o == 0.0:  # finite: NaN and inf cast no vote
                n[i] += 1
                # Summed in float32 like the buffer that holds it, so a
                # checkpoint (which saves the buffers) resumes exactly.
                s[i] = float(np.float32(s[i] + o))
                if o > p[i]:
                    g[i] += 1
                elif o < p[i]:
                    l[i] += 1
            if n[i] < cfg.min_votes:
                continue
            up = g[i] > cfg.up_ratio * n[i]
            if up or l[i] > cfg.down_ratio * n[i]:
                if cfg.rule == "mean":
                    blend = cfg.keep * p[i] + (1.0 - cfg.keep) * (s[i] / n[i])
                    new = max(p[i], blend) if up else min(p[i], blend)
                else:
                    delta = cfg.step * max(abs(p[i]), cfg.eps)
                    new = p[i] + delta if up else p[i] - delta
                p[i] = float(np.float32(new))  # what the float32 buffer holds
                n[i] = g[i] = l[i] = s[i] = 0
                moved.append(i)
            elif cfg.window and n[i] >= cfg.window:
                n[i] = g[i] = l[i] = s[i] = 0
        if moved:
            committed, counts = self.committed.view(-1), self.counts.view(-1)
            for i in moved:
                committed[i] = p[i]
                counts[i] += 1
        return bool(moved)

    def flush(self) -> None:
        for name, values in zip("ngls", self.votes):
            getattr(self.state, name).view(-1).copy_(torch.tensor(values, dtype=torch.float32))


class ChannelVotes:
    """Per-channel ranges on the CPU: in-place NumPy ufuncs on views of the buffers and
    preallocated scratch arrays (a commit somewhere among a weight's channels is due on most
    steps, so there is nothing to defer; what costs is the number of array operations, so this
    is the fewest). The buffers are always current."""

    def __init__(self, config: VoteConfig, committed: torch.Tensor, state: VoteState, counts: torch.Tensor) -> None:
        self.config = config
        self.p = committed.numpy()
        self.state = VoteState(*(getattr(state, k).numpy() for k in "ngls"))
        self.counts = counts.numpy()
        shape = self.p.shape
        self.t1, self.t2 = np.empty(shape, np.float32), np.empty(shape, np.float32)
        self.up, self.down, self.mask = np.empty(shape, bool), np.empty(shape, bool), np.empty(shape, bool)

    def observe(self, observation: torch.Tensor | np.ndarray) -> bool:
        obs = observation.numpy() if isinstance(observation, torch.Tensor) else observation
        p, st, cfg = self.p, self.state, self.config
        t1, up, down, mask = self.t1, self.up, self.down, self.mask
        if np.isfinite(obs).all():
            st.n += 1
            np.greater(obs, p, out=mask)
            st.g += mask
            np.less(obs, p, out=mask)
            st.l += mask
            st.s += obs
        else:
            accumulate(p, st, obs)
        np.multiply(st.n, cfg.up_ratio, out=t1)
        np.greater(st.g, t1, out=up)
        np.multiply(st.n, cfg.down_ratio, out=t1)
        np.greater(st.l, t1, out=down)
        np.greater_equal(st.n, cfg.min_votes, out=mask)  # ready
        up &= mask
        down &= mask
        np.logical_or(up, down, out=mask)  # commits (up wins a tie, as in decide)
        down &= ~up
        moved = bool(mask.any())
        if moved:
            self._commit(up, down)
            self.counts += mask
        reset = mask | (st.n >= cfg.window) if cfg.window else mask
        if moved or (cfg.window and reset.any()):
            for votes in (st.n, st.g, st.l, st.s):
                np.copyto(votes, 0.0, where=reset)  # type: ignore[arg-type]  # NumPy views on the CPU path
        return moved

    def _commit(self, up: np.ndarray, down: np.ndarray) -> None:
        p, st, cfg, t1, t2 = self.p, self.state, self.config, self.t1, self.t2
        if cfg.rule == "mean":
            np.maximum(st.n, 1.0, out=t1)
            np.divide(st.s, t1, out=t1)
            t1 *= 1.0 - cfg.keep
            np.multiply(p, cfg.keep, out=t2)
            t1 += t2  # blend = keep * P + (1 - keep) * mean
            np.maximum(p, t1, out=t2)
            np.copyto(p, t2, where=up)
            np.minimum(p, t1, out=t2)
            np.copyto(p, t2, where=down)
        else:
            np.abs(p, out=t1)
            np.maximum(t1, cfg.eps, out=t1)
            t1 *= cfg.step  # delta
            np.add(p, t1, out=t2)
            np.copyto(p, t2, where=up)
            np.subtract(p, t1, out=t2)
            np.copyto(p, t2, where=down)

    def flush(self) -> None:
        pass  # views: nothing waits


#: most observations the lazy route holds before counting them (bounds its memory; exact at any bound)
MAX_PENDING = 64


class LazyVotes:
    """The rule in torch (a GPU), counted lazily and exactly: :func:`steps_to_decision` says how
    many more observations must arrive before any value could commit (or expire); until then
    every decision would be "no change", so the observations wait in a list and are counted
    together when that many have arrived, against the same committed value they would have met
    one by one: fewer host synchronisations."""

    def __init__(self, config: VoteConfig, committed: torch.Tensor, state: VoteState, counts: torch.Tensor) -> None:
        self.config, self.committed, self.state, self.counts = config, committed, state, counts
        self.pending: list[torch.Tensor] = []
        self.due: int | None = None

    def observe(self, observation: torch.Tensor) -> bool:
        self.pending.append(observation)
        if self.due is None:
            self.due = self._steps()
        if len(self.pending) < self.due:
            return False
        self.flush()
        new, moved = decide(self.committed, self.state, self.config)
        any_moved = bool(moved.any())
        if any_moved:
            self.committed.copy_(new)  # type: ignore[arg-type]  # torch on this route
            self.counts += moved  # type: ignore[arg-type]  # torch on this route
        self.due = self._steps()
        return any_moved

    def flush(self) -> None:
        """Count the waiting observations into the votes (no decision: none can be due yet)."""
        if not self.pending:
            return
        accumulate(self.committed, self.state, torch.stack(self.pending))
        if self.due is not None:
            self.due = max(1, self.due - len(self.pending))
        self.pending = []

    def _steps(self) -> int:
        return min(steps_to_decision(self.state, self.config), MAX_PENDING)
