"""Programs on Arm kernels: the bundled example and an ImageNet CNN on ExecuTorch's aarch64 runtime under qemu.

For each program, in one run on one machine: the recipe's metric on the x86 runtime and on the
aarch64 runtime (qemu user-mode, one emulated core at a time), top-1 agreement, the share of output
values bit-identical to x86 and the largest difference, and the wall time of the emulated run (not a
phone's latency: emulation). The ImageNet program is a uniform-int8 edgeq build of
EfficientNet-Lite0 (`--precision int8 --steps 0`: PTQ candidates only, the fastest build that
gives the program the default flow ships for it).

Needs `edgeq setup arm64` and `pip install -e '.[bench]'`; ImageNet photos from ../shared/data.

    python scripts/bench_arm64.py [--cpus cortex-a76 cortex-a53] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import imagenet_recipes  # noqa: E402
from bench_report import machine, table, write_section  # noqa: E402

from edgeq.checks import arm64  # noqa: E402
from edgeq.configs import BuildConfig, QATConfig  # noqa: E402
from edgeq.pipeline import build  # noqa: E402
from edgeq.recipe import load_recipe  # noqa: E402


def _rows(label: str, program: Path, recipe, cpus: list[str]) -> list[list[str]]:
    rows = []
    for cpu in cpus:
        start = time.perf_counter()
        c = arm64.compare(program, recipe, cpu)
        seconds = time.perf_counter() - start
        rows.append([
            label, cpu, str(c.samples), f"{c.host_metric:.2f}", f"{c.metric:.2f}", f"{c.agreement:.1f}%",
            f"{100 * c.bitexact[0]:.1f}%", f"{c.max_difference[0]:.3g}", f"{seconds:.0f} s",
        ])  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", nargs="*", default=["cortex-a76", "cortex-a53"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    ready = arm64.find_setup()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        digits = load_recipe(None)
        build(digits, BuildConfig(out=Path(tmp) / "digits"))
        rows += _rows("digits CNN (bundled example)", Path(tmp) / "digits" / "model.pte", digits, args.cpus)
        if imagenet_recipes.available():
            lite0 = imagenet_recipes.recipe("lite0")
            config = BuildConfig(out=Path(tmp) / "lite0", precision="int8", qat=QATConfig(steps=0), debug_program=False)
            build(lite0, config)
            rows += _rows("EfficientNet-Lite0 int8 (4.65M)", Path(tmp) / "lite0" / "model.pte", lite0, args.cpus)
    header = ["program", "emulated core", "samples", "x86 runtime", "aarch64 runtime", "top-1 agreement",
              "bit-identical outputs", "largest difference", "emulated run"]  # fmt: skip
    body = (
        "## Arm kernels under emulation (`scripts/bench_arm64.py`)\n\n"
        f"Machine: {machine()}; qemu-aarch64 {'.'.join(map(str, arm64.qemu_version(ready.qemu)))}.\n\n"
        "Each program on ExecuTorch's x86 runtime and on its aarch64 runtime (the executorch wheel for "
        "manylinux_2_28_aarch64, edgeq's runner, qemu user-mode on the named core), on the recipe's evaluation "
        "data (digits: 360 scikit-learn digits; Lite0: the 250 ImageNet photos of `bench_imagenet.py`). "
        "Outputs are logits; a difference of one output step (the int8 output's scale) is a requantization "
        "that rounds the other way. The time is emulation, never a phone's latency.\n\n" + table(header, rows) + "\n"
    )
    print(body)
    if not args.no_write:
        write_section("arm64", body)


if __name__ == "__main__":
    main()
