"""Programs on Arm kernels under qemu (edgeq.checks.arm64): set-up, validation against x86, refusals.

Needs qemu-user-static, g++-aarch64-linux-gnu and cmake (`edgeq setup arm64` installs them as root)
and PyPI for the aarch64 wheel; without them these tests skip and say why.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from edgeq.checks import arm64
from edgeq.errors import EdgeqError

TOOLS = ("qemu-aarch64-static", "aarch64-linux-gnu-g++", "cmake")
pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS), reason=f"Arm emulation needs {', '.join(TOOLS)}"
)


@pytest.fixture(scope="module")
def ready(edgeq_cache) -> arm64.ArmSetup:
    return arm64.setup(say=lambda _line: None)


def test_the_program_on_arm_kernels_matches_the_x86_runtime(ready, digits_build):
    program = digits_build.out_dir / "model.pte"
    from edgeq.recipe import load_recipe

    recipe = load_recipe(None)
    for cpu in ("cortex-a76", "cortex-a53"):  # dot-product kernels, and the plain NEON ones
        c = arm64.compare(program, recipe, cpu)
        assert c.samples == 360
        assert c.agreement >= 99.0 and abs(c.metric - c.host_metric) <= 100.0 / 360
        assert c.bitexact[0] > 0.2  # many values bit-identical; the rest a requantization step off
        assert 0.0 <= c.max_difference[0] < 0.1, (cpu, c.max_difference)


def test_an_emulated_core_known_to_be_wrong_is_refused_and_why(ready, digits_build, tmp_path):
    with pytest.raises(EdgeqError, match="pass --cpu with one of cortex-a76"):
        arm64.check_cpu("cortex-a99")
    # qemu 7's -cpu max (SME advertised) computes the int8 program wrongly; the same core with SME off,
    # and qemu 10's -cpu max (SME kernels included), compute what a phone core does.
    program = digits_build.out_dir / "model.pte"
    x = torch.rand(4, 1, 8, 8)
    (tmp_path / "in.bin").write_bytes(x.numpy().tobytes())
    outputs = {}
    for cpu in ("max", "max,sme=off", "cortex-a76"):
        prefix = tmp_path / cpu.replace(",", "_")
        done = subprocess.run(ready.command(cpu, str(program), "4", str(prefix), str(tmp_path / "in.bin")),
                              capture_output=True)  # fmt: skip
        assert done.returncode == 0, done.stderr[-300:]
        outputs[cpu] = np.fromfile(f"{prefix}.0", dtype=np.float32)
    assert np.array_equal(outputs["max,sme=off"], outputs["cortex-a76"])
    if arm64.qemu_version(ready.qemu)[0] < 8:
        with pytest.raises(EdgeqError, match="SME"):
            arm64.ArmRunner(program, "max")
        assert np.abs(outputs["max"] - outputs["cortex-a76"]).max() > 1.0
    else:  # a qemu that emulates SME right: -cpu max is on the menu and agrees
        assert arm64.ArmRunner(program, "max").cpu == "max"
        assert np.abs(outputs["max"] - outputs["cortex-a76"]).max() < 1e-4  # float rounding at most


def test_without_set_up_the_error_names_the_command(monkeypatch, tmp_path, digits_build):
    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "empty"))
    with pytest.raises(EdgeqError) as error:
        arm64.ArmRunner(digits_build.out_dir / "model.pte")
    assert "run `edgeq setup arm64` once" in str(error.value) and "\n" not in str(error.value)


def test_validate_runtime_arm64_from_the_command_line(ready, digits_build):
    from typer.testing import CliRunner

    from edgeq.cli import app

    program = str(digits_build.out_dir / "model.pte")
    done = CliRunner().invoke(app, ["validate", program, "--runtime", "arm64", "--cpu", "neoverse-n1"])
    assert done.exit_code == 0, done.output
    assert "arm64 (neoverse-n1, emulated)" in done.output and "bit-identical" in done.output
    refused = CliRunner().invoke(app, ["validate", program, "--runtime", "arm64", "--cpu", "cortex-a99"])
    assert refused.exit_code != 0 and "pass --cpu with one of" in refused.output
