"""Qualcomm's QNN libraries on this machine: a real QAIRT SDK, or the host HTP runtime from PyPI.

ExecuTorch lowers for HTP and runs HTP programs on an x86_64 host through
Qualcomm's libraries: ``libQnnHtp.so`` (whose x86_64 build carries the HTP
simulator) and ``libQnnSystem.so``. Two sources, in this order:

1. ``QNN_SDK_ROOT`` naming a QAIRT SDK the user installed: used as it is.
2. The host runtime edgeq assembles from the ``onnxruntime-qnn`` wheel (the
   ``qnn`` extra: ``pip install -e '.[qnn]'``), under ``$EDGEQ_CACHE/qnn-host``:
   links to the wheel's libraries in an SDK-shaped folder, plus edgeq's ABI
   bridge (``qnn_bridge.c``, compiled once with the system C compiler) in
   front of ``libQnnHtp.so``. The wheel carries a newer QNN than the one
   ExecuTorch was built for; programs compiled with it are labelled so.

Nothing is ever downloaded here.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

from edgeq.errors import SdkMissingError
from edgeq.logs import native_stderr

WHEEL = "onnxruntime-qnn"
LIB_DIR = Path("lib") / "x86_64-linux-clang"
#: QNN release ExecuTorch's Android runtime (and this executorch wheel) was built against
_EXECUTORCH_QNN_FALLBACK = "2.37.0.250724"
INSTALL_HELP = (
    "install the host HTP runtime with `pip install -e '.[qnn]'` (or `pip install onnxruntime-qnn==2.7.0`), "
    "or point QNN_SDK_ROOT at a Qualcomm AI Engine Direct (QAIRT) SDK"
)


@dataclass(frozen=True)
class QnnLibraries:
    """Where this process's QNN libraries come from."""

    #: "sdk" (a QAIRT SDK at QNN_SDK_ROOT) or "host-runtime" (onnxruntime-qnn + edgeq's bridge)
    source: str
    root: Path
    #: QNN build id of libQnnHtp.so, e.g. "v2.51.0.251030..."; "" when it could not be read
    build_id: str
    #: the wheel's version for the host runtime
    wheel_version: str = ""

    @property
    def version(self) -> str:
        """The QNN release as numbers, e.g. "2.51.0"."""
        import re

        match = re.search(r"v?(\d+\.\d+\.\d+)", self.build_id)
        return match.group(1) if match else ""


def executorch_qnn_version() -> str:
    """The QNN SDK release this executorch build expects (its download script's pinned version)."""
    try:
        from executorch.backends.qualcomm.scripts import download_qnn_sdk

        return str(download_qnn_sdk.QNN_VERSION)
    except Exception:  # noqa: BLE001 - a label; the pinned default of executorch 1.5.1 stands in
        return _EXECUTORCH_QNN_FALLBACK


#: nodelete: the bridge's deviceCreate is written into the real library's table, so the bridge
#: must outlive every dlclose (ExecuTorch opens and closes the library to read its build id).
_FLAGS = ("-O2", "-shared", "-fPIC", "-Wall", "-Wl,-soname,libQnnHtp.so", "-Wl,-z,nodelete")


def _cache_root() -> Path:
    return Path(os.environ.get("EDGEQ_CACHE", Path.home() / ".cache" / "edgeq")) / "qnn-host"


def _wheel() -> tuple[Path, str] | None:
    """The onnxruntime_qnn package folder and version, or None where the extra is not installed.

    ``EDGEQ_QNN_HOST_RUNTIME=off`` ignores an installed wheel (only a QAIRT SDK counts then).
    """
    if os.environ.get("EDGEQ_QNN_HOST_RUNTIME", "").lower() in ("off", "0", "no"):
        return None
    try:
        version = package_version(WHEEL)
    except PackageNotFoundError:
        return None
    try:
        folder = Path(str(resources.files("onnxruntime_qnn")))
    except ModuleNotFoundError:
        return None
    return (folder, version) if (folder / "libQnnHtp.so").is_file() else None


def _bridge_source() -> bytes:
    return resources.files("edgeq.backends").joinpath("qnn_bridge.c").read_bytes()


def host_runtime_dir() -> Path | None:
    """The assembled host runtime for the installed wheel (built if needed), or None without the wheel."""
    found = _wheel()
    if found is None:
        return None
    folder, version = found
    source = _bridge_source()
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + str(folder).encode() + version.encode()).hexdigest()[:12]
    root = _cache_root() / f"{version}-{key}"
    if not (root / "edgeq-qnn-host.json").is_file():
        _assemble(root, folder, version, source)
    return root


def _assemble(root: Path, folder: Path, version: str, source: bytes) -> None:
    """Link the wheel's libraries into an SDK-shaped folder and compile the bridge; atomic."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise SdkMissingError(
            "the QNN host runtime needs a C compiler once, to build edgeq's ABI bridge (none found)",
            "install gcc (e.g. `apt-get install gcc`) or set CC, then rerun",
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root.parent))
    try:
        libs = staging / LIB_DIR
        libs.mkdir(parents=True)
        for lib in sorted(folder.glob("*.so")):
            name = "libQnnHtpReal.so" if lib.name == "libQnnHtp.so" else lib.name
            (libs / name).symlink_to(lib)
        # The libraries find their bundled libc++ at $ORIGIN/../onnxruntime_qnn.libs.
        (staging / "lib" / "onnxruntime_qnn.libs").symlink_to(folder.parent / "onnxruntime_qnn.libs")
        (staging / "qnn_bridge.c").write_bytes(source)
        result = subprocess.run(
            [compiler, *_FLAGS, "-o", str(libs / "libQnnHtp.so"), str(staging / "qnn_bridge.c"), "-ldl"],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SdkMissingError(
                f"compiling edgeq's QNN bridge with {compiler} failed: {tail[0]}",
                "install a working gcc (e.g. `apt-get install gcc`) or set CC, then rerun",
            )
        (staging / "edgeq-qnn-host.json").write_text(
            json.dumps({"wheel": WHEEL, "version": version, "libraries": str(folder), "compiler": compiler}, indent=2)
            + "\n"
        )
        try:
            staging.rename(root)
        except OSError:  # another process finished first
            if not (root / "edgeq-qnn-host.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_active: QnnLibraries | None = None


def _real_sdk() -> Path | None:
    root = os.environ.get("QNN_SDK_ROOT")
    if not root or not Path(root).is_dir():
        return None
    if (Path(root) / "edgeq-qnn-host.json").is_file():  # our own, exported by an earlier activate()
        return None
    return Path(root)


def available() -> bool:
    """Whether QNN libraries can be had here without a download (an SDK, or the qnn extra)."""
    return _active is not None or _real_sdk() is not None or _wheel() is not None


def activate() -> QnnLibraries:
    """Make ExecuTorch's QNN code (lowering and runtime) use this machine's QNN libraries.

    Sets QNN_SDK_ROOT and loads libQnnHtp.so and libQnnSystem.so into the
    process, so the runtime's own ``dlopen("libQnnHtp.so")`` finds them
    without LD_LIBRARY_PATH. Call after torch is imported (the libraries bring
    their own libc++). Raises SdkMissingError, one line, when there are none.
    """
    global _active
    if _active is not None:
        return _active
    sdk = _real_sdk()
    if sdk is not None:
        source, root, wheel_version = "sdk", sdk, ""
    else:
        built = host_runtime_dir()
        if built is None:
            raise SdkMissingError(
                "no QNN libraries on this machine (QNN_SDK_ROOT is not set and the host HTP runtime is not installed)",
                INSTALL_HELP,
            )
        source, root, wheel_version = "host-runtime", built, (_wheel() or (None, ""))[1]
        os.environ["QNN_SDK_ROOT"] = str(root)
    for name in ("libQnnHtp.so", "libQnnSystem.so"):
        path = root / LIB_DIR / name
        if not path.is_file():
            raise SdkMissingError(f"{path} not found", "point QNN_SDK_ROOT at a complete QAIRT SDK for x86_64 Linux")
        with native_stderr(stdout=True):  # the HTP library announces its thread-local config on load
            ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
    _active = QnnLibraries(source=source, root=root, build_id=_build_id(), wheel_version=wheel_version)
    return _active


def _build_id() -> str:
    try:
        from executorch.backends.qualcomm.utils.check_qnn_version import get_sdk_build_id

        with native_stderr(stdout=True):  # reading the id loads the HTP library once more
            return str(get_sdk_build_id())
    except Exception:  # noqa: BLE001 - a label only; the libraries themselves loaded
        return ""


def describe() -> str:
    """One line for `edgeq qnn-setup` and the report."""
    libs = activate()
    where = (
        f"QAIRT SDK at {libs.root}"
        if libs.source == "sdk"
        else (f"host HTP runtime from {WHEEL} {libs.wheel_version} with edgeq's ABI bridge, at {libs.root}")
    )
    return f"QNN {libs.build_id or 'build id unknown'}: {where}; ExecuTorch expects QNN {executorch_qnn_version()}"


if __name__ == "__main__":  # pragma: no cover - `python -m edgeq.backends.qnn_host`
    print(describe())
    sys.exit(0)
