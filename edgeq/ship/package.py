"""Write the build's artifacts: atomically, all or nothing.

Artifacts go to a staging directory beside the output directory; only when
every file is written does the staging directory replace the output
directory, so a failed build leaves an earlier output exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from edgeq.errors import EdgeqError


def versions() -> dict[str, str]:
    found = {}
    for dist in ("edgeq", "executorch", "torch", "torchao"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "unknown"
    return found


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


class OutputDir:
    """A staging directory that becomes ``final`` on commit, or vanishes on abort."""

    def __init__(self, final: Path) -> None:
        self.final = Path(final).absolute()
        #: a rank's scratch directory (see for_rank), removed whole by discard()
        self.temporary = False
        self.created_parents: list[Path] = []
        parent = self.final.parent
        missing = []
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        try:
            for path in reversed(missing):
                path.mkdir()
                self.created_parents.append(path)
            self.staging = self.final.with_name(f".{self.final.name}.partial-{os.getpid()}")
            if self.staging.exists():
                shutil.rmtree(self.staging)
            self.staging.mkdir()
        except OSError as exc:
            self._remove_parents()
            raise EdgeqError(
                f"cannot write the output directory {self.final} ({exc.strerror or exc})",
                "pass --out a directory you can write to",
            ) from exc

    @classmethod
    def for_rank(cls, final: Path, rank: int) -> OutputDir:
        """Rank 0 writes ``final``; other ranks of a torchrun job train alongside it and write
        into a temporary directory that :meth:`discard` removes."""
        if rank != 0:
            final = Path(tempfile.mkdtemp(prefix=f"edgeq-rank{rank}-")) / "out"
        out = cls(final)
        out.temporary = rank != 0
        return out

    def discard(self) -> None:
        """Abort, and remove a temporary rank's directory altogether."""
        self.abort()
        if self.temporary:
            shutil.rmtree(self.final.parent, ignore_errors=True)

    def path(self, name: str) -> Path:
        path = self.staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self) -> Path:
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.staging, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self._remove_parents()

    def _remove_parents(self) -> None:
        for path in reversed(self.created_parents):
            try:
                path.rmdir()
            except OSError:
                break
        self.created_parents = []
