"""Programs on Arm kernels without a phone: ExecuTorch's aarch64 runtime under qemu user-mode emulation.

Phones run XNNPACK's Arm kernels (NEON, dot-product, i8mm), not the x86 ones every host number
comes from. ``edgeq setup arm64`` prepares, once, under ``$EDGEQ_CACHE/arm64``: the
``executorch`` wheel for ``manylinux_2_28_aarch64`` at the installed version (downloaded, never
installed: it ships the C++ runtime, the XNNPACK delegate and the kernels, none of which need
torch), and edgeq's program runner (``edgeq/checks/native``) cross-compiled against it. Validation
then runs a program under ``qemu-aarch64-static -cpu <core>`` with the cross toolchain's aarch64
libraries (``-L``; a chroot lacks /proc, which XNNPACK reads to start), and compares every output
with the x86 runtime's on the same inputs. ``$EDGEQ_QEMU`` points at another qemu-aarch64 (qemu 7.2,
Debian 12's, emulates SME wrongly; Debian's bookworm-backports has qemu-user 10.0).

Emulated time is not a phone's: nothing here is reported as latency.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from edgeq.errors import EdgeqError
from edgeq.runtime import ProgramRunner, program_batches

__all__ = ["CPUS", "DEFAULT_CPU", "WRONG_CPUS", "ArmComparison", "ArmRunner", "compare", "find_setup", "setup"]

#: emulated cores a program can be checked on (qemu's names), with the phones they stand for; the
#: menu is what the installed qemu offers of these (qemu 7.2 lacks the Armv9 ones and cortex-a55)
CPUS = {
    "cortex-a76": "big core with dot product (Armv8.2: Snapdragon 855-888, Dimensity 1000-1200 big cores)",
    "cortex-a55": "little core with dot product (Armv8.2: the little cluster of most phones since 2018)",
    "neoverse-n1": "Cortex-A76's server sibling (Armv8.2 with dot product)",
    "cortex-a710": "big core with i8mm (Armv9: Snapdragon 8 Gen 1, Dimensity 9000)",
    "neoverse-n2": "Cortex-A710's server sibling (Armv9 with i8mm and SVE2)",
    "cortex-a72": "big core without dot product (Armv8.0: Snapdragon 650-660, older tablets)",
    "cortex-a53": "little core without dot product (Armv8.0: budget phones, little clusters)",
    "max": "every feature qemu emulates, SME included (qemu 8 or newer only)",
}
DEFAULT_CPU = "cortex-a76"
#: (core, qemu major versions below which it is wrong, the reason)
WRONG_CPUS = {
    "max": (8, "qemu 7's -cpu max advertises SME, and under its SME emulation XNNPACK's int8 kernels return "
            "wrong outputs (edgeq's digits program: logits off by up to 22; exact with max,sme=off, and "
            "under qemu 10.0.2's -cpu max, so the fault is the emulator's)"),
}  # fmt: skip
#: Debian packages the set-up needs, by the tool they provide
PACKAGES = {"qemu-aarch64-static": "qemu-user-static", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
            "cmake": "cmake"}  # fmt: skip
#: where the cross toolchain keeps the aarch64 loader and libraries qemu runs the runner with
SYSROOT = Path("/usr/aarch64-linux-gnu")


def _cache() -> Path:
    return Path(os.environ.get("EDGEQ_CACHE", Path.home() / ".cache" / "edgeq")) / "arm64"


def _executorch_version() -> str:
    from importlib.metadata import version

    return version("executorch")


@dataclass(frozen=True)
class ArmSetup:
    #: the unzipped aarch64 wheel's executorch package (headers, libraries, CMake config)
    executorch: Path
    runner: Path
    qemu: str

    def command(self, cpu: str, *args: str, binary: Path | None = None) -> list[str]:
        """``binary`` (default: edgeq's program runner) under qemu on the emulated ``cpu``."""
        return [self.qemu, "-cpu", cpu, "-L", str(SYSROOT), str(binary or self.runner), *args]

    @property
    def toolchain(self) -> Path:
        """The CMake toolchain file that cross-compiles against this runtime (the bundle's native app too)."""
        return self.executorch.parent / "aarch64.cmake"


def _missing_tools() -> list[str]:
    return [tool for tool in PACKAGES if shutil.which(tool) is None] + (
        [] if (SYSROOT / "lib" / "ld-linux-aarch64.so.1").is_file() else ["aarch64-linux-gnu-g++"]
    )


def find_setup() -> ArmSetup:
    """The prepared aarch64 runtime and runner, or a one-line error naming the set-up command."""
    root = _cache() / f"executorch-{_executorch_version()}"
    runner = root / "build" / "program_runner"
    missing = _missing_tools()
    if missing or not runner.is_file():
        what = f"{', '.join(sorted(set(missing)))} missing" if missing else f"no runner under {root}"
        raise EdgeqError(f"the arm64 runtime is not set up ({what})", "run `edgeq setup arm64` once")
    return ArmSetup(root / "executorch", runner, str(qemu_binary()))


def setup(say: Any = print) -> ArmSetup:
    """Install what is missing (apt, as root), download the aarch64 wheel, cross-compile the runner."""
    missing = sorted({PACKAGES[tool] for tool in _missing_tools()})
    if missing:
        install = ["apt-get", "install", "-y", *missing]
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise EdgeqError(f"{', '.join(missing)} not installed", f"run `sudo {' '.join(install)}`, then again")
        say(f"installing {', '.join(missing)}")
        subprocess.run(install, check=True, capture_output=True)
    version = _executorch_version()
    root = _cache() / f"executorch-{version}"
    if not (root / "executorch" / "lib" / "libexecutorch.so").is_file():
        _download(version, root, say)
    _build_runner(root, say)
    return find_setup()


def _download(version: str, root: Path, say: Any) -> None:
    say(f"downloading executorch {version} for aarch64 (not installed: its C++ runtime only)")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", f"executorch=={version}", "--no-deps", "--only-binary=:all:",
             "--platform", "manylinux_2_28_aarch64", "--python-version",
             f"{sys.version_info.major}.{sys.version_info.minor}", "-d", tmp],
            capture_output=True, text=True,
        )  # fmt: skip
        wheels = list(Path(tmp).glob("executorch-*.whl"))
        if done.returncode or not wheels:
            raise EdgeqError(
                f"could not download executorch {version} for manylinux_2_28_aarch64: "
                f"{(done.stderr.strip().splitlines() or ['no wheel'])[-1]}",
                "check that PyPI is reachable (pip download), then run `edgeq setup arm64` again",
            )
        staging = root.with_name(root.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(staging, [n for n in wheel.namelist() if n.startswith("executorch/")])
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)  # a half-extracted wheel is never mistaken for a set-up


def _build_runner(root: Path, say: Any) -> None:
    runner = root / "build" / "program_runner"
    if runner.is_file():
        return
    say("cross-compiling edgeq's program runner for aarch64")
    source = Path(str(resources.files("edgeq.checks").joinpath("native")))
    toolchain = root / "aarch64.cmake"
    toolchain.write_text(
        "set(CMAKE_SYSTEM_NAME Linux)\nset(CMAKE_SYSTEM_PROCESSOR aarch64)\n"
        "set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)\nset(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)\n"
    )
    build = root / "build"
    for step in (
        ["cmake", "-S", str(source), "-B", str(build), f"-DCMAKE_TOOLCHAIN_FILE={toolchain}",
         f"-DCMAKE_PREFIX_PATH={root / 'executorch'}"],
        ["cmake", "--build", str(build)],
    ):  # fmt: skip
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise EdgeqError(f"building the aarch64 runner failed: {tail[0]}", "run `edgeq setup arm64` again")


def qemu_binary() -> str | None:
    """``$EDGEQ_QEMU`` (a newer qemu-aarch64 than the distribution's), else qemu-aarch64-static."""
    return os.environ.get("EDGEQ_QEMU") or shutil.which("qemu-aarch64-static")


def qemu_version(qemu: str | None = None) -> tuple[int, int]:
    done = subprocess.run([qemu or qemu_binary() or "qemu-aarch64-static", "--version"], capture_output=True, text=True)
    words = done.stdout.split()
    number = words[2] if len(words) > 2 and words[1] == "version" else "0.0"
    major, minor, *_ = (int(part) for part in (number.split(".") + ["0"])[:2])
    return major, minor


def available_cpus(qemu: str | None = None) -> list[str]:
    """The menu's cores the installed qemu emulates."""
    done = subprocess.run(
        [qemu or qemu_binary() or "qemu-aarch64-static", "-cpu", "help"], capture_output=True, text=True
    )
    offered = set(done.stdout.split())
    return [cpu for cpu in CPUS if cpu in offered]


def check_cpu(cpu: str, qemu: str | None = None) -> str:
    """``cpu`` when this qemu emulates it correctly; a one-line error naming the choices otherwise."""
    qemu = qemu or qemu_binary()
    menu = available_cpus(qemu) if qemu else list(CPUS)
    choices = f"pass --cpu with one of {', '.join(c for c in menu if c not in WRONG_CPUS)}"
    wrong = WRONG_CPUS.get(cpu)
    version = qemu_version(qemu) if qemu and wrong is not None else None
    if wrong is not None and version is not None and version[0] < wrong[0]:
        raise EdgeqError(f"edgeq does not validate on the emulated core {cpu!r} with qemu "
                         f"{'.'.join(map(str, version))}: {wrong[1]}", choices)  # fmt: skip
    if cpu not in menu:
        raise EdgeqError(f"unknown emulated core {cpu!r} (or not emulated by this qemu)", choices)
    return cpu


class ArmRunner:
    """Calls a .pte's ``forward`` on ExecuTorch's aarch64 runtime under qemu, like a torch module
    (every output through :meth:`outputs`); one emulated process per call."""

    def __init__(self, program: str | Path, cpu: str = DEFAULT_CPU) -> None:
        self.program = Path(program)
        self.setup = find_setup()
        self.cpu = check_cpu(cpu, self.setup.qemu)
        host = ProgramRunner(self.program)
        self.signature, self.batch = host.signature, host.batch

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.outputs(*inputs)[0]

    def outputs(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        chunks = program_batches(tuple(inputs), self.batch)
        with tempfile.TemporaryDirectory() as tmp:
            files = []
            for i in range(len(self.signature.inputs)):
                path = Path(tmp) / f"in{i}.bin"
                tensors = [chunk[i].contiguous() for chunk, _ in chunks]
                path.write_bytes(b"".join(t.numpy().tobytes() for t in tensors))
                files.append(str(path))
            prefix = str(Path(tmp) / "out")
            done = subprocess.run(
                self.setup.command(self.cpu, str(self.program), str(len(chunks)), prefix, *files),
                capture_output=True,
                text=True,
            )
            if done.returncode:
                tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
                raise EdgeqError(
                    f"the aarch64 runtime failed on {self.program.name}: {tail[0]}",
                    "check the program runs on the host (`edgeq validate`), then `edgeq setup arm64`",
                )
            return [self._read(Path(f"{prefix}.{j}"), shape, dtype, chunks)
                    for j, (shape, dtype) in enumerate(self.signature.outputs)]  # fmt: skip

    @staticmethod
    def _read(path: Path, shape: tuple[int, ...], dtype: str, chunks: list) -> torch.Tensor:
        values = torch.frombuffer(bytearray(path.read_bytes()), dtype=getattr(torch, dtype))
        per_call = values.view(len(chunks), *shape)
        return torch.cat([per_call[n][:real] for n, (_, real) in enumerate(chunks)])


@dataclass
class ArmComparison:
    """The program on Arm kernels against the x86 runtime, on the same inputs."""

    cpu: str
    samples: int
    #: the recipe's metric on the Arm outputs and on the x86 outputs
    metric: float
    host_metric: float
    #: share of output values bit-identical to the x86 runtime's, and the largest difference, per output
    bitexact: list[float] = field(default_factory=list)
    max_difference: list[float] = field(default_factory=list)
    #: top-1 agreement of the scored output with the x86 runtime's (percent)
    agreement: float = 100.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu,
            "cpu_stands_for": CPUS.get(self.cpu, ""),
            "samples": self.samples,
            "metric": self.metric,
            "host_metric": self.host_metric,
            "bitexact": self.bitexact,
            "max_difference": self.max_difference,
            "agreement": self.agreement,
            "runtime": f"executorch {_executorch_version()} aarch64 wheel under qemu-aarch64 "
            f"{'.'.join(map(str, qemu_version()))} -cpu {self.cpu}",
        }


def compare(
    program: str | Path, recipe: Any, cpu: str = DEFAULT_CPU, limit: int | None = None, scored: int = 0
) -> ArmComparison:
    """Run ``program`` on the recipe's evaluation data on Arm kernels and on x86, and compare; the
    metric reads output ``scored`` (the manifest's scored_output)."""
    from edgeq.checks.evaluate import agreement
    from edgeq.recipe import as_tuple
    from edgeq.samples import count, join

    arm, host = ArmRunner(program, cpu), ProgramRunner(program)
    arm_out: list[list[torch.Tensor]] = []
    host_out: list[list[torch.Tensor]] = []
    targets: list[Any] = []
    sizes: list[int] = []
    seen = 0
    for inputs, target in recipe.eval_data():
        inputs = as_tuple(inputs)
        arm_out.append(arm.outputs(*inputs))
        host_out.append(host.outputs(*inputs))
        targets.append(target)
        sizes.append(int(inputs[0].shape[0]))
        seen += sizes[-1]
        if limit is not None and seen >= limit:
            break
    a = [torch.cat(parts) for parts in zip(*arm_out)]
    h = [torch.cat(parts) for parts in zip(*host_out)]
    y = join(targets, sizes)
    scored_a, scored_h = a[scored], h[scored]
    return ArmComparison(
        cpu=cpu,
        samples=count(y),
        metric=float(recipe.metric(scored_a, y)),
        host_metric=float(recipe.metric(scored_h, y)),
        bitexact=[float((x == z).float().mean()) for x, z in zip(a, h)],
        max_difference=[float((x.double() - z.double()).abs().max()) for x, z in zip(a, h)],
        agreement=agreement(scored_h, scored_a),
    )
