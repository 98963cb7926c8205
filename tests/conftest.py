"""Shared fixtures: one real build of the bundled example per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests must never reach a hub or an SDK downloader.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config) -> None:
    """Under pytest-xdist, each worker's torch takes its share of the cores: two workers with two
    intra-op threads each on a 2-core CI runner would fight over them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session", autouse=True)
def edgeq_cache(tmp_path_factory):
    """A fresh float-model cache per session, shared by pytest-xdist's workers (the examples train
    once, under a lock): tests never read or fill the user's ~/.cache/edgeq."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.getbasetemp().parent / "edgeq-cache"  # the run's root, above each worker's
        path.mkdir(exist_ok=True)
    else:
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
