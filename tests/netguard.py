"""Run a subprocess with every network connection refused and recorded (no download may happen)."""

from __future__ import annotations

import os
from pathlib import Path

NO_NETWORK = """
import socket, os
_marker = os.environ["EDGEQ_NETWORK_MARKER"]
def _refuse(*args, **kwargs):
    with open(_marker, "a") as f:
        f.write(repr(args[:2]) + "\\n")
    raise OSError("network disabled in this test")
socket.getaddrinfo = _refuse
socket.socket.connect = _refuse
socket.create_connection = _refuse
"""


def no_network_env(tmp_path: Path, **extra: str) -> tuple[dict[str, str], Path]:
    """An environment whose Python refuses sockets (sitecustomize), and the file attempts are written to."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_NETWORK)
    marker = tmp_path / "network_attempts.txt"
    env = dict(os.environ)
    env.update(PYTHONPATH=str(site), EDGEQ_NETWORK_MARKER=str(marker), **extra)
    return env, marker
