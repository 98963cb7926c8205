"""``AdaptiveRangeFakeQuantize``: the voting range tracker as a PT2E fake-quant.

PT2E builds it from a ``QuantizationSpec`` like any torchao fake-quant, and
``convert_pt2e`` reads its ``calculate_qparams()``, ``dtype``, ``qscheme``,
``quant_min``/``quant_max`` and ``ch_axis`` to emit the quantize/dequantize
ops, so the grid the model trained against is the grid the program ships.

Life cycle of the committed range:

1. *calibration*: the first observations (before :meth:`start_tracking`)
   widen the committed range to the min/max over the calibration batches;
2. *tracking*: each observation casts a vote (:func:`edgeq.quant.ranges.apply_vote`);
   the grid moves only on a commit;
3. *frozen*: ``disable_observer()``; the grid never moves again.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
from torchao.quantization.pt2e.observer import UniformQuantizationObserverBase

from edgeq.quant.ranges import VoteConfig, VoteState, accumulate, decide, steps_to_decision

_PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)
_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)
_DEFAULT_RANGES = {
    torch.int8: (-128, 127),
    torch.uint8: (0, 255),
    torch.int16: (-(2**15), 2**15 - 1),
    torch.uint16: (0, 2**16 - 1),
    torch.int32: (-(2**31), 2**31 - 1),
}

UNINITIALIZED, CALIBRATING, TRACKING = 0, 1, 2
# Most observations a tracker holds before counting them (bounds the memory
# of the lazy count; the count is exact at any bound).
_MAX_PENDING = 64


class AdaptiveRangeFakeQuantize(FakeQuantizeBase):
    """Fake-quantize against a committed range that moves only by majority vote.

    Args:
        dtype, quant_min, quant_max, qscheme, ch_axis, eps: as for torchao's
            ``FakeQuantize``; any integer width works through quant_min/max
            (4-bit weights: ``dtype=torch.int8, quant_min=-7, quant_max=7``).
        up_ratio, down_ratio, min_votes, window, rule, keep, step: the
            method's knobs, see :class:`edgeq.quant.ranges.VoteConfig`.
        reduce_distributed: under ``torch.distributed``, reduce each
            observation across ranks before it votes, so that every rank
            commits the same ranges.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    #: run the rule in NumPy on the CPU (False: in torch, as on a GPU)
    cpu_numpy: bool = True

    def __init__(
        self,
        dtype: torch.dtype = torch.int8,
        quant_min: int | None = None,
        quant_max: int | None = None,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        ch_axis: int = 0,
        eps: float = 2**-12,
        is_dynamic: bool = False,
        up_ratio: float = VoteConfig.up_ratio,
        down_ratio: float = VoteConfig.down_ratio,
        min_votes: int = VoteConfig.min_votes,
        window: int = VoteConfig.window,
        rule: str = VoteConfig.rule,
        keep: float = VoteConfig.keep,
        step: float = VoteConfig.step,
        reduce_distributed: bool = True,
        **unused,
    ) -> None:
        super().__init__()
        if is_dynamic:
            raise ValueError("AdaptiveRangeFakeQuantize tracks static ranges; use it for static specs only")
        default_min, default_max = _DEFAULT_RANGES.get(dtype, (-128, 127))
        self.has_customized_qrange = quant_min is not None and quant_max is not None
        self.quant_min = int(default_min if quant_min is None else quant_min)
        self.quant_max = int(default_max if quant_max is None else quant_max)
        if not self.quant_min <= 0 <= self.quant_max or self.quant_min >= self.quant_max:
            raise ValueError(f"quant range [{self.quant_min}, {self.quant_max}] must contain 0 and be non-empty")
        self.dtype = dtype
        self.qscheme = qscheme
        self.ch_axis = ch_axis if qscheme in _PER_CHANNEL else -1
        self.is_dynamic = False
        self.reduce_distributed = reduce_distributed
        self.config = VoteConfig(
            up_ratio=up_ratio,
            down_ratio=down_ratio,
            min_votes=min_votes,
            window=window,
            rule=rule,
            keep=keep,
            step=step,
        )
        self.register_buffer("eps", torch.tensor([eps], dtype=torch.float32))
        # Rows of `committed`: [absmax] for symmetric schemes, [low, high] otherwise;
        # one column per channel (a single column per tensor).
        rows = 1 if qscheme in _SYMMETRIC else 2
        for name in ("committed", "n", "g", "l", "s", "commit_count"):
            self.register_buffer(name, torch.zeros(rows, 0 if self.ch_axis >= 0 else 1))
        self.register_buffer("mode", torch.tensor(UNINITIALIZED, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
        # Fast-path state outside the buffers (see observe()); a plain dict so
        # that updating it skips nn.Module.__setattr__. Flushed into the
        # buffers before any state_dict is taken.
        self._fast: dict = {}

    # ------------------------------------------------------------------ state
    @property
    def symmetric(self) -> bool:
        return self.qscheme in _SYMMETRIC

    def start_tracking(self) -> None:
        """End calibration: from now on observations vote instead of widening."""
        if int(self.mode) == CALIBRATING:
            self.mode.fill_(TRACKING)
            self._fast.pop("flags", None)

    def enable_observer(self, enabled: bool = True) -> None:
        if not enabled:
            self._flush()
        super().enable_observer(enabled)
        self._fast.pop("flags", None)

    def enable_fake_quant(self, enabled: bool = True) -> None:
        super().enable_fake_quant(enabled)
        self._fast.pop("flags", None)

    def _flags(self) -> tuple[bool, bool, int, str]:
        """(observing, fake-quantizing, mode, route) as Python values, cached:
        reading the buffers costs more than the rest of a per-tensor step."""
        flags = self._fast.get("flags")
        if flags is None:
            mode = int(self.mode)
            route = "general"
            if (
                mode == TRACKING
                and self.cpu_numpy
                and self.committed.device.type == "cpu"
                and not (self.reduce_distributed and dist.is_available() and dist.is_initialized())
            ):
                route = "channels" if self.ch_axis >= 0 else "scalar"
            flags = (bool(self.observer_enabled[0] == 1), bool(self.fake_quant_enabled[0] == 1), mode, route)
            self._fast["flags"] = flags
        return flags

    @torch.no_grad()
    def set_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Replace the committed range (calibration only: e.g. with an outlier-clipping one)."""
        if self.symmetric:
            value = torch.maximum(low.abs(), high.abs()).reshape(1, -1)
        else:
            value = torch.stack([low.reshape(-1), high.reshape(-1)])
        if self.committed.shape != value.shape:
            self._resize(value.shape[1], value.device)
        self.committed.copy_(value.to(self.committed))
        self._fast.clear()
        self._refresh_qparams()

    def commits(self) -> int:
        """How many times any of this tensor's tracked values was committed."""
        return int(self.commit_count.sum())

    def committed_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The committed (min, max), per channel or as one-element tensors."""
        if self.symmetric:
            return -self.committed[0], self.committed[0]
        return self.committed[0], self.committed[1]

    def _resize(self, columns: int, device: torch.device) -> None:
        rows = self.committed.shape[0]
        for name in ("committed", "n", "g", "l", "s", "commit_count"):
            setattr(self, name, torch.zeros(rows, columns, device=device))
        self._fast.clear()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Per-channel buffers are sized on the first observation; take the saved size.
        saved = state_dict.get(prefix + "committed")
        if saved is not None and saved.shape != self.committed.shape:
            self._resize(saved.shape[1], saved.device)
        for name in ("scale", "zero_point"):
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(incoming))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        self._fast.clear()

    # ------------------------------------------------------------ observation
    def _observe(self, x: torch.Tensor) -> torch.Tensor:
        """This step's observation: rows like `committed`, reduced across ranks."""
        x = x.detach()
        if self.ch_axis >= 0:
            dims = [d for d in range(x.dim()) if d != self.ch_axis % x.dim()]
            if self.symmetric:
                obs = x.abs().amax(dim=dims).unsqueeze(0)
            else:
                obs = torch.stack(torch.aminmax(x.transpose(0, self.ch_axis).flatten(1), dim=1))
        elif self.symmetric:
            obs = x.abs().max().reshape(1, 1)
        else:
            obs = torch.stack(torch.aminmax(x)).reshape(2, 1)
        obs = obs.float()
        if self.reduce_distributed and dist.is_available() and dist.is_initialized():
            # Max-reduce upper bounds and absmax, min-reduce lower bounds; a
            # rank's non-finite value drops out of the reduction.
            signs = torch.ones_like(obs)
            if not self.symmetric:
                signs[0] = -1.0
            signed = torch.where(torch.isfinite(obs), obs * signs, torch.full_like(obs, -torch.inf))
            dist.all_reduce(signed, op=dist.ReduceOp.MAX)
            obs = signed * signs
        return obs

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        obs = self._observe(x)
        mode = self._flags()[2]
        if mode == TRACKING:
            self._track(obs)
            return
        if self.committed.shape != obs.shape:
            self._resize(obs.shape[1], obs.device)
        finite = torch.isfinite(obs)
        if mode == UNINITIALIZED:
            widened = obs
        elif self.symmetric:
            widened = torch.maximum(self.committed, obs)
        else:
            widened = torch.stack([torch.minimum(self.committed[0], obs[0]), torch.maximum(self.committed[1], obs[1])])
        previous = self.committed if mode == CALIBRATING else torch.zeros_like(obs)
        self.committed.copy_(torch.where(finite, widened, previous))
        self.mode.fill_(CALIBRATING)
        self._fast.pop("flags", None)
        self._refresh_qparams()

    # On the CPU the rule runs at once, on Python floats or NumPy views. In
    # torch (a GPU) votes are counted lazily, and exactly:
    # ranges.steps_to_decision() says how many more observations must arrive
    # before any value could commit (or expire); until then every decision
    # would be "no change", so the observations wait in a list and are counted
    # together when that many have arrived, against the same committed value
    # they would have met one by one: fewer host synchronisations.
    def _track(self, obs: torch.Tensor) -> None:
        fast = self._fast
        if obs.device.type == "cpu" and self.cpu_numpy:
            if obs.shape[1] == 1:
                self._track_scalar(obs.view(-1).tolist())
            else:
                self._track_channels(obs.numpy())
            return
        pending = fast.get("pending")
        if pending is None:
            pending = fast["pending"] = []
        pending.append(obs)
        due = fast.get("due")
        if due is None:
            due = fast["due"] = self._steps_to_decision()
        if len(pending) >= due:
            self._decide()

    def _track_scalar(self, values: list[float]) -> None:
        """A per-tensor range is one or two numbers: the rule runs on Python
        floats, cheaper than any array library at that size. Same rule as
        edgeq.quant.ranges (tests hold the two to the same commits); the buffers are
        brought up to date on every commit and before any state_dict."""
        fast = self._fast
        st = fast.get("scalar")
        if st is None:
            st = fast["scalar"] = [self.committed.view(-1).tolist()] + [
                getattr(self, k).view(-1).tolist() for k in "ngls"
            ]
        p, n, g, l, s = st  # noqa: E741 (the spec's names)
        cfg = self.config
        moved = None
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
                moved = moved or []
                moved.append(i)
            elif cfg.window and n[i] >= cfg.window:
                n[i] = g[i] = l[i] = s[i] = 0
        if moved:
            committed, counts = self.committed.view(-1), self.commit_count.view(-1)
            for i in moved:
                committed[i] = p[i]
                counts[i] += 1
            self._refresh_qparams()

    def _track_channels(self, obs: np.ndarray) -> None:
        """Per-channel ranges on the CPU: the rule of edgeq.quant.ranges for one
        observation, written as in-place NumPy ufuncs on views of the buffers
        and preallocated scratch arrays (a commit somewhere among a weight's
        channels is due on most steps, so there is nothing to defer; what
        costs is the number of array operations, so this is the fewest)."""
        ch = self._fast.get("ch")
        if ch is None:
            # NumPy views of the buffers themselves: the buffers are always current.
            committed = self.committed.numpy()
            st = VoteState(*(getattr(self, k).numpy() for k in "ngls"))
            ch = self._fast["ch"] = (
                committed,
                st,
                self.commit_count.numpy(),
                np.empty(committed.shape, np.float32),
                np.empty(committed.shape, np.float32),
                np.empty(committed.shape, bool),
                np.empty(committed.shape, bool),
                np.empty(committed.shape, bool),
            )
        p, st, counts, t1, t2, up, down, mask = ch
        cfg = self.config
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
        moved = mask.any()
        if moved:
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
            counts += mask
        reset = mask | (st.n >= cfg.window) if cfg.window else mask
        if moved or (cfg.window and reset.any()):
            for votes in (st.n, st.g, st.l, st.s):
                np.copyto(votes, 0.0, where=reset)  # type: ignore[arg-type]  # NumPy views on the CPU path
        if moved:
            self._update_channel_scale(p)

    def _update_channel_scale(self, committed: np.ndarray) -> None:
        if self._signed_symmetric_per_channel() and self.scale.shape == committed.shape[1:]:
            # calculate_qparams' fast branch in NumPy, in place on the scale
            # buffer (the zero point stays 0).
            scale = self.scale.numpy()
            np.divide(np.clip(committed[0], 0, None), float(self.quant_max - self.quant_min) / 2, out=scale)
            np.maximum(scale, self.eps.numpy(), out=scale)
        else:
            self._refresh_qparams()

    def _votes(self) -> VoteState:
        return VoteState(self.n, self.g, self.l, self.s)

    def _steps_to_decision(self) -> int:
        return min(steps_to_decision(self._votes(), self.config), _MAX_PENDING)

    def _flush(self) -> None:
        """Bring the buffers up to date: count the waiting observations into n,
        g, l, s (no decision: none can be due), write the scalar path's state."""
        fast = self._fast
        scalar = fast.get("scalar")
        if scalar is not None:
            for name, values in zip("ngls", scalar[1:]):
                getattr(self, name).view(-1).copy_(torch.tensor(values, dtype=torch.float32))
        pending = fast.get("pending")
        if not pending:
            return
        accumulate(self.committed, self._votes(), torch.stack(pending))
        fast["pending"] = []
        if fast.get("due") is not None:
            fast["due"] = max(1, fast["due"] - len(pending))

    def _decide(self) -> None:
        self._flush()
        new, moved = decide(self.committed, self._votes(), self.config)
        if bool(moved.any()):
            self.committed.copy_(new)
            self.commit_count += moved
            self._refresh_qparams()
        self._fast["due"] = self._steps_to_decision()

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() replace the buffers: count waiting votes, then drop
        # views and caches of the old buffers.
        self._flush()
        self._fast.clear()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Saved n, g, l, s always include every observation so far.
        self._flush()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    # ----------------------------------------------------------------- qparams
    def _scalar_qparams(self) -> tuple[np.float32, int] | None:
        """calculate_qparams() for a per-tensor range with a signed dtype, in
        float32 NumPy scalars: the same operations in the same precision as
        torchao's tensor code, without its dozen tensor allocations (it runs on
        every commit of an activation range). None where it does not apply."""
        if (
            self.ch_axis >= 0
            or self.dtype in (torch.uint8, torch.quint8, torch.uint16)
            or self.committed.device.type != "cpu"
        ):
            return None
        f32 = np.float32
        if self.symmetric:
            absmax = f32(self.committed.view(-1)[0].item())
            if not np.isfinite(absmax):
                return None
            scale = max(max(absmax, f32(0.0)) / f32(float(self.quant_max - self.quant_min) / 2), f32(self.eps.item()))
            return scale, 0
        lo, hi = (f32(v) for v in self.committed.view(-1).tolist())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
            return None
        lo, hi = min(lo, f32(0.0)), max(hi, f32(0.0))
        scale = max((hi - lo) / f32(self.quant_max - self.quant_min), f32(self.eps.item()))
        zero_point = self.quant_min - int(np.round(lo / scale))
        return scale, min(max(zero_point, self.quant_min), self.quant_max)

    def _refresh_qparams(self) -> None:
        scalar = self._scalar_qparams() if self.scale.shape == (1,) and self.cpu_numpy else None
        if scalar is not None:
            self.scale.view(-1)[0] = float(scalar[0])
            self.zero_point.view(-1)[0] = scalar[1]
            return
        scale, zero_point = self.calculate_qparams()
        if self.scale.shape == scale.shape:
            # In place: runs on most steps for per-channel weights, and
            # nn.Module.__setattr__ costs more than the copy.
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        else:
            self.scale = scale.to(self.committed.device)
            self.zero_point = zero_point.to(device=self.committed.device, dtype=torch.int32)
            self._fast.pop("qp", None)

    def _signed_symmetric_per_channel(self) -> bool:
        return self.symmetric and self.ch_axis >= 0 and self.dtype not in (torch.uint8, torch.quint8, torch.uint16)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the committed range (PyTorch's min/max formulas)."""
        if self._signed_symmetric_per_channel():
            # torchao's symmetric branch reduced to what it computes for a
            # signed dtype and a range [-absmax, absmax]: the same float ops,
            # without a dozen intermediate tensors (this runs on most steps).
            absmax = self.committed[0].clamp(min=0)
            scale = torch.max(absmax / (float(self.quant_max - self.quant_min) / 2), self.eps)
            return scale, torch.zeros(scale.shape, dtype=torch.int64, device=scale.device)
        lo, hi = self.committed_range()
        if self.ch_axis < 0:
            lo, hi = lo.reshape(()), hi.reshape(())
        # Same arithmetic as torchao's observers, so convert_pt2e reproduces
        # exactly the grid that training saw. Private and called on another
        # class: torchao exposes this formula only through an observer
        # instance's calculate_qparams(), which reads the observer's own
        # min/max buffers, not a committed range; tests/test_upstream.py pins
        # its signature and tests/test_fake_quant.py its numbers.
        return UniformQuantizationObserverBase._calculate_qparams(self, lo, hi)

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        observing, fake_quantizing, mode, route = self._flags()
        if observing:
            # The usual training step (tracking, on the CPU, one process) goes
            # straight from one reduction kernel to the rule; everything else
            # through observe(). A per-tensor range reads its bounds as Python
            # floats directly: stacking them into an observation tensor first
            # would double the cost of the step.
            if route == "scalar":
                lo, hi = torch.aminmax(x.detach())
                self._track_scalar([max(-lo.item(), hi.item())] if self.symmetric else [lo.item(), hi.item()])
            elif route == "channels":
                self._track_channels(self._observe(x).numpy())
            else:
                self.observe(x)
                mode = self._flags()[2]  # the first observation ends UNINITIALIZED
        if fake_quantizing and mode != UNINITIALIZED:
            qp = self._fast.get("qp")
            if qp is None:
                qp = self._fast["qp"] = (self.scale, self.zero_point)
            if self.ch_axis >= 0:
                x = torch.fake_quantize_per_channel_affine(
                    x, qp[0], qp[1], self.ch_axis, self.quant_min, self.quant_max
                )
            else:
                x = torch.fake_quantize_per_tensor_affine(x, qp[0], qp[1], self.quant_min, self.quant_max)
        return x

    def extra_repr(self) -> str:
        lo, hi = self.committed_range()
        return (
            f"dtype={self.dtype}, qscheme={self.qscheme}, ch_axis={self.ch_axis}, "
            f"quant=[{self.quant_min}, {self.quant_max}], mode={int(self.mode)}, "
            f"commits={self.commits()}, {self.config}"
        )


def vote_kwargs(vote: VoteConfig) -> dict:
    """The tracker's knobs as AdaptiveRangeFakeQuantize keyword arguments."""
    return {k: getattr(vote, k) for k in ("up_ratio", "down_ratio", "min_votes", "window", "rule", "keep", "step")}


def start_tracking(model: torch.nn.Module) -> int:
    """End calibration in every adaptive fake-quant of ``model``; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, AdaptiveRangeFakeQuantize):
            module.start_tracking()
            count += 1
    return count
