"""The float program lowered in a second process, at the lowest priority, while the build goes on.

A build needs the float program beside its own (size and speed are ratios measured side by
side), and lowering is Python on one core: torch.export's tracing and ExecuTorch's passes
(on SmolLM2-135M, 108 s of CPU in 108 s of wall for four blocks; the float program alone
took 4-8 minutes of a 35-minute build). The machines edgeq builds on have two cores or more,
and the quantized program's lowering, the longest stage, leaves the second one idle. So the
build writes the float checkpoint at the start and a child process (``python -m
edgeq.llm.background DIR``) lowers it under ``nice 19``: while the analysis keeps both cores
busy the child takes what is left, and it runs at full speed beside the quantized lowering.
The program is the same bytes as lowering it in the build's own process (a test holds it so).

A child that cannot start or fails is not fatal: :meth:`FloatLowering.result` then lowers in
the build's own process, as before, and says why in the record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["FloatLowering"]

_JOB = "job.json"
_DONE = "done.json"
_LOG = "log.txt"


class FloatLowering:
    """The float program of a Hugging Face decoder, lowered in a child process from :meth:`start` on;
    :meth:`result` waits for it, :meth:`close` (or leaving a ``with`` block) stops the child and
    removes its files."""

    def __init__(self) -> None:
        self._scratch = tempfile.TemporaryDirectory(prefix="edgeq-llm-float-")
        self.root = Path(self._scratch.name)
        self._child: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._started = 0.0
        self.record: dict[str, Any] = {}

    def start(self, model: Any, tokenizer: Path, max_seq_len: int, metadata: dict[str, Any]) -> None:
        """Write ``model``'s checkpoint and start lowering it (``metadata``: the runner's bos/eos)."""
        from edgeq.llm.export import write_checkpoint

        write_checkpoint(model, max_seq_len, self.root)
        job = {"tokenizer": str(tokenizer), "max_seq_len": max_seq_len, "metadata": metadata}
        (self.root / _JOB).write_text(json.dumps(job))
        self._started = time.perf_counter()
        self.record = {"where": "a second process (nice 19)"}
        # the child finds the same edgeq and packages as this process, however it was put on the path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._log = (self.root / _LOG).open("wb")
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "edgeq.llm.background", str(self.root)],
                stdout=self._log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        except OSError as error:
            self.record["failed"] = f"could not start: {error}"

    def result(self) -> bytes:
        """The float program's bytes: the child's, or (it failed) lowered here."""
        if self._child is not None and self._child.wait() == 0 and (self.root / _DONE).is_file():
            done = json.loads((self.root / _DONE).read_text())
            self.record.update(seconds=done["seconds"], ready_after=time.perf_counter() - self._started)
            return (self.root / "model.pte").read_bytes()
        if self._child is not None:
            tail = (self.root / _LOG).read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            self.record["failed"] = f"exit {self._child.returncode}: {tail[0][:300]}"
        from edgeq.llm.export import lower_checkpoint

        job = json.loads((self.root / _JOB).read_text())
        self.record["where"] = "this process, after the second one failed"
        return lower_checkpoint(self.root, Path(job["tokenizer"]), job["max_seq_len"], None, job["metadata"])

    def close(self) -> None:
        if self._child is not None and self._child.poll() is None:
            self._child.kill()
            self._child.wait()
        if self._log is not None:
            self._log.close()
        self._scratch.cleanup()

    def __enter__(self) -> FloatLowering:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _main(root: Path) -> None:
    """The child: lower the float checkpoint in ``root`` at the lowest priority on one thread."""
    import torch

    from edgeq.llm.export import lower_checkpoint

    if hasattr(os, "nice"):
        os.nice(19)
    # lowering is Python; its few tensor ops need no second thread to take from the build
    torch.set_num_threads(1)
    start = time.perf_counter()
    job = json.loads((root / _JOB).read_text())
    program = lower_checkpoint(root, Path(job["tokenizer"]), job["max_seq_len"], None, job["metadata"])
    (root / "model.pte").write_bytes(program)
    (root / _DONE).write_text(json.dumps({"seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
