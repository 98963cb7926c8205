"""The debug stage: per-layer numerics for the report, the reference against float and, where the
backend allows, the program's own layers read back from ExecuTorch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from edgeq.checks.debug import LayerError
from edgeq.checks.debug import debug as layer_debug
from edgeq.configs import DEBUG_PROGRAM_LAYERS
from edgeq.context import BuildContext, FloatBaseline
from edgeq.errors import EdgeqError
from edgeq.lower import Lowered
from edgeq.planning.plan import Plan

__all__ = ["Numerics", "debug_layers", "reads_layers"]


@dataclass
class Numerics:
    layer_errors: list[LayerError]
    first_divergence: LayerError | None
    #: the program's own layers (or why they were skipped); None: not attempted
    program_layers: dict[str, Any] | None


def debug_layers(
    ctx: BuildContext, plan: Plan, baseline: FloatBaseline, reference: torch.fx.GraphModule, lowered: Lowered
) -> Numerics:
    """Per-layer numerics: the reference against float, and the program's own layers where the backend allows."""
    ctx.announce("debug")
    with ctx.stages("debug"):
        try:
            errors, first = layer_debug(baseline.model, reference, ctx.recipe)
        except Exception:  # noqa: BLE001 - a diagnostic; e.g. a static-batch graph cannot take an eval batch
            errors, first = [], None
        return Numerics(errors, first, _program_layers(ctx, plan, baseline, reference, lowered))


def reads_layers(target: Any) -> bool:
    """How a program of ``target`` is debugged: layer by layer (one delegate call per layer, read
    back through ETDump: True), or through the delegate's own dump of its intermediates (False)."""
    return target.impl.per_op_partitioners(target) is not None


def _program_layers(
    ctx: BuildContext, plan: Plan, baseline: FloatBaseline, reference: torch.fx.GraphModule, lowered: Lowered
) -> dict[str, Any] | None:
    config, target = ctx.config, ctx.target
    if config.debug_program is False:
        return None
    if config.debug_program is None and len(plan.layers) > DEBUG_PROGRAM_LAYERS:
        return {
            "skipped": f"{len(plan.layers)} layers (the build reads them back by itself up to "
            f"{DEBUG_PROGRAM_LAYERS}); run `edgeq debug` on this directory, or build "
            "with --debug-program"
        }
    try:
        if not reads_layers(target):
            from edgeq.checks.intermediates import debug_intermediates

            try:
                return {"intermediates": debug_intermediates(reference, ctx.recipe, target).to_json()}
            except EdgeqError:  # the backend cannot dump its intermediates
                return None
        from edgeq.checks.program_debug import debug_program

        try:
            return debug_program(
                baseline.model, reference, ctx.recipe, target, shipped=lowered.program, samples=config.debug_samples
            ).to_json()
        except EdgeqError as exc:  # this program cannot be read back layer by layer
            return {"skipped": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not fail a build that validated
        return {"error": f"{type(exc).__name__}: {exc}"}
