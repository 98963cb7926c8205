"""Keep third-party chatter off a user's terminal unless they ask for it (``--verbose``).

torch, torchao and ExecuTorch warn about their own deprecations at every
build (dozens of repeated ``FutureWarning`` lines), and ExecuTorch's native
runtime prints ``[cpuinfo_utils.cpp:...]`` lines from C++ when it first
loads a program. None of it is actionable for an edgeq user, and it buries
edgeq's own stages and errors.
"""

from __future__ import annotations

import atexit
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
        logging.disable(logging.NOTSET)
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
    # ExecuTorch's Qualcomm modules install handlers and levels of their own; edgeq itself
    # reports through rich, not logging, so nothing below ERROR from any logger is shown.
    logging.disable(logging.WARNING)
    # Native runtimes (QNN's) log their teardown from C++ destructors after Python has finished.
    atexit.register(_silence_native_teardown)


def _silence_native_teardown() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
            fd = stream.fileno()
        except (AttributeError, ValueError, OSError):
            continue
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)


def verbose() -> bool:
    return _verbose


@contextmanager
def native_stderr(stdout: bool = False) -> Iterator[None]:
    """Drop what native code writes to stderr (and stdout, if asked) while the block runs.

    Only in quiet mode; Python's own streams are flushed first so that nothing
    of edgeq's is lost.
    """
    if _verbose:
        yield
        return
    streams = [sys.stderr, sys.stdout] if stdout else [sys.stderr]
    try:
        fds = [stream.fileno() for stream in streams]
    except (AttributeError, ValueError, OSError):  # a stream replaced by something without a descriptor
        yield
        return
    for stream in streams:
        stream.flush()
    saved = [os.dup(fd) for fd in fds]
    with tempfile.TemporaryFile() as sink:
        for fd in fds:
            os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            for stream in streams:
                stream.flush()
            for fd, copy in zip(fds, saved):
                os.dup2(copy, fd)
                os.close(copy)
