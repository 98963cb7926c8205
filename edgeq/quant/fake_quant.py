"""The voting range tracker as a torchao observer, and the PT2E fake-quant that holds it.

As in torchao's ``FakeQuantize``, the fake-quant holds an observer
(``activation_post_process``, an :class:`AdaptiveRangeObserver`) and asks it for
its qparams. The observer's committed range is its ``min_val``/``max_val``, and
its ``calculate_qparams()`` is torchao's own formula on them, so the grid the
model trained against is the grid ``convert_pt2e`` emits and the program ships.

Life cycle of the committed range:

1. *calibration*: the first observations (before :meth:`start_tracking`)
   widen the committed range to the min/max over the calibration batches;
2. *tracking*: each observation casts a vote (the rule of :mod:`edgeq.quant.ranges`,
   run by one of its three implementations); the grid moves only on a commit;
3. *frozen*: ``disable_observer()``; the grid never moves again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
from torchao.quantization.pt2e.observer import UniformQuantizationObserverBase

from edgeq.quant.ranges import ChannelVotes, LazyVotes, ScalarVotes, VoteConfig, Votes, VoteState

_PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)
_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)
_UNSIGNED = (torch.uint8, torch.quint8, torch.uint16)
_BUFFERS = ("committed", "n", "g", "l", "s", "commit_count")

UNINITIALIZED, CALIBRATING, TRACKING = 0, 1, 2


class AdaptiveRangeObserver(UniformQuantizationObserverBase):
    """A torchao observer whose range moves only by majority vote.

    ``committed`` holds the tracked values: one row ``[absmax]`` for symmetric schemes, rows
    ``[low, high]`` otherwise, one column per channel; ``min_val``/``max_val`` read it.
    ``scale``/``zero_point`` are refreshed on every commit (what the fake-quant applies).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    committed: torch.Tensor
    #: run the rule in NumPy on the CPU (False: in torch, as on a GPU)
    cpu_numpy: bool = True

    def __init__(
        self,
        dtype: torch.dtype = torch.int8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        quant_min: int | None = None,
        quant_max: int | None = None,
        ch_axis: int = 0,
        eps: float = 2**-12,
        vote: VoteConfig | None = None,
        reduce_distributed: bool = True,
        scale_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, eps=eps)
        if not self.quant_min <= 0 <= self.quant_max or self.quant_min >= self.quant_max:
            raise ValueError(f"quant range [{self.quant_min}, {self.quant_max}] must contain 0 and be non-empty")
        self.ch_axis = ch_axis if qscheme in _PER_CHANNEL else -1
        self.config = vote or VoteConfig()
        self.reduce_distributed = reduce_distributed
        #: scales rounded to this dtype and back (bf16 where the program stores them so)
        self.scale_dtype = scale_dtype
        rows = 1 if qscheme in _SYMMETRIC else 2
        for name in _BUFFERS:
            self.register_buffer(name, torch.zeros(rows, 0 if self.ch_axis >= 0 else 1))
        self.register_buffer("mode", torch.tensor(UNINITIALIZED, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
        # Caches outside the buffers (tracker, route, qparams); a plain dict so that updating it
        # skips nn.Module.__setattr__. The tracker is flushed into the buffers before any state_dict.
        self._fast: dict[str, Any] = {}

    # ------------------------------------------------------------------ range
    @property
    def symmetric(self) -> bool:
        return self.qscheme in _SYMMETRIC

    @property
    def min_val(self) -> torch.Tensor:
        low = -self.committed[0] if self.symmetric else torch.minimum(self.committed[0], self.committed[1])
        return low.reshape(()) if self.ch_axis < 0 else low

    @property
    def max_val(self) -> torch.Tensor:
        # Each bound of an asymmetric range follows its own votes; on a tensor whose values all sit
        # in a narrow band far from zero (measured: ESPNet's decoder near -6,000 with a spread of
        # a few hundred, step moves of |P| * step) the two can pass each other. The range is then
        # the two bounds in order, and torchao's qparams never see min > max.
        high = self.committed[-1] if self.symmetric else torch.maximum(self.committed[0], self.committed[1])
        return high.reshape(()) if self.ch_axis < 0 else high

    def committed_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The committed (min, max), per channel or as one-element tensors."""
        if self.symmetric:
            return -self.committed[0], self.committed[0]
        return self.min_val.reshape(self.committed[0].shape), self.max_val.reshape(self.committed[1].shape)

    def commits(self) -> int:
        """How many times any of this tensor's tracked values was committed."""
        return int(self.commit_count.sum())

    def initialized(self) -> bool:
        """Whether any observation has set a range yet (cached: a buffer read per step costs)."""
        ready = self._fast.get("ready")
        if ready is None:
            ready = self._fast["ready"] = int(self.mode) != UNINITIALIZED
        return ready

    def start_tracking(self) -> None:
        """End calibration: from now on observations vote instead of widening."""
        if int(self.mode) == CALIBRATING:
            self.mode.fill_(TRACKING)
            self._fast.clear()

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

    def _resize(self, columns: int, device: torch.device) -> None:
        rows = self.committed.shape[0]
        for name in _BUFFERS:
            setattr(self, name, torch.zeros(rows, columns, device=device))
        self._fast.clear()

    # ------------------------------------------------------------ observation
    def _distributed(self) -> bool:
        return self.reduce_distributed and dist.is_available() and dist.is_initialized()

    def _route(self) -> str:
        """How the next observation is counted: "scalar" or "channels" (tracking on the CPU in one
        process: straight from one reduction kernel to the rule), else "general"."""
        route = self._fast.get("route")
        if route is None:
            fast = (
                int(self.mode) == TRACKING
                and self.cpu_numpy
                and self.committed.device.type == "cpu"
                and not self._distributed()
            )
            route = self._fast["route"] = ("channels" if self.ch_axis >= 0 else "scalar") if fast else "general"
        return route

    def _tracker(self) -> Votes:
        tracker = self._fast.get("tracker")
        if tracker is None:
            state = VoteState(self.n, self.g, self.l, self.s)
            if not (self.cpu_numpy and self.committed.device.type == "cpu"):
                cls: type = LazyVotes
            else:
                cls = ScalarVotes if self.committed.shape[1] == 1 and self.ch_axis < 0 else ChannelVotes
            tracker = self._fast["tracker"] = cls(self.config, self.committed, state, self.commit_count)
        return tracker

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
        if self._distributed():
            # Max-reduce upper bounds and absmax, min-reduce lower bounds; a
            # rank's non-finite value drops out of the reduction.
            signs = torch.ones_like(obs)
            if not self.symmetric:
                signs[0] = -1.0
            signed = torch.where(torch.isfinite(obs), obs * signs, torch.full_like(obs, -torch.inf))
            dist.all_reduce(signed, op=dist.ReduceOp.MAX)
            obs = signed * signs
        return obs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No torch.no_grad() here: entering it costs more than a per-tensor step's rule, and every
        # route reads x detached.
        route = self._route()
        if route == "scalar":
            # A per-tensor range reads its bounds as Python floats directly: stacking them into
            # an observation tensor first would double the cost of the step.
            lo, hi = torch.aminmax(x.detach())
            values = [max(-lo.item(), hi.item())] if self.symmetric else [lo.item(), hi.item()]
            moved = self._tracker().observe_values(values)  # type: ignore[attr-defined]
        elif route == "channels":
            moved = self._tracker().observe(self._observe(x))
        else:
            moved = self._observe_general(self._observe(x))
        if moved:
            self._refresh_qparams()
        return x

    @torch.no_grad()
    def _observe_general(self, obs: torch.Tensor) -> bool:
        mode = int(self.mode)
        if mode == TRACKING:
            return self._tracker().observe(obs)
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
        self._fast.clear()
        return True

    def flush(self) -> None:
        """Bring the vote buffers up to date."""
        tracker = self._fast.get("tracker")
        if tracker is not None:
            tracker.flush()

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() replace the buffers: count waiting votes, then drop views and caches.
        self.flush()
        self._fast.clear()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Saved n, g, l, s always include every observation so far.
        self.flush()
        super()._save_to_state_dict(destination, prefix, keep_vars)

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

    # ----------------------------------------------------------------- qparams
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the committed range: torchao's formula on min_val/max_val."""
        if self._signed_symmetric_per_channel():
            # torchao's symmetric branch reduced to what it computes for a signed dtype and a
            # range [-absmax, absmax]: the same float ops, without a dozen intermediate tensors
            # (tests/test_fake_quant.py holds the two equal bit for bit).
            absmax = self.committed[0].clamp(min=0)
            scale = torch.max(absmax / (float(self.quant_max - self.quant_min) / 2), self.eps)
            zero_point = torch.zeros(scale.shape, dtype=torch.int64, device=scale.device)
        else:
            scale, zero_point = self._calculate_qparams(self.min_val, self.max_val)
        if self.scale_dtype is not None:
            scale = scale.to(self.scale_dtype).float()
        return scale, zero_point

    def _signed_symmetric_per_channel(self) -> bool:
        return self.symmetric and self.ch_axis >= 0 and self.dtype not in _UNSIGNED

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (scale, zero_point) buffers, cached: reading buffers through nn.Module costs more
        than a per-tensor fake-quant step."""
        qp = self._fast.get("qp")
        if qp is None:
            qp = self._fast["qp"] = (self.scale, self.zero_point)
        return qp

    def _refresh_qparams(self) -> None:
        """``scale``/``zero_point`` = calculate_qparams(), by the fastest route that computes it exactly."""
        fast = self._fast.get("refresh")
        if fast is None:
            fast = self._fast["refresh"] = self._fast_refresh()
        if fast is not False and fast():
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
            self._fast.pop("refresh", None)

    def _fast_refresh(self) -> Any:
        """A function computing calculate_qparams() into the buffers without torch's tensor
        allocations (True when it applied), or False where none applies. Per channel it holds
        NumPy views of the buffers: bound once, as reading buffers through nn.Module costs more
        than the arithmetic (this runs on most steps)."""
        if not (self.cpu_numpy and self.committed.device.type == "cpu" and self.scale_dtype is None):
            return False
        if self.ch_axis < 0:

            def scalar() -> bool:
                if self.scale.shape != (1,):
                    return False
                qparams = self._scalar_qparams()
                if qparams is None:
                    return False
                self.scale.view(-1)[0] = float(qparams[0])
                self.zero_point.view(-1)[0] = qparams[1]
                return True

            return scalar
        if not self._signed_symmetric_per_channel() or self.scale.shape != self.committed.shape[1:]:
            return False
        # calculate_qparams' fast branch in NumPy, in place on the scale buffer (the zero point stays 0).
        scale, absmax, eps = self.scale.numpy(), self.committed.numpy()[0], self.eps.numpy()
        half_range = float(self.quant_max - self.quant_min) / 2

        def channels() -> bool:
            np.divide(np.clip(absmax, 0, None), half_range, out=scale)
            np.maximum(scale, eps, out=scale)
            return True

        return channels

    def _scalar_qparams(self) -> tuple[np.float32, int] | None:
        """calculate_qparams() for a per-tensor range with a signed dtype, in float32 NumPy
        scalars: the same operations in the same precision as torchao's tensor code, without its
        dozen tensor allocations (it runs on every commit of an activation range). None where it
        does not apply."""
        if self.dtype in _UNSIGNED:
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

    def extra_repr(self) -> str:
        return (
            f"dtype={self.dtype}, qscheme={self.qscheme}, ch_axis={self.ch_axis}, "
            f"quant=[{self.quant_min}, {self.quant_max}], mode={int(self.mode)}, "
            f"commits={self.commits()}, {self.config}"
        )


class AdaptiveRangeFakeQuantize(FakeQuantizeBase):
    """Fake-quantize against a committed range that moves only by majority vote.

    Args:
        dtype, quant_min, quant_max, qscheme, ch_axis, eps: as for torchao's
            ``FakeQuantize``; any integer width works through quant_min/max
            (4-bit weights: ``dtype=torch.int8, quant_min=-7, quant_max=7``).
        up_ratio, down_ratio, min_votes, window, rule, keep, step: the
            method's knobs, see :class:`edgeq.configs.VoteConfig`.
        reduce_distributed: under ``torch.distributed``, reduce each
            observation across ranks before it votes, so that every rank
            commits the same ranges.
    """

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
        scale_dtype: torch.dtype | None = None,
        **unused,
    ) -> None:
        super().__init__()
        if is_dynamic:
            raise ValueError("AdaptiveRangeFakeQuantize tracks static ranges; use it for static specs only")
        vote = VoteConfig(
            up_ratio=up_ratio,
            down_ratio=down_ratio,
            min_votes=min_votes,
            window=window,
            rule=rule,
            keep=keep,
            step=step,
        )
        self.activation_post_process = AdaptiveRangeObserver(
            dtype, qscheme, quant_min, quant_max, ch_axis, eps, vote, reduce_distributed, scale_dtype
        )
        observer = self.activation_post_process
        # What convert_pt2e reads from a fake-quant, as torchao's FakeQuantize copies them.
        self.dtype, self.qscheme, self.ch_axis, self.is_dynamic = dtype, qscheme, observer.ch_axis, False
        self.quant_min, self.quant_max = observer.quant_min, observer.quant_max
        self._flags_cache: tuple[bool, bool] | None = None

    # What tests, calibration and reports read, from the observer that holds it.
    config = property(lambda self: self.activation_post_process.config)
    committed = property(lambda self: self.activation_post_process.committed)
    commit_count = property(lambda self: self.activation_post_process.commit_count)
    mode = property(lambda self: self.activation_post_process.mode)
    scale = property(lambda self: self.activation_post_process.scale)  # type: ignore[assignment]
    zero_point = property(lambda self: self.activation_post_process.zero_point)  # type: ignore[assignment]

    @property
    def cpu_numpy(self) -> bool:
        return self.activation_post_process.cpu_numpy

    @cpu_numpy.setter
    def cpu_numpy(self, value: bool) -> None:
        observer = self.activation_post_process
        observer.flush()
        observer.cpu_numpy = value
        observer._fast.clear()

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.activation_post_process.calculate_qparams()

    def start_tracking(self) -> None:
        self.activation_post_process.start_tracking()

    def set_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        self.activation_post_process.set_range(low, high)

    def committed_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.activation_post_process.committed_range()

    def commits(self) -> int:
        return self.activation_post_process.commits()

    def set_width(self, quant_min: int, quant_max: int) -> None:
        """Train at another integer width (QAT's intermediate width), on the same committed range."""
        self.quant_min, self.quant_max = quant_min, quant_max
        observer = self.activation_post_process
        observer.quant_min, observer.quant_max = quant_min, quant_max
        observer._fast.pop("refresh", None)  # bound to the old width
        observer._refresh_qparams()

    def enable_observer(self, enabled: bool = True) -> None:
        if not enabled:
            self.activation_post_process.flush()
        super().enable_observer(enabled)
        self._flags_cache = None

    def enable_fake_quant(self, enabled: bool = True) -> None:
        super().enable_fake_quant(enabled)
        self._flags_cache = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._flags_cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flags = self._flags_cache
        if flags is None:
            # Python bools, cached: reading the buffers costs more than the rest of a per-tensor step.
            flags = self._flags_cache = (bool(self.observer_enabled[0] == 1), bool(self.fake_quant_enabled[0] == 1))
        observer = self.activation_post_process
        if flags[0]:
            observer.forward(x)  # not __call__: no hooks to run, and this is every step's hot path
        if flags[1] and observer.initialized():
            scale, zero_point = observer.qparams()
            if self.ch_axis >= 0:
                return torch.fake_quantize_per_channel_affine(
                    x, scale, zero_point, self.ch_axis, self.quant_min, self.quant_max
                )
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, self.quant_min, self.quant_max)
        return x


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
