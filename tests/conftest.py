"""Shared fixtures: one real build of the bundled example per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests must never reach a hub or an SDK downloader.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def digits_build(tmp_path_factory):
    """The bundled example built for android (real export, PT2E QAT, XNNPACK lowering, runtime)."""
    from edgeq.pipeline import BuildConfig, build
    from edgeq.qat import QATConfig

    out = tmp_path_factory.mktemp("build") / "digits"
    result = build(None, BuildConfig(target="android", out=out, qat=QATConfig(steps=120), size_budget=0.9))
    return result


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
