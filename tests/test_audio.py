"""Keyword spotters: the log-mel features the app computes, Java against the Python reference.

The bundle's AudioFeatures.java is compiled with the JDK and run on speech-like
signals (a voiced vowel with formants and pitch glide, a fricative burst, a
chirp, silence; clips shorter and longer than the model's window); its
features must equal edgeq.tasks.audio.LogMel's. scripts/bench_keywords.py runs
the same comparison on real recordings (FSDD).
"""

from __future__ import annotations

import math
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from edgeq.errors import EdgeqError
from edgeq.tasks.audio import LogMel

FEATURES = LogMel(sample_rate=8000, samples=8000, n_fft=256, hop=128, n_mels=40)


def speech_like() -> list[torch.Tensor]:
    rate = FEATURES.sample_rate
    t = torch.arange(6000, dtype=torch.float64) / rate
    pitch = 120 + 40 * t  # a glide, as intonation
    phase = 2 * math.pi * torch.cumsum(pitch / rate, 0)
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 30))  # harmonics of the glottal pulse
    formants = sum(torch.sin(2 * math.pi * f * t) * 0.2 for f in (700, 1200, 2600))
    envelope = torch.sin(math.pi * t / t[-1]).clamp(min=0)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3000, generator=g, dtype=torch.float64) * torch.linspace(0, 0.3, 3000, dtype=torch.float64)
    chirp = torch.sin(2 * math.pi * (200 * t + 1500 * t**2))
    return [
        (0.3 * voiced * envelope + 0.1 * formants * envelope).float(),
        noise.float(),
        (0.5 * chirp).float(),
        torch.zeros(8000),
        torch.cat([0.4 * chirp, 0.2 * chirp]).float()[:11000],  # longer than the window: cut
    ]


def test_log_mel_shape_filters_and_bad_settings():
    assert FEATURES.shape == (40, 61)
    filters = FEATURES.filters()
    assert filters.shape == (40, 129) and float(filters.max()) <= 1.0 and bool((filters.sum(1) > 0).all())
    out = FEATURES(speech_like()[0])
    assert out.shape == (40, 61) and out.dtype == torch.float32
    silent = FEATURES(torch.zeros(100))  # padded to the window; the floor's log everywhere
    assert torch.allclose(silent, torch.full_like(silent, math.log(FEATURES.floor)))
    with pytest.raises(EdgeqError, match="power of two"):
        LogMel(n_fft=200)
    with pytest.raises(EdgeqError, match="half the sample rate"):
        LogMel(fmax=6000)


HARNESS = """
package t;
import java.nio.*;
import java.nio.file.*;
public class Harness {
    public static void main(String[] args) throws Exception {
        ByteBuffer in = ByteBuffer.wrap(Files.readAllBytes(Paths.get(args[0]))).order(ByteOrder.LITTLE_ENDIAN);
        ByteBuffer out = ByteBuffer.allocate(1 << 24).order(ByteOrder.LITTLE_ENDIAN);
        while (in.remaining() > 0) {
            float[] clip = new float[in.getInt()];
            for (int i = 0; i < clip.length; i++) clip[i] = in.getFloat();
            for (float v : AudioFeatures.compute(clip)) out.putFloat(v);
        }
        Files.write(Paths.get(args[1]), java.util.Arrays.copyOf(out.array(), out.position()));
    }
}
"""


def java_features(tmp_path: Path, features: LogMel, clips: list[torch.Tensor]) -> torch.Tensor:
    from edgeq.ship.templating import render

    src, classes = tmp_path / "src", tmp_path / "classes"
    src.mkdir(exist_ok=True)
    (src / "AudioFeatures.java").write_text(
        render("AudioFeatures.java.j2", edgeq_version="test", recipe="test", package="t", **features.manifest())
    )
    (src / "Harness.java").write_text(HARNESS)
    subprocess.run(["javac", "-d", str(classes), *map(str, src.glob("*.java"))], check=True, capture_output=True)
    data = b"".join(struct.pack("<i", len(c)) + c.float().numpy().astype("<f4").tobytes() for c in clips)
    (tmp_path / "in.bin").write_bytes(data)
    subprocess.run(
        ["java", "-cp", str(classes), "t.Harness", str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
        check=True,
        capture_output=True,
    )
    values = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.float32)
    return values.reshape(len(clips), *features.shape)


@pytest.mark.skipif(shutil.which("javac") is None, reason="no JDK (javac) on this machine")
def test_bundle_java_features_equal_the_python_reference(tmp_path):
    clips = speech_like()
    java = java_features(tmp_path, FEATURES, clips)
    python = torch.stack([FEATURES(c) for c in clips])
    assert float((java - python).abs().max()) < 1e-4


def test_bundle_refuses_features_the_program_does_not_take():
    from edgeq.ship.bundle import audio_sources

    manifest = {
        "versions": {"edgeq": "t", "executorch": "t"},
        "recipe": {"name": "kws"},
        "inputs": [{"name": "x", "shape": [1, 1, 40, 61], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": [1, 10], "dtype": "float32"}],
        "labels": [str(d) for d in range(10)],
        "features": FEATURES.manifest(),
    }
    sources = audio_sources(manifest)
    assert set(sources) == {"KwsModel.kt", "AudioFeatures.java"}
    assert "N_MELS = 40" in sources["AudioFeatures.java"]
    manifest["features"] = LogMel(n_mels=32).manifest()
    with pytest.raises(EdgeqError, match=r"features are \[32, 61\].*program takes float32 \[1, 1, 40, 61\]"):
        audio_sources(manifest)
    manifest["features"] = {**FEATURES.manifest(), "kind": "mfcc"}
    with pytest.raises(EdgeqError, match="cannot compute 'mfcc' features"):
        audio_sources(manifest)
