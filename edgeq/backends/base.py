"""What a deployment backend provides to the pipeline.

A backend is the one place that knows its vendor: how a target file for it is
checked, how a precision plan becomes a PT2E quantizer, which ExecuTorch
partitioners lower to it, whether its SDK and host runtime are present, how
its programs run on the host, and what an app must carry to load them. The
pipeline, the checks and the bundle only ever talk to this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from edgeq.configs import RangeConfig
    from edgeq.planning.plan import Plan
    from edgeq.runtime import ProgramRunner
    from edgeq.targets import Precision, Target


@dataclass(frozen=True)
class AppRuntime:
    """What the app bundle tells a developer to add beside model.pte."""

    #: Gradle dependency lines (``group:artifact:version``)
    gradle: tuple[str, ...]
    #: one sentence on what the runtime is and what it holds
    note: str
    #: native libraries the app must package (name -> where it comes from)
    libraries: dict[str, str] = field(default_factory=dict)
    #: warnings a developer must read before shipping (runtime/compiler mismatches)
    warnings: tuple[str, ...] = ()


class Backend(ABC):
    """One ExecuTorch delegate; subclasses register under the target files' ``backend`` name."""

    name: ClassVar[str]
    #: the delegate as users know it, for reports ("XNNPACK (Arm CPU)")
    title: ClassVar[str]
    #: where a build runs this backend's programs, for the report
    host_runtime: ClassVar[str] = "the host CPU, via executorch.runtime"
    #: the float baseline (float_partitioners) carries the same fixed overhead as this backend's
    #: quantized programs; False: the planner measures the overhead under --size-budget
    float_baseline_overhead: ClassVar[bool] = True
    #: the host runtime runs the target's kernels on the host CPU, so its latency means something
    #: (False for a simulator)
    host_latency: ClassVar[bool] = True
    #: its programs run on ExecuTorch's aarch64 CPU runtime (the arm64 check, edgeq.checks.arm64)
    arm_cpu_runtime: ClassVar[bool] = False
    #: its quantizer can leave the ops between planned layers in float (Plan.other_ops), so the
    #: build measures both (False: it quantizes them as its delegate requires)
    plans_other_ops: ClassVar[bool] = False

    @abstractmethod
    def check_target(self, data: dict[str, Any], precisions: dict[str, Precision], where: str) -> None:
        """Raise EdgeqError for what this backend needs beyond the common target schema."""

    @abstractmethod
    def quantizer(self, plan: Plan, target: Target, qat: bool, ranges: RangeConfig) -> Any:
        """A PT2E quantizer that quantizes each planned layer at its precision."""

    @abstractmethod
    def partitioners(self, target: Target, allow_download: bool = False) -> list[Any]:
        """ExecuTorch partitioners that lower a converted reference for ``target``."""

    def to_edge(
        self, model: torch.nn.Module, example_inputs: tuple, target: Target, allow_download: bool = False
    ) -> Any:
        """Export at the example shape and lower with this backend's partitioners (an EdgeProgramManager).

        Backends whose lowering needs its own passes (QNN) override this.
        """
        from executorch.exir import to_edge_transform_and_lower

        partitioners = self.partitioners(target, allow_download)
        exported = torch.export.export(model, example_inputs)
        return to_edge_transform_and_lower(exported, partitioner=partitioners)

    def to_edge_with_intermediates(self, model: torch.nn.Module, example_inputs: tuple, target: Target) -> Any:
        """Lowered so that the delegate dumps each op's output to ETDump, with an ETRecord; None: unsupported."""
        return None

    def per_op_partitioners(self, target: Target) -> list[Any] | None:
        """Partitioners giving one delegate call per layer, for reading a program's intermediates; None: unsupported."""
        return None

    @abstractmethod
    def float_partitioners(self) -> list[Any]:
        """Partitioners for the float baseline program that sizes are measured against."""

    def rewrite_for_quantization(self, graph: torch.fx.GraphModule) -> int:
        """Rewrite the captured graph, in place and computing the same function, into ops this backend
        quantizes correctly, before anything records or annotates it; returns how many ops changed."""
        return 0

    def ensure_sdk(self, allow_download: bool = False) -> None:  # noqa: B027 - optional hook
        """Raise SdkMissingError (one line, naming the fix) when lowering cannot run here."""

    def runner(self, program: bytes | str | Path) -> ProgramRunner:
        """Run a program of this backend on the host, like a torch module."""
        from edgeq.runtime import ProgramRunner

        return ProgramRunner(program)

    def outside_reason(self, op: str) -> str:
        return (
            f"the {self.title} partitioner does not take this op "
            "(no delegate kernel for it, or for its dtype/arguments)"
        )

    @abstractmethod
    def app_runtime(self, manifest: dict[str, Any]) -> AppRuntime:
        """What the app needs to load this backend's programs."""

    def program_notes(self, program: bytes) -> dict[str, Any]:
        """Facts about a lowered program for the report and manifest (versions of what compiled it)."""
        return {}

    def warnings(self, notes: dict[str, Any]) -> list[str]:
        """What a developer must read before shipping a program with these notes."""
        return []
