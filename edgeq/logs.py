"""Keep third-party chatter off a user's terminal unless they ask for it (``--verbose``).

torch, torchao and ExecuTorch warn about their own deprecations at every
build (dozens of repeated ``FutureWarning`` lines), and ExecuTorch's native
runtime prints ``[cpuinfo_utils.cpp:...]`` lines from C++ when it first
loads a program. None of it is actionable for an edgeq user, and it buries
edgeq's own stages and errors.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_verbose = False


def set_verbose(verbose: bool) -> None:
    """verbose=False: third-party warnings and native runtime lines are dropped; True: all shown."""
    global _verbose
    _verbose = verbose
    if verbose:
        warnings.resetwarnings()
        logging.getLogger().setLevel(logging.WARNING)
        return
    # Only warnings raised outside edgeq are silenced; edgeq's own still show.
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"edgeq(\..*)?")
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    # torch configures its own loggers when imported (and torchao's import then warns
    # through them), so the levels are set after importing torch, before anything else.
    import torch  # noqa: F401

    for name in ("torch", "torchao", "executorch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def verbose() -> bool:
    return _verbose


@contextmanager
def native_stderr() -> Iterator[None]:
    """Hold what native code writes to stderr (file descriptor 2) while the block runs.

    Shown again only in verbose mode; Python's own stderr is flushed first so
    that nothing of edgeq's is lost.
    """
    if _verbose:
        yield
        return
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # stderr replaced by something without a descriptor
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
