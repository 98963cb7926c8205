"""The bundle's native app (C++, ExecuTorch's Module API): compiled against the executorch wheel's own
runtime with CMake, run on real digits, and compared with the Python runtime."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeq.runtime import ProgramRunner


def _prefix() -> str:
    import executorch.version

    return str(Path(executorch.version.__file__).parent)


@pytest.fixture(scope="module")
def runner(digits_build, tmp_path_factory) -> Path:
    """The digits bundle's native/ project, configured and built (the README's two commands)."""
    for tool in ("cmake", "g++"):
        assert shutil.which(tool), f"{tool} is needed to build the bundle's native app (apt-get install {tool})"
    source = digits_build.out_dir / "bundle" / "native"
    build = tmp_path_factory.mktemp("native")
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), f"-DCMAKE_PREFIX_PATH={_prefix()}"],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    return build / "edgeq_runner"


def test_the_native_app_computes_what_the_python_runtime_computes(runner, digits_build, tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = digits.data[-20:].astype(np.float32)  # 0..16, before the recipe's preprocessing (/ 16)
    program = digits_build.out_dir / "bundle" / "model.pte"
    python = ProgramRunner(program)
    agree = 0
    for i, values in enumerate(raw):
        (tmp_path / "in.f32").write_bytes(values.tobytes())
        done = subprocess.run([str(runner), str(program), str(tmp_path / "in.f32"), "--output",
                               str(tmp_path / "out.f32"), "--top", "1"], capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
        native = np.fromfile(tmp_path / "out.f32", dtype=np.float32)
        expected = python(torch.from_numpy(values / 16.0).view(1, 1, 8, 8)).numpy().ravel()
        assert np.array_equal(native, expected), (i, np.abs(native - expected).max())
        label, probability = done.stdout.split("\n")[0].split("\t")
        assert int(label) == int(expected.argmax()) and 0 < float(probability) <= 1
        agree += int(label) == digits.target[-20 + i]
    assert agree >= 18  # and the labels are right on real digits


def test_bad_input_is_one_line_and_a_nonzero_exit(runner, digits_build, tmp_path):
    program = digits_build.out_dir / "bundle" / "model.pte"
    (tmp_path / "short.f32").write_bytes(np.zeros(10, dtype=np.float32).tobytes())
    done = subprocess.run([str(runner), str(program), str(tmp_path / "short.f32")], capture_output=True, text=True)
    assert done.returncode == 1
    assert "is not 64 float32 values" in done.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("qemu-aarch64-static", "aarch64-linux-gnu-g++")),
    reason="cross-compiling for aarch64 needs qemu-user-static and g++-aarch64-linux-gnu (`edgeq setup arm64`)",
)
def test_the_native_app_cross_compiles_and_runs_on_emulated_arm(runner, digits_build, tmp_path, edgeq_cache):
    from sklearn.datasets import load_digits

    from edgeq.checks import arm64

    ready = arm64.setup(say=lambda _line: None)
    source = digits_build.out_dir / "bundle" / "native"
    build = tmp_path / "arm"
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), f"-DCMAKE_TOOLCHAIN_FILE={ready.toolchain}",
                    f"-DCMAKE_PREFIX_PATH={ready.executorch}"], check=True, capture_output=True)  # fmt: skip
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    program = digits_build.out_dir / "bundle" / "model.pte"
    raw = load_digits().data[-5:].astype(np.float32)
    for values in raw:
        (tmp_path / "in.f32").write_bytes(values.tobytes())
        outs = []
        for command in (
            [str(runner)],
            ready.command("cortex-a76", binary=build / "edgeq_runner"),
        ):
            out = tmp_path / "out.f32"
            done = subprocess.run([*command, str(program), str(tmp_path / "in.f32"), "--output", str(out)],
                                  capture_output=True, text=True)  # fmt: skip
            assert done.returncode == 0, done.stderr[-300:]
            outs.append((np.fromfile(out, dtype=np.float32), done.stdout.splitlines()[0].split("\t")[0]))
        (x86, x86_label), (arm, arm_label) = outs
        assert arm_label == x86_label and np.abs(arm - x86).max() < 0.1
