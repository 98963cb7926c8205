"""Every setting of a build, as validated, frozen dataclasses (the public configuration API).

Configs check themselves on construction and are changed with
``dataclasses.replace``, so a misspelt field or an impossible value fails at
once, in one line. This module imports nothing heavy: the CLI reads its
defaults from here without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeq.errors import ConfigError

if TYPE_CHECKING:
    from edgeq.planning.plan import Plan
    from edgeq.targets import Target

__all__ = [
    "BuildConfig",
    "DEBUG_PROGRAM_LAYERS",
    "LOSSES",
    "Loss",
    "OPTIMIZERS",
    "Optimizer",
    "QATConfig",
    "RANGE_MODES",
    "RULES",
    "RangeConfig",
    "RangeMode",
    "Rule",
    "VoteConfig",
    "field_docs",
    "resolve",
]


class Rule(StrEnum):
    """How a commit moves the committed value (spec claims 4 and 5)."""

    MEAN = "mean"
    STEP = "step"


RULES = tuple(r.value for r in Rule)


@dataclass(frozen=True)
class VoteConfig:
    """The method's knobs, named as in the spec (they are public API)."""

    #: commit an increase when more than this share of the votes is above P
    up_ratio: float = 0.5
    #: commit a decrease when more than this share of the votes is below P
    down_ratio: float = 0.7
    #: no commit before this many observations since the last one
    min_votes: int = 8
    #: forget the votes after this many observations without a commit (0: never)
    window: int = 0
    #: "mean" (claim 4: blend P with the mean of the votes) or "step" (claim 5)
    rule: str = "mean"
    #: weight of the committed value in the "mean" blend
    keep: float = 0.5
    #: relative step of the "step" rule
    step: float = 0.05
    #: floor of |P| in the "step" rule, so a zero bound can still move
    eps: float = 2**-12

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"rule must be one of {RULES}, got {self.rule!r}", "see `edgeq build --help`")
        # Stored as the plain string: it travels into fake-quant kwargs, JSON and checkpoints.
        object.__setattr__(self, "rule", Rule(self.rule).value)
        if not (0.0 <= self.up_ratio < 1.0 and 0.0 <= self.down_ratio < 1.0):
            raise ConfigError("up_ratio and down_ratio must lie in [0, 1)", "see `edgeq build --help`")
        if self.min_votes < 1 or self.window < 0:
            raise ConfigError("min_votes must be >= 1 and window >= 0", "see `edgeq build --help`")
        if self.window and self.window < self.min_votes:
            raise ConfigError(
                "window must be 0 or at least min_votes, or nothing could ever commit", "see `edgeq build --help`"
            )
        if not 0.0 <= self.keep <= 1.0:
            raise ConfigError("keep must lie in [0, 1]", "see `edgeq build --help`")

    def as_dict(self) -> dict:
        return asdict(self)


#: adaptive: edgeq's voting tracker; ema: PT2E's moving-average observers in
#: torchao's FakeQuantize; ema-fused: PT2E's default as shipped
#: (FusedMovingAvgObsFakeQuantize), kept for comparison: measured here, its
#: fused kernel fake-quantizes per-channel 4-bit weights on a grid 0.94x the
#: one convert_pt2e emits, which cost 5 points of .pte accuracy on digits.
class RangeMode(StrEnum):
    ADAPTIVE = "adaptive"
    EMA = "ema"
    EMA_FUSED = "ema-fused"


RANGE_MODES = tuple(m.value for m in RangeMode)


@dataclass(frozen=True)
class RangeConfig:
    """Which fake-quant QAT uses, and the adaptive tracker's knobs."""

    #: range tracking during QAT: adaptive (edgeq's voting tracker), ema (PT2E's moving-average
    #: observers, unfused) or ema-fused (PT2E's default as shipped)
    mode: str = "adaptive"
    vote: VoteConfig = field(default_factory=VoteConfig)

    def __post_init__(self) -> None:
        if self.mode not in RANGE_MODES:
            raise ConfigError(f"ranges must be one of {RANGE_MODES}, got {self.mode!r}", "see `edgeq build --help`")
        object.__setattr__(self, "mode", RangeMode(self.mode).value)


class Optimizer(StrEnum):
    SGD = "sgd"  # momentum 0.9
    ADAM = "adam"


OPTIMIZERS = tuple(o.value for o in Optimizer)


class Loss(StrEnum):
    """What QAT learns from."""

    TASK = "task"  # the recipe's loss() against train_data()'s targets
    DISTILL = "distill"  # the float model's own outputs (KL on logits, MSE otherwise); no labels needed
    BOTH = "both"  # their sum


LOSSES = tuple(item.value for item in Loss)


@dataclass(frozen=True)
class QATConfig:
    """How QAT trains; validated on construction, changed with ``dataclasses.replace``."""

    #: QAT optimizer steps (unset: --epochs passes over the training batches, held-out ones excluded)
    steps: int | None = None
    #: QAT length in passes over the training data, when --steps is unset
    epochs: float = 15.0
    #: share of train_data()'s batches held out of training (never the eval data): QAT stops
    #: early when its loss there stops improving, and the build picks between PTQ and QAT on it
    holdout: float = 0.1
    #: hold out more batches (up to a third) when --holdout's share holds fewer samples than this
    min_holdout_samples: int = 64
    #: held-out checks without improvement before QAT stops (0: never stop early)
    patience: int = 2
    #: QAT learning rate (cosine schedule to 0)
    lr: float = 1e-3
    #: learning rates QAT tries before it trains: --lr, then each a factor sqrt(10) lower, each in a
    #: short run (a quarter of the schedule) from the same calibrated state; the lowest held-out
    #: loss picks the rate of the full run (1: --lr as given)
    lr_candidates: int = 1
    #: QAT optimizer: sgd (momentum 0.9) or adam
    optimizer: str = "sgd"
    #: QAT weight decay
    weight_decay: float = 0.0
    #: training batches that calibrate the ranges before QAT
    calibration_batches: int = 8
    ranges: RangeConfig = field(default_factory=RangeConfig)
    #: fold BatchNorm into conv weights before QAT, so that the simulated
    #: weight is exactly the weight convert quantizes
    fold_bn: bool = True
    #: freeze BatchNorm statistics after this share of QAT (without BatchNorm folding)
    freeze_bn: float = 0.5
    #: freeze range observation after this share of QAT
    freeze_ranges: float = 0.8
    #: share of QAT that layers planned below 8 bits train at the intermediate width first
    intermediate_share: float = 0.3
    #: the intermediate weight width of plans edgeq makes (0: off); an edited plan carries its own
    intermediate_bits: int = 8
    #: set by the build's seed (BuildConfig.seed), which seeds QAT too
    seed: int = 0
    #: device QAT trains on (cpu or cuda); export and lowering stay on the CPU
    device: str = "cpu"
    #: write a resumable checkpoint every this many steps (0: never)
    checkpoint_every: int = 100
    #: what QAT learns from: distill (the float model's outputs, KL on logits, MSE otherwise: no
    #: labels needed), task (the recipe's loss on its targets) or both
    loss: str = "distill"
    #: train with the model's own dropout rates; False: every dropout off while training (a model
    #: learning to reproduce its float self: dropout noise would swamp a quantization error that small)
    dropout: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}", f"use one of: {', '.join(OPTIMIZERS)}")
        object.__setattr__(self, "optimizer", Optimizer(self.optimizer).value)
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown QAT loss {self.loss!r}", f"use one of: {', '.join(LOSSES)}")
        object.__setattr__(self, "loss", Loss(self.loss).value)
        if not isinstance(self.ranges, RangeConfig):
            raise ConfigError(f"QATConfig.ranges is a {type(self.ranges).__name__}", "pass an edgeq.RangeConfig")
        checks = [
            (self.steps is None or self.steps >= 0, "steps must be >= 0"),
            (self.epochs >= 0, "epochs must be >= 0"),
            (0.0 <= self.holdout < 1.0, "holdout is a share of the training batches, in [0, 1)"),
            (self.min_holdout_samples >= 0, "min_holdout_samples must be >= 0"),
            (self.patience >= 0, "patience must be >= 0"),
            (self.lr > 0, "lr must be > 0"),
            (self.lr_candidates >= 1, "lr_candidates must be >= 1 (1: --lr as given)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.calibration_batches >= 1, "calibration_batches must be >= 1"),
            (
                0.0 <= self.freeze_bn <= 1.0 and 0.0 <= self.freeze_ranges <= 1.0,
                "freeze_bn and freeze_ranges are shares of the steps, in [0, 1]",
            ),
            (0.0 <= self.intermediate_share <= 1.0, "intermediate_share must lie in [0, 1]"),
            (self.intermediate_bits in (0, 8, 16), "intermediate_bits must be 0 (off), 8 or 16"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
        ]
        for ok, why in checks:
            if not ok:
                raise ConfigError(f"invalid QAT setting: {why}", "fix the option (see `edgeq build --help`)")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ranges"] = {"mode": self.ranges.mode, **self.ranges.vote.as_dict()}
        return data


# Largest model (planned layers) whose program a build debugs layer by layer unasked.
DEBUG_PROGRAM_LAYERS = 32


@dataclass(frozen=True)
class BuildConfig:
    """What ``edgeq.build`` does; validated on construction, changed with ``dataclasses.replace``."""

    #: a built-in target name (see `edgeq targets`) or a target .toml file
    target: str | Path | Target = "android"
    #: output directory (default: ./edgeq-out/<recipe name>)
    out: str | Path | None = None
    #: an edited plan.json to build as written (unset: --precision, or a plan made layer by layer)
    plan: str | Path | Plan | None = None
    #: one precision from the target's menu for every layer (unset: planned layer by layer)
    precision: str | None = None
    #: planner constraint: program bytes (> 1) or a fraction of the float program (<= 1)
    size_budget: float | None = None
    #: planner: inputs with max |x| / p99.9 above this keep a wide precision
    outlier_ratio: float = 8.0
    #: unset: QATConfig's defaults updated with the recipe's own ``qat`` settings
    qat: QATConfig | None = None
    #: fail when the .pte's metric falls more than this below float
    max_drop: float = 1.0
    #: random seed (QAT's too): the same seed gives the same program
    seed: int = 0
    #: let ExecuTorch download the Qualcomm SDK when QNN_SDK_ROOT is unset
    allow_sdk_download: bool = False
    #: continue QAT from the checkpoint a killed build left beside the output directory
    resume: bool = False
    #: read the program's per-layer outputs back through ETDump for the report; unset: when
    #: the model has at most DEBUG_PROGRAM_LAYERS planned layers (it lowers one delegate
    #: call per layer, about half a second each); backends without per-op lowering skip it
    debug_program: bool | None = None
    #: evaluation samples the per-layer program debugging runs
    debug_samples: int = 8
    #: also run the program on ExecuTorch's aarch64 runtime under qemu, emulating this core
    #: (cortex-a76, neoverse-n1, cortex-a72, cortex-a53; `edgeq setup arm64` first), and compare
    #: every output with the x86 runtime's; unset: x86 only
    arm_cpu: str | None = None
    #: LLM recipes: 4-bit groups on an asymmetric min-max grid, the zero points XNNPACK's 4-bit
    #: kernels lack carried by a small 8-bit linear beside each (0.25 bits more per weight);
    #: --no-zero-points: symmetric groups; unset: the per-layer plan measures both grids on
    #: training text and keeps the better (symmetric with --precision or --steps)
    zero_points: bool | None = None
    #: LLM recipes: the output head's precision (w4g32, w4g64, w4g128, w8dyn, fp16, float), whatever
    #: --precision or the plan gives the other linears, as llama.cpp's --output-tensor-type: the head
    #: decides the next token, and at 4 bits it cost SmolLM2 most of its next-token agreement
    head: str | None = None
    #: LLM recipes: the program's teacher-forced next-token agreement with the float model (%) it
    #: must reach: the --max-drop plan check backs off until the plan agrees this well on training
    #: text, and the build fails (exit 3) when the program does not on eval_text(); unset: reported
    min_agreement: float | None = None
    #: LLM recipes: the 4-bit group sizes the per-layer plan may give a linear, comma-separated (e.g.
    #: 32,64,128: larger groups hold fewer scales and lose more; each is measured per linear, which
    #: multiplies the analysis's time); unset: 32
    group_sizes: str | None = None
    #: calibration batches of the plain-PTQ candidate every build also measures; the candidate
    #: with the lowest held-out loss ships (0: QAT only)
    ptq_batches: int = 16
    #: when the shipped reference misses max_drop, send up to this many of its most sensitive
    #: layers to float, one at a time, re-measuring each step (0: never)
    fallback_layers: int = 5
    #: floating-point operations the per-layer sensitivity scoring may spend (layers x scored
    #: precisions x samples x the model's FLOPs per sample); beyond it each score uses fewer
    #: samples. A budget in FLOPs, not seconds: the same build plans the same on any machine
    analysis_flops: float = 4e12
    #: also measure PTQ of the model with cross-layer equalization (consecutive convolutions with
    #: only BatchNorm/ReLU between rescaled to equal weight ranges) as a candidate, and weight
    #: rounding on top of it; off by default: it did not pay on EfficientNet-Lite0/1 (BENCHMARKS.md)
    equalization: bool = False
    #: also measure PTQ with each activation range searched by its quantization error on the
    #: calibration histogram (beside the observer's own greedy search) as a candidate, and weight
    #: rounding on top of it; off by default: it did not pay on EfficientNet-Lite0/1 (BENCHMARKS.md)
    clipping: bool = False
    #: also measure PTQ with empirical bias correction as a candidate (needs ptq_batches > 0)
    bias_correction: bool = True
    #: also measure PTQ with each layer's weight scales and rounding fitted to its float output
    #: (scale search + AdaRound) as a candidate (needs ptq_batches > 0)
    rounding: bool = True
    #: AdaRound steps per layer of that candidate (0: the per-channel scale search only)
    rounding_iterations: int = 200
    #: training samples (held-out batches skipped) bias correction and weight rounding fit on
    fit_samples: int = 64

    @property
    def training(self) -> QATConfig:
        """The QAT settings a build runs with: ``qat``, or the defaults when it is None
        (``edgeq.build`` puts the recipe's settings there first)."""
        return self.qat if self.qat is not None else QATConfig()

    def __post_init__(self) -> None:
        if self.qat is not None and not isinstance(self.qat, QATConfig):
            raise ConfigError(f"BuildConfig.qat is a {type(self.qat).__name__}", "pass an edgeq.QATConfig")
        if self.size_budget is not None and self.size_budget <= 0:
            raise ConfigError(
                f"--size-budget {self.size_budget} is not positive",
                "pass bytes (> 1) or a fraction of the float program (<= 1)",
            )
        if self.max_drop < 0:
            raise ConfigError(f"--max-drop {self.max_drop} is negative", "pass the points the program may lose, >= 0")
        if self.outlier_ratio <= 1:
            raise ConfigError(f"--outlier-ratio {self.outlier_ratio} must be > 1", "the default is 8")
        if self.ptq_batches < 0:
            raise ConfigError(f"ptq_batches {self.ptq_batches} is negative", "pass 0 (QAT only) or a batch count")
        if self.fallback_layers < 0:
            raise ConfigError("fallback_layers must be >= 0", "pass 0 (never) or a number of layers")
        if self.analysis_flops <= 0:
            raise ConfigError("analysis_flops must be > 0", "pass the FLOPs the layer analysis may spend, e.g. 4e12")
        if self.fit_samples < 1:
            raise ConfigError("fit_samples must be >= 1", "pass a positive number of samples")
        if self.rounding_iterations < 0:
            raise ConfigError("rounding_iterations must be >= 0", "pass 0 (scale search only) or a step count")
        if self.debug_samples < 1:
            raise ConfigError("debug_samples must be >= 1", "pass a positive number of samples")
        if self.plan is not None and self.precision is not None:
            raise ConfigError("both a plan and a uniform precision were given", "pass --plan or --precision, not both")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's ``#:`` comment from the class source, joined into one line (help texts, docs)."""
    import inspect
    import re

    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = re.match(r"(\w+)\s*:", stripped)
        if match and pending:
            docs[match.group(1)] = " ".join(pending).replace("``", "")
        pending = []
    return docs


def resolve(
    config: BuildConfig | None = None,
    recipe_qat: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    qat_overrides: Mapping[str, Any] | None = None,
) -> BuildConfig:
    """The one place a build's settings are merged; returns the resolved, frozen config.

    Precedence, lowest first: QATConfig's defaults, the recipe's ``qat`` settings (``recipe_qat``),
    an API ``config.qat`` (which replaces both), then ``qat_overrides`` (QAT settings given on the
    command line). ``overrides`` replace BuildConfig fields (``edgeq.build(recipe, max_drop=2)``).
    QAT's seed is the build's ``seed``: one seed makes one program. The result's ``qat`` is set.
    """
    config = config or BuildConfig()
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in fields(BuildConfig)})
        if unknown:
            names = ", ".join(f.name for f in fields(BuildConfig))
            raise ConfigError(f"unknown build setting(s): {', '.join(unknown)}", f"use one of: {names}")
        config = replace(config, **overrides)
    qat = config.qat if config.qat is not None else QATConfig(**(recipe_qat or {}))
    if qat_overrides:
        unknown = sorted(set(qat_overrides) - {f.name for f in fields(QATConfig)})
        if unknown:
            raise ConfigError(f"unknown QAT setting(s): {', '.join(unknown)}", "see `edgeq build --help`")
        qat = replace(qat, **qat_overrides)
    if qat.seed not in (0, config.seed):
        raise ConfigError(
            f"QATConfig.seed {qat.seed} differs from the build's seed {config.seed}",
            "set BuildConfig.seed (--seed): it seeds QAT too",
        )
    return replace(config, qat=replace(qat, seed=config.seed))
