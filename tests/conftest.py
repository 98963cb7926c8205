"""Shared fixtures: one real build of the bundled example per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests must never reach a hub or an SDK downloader.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def edgeq_cache(tmp_path_factory):
    """A fresh float-model cache per session: tests never read or fill the user's ~/.cache/edgeq."""
    path = tmp_path_factory.mktemp("edgeq-cache")
    previous = os.environ.get("EDGEQ_CACHE")
    os.environ["EDGEQ_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("EDGEQ_CACHE", None)
    else:
        os.environ["EDGEQ_CACHE"] = previous


@pytest.fixture(scope="session")
def digits_build(tmp_path_factory, edgeq_cache):
    """The bundled example built for android (real export, PT2E QAT, XNNPACK lowering, runtime)."""
    import time

    from edgeq.pipeline import BuildConfig, build
    from edgeq.quant.qat import QATConfig

    out = tmp_path_factory.mktemp("build") / "digits"
    start = time.perf_counter()
    result = build(None, BuildConfig(target="android", out=out, qat=QATConfig(steps=120), size_budget=0.9))
    result.wall_seconds = time.perf_counter() - start  # type: ignore[attr-defined]
    return result


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
