"""The package stage: model.pte, plan, manifest, analysis, the app bundle and the reference, written
into the staged output directory (swapped in only when the whole build succeeds)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgeq import capture as capture_mod
from edgeq.checks.program import Scores
from edgeq.context import BuildContext, FloatBaseline
from edgeq.errors import AccuracyError, EdgeqError
from edgeq.lower import Lowered
from edgeq.planning.choose import PlanChoice
from edgeq.planning.plan import Plan
from edgeq.quant.qat import QATReport
from edgeq.ship.bundle import write_bundle
from edgeq.ship.package import OutputDir, sha256, write_bytes_atomic, write_json_atomic
from edgeq.ship.report import BuildRecord, build_report, manifest, write_html
from edgeq.targets import Target

__all__ = ["BuildResult", "package", "write_report"]


@dataclass
class BuildResult:
    recipe: str
    target: Target
    plan: Plan
    scores: Scores
    sizes: dict[str, int]
    lowered: Lowered
    qat: QATReport
    timings: dict[str, float]
    out_dir: Path | None
    report: dict[str, Any]
    #: the converted PT2E reference (q/dq on floats), kept for debugging
    reference_model: torch.nn.Module | None = None

    @classmethod
    def of(cls, record: BuildRecord, report: dict[str, Any], reference: torch.nn.Module) -> BuildResult:
        """What edgeq.build returns, from what its report was written from (out_dir: set on commit)."""
        r = record
        return cls(r.recipe.name, r.target, r.plan, r.scores, r.sizes, r.lowered, r.qat_report, r.timings, None,
                   report, reference)  # fmt: skip

    @property
    def drop(self) -> float:
        return self.scores.float - self.scores.program

    def gate(self, max_drop: float) -> None:
        """--max-drop: the one place the evaluation data counts, and it decides only pass or fail."""
        if self.drop > max_drop:
            raise AccuracyError(
                f"the program's {self.scores.program:.2f} is {self.drop:.2f} points below float "
                f"({self.scores.float:.2f}), over --max-drop {max_drop} ({self.scores.verdict or 'no interval'}); "
                f"artifacts are in {self.out_dir} for inspection",
                "train longer (--steps), keep sensitive layers wider in plan.json, or raise --max-drop",
            )


def package(
    ctx: BuildContext,
    output: OutputDir,
    choice: PlanChoice,
    baseline: FloatBaseline,
    reference: torch.fx.GraphModule,
    lowered: Lowered,
    signature: Any,
) -> dict[str, Any]:
    """Write the build's artifacts; returns the program notes (backend facts and delegate payloads)."""
    ctx.announce("package")
    with ctx.stages("package"):
        write_bytes_atomic(output.path("model.pte"), lowered.program)
        choice.plan.save(output.path("plan.json"))
        notes = {**ctx.backend.program_notes(lowered.program), **lowered.payloads()}
        digest = sha256(lowered.program)
        man = manifest(ctx.recipe, ctx.target, ctx.config, signature, baseline, digest, notes)
        write_json_atomic(output.path("manifest.json"), man)
        if choice.analysis is not None:
            choice.analysis.save(output.path("analysis.json"))
        write_bundle(output.path("bundle"), lowered.program, man, vocab=_vocab(ctx))
        # The converted reference, for `edgeq validate` and numeric debugging.
        exported = capture_mod.export(reference, baseline.example_inputs)
        torch.export.save(exported, str(output.path("reference.pt2")))
    return notes


def write_report(output: OutputDir, record: BuildRecord) -> dict[str, Any]:
    """report.json and report.html; returns the report."""
    report = build_report(record)
    write_json_atomic(output.path("report.json"), report)
    write_html(output.path("report.html"), report)
    return report


def _vocab(ctx: BuildContext) -> bytes | None:
    recipe = ctx.recipe
    if not recipe.text:
        return None
    path = Path(str(recipe.text.get("vocab_file", "")))
    if not path.is_file():
        raise EdgeqError(
            f"recipe {recipe.name}: text['vocab_file'] {str(path)!r} is not a file",
            "point it at the tokenizer's vocab.txt",
        )
    return path.read_bytes()
