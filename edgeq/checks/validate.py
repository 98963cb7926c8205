"""Score a shipped program (the .pte) on the host or a phone against float and its reference."""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgeq.errors import EdgeqError
from edgeq.runtime import ProgramRunner, ProgramSignature, program_batches

__all__ = [
    "ProgramRunner",
    "ProgramSignature",
    "Validation",
    "load_reference",
    "program_batches",
    "run_program",
    "validate",
]


def run_program(program: bytes | str | Path) -> Callable[..., torch.Tensor]:
    return ProgramRunner(program)


@dataclass
class Validation:
    """What ``edgeq validate`` reports about a program on a recipe's evaluation data."""

    where: str
    samples: int
    program: builtins.float
    float: builtins.float
    reference: builtins.float | None
    #: top-1 agreement (percent); None for an output that is not [samples, classes] scores
    agreement_float: builtins.float | None
    agreement_reference: builtins.float | None
    #: per output: SQNR (dB) and cosine similarity against the reference (or float)
    sqnr_db: list[builtins.float]
    cosine: list[builtins.float]


def validate(
    program: str | Path,
    recipe,
    reference: torch.nn.Module | None = None,
    device: str | None = None,
    runner: str | Path | None = None,
    on_phone: bool = False,
    backend: str | None = None,
) -> Validation:
    """Score ``program`` on the host (ExecuTorch runtime) or on a phone over adb.

    On the host the program runs through its backend's runner (``backend``, or the
    one the manifest beside the program names): XNNPACK on the CPU, QNN on the HTP
    simulator.
    """
    from edgeq.checks.evaluate import agreement, collect, cosine, is_classifier_output, sqnr_db

    program = Path(program)
    if not program.is_file():
        raise EdgeqError(f"program {program} not found", "pass the path of a model.pte written by `edgeq build`")
    manifest = program_manifest(program)
    scored = int(manifest.get("scored_output", 0))  # the output the build scored
    if on_phone or device is not None or runner is not None:
        from edgeq.checks.device import device_runner

        run = device_runner(program, device, runner, scored)
        where = f"phone {run.device.serial}"
    else:
        from edgeq.backends import get_backend

        chosen = get_backend(backend or _backend_name(manifest))
        run, where = chosen.runner(program), chosen.host_runtime
        run.scored = scored
    select = recipe.score_output  # the output the build scored
    outputs, targets = collect(run, recipe.eval_data(), select=select)
    float_out, _ = collect(recipe.model().eval(), recipe.eval_data(), select=select)
    ref_out = collect(reference, recipe.eval_data(), select=select)[0] if reference is not None else None
    against = ref_out if ref_out is not None else float_out
    classifier = is_classifier_output(outputs)
    return Validation(
        where=where,
        samples=len(outputs),
        program=float(recipe.metric(outputs, targets)),
        float=float(recipe.metric(float_out, targets)),
        reference=float(recipe.metric(ref_out, targets)) if ref_out is not None else None,
        agreement_float=agreement(float_out, outputs) if classifier else None,
        agreement_reference=agreement(ref_out, outputs) if ref_out is not None and classifier else None,
        sqnr_db=[sqnr_db(against, outputs)],
        cosine=[cosine(against, outputs)],
    )


def program_manifest(program: Path) -> dict[str, Any]:
    """The manifest beside a program ({} when there is none)."""
    import json

    manifest = Path(program).with_name("manifest.json")
    if not manifest.is_file():
        return {}
    try:
        data = json.loads(manifest.read_text())
        data["target"]["backend"]
    except (ValueError, KeyError, TypeError):
        raise EdgeqError(f"{manifest} is not an edgeq manifest", "rebuild with `edgeq build`") from None
    return data


def _backend_name(manifest: dict[str, Any]) -> str:
    return str(manifest["target"]["backend"]) if manifest else "xnnpack"


def program_backend(program: Path) -> str:
    """The backend named by the manifest beside a program (xnnpack when there is none)."""
    return _backend_name(program_manifest(program))


def load_reference(path: str | Path) -> torch.nn.Module:
    """The converted PT2E reference a build saved beside its program (reference.pt2)."""
    # Registers the quantized_decomposed ops the saved graph calls.
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401

    try:
        return torch.export.load(str(path)).module()
    except Exception as exc:  # a corrupt or foreign file
        raise EdgeqError(f"cannot load the quantized reference {path}: {exc}", "rebuild with `edgeq build`") from exc
