"""The ``edgeq`` command line: a thin typer layer over the library."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

# Light modules only (no torch): `edgeq --help` stays fast.
from edgeq.errors import EdgeqError
from edgeq.logs import set_verbose

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Quantize a float PyTorch model with adaptive-range QAT and ship it to phones.",
)
console = Console(stderr=True)
stdout = Console()


@app.callback()
def _quiet(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show third-party warnings and native runtime lines for any command."
    ),
) -> None:
    """Every subcommand's output is edgeq's own unless --verbose (a subcommand's own -v also works)."""
    set_verbose(verbose)


class RichProgress:
    """edgeq's own stages on the terminal: a line per stage, QAT steps with loss, rate and ETA, evaluation counts."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=not console.is_terminal,
        )
        self.qat_task: Any = None
        self.eval_task: Any = None
        self.started = 0.0

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def stage(self, name: str) -> None:
        self.progress.console.print(f"[dim]edgeq: {name}[/dim]", highlight=False)

    def qat_start(self, steps: int) -> None:
        import time

        self.started = time.perf_counter()
        self.qat_task = self.progress.add_task("QAT", total=steps, info="")

    def step(self, i: int, loss: float) -> None:
        import time

        if self.qat_task is None:
            return
        rate = (i + 1) / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.qat_task, advance=1, info=f"loss {loss:.4g}  {rate:.1f} steps/s")
        if not console.is_terminal and ((i + 1) % 100 == 0 or i == 0):
            console.print(f"[dim]edgeq: QAT step {i + 1}: loss {loss:.4g}, {rate:.1f} steps/s[/dim]", highlight=False)

    def eval_start(self, label: str) -> None:
        self.eval_task = self.progress.add_task(f"eval {label}", total=None, info="samples")

    def eval_advance(self, k: int) -> None:
        if self.eval_task is not None:
            self.progress.update(self.eval_task, advance=k)

    def eval_end(self) -> None:
        if self.eval_task is not None:
            task = self.progress.tasks[self.eval_task]
            self.progress.update(self.eval_task, total=task.completed)


def _fail(exc: Exception) -> None:

    if isinstance(exc, EdgeqError):
        from rich.markup import escape

        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    raise exc


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user set option ``name`` (on the command line or through the environment).

    Compared by name: typer runs its own copy of click (typer._click), whose ParameterSource is not
    click's, so an identity test against click.core.ParameterSource.DEFAULT always says "given"."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def build(
    ctx: typer.Context,
    recipe: Optional[str] = None,
    nproc: int = 1,
    verbose: bool = False,
    **options: Any,
) -> None:
    """Quantize, train, lower and validate a model; write model.pte and its report."""
    if nproc > 1:
        _relaunch_with_torchrun(nproc)
    set_verbose(verbose)
    try:
        from edgeq.options import split
        from edgeq.pipeline import build as run_build

        given = {name for name in options if _given(ctx, name)}
        config, qat = split(options, given)
        from edgeq.llm.recipe import is_llm_module
        from edgeq.recipe import import_recipe, recipe_from_module

        module, source = import_recipe(recipe)
        if is_llm_module(module):
            _build_llm(module, source, config, given, qat)
            return
        grid = "--zero-points" if config.zero_points else "--no-zero-points"
        llm_only = {
            grid: config.zero_points is not None,
            "--head": bool(config.head),
            "--group-sizes": bool(config.group_sizes),
            "--min-agreement": config.min_agreement is not None,
        }
        flag = next((flag for flag, given_flag in llm_only.items() if given_flag), None)
        if flag is not None:
            raise EdgeqError(f"{flag} applies to LLM recipes only", f"drop {flag} for this recipe")
        loaded = recipe_from_module(module, source)
        with RichProgress() as progress:
            result = run_build(loaded, config, progress=progress, qat_overrides=qat)
        if result is not None:  # ranks other than 0 of a torchrun job return None
            _summary(result)
    except EdgeqError as exc:  # anything else is a bug: its traceback stays
        _fail(exc)


def _group_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise EdgeqError(
            f"--group-sizes {text!r} is not a list of integers", "pass e.g. --group-sizes 32,64,128"
        ) from None


def _build_llm(module: Any, source: str, config: Any, given: set[str], qat: dict[str, Any]) -> None:
    """A decoder LLM recipe (edgeq.llm): --out, --target, --precision (every linear), --max-drop (the
    perplexity increase the per-layer plan may predict, in percent; 5 unless given), --size-budget,
    --[no-]zero-points (asymmetric or symmetric 4-bit groups, edgeq.llm.zero_points; unset: the plan
    measures both), --head (the output head's own precision), --group-sizes (the 4-bit groups the plan
    may choose), --min-agreement (next-token agreement the plan check and the program must reach) and
    --steps / --lr (QAT by distillation, edgeq.llm.qat: off unless --steps is given) apply."""
    from edgeq.llm.build import LLMBuildConfig, build_llm
    from edgeq.llm.export import LINEAR
    from edgeq.llm.qat import LLMQATConfig
    from edgeq.llm.recipe import llm_recipe_from_module

    if config.target != "android":
        raise EdgeqError(
            f"LLM recipes build for android only so far, not {config.target}",
            "pass --target android (edgeq.llm.htp.build_htp lowers a decoder for the HTP and scores it on the "
            "simulator, without a runner to generate with)",
        )
    if config.precision is not None and config.precision not in LINEAR:
        raise EdgeqError(
            f"--precision {config.precision} is not an LLM linear precision", f"use one of: {', '.join(LINEAR)}"
        )
    recipe = llm_recipe_from_module(module, source)
    out = Path(config.out) if config.out else Path("edgeq-out") / recipe.name
    settings: dict[str, Any] = {"linear": config.precision} if config.precision else {}
    if "max_drop" in given:
        settings["max_drop"] = config.max_drop
    if config.size_budget is not None:
        settings["size_budget"] = config.size_budget
    if config.zero_points is not None:
        settings["zero_points"] = config.zero_points
    if config.head:
        settings["head"] = config.head
    if config.group_sizes:
        settings["group_sizes"] = _group_sizes(config.group_sizes)
    if config.min_agreement is not None:
        settings["min_agreement"] = config.min_agreement
    qat_settings = {k: qat[k] for k in ("steps", "lr") if qat.get(k) is not None}
    if qat_settings:
        settings["qat"] = LLMQATConfig(**qat_settings)
    with console.status(f"building {recipe.name} (LLM) for android") as status:

        def started(stage: str) -> None:  # a 135M-parameter build runs for half an hour on 2 cores
            console.print(f"[dim]edgeq: {stage}[/dim]", highlight=False)
            status.update(f"building {recipe.name} (LLM) for android: {stage}")

        result = build_llm(recipe, LLMBuildConfig(out=out, **settings), on_stage=started)
    acc, size, speed = result.report["accuracy"], result.report["size"], result.report["speed"]
    console.print(
        f"{result.out_dir}/model.pte: {size['program_bytes']:,} bytes ({size['ratio']:.3f}x float); "
        f"perplexity {acc['program_perplexity']:.3f} vs float {acc['float_perplexity']:.3f} "
        f"({acc['perplexity_ratio']:.4f}x); next-token agreement {acc['agreement']:.1f}% on {acc['tokens']} tokens"
        + (f"; decode {speed['decode_tokens_per_s']:.1f} tokens/s" if speed["decode_tokens_per_s"] else "")
    )


def _build_signature() -> inspect.Signature:
    """build()'s own parameters, then one per config field (edgeq.options): typer reads this signature."""
    from edgeq.options import parameters

    own = [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        inspect.Parameter(
            "recipe",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[str],
            default=typer.Option(None, help="Recipe .py file or importable module (default: bundled digits example)."),
        ),
        inspect.Parameter(
            "nproc",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=int,
            default=typer.Option(1, help="Data-parallel QAT over this many processes on this machine (torchrun)."),
        ),
        inspect.Parameter(
            "verbose",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(
                False, "--verbose", "-v", help="Also show third-party warnings and the native runtime's own lines."
            ),
        ),
    ]
    return inspect.Signature([*own, *parameters()])


build.__signature__ = _build_signature()  # type: ignore[attr-defined]
app.command("build")(build)


def _relaunch_with_torchrun(nproc: int) -> None:
    """Run this same command under torchrun with ``nproc`` processes, minus --nproc."""
    import subprocess

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        args.append(arg)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "edgeq",
        *args,
    ]
    raise typer.Exit(subprocess.run(cmd).returncode)


def _summary(result) -> None:
    from rich.table import Table

    s = result.scores
    table = Table(title=f"edgeq build: {result.recipe} -> {result.target.name}", show_header=True)
    table.add_column("")
    table.add_column("value", justify="right")
    flt = s.intervals.get("float")
    table.add_row("float", f"{s.float:.2f}" + (f"  [{flt['low']:.2f}, {flt['high']:.2f}]" if flt else ""))
    table.add_row("QAT (simulated)", f"{s.qat:.2f}")
    from edgeq.quant.candidates import candidate_label

    for name, measured in s.candidates.items():
        loss = measured.get("holdout_loss")
        table.add_row(
            f"{candidate_label(name)} (reference){'  <- shipped' if name == s.shipped else ''}",
            f"{measured['metric']:.2f}" + (f"  (held-out loss {loss:.4g})" if loss is not None else ""),
        )
    if s.selected_on:
        why = "lowest held-out loss" if s.lowest in ("", s.shipped) else f"as good as {s.lowest} (lowest), simpler"
        table.add_row("shipped", f"{s.shipped}: {why}, on {s.selected_on}")
    fallback = result.report.get("fallback")
    if fallback and fallback.get("skipped"):
        table.add_row("accuracy fallback", f"not run: {fallback['skipped']}")
    elif fallback:
        moved = ", ".join(step["layer"] for step in fallback["steps"])
        table.add_row("accuracy fallback to float", f"{moved} ({'shipped' if fallback['shipped'] else 'no gain'})")
    program = s.intervals.get("program")
    interval = f"  [{program['low']:.2f}, {program['high']:.2f}]" if program else ""
    table.add_row(f"model.pte on {result.report['runtime'].split(',')[0]}", f"{s.program:.2f}{interval}")
    if s.verdict:
        table.add_row("how sure (95%, paired on the same samples)", s.verdict)
    latency = result.report.get("latency")
    if latency:
        table.add_row(
            "host latency, .pte / float", f"{latency['program_ms']:.2f} / {latency['float_program_ms']:.2f} ms"
        )
    if s.agreement:
        table.add_row("reference vs .pte top-1 agreement", f"{s.agreement['reference_vs_program']:.2f}%")
    else:  # not a classifier: how close the program's output is to the reference's
        table.add_row("reference vs .pte output SQNR", f"{s.sqnr_db['reference_vs_program']:.1f} dB")
    table.add_row(
        "program size", f"{result.sizes['program_bytes']:,} B (float {result.sizes['float_program_bytes']:,} B)"
    )
    d = result.lowered.delegation
    table.add_row("delegated ops / outside", f"{d.delegated_ops} / {d.outside_ops}")
    layers = result.report.get("program_layers")
    if layers and "layers" in layers:
        table.add_row(
            f"first layer < {layers['threshold_db']:g} dB vs float (program)", layers["first_vs_float"] or "none"
        )
    stdout.print(table)
    timing = Table(title="time per stage (s)")
    timing.add_column("stage")
    timing.add_column("seconds", justify="right")
    for name, secs in result.timings.items():
        timing.add_row(name, f"{secs:.2f}")
    timing.add_row("total", f"{sum(result.timings.values()):.2f}")
    stdout.print(timing)
    for warning in result.report.get("warnings", []):
        stdout.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    stdout.print(f"wrote {result.out_dir}")


@app.command()
def analyze(
    target: str = typer.Option("android", help="Target whose precision menu is measured."),
    recipe: Optional[str] = typer.Option(
        None, help="Recipe .py file or importable module (default: bundled digits example)."
    ),
    out: Path = typer.Option(Path("analysis.json"), help="Where to write the analysis."),
    batches: int = typer.Option(8, help="Calibration batches from train_data()."),
) -> None:
    """Measure every layer's ranges, SQNR and sensitivity; print a table and write analysis.json."""
    set_verbose(False)
    try:
        from edgeq.backends import load_target
        from edgeq.errors import EdgeqError
        from edgeq.planning.analysis import analyze as run_analyze
        from edgeq.planning.analysis import print_analysis
        from edgeq.recipe import load_recipe
        from edgeq.ship.package import write_json_atomic

        t = load_target(target)
        r = load_recipe(recipe)
        if out.parent and not out.parent.exists():
            raise EdgeqError(f"directory {out.parent} does not exist", "create it or pass --out elsewhere")
        analysis = run_analyze(r.model(), r, t, batches=batches)
        print_analysis(analysis, stdout)
        write_json_atomic(out, analysis.to_dict())
        stdout.print(f"wrote {out}")
    except EdgeqError as exc:  # anything else is a bug: its traceback stays
        _fail(exc)


@app.command()
def targets() -> None:
    """List the built-in targets and their precision menus."""
    from rich.table import Table

    from edgeq.backends import load_target
    from edgeq.targets import builtin_targets

    table = Table(title="edgeq targets")
    for col in ("name", "backend", "chipset", "default", "precisions"):
        table.add_column(col)
    for name in builtin_targets():
        try:
            t = load_target(name)
        except EdgeqError as exc:  # anything else is a bug: its traceback stays
            _fail(exc)
        table.add_row(t.name, t.backend, t.chipset, t.default_precision, ", ".join(t.precisions))
    stdout.print(table)


@app.command("qnn-setup")
def qnn_setup(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show the native libraries' own lines."),
) -> None:
    """Check Qualcomm's QNN libraries for Qualcomm targets: a QAIRT SDK, or the host HTP runtime (built once)."""
    set_verbose(verbose)
    try:
        from edgeq.backends import qnn_host

        stdout.print(qnn_host.describe(), highlight=False)
        libs = qnn_host.activate()
        if not qnn_host.executorch_qnn_version().startswith(libs.version or "?"):
            stdout.print(
                "programs compiled here run on the host HTP simulator; for phones, build with the QAIRT SDK "
                f"{qnn_host.executorch_qnn_version()} (export QNN_SDK_ROOT=...)",
                highlight=False,
            )
    except EdgeqError as exc:  # anything else is a bug: its traceback stays
        _fail(exc)


@app.command()
def setup(
    what: str = typer.Argument(..., help="arm64: ExecuTorch's aarch64 runtime under qemu, for --runtime arm64."),
) -> None:
    """Prepare an optional runtime once (cached under $EDGEQ_CACHE)."""
    set_verbose(False)
    try:
        if what != "arm64":
            raise EdgeqError(
                f"nothing to set up called {what!r}", "run `edgeq setup arm64` (Qualcomm: `edgeq qnn-setup`)"
            )
        from edgeq.checks import arm64

        ready = arm64.setup(say=lambda line: stdout.print(f"edgeq: {line}", highlight=False))
        stdout.print(f"arm64 runtime ready: {ready.runner} (executorch {ready.executorch.parent.name.split('-')[-1]}); "
                     f"emulated cores: {', '.join(arm64.available_cpus(ready.qemu))}", highlight=False)  # fmt: skip
    except EdgeqError as exc:  # anything else is a bug: its traceback stays
        _fail(exc)


def _validate_llm(
    program: Path,
    module: Any,
    source: str,
    device: Optional[str],
    runtime: str,
    max_drop: Optional[float],
    min_agreement: Optional[float],
) -> None:
    """`edgeq validate` with an LLM recipe module (edgeq.llm.validate). --max-drop: the perplexity
    increase allowed, in percent, as in `edgeq build` for LLMs."""
    from edgeq.errors import AccuracyError
    from edgeq.llm.recipe import llm_recipe_from_module
    from edgeq.llm.validate import validate_llm

    if device is not None or runtime != "host":
        raise EdgeqError(
            "LLM programs validate on the host runtime only so far",
            "drop --device/--runtime, or run the bundle's LlmGenerator on the phone",
        )
    with console.status(f"validating {program} (LLM)"):
        v = validate_llm(program, llm_recipe_from_module(module, source))
    stdout.print(f"host: {v.summary()}", highlight=False, soft_wrap=True)

    def shown(text: str) -> str:
        text = " ".join(text.split())
        return repr(text if len(text) <= 120 else text[:117] + "...")

    for g in v.generations:
        lines = [
            f"  {g['prompt']!r}",
            f"    model.pte:   {shown(g['program'])}",
            f"    float model: {shown(g['float model'])}",
        ]
        stdout.print("\n".join(lines), highlight=False, soft_wrap=True)
    increase = 100.0 * (v.perplexity_ratio - 1.0)
    if max_drop is not None and increase > max_drop:
        raise AccuracyError(
            f"perplexity {increase:.2f}% above float exceeds --max-drop {max_drop}",
            "rebuild with a lower --max-drop or a wider --precision",
        )
    if min_agreement is not None and v.agreement < min_agreement:
        raise AccuracyError(
            f"next-token agreement {v.agreement:.2f}% is below --min-agreement {min_agreement}",
            "rebuild with a lower --max-drop or a wider --precision",
        )


@app.command()
def validate(
    program: Path = typer.Argument(..., help="The model.pte to run."),
    recipe: Optional[str] = typer.Option(
        None, help="Recipe whose eval_data() scores the program (default: bundled example)."
    ),
    device: Optional[str] = typer.Option(None, help="Run on this Android phone (adb serial) instead of the host."),
    runner: Optional[Path] = typer.Option(
        None, help="ExecuTorch executor_runner built for Android (needed with --device)."
    ),
    reference: Optional[Path] = typer.Option(
        None, help="Quantized reference (default: reference.pt2 beside the program)."
    ),
    max_drop: Optional[float] = typer.Option(
        None, help="Fail when the program scores more than this many points below float."
    ),
    min_agreement: Optional[float] = typer.Option(
        None, help="Fail when top-1 agreement with the reference (or float) falls below this percent."
    ),
    per_layer: bool = typer.Option(
        False,
        help="Then read the program's per-layer outputs on the host, as `edgeq debug` does "
        "(needs the build directory).",
    ),
    runtime: str = typer.Option(
        "host", help="host: ExecuTorch's runtime here; arm64: its aarch64 runtime under qemu (`edgeq setup arm64`)."
    ),
    cpu: str = typer.Option(
        "cortex-a76", help="With --runtime arm64: the emulated core (cortex-a76, neoverse-n1, cortex-a72, cortex-a53)."
    ),  # fmt: skip
) -> None:
    """Run a .pte on the host (ExecuTorch runtime), on Arm kernels under emulation, or a phone (adb); score it."""
    set_verbose(False)
    try:
        from edgeq.checks.validate import load_reference
        from edgeq.checks.validate import validate as run_validate
        from edgeq.errors import AccuracyError
        from edgeq.llm.recipe import is_llm_module
        from edgeq.recipe import import_recipe, recipe_from_module

        if runtime not in ("host", "arm64"):
            raise EdgeqError(f"unknown --runtime {runtime!r}", "pass --runtime host or --runtime arm64")
        module, source = import_recipe(recipe)  # once: an LLM recipe goes its own way, as in `edgeq build`
        if is_llm_module(module):
            _validate_llm(program, module, source, device, runtime, max_drop, min_agreement)
            return
        r = recipe_from_module(module, source)
        if runtime == "arm64":
            _validate_arm(program, r, cpu, max_drop)
            return
        ref_path = reference or program.with_name("reference.pt2")
        ref = load_reference(ref_path) if ref_path.is_file() else None
        v = run_validate(program, r, reference=ref, device=device, runner=runner, on_phone=device is not None)
        agree = v.agreement_reference if v.agreement_reference is not None else v.agreement_float
        stdout.print(
            f"{v.where}: program {v.program:.2f}  float {v.float:.2f}"
            + (f"  reference {v.reference:.2f}" if v.reference is not None else "")
            + f"  drop {v.float - v.program:.2f}"
            + (f"  top-1 agreement: float {v.agreement_float:.2f}%" if v.agreement_float is not None else "")
            + (f", reference {v.agreement_reference:.2f}%" if v.agreement_reference is not None else "")
            + f"  SQNR {v.sqnr_db[0]:.1f} dB  cosine {v.cosine[0]:.4f}  ({v.samples} samples)"
        )
        if per_layer:
            _program_debug(program.parent, r, 20.0, 30.0, 16)
        if max_drop is not None and v.float - v.program > max_drop:
            raise AccuracyError(
                f"drop {v.float - v.program:.2f} exceeds --max-drop {max_drop}",
                "rebuild with more QAT steps or a wider plan",
            )
        if min_agreement is not None and agree is None:
            raise EdgeqError(
                "--min-agreement is top-1 agreement, and this model's output is not [samples, classes] scores",
                "gate on the recipe's metric with --max-drop instead",
            )
        if min_agreement is not None and agree is not None and agree < min_agreement:
            raise AccuracyError(
                f"agreement {agree:.2f}% is below --min-agreement {min_agreement}",
                "rebuild with more QAT steps or a wider plan",
            )
    except EdgeqError as exc:  # anything else is a bug: its traceback stays
        _fail(exc)


def _validate_arm(program: Path, r: Any, cpu: str, max_drop: float | None) -> None:
    """The program on Arm kernels (qemu) against the x86 runtime, on the recipe's evaluation data."""
    from edgeq.backends import get_backend
    from edgeq.checks import arm64
    from edgeq.checks.evaluate import collect
    from edgeq.checks.validate import program_backend, program_manifest
    from edgeq.errors import AccuracyError

    if not program.is_file():
        raise EdgeqError(f"program {program} not found", "pass the path of a model.pte written by `edgeq build`")
    backend = get_backend(program_backend(program))
    if not backend.arm_cpu_runtime:
        raise EdgeqError(f"{program} is a {backend.title} program: the arm64 runtime runs CPU programs",
                         "validate it with `edgeq validate` (its own runtime), or build for android")  # fmt: skip
    scored = int(program_manifest(program).get("scored_output", 0))
    c = arm64.compare(program, r, arm64.check_cpu(cpu), scored=scored)
    float_metric = float(r.metric(*collect(r.model().eval(), r.eval_data(), select=r.score_output)))
    stdout.print(
        f"arm64 ({cpu}, emulated): program {c.metric:.2f}  x86 runtime {c.host_metric:.2f}  float {float_metric:.2f}  "
        f"top-1 agreement with x86 {c.agreement:.2f}%  bit-identical outputs "
        + ", ".join(f"{100 * b:.2f}%" for b in c.bitexact)
        + "  max difference "
        + ", ".join(f"{d:.3g}" for d in c.max_difference)
        + f"  ({c.samples} samples; emulated time is not a phone's latency)",
        highlight=False,
    )
    if max_drop is not None and float_metric - c.metric > max_drop:
        raise AccuracyError(
            f"on Arm kernels ({cpu}) the drop {float_metric - c.metric:.2f} exceeds --max-drop {max_drop}"
            + (f" (x86 runtime: {float_metric - c.host_metric:.2f})" if c.metric != c.host_metric else ""),
            "rebuild with more QAT steps or a wider plan; if only Arm misses, report the core to ExecuTorch",
        )


def _program_debug(build_dir: Path, r, threshold: float, runtime_threshold: float, samples: int) -> None:
    """Run the per-layer program debugging on a build directory and print its table."""
    import json

    from rich.table import Table

    from edgeq.checks.program_debug import Thresholds, debug_program
    from edgeq.checks.validate import load_reference
    from edgeq.ship.package import write_json_atomic
    from edgeq.targets import builtin_targets

    path = build_dir / "reference.pt2"
    if not path.is_file():
        raise EdgeqError(f"{path} not found", "pass the output directory of `edgeq build` (it holds reference.pt2)")
    manifest_path = build_dir / "manifest.json"
    target = json.loads(manifest_path.read_text())["target"]["name"] if manifest_path.is_file() else "android"
    if target not in builtin_targets():
        raise EdgeqError(f"the build's target '{target}' is not a built-in target", "rebuild with a built-in --target")
    from edgeq.backends import load_target
    from edgeq.checks.numerics import reads_layers

    if not reads_layers(load_target(target)):
        _intermediates_debug(build_dir, r, target, threshold)
        return
    shipped = build_dir / "model.pte"
    result = debug_program(
        r.model(),
        load_reference(path),
        r,
        target,
        shipped=shipped if shipped.is_file() else None,
        out_dir=build_dir / "debug",
        samples=samples,
        thresholds=Thresholds(float_db=threshold, runtime_db=runtime_threshold),
    )
    write_json_atomic(build_dir / "debug" / "layers.json", result.to_json())
    table = Table(title=f"model.pte layer by layer, {result.samples} samples (execution order)")
    for column in ("layer", "ops", "kernel dB", "ints ≠", "max Δ", "vs ref dB", "vs float dB", "ref vs float"):
        table.add_column(column, justify="left" if column in ("layer", "ops") else "right")
    flagged = {result.first_vs_float, result.first_vs_reference}

    def db(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f}"

    for layer in result.layers:
        table.add_row(
            layer.name,
            "+".join(op.replace("convolution", "conv") for op in layer.ops),
            db(layer.kernel_vs_reference_db),
            f"{100 * layer.mismatch:.2f}%",
            str(layer.max_steps),
            db(layer.program_vs_reference_db),
            db(layer.program_vs_float_db),
            db(layer.reference_vs_float_db),
            style="bold red" if layer.name in flagged else None,
        )
    stdout.print(table)
    if result.shipped_max_diff is not None:
        stdout.print(f"per-layer program vs model.pte outputs: max |difference| {result.shipped_max_diff:g}")
    if result.outside_ops:
        stdout.print(f"ops outside XNNPACK, not compared: {', '.join(result.outside_ops)}")
    stdout.print(
        f"first divergence from float: {result.first_vs_float} (< {threshold:g} dB)"
        if result.first_vs_float
        else f"no layer below {threshold:g} dB against float"
    )
    stdout.print(
        f"first layer whose kernels leave the quantized reference (< {runtime_threshold:g} dB on the same "
        f"inputs): {result.first_vs_reference}"
        if result.first_vs_reference
        else "every layer's kernels compute what the quantized reference computes on the same inputs"
    )
    stdout.print(
        "kernel dB: the layer's output against the reference's ops run on the layer's own program inputs; "
        "vs ref dB: against the reference run end to end"
    )
    stdout.print(f"ETRecord, ETDump and debug buffer for executorch.devtools.Inspector: {build_dir / 'debug'}")


def _intermediates_debug(build_dir: Path, r: Any, target: str, threshold: float) -> None:
    """Op-by-op numerics for backends that dump their own intermediates (QNN HTP)."""
    from rich.table import Table

    from edgeq.checks.intermediates import debug_intermediates
    from edgeq.checks.validate import load_reference
    from edgeq.ship.package import write_json_atomic

    result = debug_intermediates(
        load_reference(build_dir / "reference.pt2"), r, target, out_dir=build_dir / "debug", threshold_db=threshold
    )
    write_json_atomic(build_dir / "debug" / "intermediates.json", result.to_json())
    table = Table(title=f"model.pte op by op on the {target} simulator, 1 sample (execution order)")
    for column in ("layer", "op", "program vs float dB"):
        table.add_column(column, justify="right" if "dB" in column else "left")
    for op in result.ops:
        table.add_row(
            op.layer or "(model)",
            op.op,
            f"{op.program_vs_float_db:.1f}",
            style="bold red" if op.program_vs_float_db < threshold else None,
        )
    stdout.print(table)
    stdout.print(
        f"first op below {threshold:g} dB against float: {result.first_below}"
        if result.first_below
        else f"no op below {threshold:g} dB against float"
    )
    stdout.print(f"ETRecord, ETDump and debug buffer for executorch.devtools.Inspector: {build_dir / 'debug'}")


@app.command()
def debug(
    build_dir: Path = typer.Argument(..., help="An edgeq build output directory (holds model.pte and reference.pt2)."),
    recipe: Optional[str] = typer.Option(None, help="The recipe the build used (default: bundled example)."),
    threshold: float = typer.Option(20.0, help="SQNR (dB) against float below which a layer counts as diverged."),
    runtime_threshold: float = typer.Option(
        30.0, help="SQNR (dB) against the quantized reference below which the program counts as leaving it."
    ),
    samples: int = typer.Option(16, help="Evaluation samples to run through the program."),
    reference_only: bool = typer.Option(
        False, help="Compare only the quantized reference with float (no program run; any backend)."
    ),
) -> None:
    """Read the program's per-layer outputs (ETRecord + ETDump + Inspector); name the first divergence."""
    set_verbose(False)
    try:
        from rich.table import Table

        from edgeq.checks.validate import load_reference
        from edgeq.errors import EdgeqError
        from edgeq.recipe import load_recipe

        path = build_dir / "reference.pt2"
        if not path.is_file():
            raise EdgeqError(f"{path} not found", "pass the output directory of `edgeq build`")
        r = load_recipe(recipe)
        if reference_only:
            from edgeq.checks.debug import debug as run_debug

            errors, first = run_debug(r.model(), load_reference(path), r, threshold_db=threshold)
            table = Table(title="quantized reference vs float, per layer (execution order)")
            table.add_column("layer")
            table.add_column("SQNR dB", justify="right")
            for e in errors:
                table.add_row(
                    e.layer, f"{e.sqnr_db:.1f}", style="bold red" if first is not None and e is first else None
                )
            stdout.print(table)
            stdout.print(
                f"first divergence: {first.layer} ({first.sqnr_db:.1f} dB < {threshold:g} dB)"
                if first
                else f"no layer below {threshold:g} dB"
            )
            return
        _program_debug(build_dir, r, threshold, runtime_threshold, samples)
    except EdgeqError as exc:  # anything else is a bug: its traceback stays
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
    main()
