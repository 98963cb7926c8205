"""The ``edgeq`` command line: a thin typer layer over the library."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize a float PyTorch model with adaptive-range QAT and ship it to phones.")
console = Console(stderr=True)
stdout = Console()


class RichProgress:
    """Progress bars for QAT and evaluation, plus a line per stage."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                                 transient=False, disable=not console.is_terminal)
        self.qat_task = None
        self.eval_task = None

    def __enter__(self) -> "RichProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def stage(self, name: str) -> None:
        if not console.is_terminal:
            console.print(f"[dim]edgeq: {name}[/dim]")

    def qat_start(self, steps: int) -> None:
        self.qat_task = self.progress.add_task("QAT", total=steps, info="")

    def step(self, i: int, loss: float) -> None:
        if self.qat_task is not None:
            self.progress.update(self.qat_task, advance=1, info=f"loss {loss:.4f}")

    def eval_start(self, label: str) -> None:
        self.eval_task = self.progress.add_task(f"eval {label}", total=None, info="")

    def eval_advance(self, k: int) -> None:
        if self.eval_task is not None:
            self.progress.update(self.eval_task, advance=k)

    def eval_end(self) -> None:
        if self.eval_task is not None:
            task = self.progress.tasks[self.eval_task]
            self.progress.update(self.eval_task, total=task.completed)


def _fail(exc: Exception) -> None:
    from .errors import EdgeqError

    if isinstance(exc, EdgeqError):
        console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    raise exc


@app.command()
def build(
    target: str = typer.Option("android", help="Built-in target name (see `edgeq targets`) or a .toml file."),
    recipe: Optional[str] = typer.Option(None, help="Recipe .py file or importable module (default: bundled digits example)."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: ./edgeq-out/<recipe name>)."),
    plan: Optional[Path] = typer.Option(None, help="Use this (edited) plan.json instead of planning."),
    precision: Optional[str] = typer.Option(None, help="One precision for every layer, from the target's menu (default: planned per layer)."),
    size_budget: Optional[float] = typer.Option(None, help="Planner: program size limit, in bytes (> 1) or as a fraction of the float program (<= 1)."),
    outlier_ratio: float = typer.Option(8.0, help="Planner: layers whose input has max |x| / p99.9 above this keep a wide precision."),
    steps: int = typer.Option(300, help="QAT steps."),
    lr: float = typer.Option(1e-3, help="QAT learning rate."),
    ranges: str = typer.Option("adaptive", help="Range tracking during QAT: adaptive (edgeq's voting tracker) or ema (PT2E's default)."),
    fold_bn: bool = typer.Option(True, help="Fold BatchNorm into conv weights before QAT (exact; training sees the shipped weights)."),
    up_ratio: float = typer.Option(0.5, help="Adaptive ranges: share of votes above the range that commits an increase."),
    down_ratio: float = typer.Option(0.7, help="Adaptive ranges: share of votes below the range that commits a decrease."),
    min_votes: int = typer.Option(8, help="Adaptive ranges: votes needed before any commit."),
    window: int = typer.Option(0, help="Adaptive ranges: forget votes after this many steps without a commit (0: never)."),
    rule: str = typer.Option("mean", help="Adaptive ranges: 'mean' (blend with the votes' mean) or 'step'."),
    keep: float = typer.Option(0.5, help="Adaptive ranges, rule mean: weight of the committed value."),
    step: float = typer.Option(0.05, help="Adaptive ranges, rule step: relative step size."),
    freeze_ranges: float = typer.Option(0.8, help="Freeze range observation after this share of QAT."),
    freeze_bn: float = typer.Option(0.5, help="Freeze BatchNorm statistics after this share of QAT (with --no-fold-bn)."),
    max_drop: float = typer.Option(1.0, help="Fail when model.pte scores more than this many points below float."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same program."),
    device: str = typer.Option("cpu", help="Device for QAT (cpu or cuda); export and lowering stay on the CPU."),
    allow_sdk_download: bool = typer.Option(False, help="Qualcomm targets: let ExecuTorch download the QNN SDK when QNN_SDK_ROOT is unset."),
) -> None:
    """Quantize, train, lower and validate a model; write model.pte and its report."""
    try:
        from .build import BuildConfig
        from .build import build as run_build
        from .qat import QATConfig
        from .quantizer import RangeConfig
        from .ranges import VoteConfig

        try:
            vote = VoteConfig(up_ratio=up_ratio, down_ratio=down_ratio, min_votes=min_votes, window=window,
                              rule=rule, keep=keep, step=step)
            range_config = RangeConfig(mode=ranges, vote=vote)
        except ValueError as exc:
            from .errors import EdgeqError

            raise EdgeqError(f"invalid range option: {exc}", "see `edgeq build --help`") from exc
        qat = QATConfig(steps=steps, lr=lr, ranges=range_config, fold_bn=fold_bn, freeze_ranges=freeze_ranges,
                        freeze_bn=freeze_bn, device=device)
        config = BuildConfig(target=target, out=out, plan=plan, precision=precision, qat=qat,
                             size_budget=size_budget, outlier_ratio=outlier_ratio,
                             max_drop=max_drop, seed=seed, allow_sdk_download=allow_sdk_download)
        with RichProgress() as progress:
            try:
                result = run_build(recipe, config, progress=progress)
            except Exception as exc:
                from .errors import AccuracyError

                if isinstance(exc, AccuracyError):
                    progress.__exit__()
                raise
        _summary(result)
    except Exception as exc:  # noqa: BLE001 - user errors become one line
        _fail(exc)


def _summary(result) -> None:
    from rich.table import Table

    s = result.scores
    table = Table(title=f"edgeq build: {result.recipe} -> {result.target.name}", show_header=True)
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("float", f"{s.float:.2f}")
    table.add_row("QAT (simulated)", f"{s.qat:.2f}")
    table.add_row("converted reference", f"{s.reference:.2f}")
    table.add_row("model.pte (ExecuTorch)", f"{s.program:.2f}")
    table.add_row("reference vs .pte top-1 agreement", f"{s.agreement['reference_vs_program']:.2f}%")
    table.add_row("program size", f"{result.sizes['program_bytes']:,} B (float {result.sizes['float_program_bytes']:,} B)")
    d = result.lowered.delegation
    table.add_row("delegated ops / outside", f"{d.delegated_ops} / {d.outside_ops}")
    stdout.print(table)
    timing = Table(title="time per stage (s)")
    timing.add_column("stage")
    timing.add_column("seconds", justify="right")
    for name, secs in result.timings.items():
        timing.add_row(name, f"{secs:.2f}")
    timing.add_row("total", f"{sum(result.timings.values()):.2f}")
    stdout.print(timing)
    stdout.print(f"wrote {result.out_dir}")


@app.command()
def analyze(
    target: str = typer.Option("android", help="Target whose precision menu is measured."),
    recipe: Optional[str] = typer.Option(None, help="Recipe .py file or importable module (default: bundled digits example)."),
    out: Path = typer.Option(Path("analysis.json"), help="Where to write the analysis."),
    batches: int = typer.Option(8, help="Calibration batches from train_data()."),
) -> None:
    """Measure every layer's ranges, SQNR and sensitivity; print a table and write analysis.json."""
    try:
        from .analyze import analyze as run_analyze
        from .analyze import print_analysis
        from .errors import EdgeqError
        from .package import write_json_atomic
        from .recipe import load_recipe
        from .targets import load_target

        t = load_target(target)
        r = load_recipe(recipe)
        if out.parent and not out.parent.exists():
            raise EdgeqError(f"directory {out.parent} does not exist", "create it or pass --out elsewhere")
        analysis = run_analyze(r.model(), r, t, batches=batches)
        print_analysis(analysis, stdout)
        write_json_atomic(out, analysis.to_dict())
        stdout.print(f"wrote {out}")
    except Exception as exc:  # noqa: BLE001
        _fail(exc)


@app.command()
def targets() -> None:
    """List the built-in targets and their precision menus."""
    from rich.table import Table

    from .targets import builtin_targets, load_target

    table = Table(title="edgeq targets")
    for col in ("name", "backend", "chipset", "default", "precisions"):
        table.add_column(col)
    for name in builtin_targets():
        try:
            t = load_target(name)
        except Exception as exc:  # noqa: BLE001
            _fail(exc)
        table.add_row(t.name, t.backend, t.chipset, t.default_precision, ", ".join(t.precisions))
    stdout.print(table)


@app.command()
def validate(
    program: Path = typer.Argument(..., help="The model.pte to run."),
    recipe: Optional[str] = typer.Option(None, help="Recipe whose eval_data() scores the program (default: bundled example)."),
    max_drop: Optional[float] = typer.Option(None, help="Fail when the program scores more than this many points below float."),
    min_agreement: Optional[float] = typer.Option(None, help="Fail when top-1 agreement with float falls below this percent."),
) -> None:
    """Run a .pte on the host through ExecuTorch's runtime and score it."""
    try:
        from .errors import AccuracyError, EdgeqError
        from .evaluate import agreement, cosine, evaluate, sqnr_db
        from .recipe import load_recipe
        from .validate import run_program

        if not program.is_file():
            raise EdgeqError(f"program {program} not found", "pass the path of a model.pte written by `edgeq build`")
        r = load_recipe(recipe)
        prog = evaluate(run_program(program), r.eval_data(), r.metric)
        ref = evaluate(r.model().eval(), r.eval_data(), r.metric)
        agree = agreement(ref.outputs, prog.outputs)
        stdout.print(f"program metric {prog.metric:.2f}  float {ref.metric:.2f}  drop {ref.metric - prog.metric:.2f}  "
                  f"top-1 agreement with float {agree:.2f}%  SQNR {sqnr_db(ref.outputs, prog.outputs):.1f} dB  "
                  f"cosine {cosine(ref.outputs, prog.outputs):.4f}  ({prog.samples} samples)")
        if max_drop is not None and ref.metric - prog.metric > max_drop:
            raise AccuracyError(f"drop {ref.metric - prog.metric:.2f} exceeds --max-drop {max_drop}", "rebuild with more QAT steps or a wider plan")
        if min_agreement is not None and agree < min_agreement:
            raise AccuracyError(f"agreement {agree:.2f}% is below --min-agreement {min_agreement}", "rebuild with more QAT steps or a wider plan")
    except Exception as exc:  # noqa: BLE001
        _fail(exc)


def main() -> None:
    import logging

    # ExecuTorch and torchao log deprecation chatter at WARNING; the CLI's own
    # output is the summary, the progress and one line per error.
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    app()


if __name__ == "__main__":
    sys.exit(main())
