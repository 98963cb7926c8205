"""Audio: the log-mel features a keyword spotter's app computes before the program runs.

An ExecuTorch program takes the features, not the waveform (an STFT does not
lower to the mobile delegates), so the app must compute exactly what the model
was trained on. :class:`LogMel` is the Python reference: its parameters go to
the manifest, and the bundle's ``AudioFeatures.java`` implements the same
steps (periodic Hann window, power spectrum, HTK mel filters, log), which the
tests hold equal to this class on recorded-like signals.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from edgeq.errors import EdgeqError

__all__ = ["LogMel"]


def _hz_to_mel(hz: float) -> float:
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: float) -> float:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@dataclass(frozen=True)
class LogMel:
    """``log(mel power + floor)`` of ``samples`` audio samples (1-D, -1..1), ``n_mels`` x ``frames``:
    frames of ``n_fft`` samples every ``hop`` samples (no padding: frames = 1 + (samples - n_fft) // hop)."""

    sample_rate: int = 8000
    samples: int = 8000
    n_fft: int = 256
    hop: int = 128
    n_mels: int = 40
    fmin: float = 20.0
    fmax: float = 4000.0
    floor: float = 1e-6

    def __post_init__(self) -> None:
        if self.n_fft & (self.n_fft - 1) or self.n_fft < 16:
            raise EdgeqError(f"LogMel n_fft {self.n_fft}", "use a power of two of 16 or more (256, 512)")
        if not 0 < self.hop <= self.n_fft or self.samples < self.n_fft:
            raise EdgeqError(
                f"LogMel hop {self.hop}, n_fft {self.n_fft}, samples {self.samples}",
                "use 0 < hop <= n_fft <= samples",
            )
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise EdgeqError(
                f"LogMel fmin {self.fmin} / fmax {self.fmax} at {self.sample_rate} Hz",
                f"use 0 <= fmin < fmax <= {self.sample_rate / 2:g} (half the sample rate)",
            )
        if self.n_mels < 1 or self.floor <= 0:
            raise EdgeqError(f"LogMel n_mels {self.n_mels}, floor {self.floor}", "use n_mels >= 1 and floor > 0")

    @property
    def frames(self) -> int:
        return 1 + (self.samples - self.n_fft) // self.hop

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_mels, self.frames

    def filters(self) -> torch.Tensor:
        """[n_mels, n_fft // 2 + 1] triangular filters on the HTK mel scale (peak 1, no area norm)."""
        bins = self.n_fft // 2 + 1
        low, high = _hz_to_mel(self.fmin), _hz_to_mel(self.fmax)
        edges = [_mel_to_hz(low + (high - low) * i / (self.n_mels + 1)) for i in range(self.n_mels + 2)]
        freqs = [self.sample_rate * k / self.n_fft for k in range(bins)]
        weights = torch.zeros(self.n_mels, bins, dtype=torch.float64)
        for m in range(self.n_mels):
            left, centre, right = edges[m], edges[m + 1], edges[m + 2]
            for k, f in enumerate(freqs):
                if left < f <= centre:
                    weights[m, k] = (f - left) / (centre - left)
                elif centre < f < right:
                    weights[m, k] = (right - f) / (right - centre)
        return weights

    def fit(self, audio: torch.Tensor) -> torch.Tensor:
        """A clip cut or zero-padded (at the end) to ``samples``, as the app does with its recording."""
        audio = audio.flatten().double()
        if len(audio) >= self.samples:
            return audio[: self.samples]
        return torch.nn.functional.pad(audio, (0, self.samples - len(audio)))

    def __call__(self, audio: torch.Tensor) -> torch.Tensor:
        """[n_mels, frames] float32 features of one clip (computed in float64, as AudioFeatures.java)."""
        x = self.fit(audio)
        frames = x.unfold(0, self.n_fft, self.hop)  # [frames, n_fft]
        window = torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64)
        power = torch.fft.rfft(frames * window).abs().pow(2)  # [frames, bins]
        mel = self.filters() @ power.T  # [n_mels, frames]
        return torch.log(mel + self.floor).float()

    def batch(self, clips: list[torch.Tensor]) -> torch.Tensor:
        """[B, 1, n_mels, frames]: the model's input for ``clips``."""
        return torch.stack([self(c) for c in clips])[:, None]

    def manifest(self) -> dict[str, Any]:
        return {"kind": "log-mel", "window": "hann-periodic", "mel_scale": "htk", **asdict(self)}
