"""Run a .pte on an Android phone over adb with ExecuTorch's ``executor_runner``.

The runner is ExecuTorch's portable ``executor_runner`` built for Android
(arm64-v8a) with the XNNPACK backend linked in; the README says how to build
it. One ``adb shell`` call runs every sample: inputs are pushed as raw tensor
files, a small shell loop runs the runner once per sample with
``--inputs``/``--output_file``, and the raw outputs are pulled back.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgeq.errors import EdgeqError
from edgeq.runtime import ProgramRunner, program_batches

REMOTE = "/data/local/tmp/edgeq"
_NP = {"float32": np.float32, "int8": np.int8, "uint8": np.uint8, "int32": np.int32, "int64": np.int64}


class AdbDevice:
    def __init__(self, serial: str | None, runner: str | Path | None, adb: str = "adb") -> None:
        found = shutil.which(adb)
        if found is None:
            raise EdgeqError(
                "adb was not found on PATH",
                "install Android platform-tools (sdkmanager 'platform-tools') and put adb on PATH",
            )
        self.adb: str = found
        if runner is None:
            raise EdgeqError(
                "no runner given for the phone",
                "build ExecuTorch's executor_runner for Android (see README: Validate on a phone) "
                "and pass --runner PATH",
            )
        self.runner = Path(runner)
        if not self.runner.is_file():
            raise EdgeqError(f"runner {runner} not found", "pass --runner the executor_runner binary built for Android")
        devices = self._devices()
        if not devices:
            raise EdgeqError(
                "no Android device is attached",
                "connect a phone with USB debugging on (check `adb devices`), or drop --device",
            )
        if serial and serial not in devices:
            raise EdgeqError(
                f"device {serial} is not attached (attached: {', '.join(devices)})",
                "pass --device one of the serials `adb devices` lists",
            )
        self.serial = serial or devices[0]

    def _devices(self) -> list[str]:
        out = self._run([self.adb, "devices"], "list devices").stdout
        return [line.split()[0] for line in out.splitlines()[1:] if line.strip().endswith("device")]

    def _run(self, args: list[str], what: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            raise EdgeqError(f"adb failed to {what}: {tail[0]}", "check the phone's connection and storage, then retry")
        return proc

    def _adb(self, *args: str, what: str) -> subprocess.CompletedProcess:
        return self._run([self.adb, "-s", self.serial, *args], what)

    def run(
        self,
        program: Path,
        samples: list[list[torch.Tensor]],
        output_shapes: list[tuple[tuple[int, ...], str]],
        scored: int = 0,
    ) -> list[torch.Tensor]:
        """Run each sample (a list of input tensors) through the program on the phone; output ``scored`` of each."""
        with tempfile.TemporaryDirectory(prefix="edgeq-adb-") as tmp:
            local = Path(tmp)
            (local / "inputs").mkdir()
            names = []
            for k, tensors in enumerate(samples):
                files = []
                for i, t in enumerate(tensors):
                    path = local / "inputs" / f"{k}_{i}.bin"
                    path.write_bytes(t.contiguous().numpy().tobytes())
                    files.append(f"{REMOTE}/inputs/{path.name}")
                names.append(",".join(files))
            script = ["set -e", f"cd {REMOTE}", "rm -rf outputs", "mkdir -p outputs"]
            for k, inputs in enumerate(names):
                script.append(
                    f"./executor_runner --model_path model.pte --inputs {inputs} "
                    f"--output_file outputs/{k} --print_output none > /dev/null 2>&1"
                )
            (local / "run.sh").write_text("\n".join(script) + "\n")
            self._adb("shell", f"rm -rf {REMOTE} && mkdir -p {REMOTE}", what="prepare the work directory")
            self._adb("push", str(program), f"{REMOTE}/model.pte", what="push the program")
            self._adb("push", str(self.runner), f"{REMOTE}/executor_runner", what="push the runner")
            self._adb("push", str(local / "inputs"), f"{REMOTE}/", what="push the inputs")
            self._adb("push", str(local / "run.sh"), f"{REMOTE}/run.sh", what="push the run script")
            self._adb("shell", f"chmod 755 {REMOTE}/executor_runner && sh {REMOTE}/run.sh", what="run the program")
            self._adb("pull", f"{REMOTE}/outputs", str(local), what="pull the outputs")
            outputs = []
            shape, dtype = output_shapes[scored]
            for k in range(len(samples)):
                raw = (local / "outputs" / f"{k}-{scored}.bin").read_bytes()
                outputs.append(torch.from_numpy(np.frombuffer(raw, dtype=_NP[dtype]).copy().reshape(shape)))
            return outputs


def device_runner(program: Path, serial: str | None, runner: str | Path | None, scored: int = 0):
    """A callable like :class:`edgeq.checks.validate.ProgramRunner` that runs on the phone and
    returns output ``scored`` of the program's."""

    signature = ProgramRunner(program).signature  # shapes from the program itself
    device = AdbDevice(serial, runner)
    batch = signature.inputs[0][0][0]

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        samples = program_batches(inputs, batch)
        outs = device.run(program, [c for c, _ in samples], signature.outputs, scored)
        return torch.cat([o[:real] for o, (_, real) in zip(outs, samples)])

    run.device = device  # type: ignore[attr-defined]
    return run
