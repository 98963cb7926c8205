"""`edgeq build`'s options, generated from the config dataclasses.

Each option is a field of :class:`~edgeq.configs.BuildConfig`, :class:`~edgeq.configs.QATConfig`,
:class:`~edgeq.configs.RangeConfig` or :class:`~edgeq.configs.VoteConfig`: its default is the
field's default and its help the field's ``#:`` comment, so the command line and the Python API
cannot drift apart. Only the command-line type is written here (a field typed ``str | Path |
Target`` is a plain string on the command line). Options are shown in one panel per config.
"""

from __future__ import annotations

import inspect
from dataclasses import MISSING, fields
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from edgeq.configs import BuildConfig, Loss, Optimizer, QATConfig, RangeConfig, RangeMode, Rule, VoteConfig, field_docs

__all__ = ["OPTIONS", "Option", "parameters", "split"]


class Option:
    """One command-line option: a config field, its command-line type, and its option name."""

    def __init__(self, config: type, field: str, kind: Any, name: str | None = None, panel: str = "") -> None:
        self.config, self.field, self.kind = config, field, kind
        #: the Python parameter name (and, with dashes, the option name)
        self.name = name or field
        self.panel = panel

    def default(self) -> Any:
        spec = next(f for f in fields(self.config) if f.name == self.field)
        value = spec.default if spec.default is not MISSING else spec.default_factory()  # type: ignore[misc,operator]
        if isinstance(self.kind, type) and issubclass(self.kind, Enum):
            return self.kind(value)
        return value

    def parameter(self) -> inspect.Parameter:
        flag = "--" + self.name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if self.kind in (bool, Optional[bool]) else [flag]
        help_text = field_docs(self.config)[self.field]
        info = typer.Option(self.default(), *decls, help=help_text, rich_help_panel=self.panel)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=self.kind)


_BUILD, _QAT, _RANGES = "Build", "QAT", "Adaptive ranges"
OPTIONS: tuple[Option, ...] = (
    *(Option(BuildConfig, name, kind, panel=_BUILD) for name, kind in (
        ("target", str), ("out", Optional[Path]), ("plan", Optional[Path]), ("precision", Optional[str]),
        ("size_budget", Optional[float]), ("outlier_ratio", float), ("max_drop", float), ("seed", int),
        ("ptq_batches", int), ("equalization", bool), ("clipping", bool), ("bias_correction", bool),
        ("rounding", bool), ("rounding_iterations", int), ("fit_samples", int),
        ("fallback_layers", int), ("analysis_flops", float), ("allow_sdk_download", bool), ("resume", bool),
        ("debug_program", Optional[bool]), ("debug_samples", int), ("arm_cpu", Optional[str]),
        ("zero_points", Optional[bool]), ("head", Optional[str]), ("group_sizes", Optional[str]),
        ("min_agreement", Optional[float]),
    )),
    *(Option(QATConfig, name, kind, panel=_QAT) for name, kind in (
        ("steps", Optional[int]), ("epochs", float), ("holdout", float), ("min_holdout_samples", int),
        ("patience", int), ("lr", float), ("lr_candidates", int),
        ("optimizer", Optimizer), ("weight_decay", float), ("loss", Loss), ("dropout", bool),
        ("calibration_batches", int), ("fold_bn", bool), ("freeze_bn", float), ("freeze_ranges", float),
        ("intermediate_share", float), ("intermediate_bits", int), ("device", str), ("checkpoint_every", int),
    )),
    Option(RangeConfig, "mode", RangeMode, name="ranges", panel=_RANGES),
    *(Option(VoteConfig, name, kind, panel=_RANGES) for name, kind in (
        ("up_ratio", float), ("down_ratio", float), ("min_votes", int), ("window", int), ("rule", Rule),
        ("keep", float), ("step", float),
    )),
)  # fmt: skip


def parameters() -> list[inspect.Parameter]:
    return [option.parameter() for option in OPTIONS]


def split(values: dict[str, Any], given: set[str]) -> tuple[BuildConfig, dict[str, Any]]:
    """The command line's BuildConfig, and the QAT settings it overrides for :func:`edgeq.configs.resolve`:
    the QAT flags the user gave (the recipe's settings fill the rest) and the range method."""
    plain = {name: value.value if isinstance(value, Enum) else value for name, value in values.items()}
    by_config: dict[type, dict[str, Any]] = {}
    for option in OPTIONS:
        by_config.setdefault(option.config, {})[option.field] = plain[option.name]
    qat = {
        option.field: plain[option.name] for option in OPTIONS if option.config is QATConfig and option.name in given
    }
    ranges = RangeConfig(mode=by_config[RangeConfig]["mode"], vote=VoteConfig(**by_config[VoteConfig]))
    return BuildConfig(**by_config[BuildConfig]), {**qat, "ranges": ranges}
