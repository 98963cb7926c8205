"""`edgeq build` for a decoder LLM: convert, quantize per layer, lower, validate the program, ship.

    LLM recipe -> ExecuTorch's Llama transformer (edgeq.llm.convert)
               -> per-layer plan (edgeq.llm.plan), inputs smoothed for 8-bit activations (edgeq.llm.smooth)
               -> per-layer torchao quantization + ExecuTorch's LLM export (edgeq.llm.export)
               -> perplexity / next-token agreement / generations / tokens/s of the .pte (edgeq.llm.evaluate)
               -> model.pte, tokenizer.json, generation.json, report, app bundle

The float program is lowered beside the quantized one from the same model, so
size and speed are ratios measured side by side. Everything is written into a
staging directory that becomes ``--out`` only when the build succeeds.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeq.errors import EdgeqError
from edgeq.llm.background import FloatLowering
from edgeq.llm.convert import check_causal_lm, executorch_params, executorch_state_dict
from edgeq.llm.evaluate import (
    Generation,
    TokenScores,
    compare,
    encode_windows,
    generate,
    median_rate,
    prompts_from,
    score_float,
    score_program,
)  # fmt: skip
from edgeq.llm.export import EMBEDDING, FLOATS, HEAD, LINEAR, LLMPlan, linear_names, lower_llm
from edgeq.llm.gptq import Hessians, collect_hessians
from edgeq.llm.memory import runner_memory
from edgeq.llm.plan import LLMAnalysis, analyze_llm, check_plan, linear_modules, measure_plan, plan_llm, weight_bytes
from edgeq.llm.qat import LLMQATConfig, LLMQATResult, distill
from edgeq.llm.recipe import LLMRecipe, load_llm_recipe
from edgeq.llm.smooth import Smoothing, smooth_activations
from edgeq.ship.package import OutputDir, sha256, versions, write_bytes_atomic, write_json_atomic
from edgeq.ship.templating import render
from edgeq.timing import Stages

__all__ = ["LLMBuildConfig", "LLMBuildResult", "build_llm"]


@dataclass(frozen=True)
class LLMBuildConfig:
    out: Path = Path("edgeq-out")
    #: every linear's precision (edgeq.llm.export.LINEAR); unset: planned per layer
    linear: str | None = None
    #: the planner's limit: predicted perplexity at most this many percent above float's
    max_drop: float = 5.0
    #: or: the program's bytes (> 1) or share of the float program's (<= 1); the planner narrows
    #: linears until they fit (cheapest loss per byte first)
    size_budget: float | None = None
    #: held-out training-text tokens (never eval_text()) the per-layer analysis scores on
    analysis_tokens: int = 256
    #: GPTQ (edgeq.llm.gptq): every quantized linear's integers fitted to its inputs on this many
    #: training-text tokens (0: round to nearest)
    gptq_tokens: int = 4096
    #: score each linear in the analysis with GPTQ's integers too (False: round to nearest there,
    #: GPTQ only in the program)
    gptq_analysis: bool = True
    #: measure the whole --max-drop plan on training text the analysis did not read, and narrow
    #: fewer linears when it misses (edgeq.llm.plan.check_plan)
    check: bool = True
    #: training-text tokens the plan check measures on (after the analysis's): 256 proved too few on
    #: SmolLM2, where prefixes one layer apart measured 1.049x and 1.055x and then 1.053x
    check_tokens: int = 1024
    #: the token table's precision (edgeq.llm.export.EMBEDDING)
    embedding: str = "e8"
    #: 4-bit groups on an asymmetric min-max grid, their zero points carried by a small 8-bit linear
    #: beside each (edgeq.llm.zero_points): 0.25 bits more per weight at groups of 32; False:
    #: symmetric; None: the per-layer plan measures both and keeps the better (symmetric with
    #: --precision or QAT)
    zero_points: bool | None = None
    #: the output head's precision (edgeq.llm.export.LINEAR) whatever the other linears get, kept
    #: out of the plan (llama.cpp's --output-tensor-type); unset: as the others, or planned
    head: str | None = None
    #: the 4-bit group sizes the per-layer plan may give a linear (each measured per linear in the
    #: analysis); 32 must be among them
    group_sizes: tuple[int, ...] = (32,)
    #: training-text tokens activation smoothing (edgeq.llm.smooth) searches its scales on, for the
    #: plan's 8-bit dynamic activations (0: none)
    smooth_tokens: int = 2048
    #: held-out tokens the perplexity and agreement are measured on
    eval_tokens: int = 512
    #: greedy generations shown side by side (prompts cut from the eval text)
    prompts: int = 3
    max_new_tokens: int = 32
    #: QAT by distillation (edgeq.llm.qat) through the plan's fake quantization; steps=0 (the
    #: default): none, the program is rounded, GPTQ'd when gptq_tokens > 0
    qat: LLMQATConfig = field(default_factory=LLMQATConfig)
    #: fail (exit 3) when the program's teacher-forced next-token agreement with the float model
    #: is below this percentage (unset: report only); the --max-drop plan check also backs off
    #: until the plan agrees this well on its training text
    min_agreement: float | None = None

    def __post_init__(self) -> None:
        if self.linear is not None and self.linear not in LINEAR:
            raise EdgeqError(f"unknown linear precision {self.linear!r}", f"use one of: {', '.join(LINEAR)}")
        if self.head is not None and self.head not in LINEAR:
            raise EdgeqError(f"unknown head precision {self.head!r}", f"use one of: {', '.join(LINEAR)}")
        if self.embedding not in EMBEDDING:
            raise EdgeqError(f"unknown embedding precision {self.embedding!r}", f"use one of: {', '.join(EMBEDDING)}")
        if self.max_drop < 0:
            raise EdgeqError(f"--max-drop {self.max_drop} is negative", "pass the perplexity increase allowed, in %")
        if self.size_budget is not None and self.size_budget <= 0:
            raise EdgeqError(f"--size-budget {self.size_budget} is not positive", "pass bytes or a share <= 1")
        if 32 not in self.group_sizes or not set(self.group_sizes) <= {32, 64, 128}:
            raise EdgeqError(f"group sizes {self.group_sizes} are not among 32, 64, 128 with 32", "pass e.g. 32,64,128")
        if self.smooth_tokens < 0:
            raise EdgeqError(f"smooth_tokens {self.smooth_tokens} is negative", "pass 0 to leave activations alone")
        if self.gptq_tokens < 0:
            raise EdgeqError(f"gptq_tokens {self.gptq_tokens} is negative", "pass 0 to round to nearest")
        if self.zero_points and self.qat.steps:
            raise EdgeqError(
                "QAT trains against torchao's grids, which have no fractional zero points",
                "drop --zero-points (or --steps): zero points are fitted by GPTQ or rounded to nearest",
            )
        if self.eval_tokens < 16:
            raise EdgeqError("eval_tokens must be >= 16", "pass the held-out tokens to score, e.g. 512")


@dataclass
class LLMBuildResult:
    out_dir: Path
    report: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def _hessians(
    model: Any, tokenizer: Path, texts: list[str], max_seq_len: int, config: LLMBuildConfig
) -> Hessians | None:
    """GPTQ's statistics on the training text (None with gptq_tokens 0)."""
    if not config.gptq_tokens:
        return None
    windows = encode_windows(tokenizer, texts, max_seq_len, config.gptq_tokens)
    return collect_hessians(model, windows, linear_modules(model))


def _plan(
    model: Any,
    tokenizer: Path,
    texts: list[str],
    params: dict[str, Any],
    max_seq_len: int,
    config: LLMBuildConfig,
    hessians: Hessians | None,
) -> tuple[LLMPlan, dict[str, Any]]:
    """``--precision`` everywhere, or the per-layer plan (edgeq.llm.plan) under --max-drop / --size-budget,
    on the 4-bit grid that measured better (see :func:`_pick`) unless --zero-points says which."""
    if config.linear is not None:
        plan = LLMPlan.uniform(linear_names(params), config.linear, config.embedding, bool(config.zero_points))
        if config.head is not None:
            plan.linears[HEAD] = config.head
        return plan, {"rule": "uniform", "head": config.head}
    windows, check_windows = _planning_windows(tokenizer, texts, max_seq_len, config, hessians is not None)
    # --head: the user's precision, out of the analysis, the plan and its prediction
    skip = frozenset({HEAD} if config.head else ())
    narrow = tuple(f"w4g{size}" for size in sorted(set(config.group_sizes)))
    grids = (False, True) if config.zero_points is None and not config.qat.steps else (bool(config.zero_points),)
    measured = None if len(grids) > 1 else grids[0]
    analysis = analyze_llm(model, windows, hessians if config.gptq_analysis else None, measured, skip, narrow)
    candidates = [_plan_on(model, analysis.on(grid), config, check_windows, hessians) for grid in grids]
    by_size = config.size_budget is None
    plan, planning = _pick(model, candidates, check_windows, hessians, by_size) if len(grids) > 1 else candidates[0]
    return plan, {**planning, "analysis": analysis.to_dict()}


def _plan_on(
    model: Any, analysis: LLMAnalysis, config: LLMBuildConfig, check_windows: list[list[int]], hessians: Hessians | None
) -> tuple[LLMPlan, dict[str, Any]]:
    """The plan on ``analysis``'s 4-bit grid, checked on ``check_windows`` under --max-drop."""
    budget = _budget(model, analysis, config)
    plan, prediction = plan_llm(analysis, config.embedding, config.max_drop / 100.0, budget)
    if config.head is not None:
        plan.linears[HEAD] = config.head
    planning = {**prediction, "head": config.head, "zero_points": analysis.zero_points}
    if budget is None and config.check and check_windows:
        order, steps = prediction["order"], prediction["steps"]
        limit = config.max_drop / 100.0
        plan, check = check_plan(model, plan, order, check_windows, limit, steps, hessians, config.min_agreement)
        planning["check"] = check.to_dict()
    sizes = {layer.name: (layer.params, layer.rows) for layer in analysis.layers}
    planned = [(sizes[name], precision) for name, precision in plan.linears.items() if name in sizes]
    planning["planned_linear_bytes"] = sum(weight_bytes(*size, p, plan.zero_points) for size, p in planned)
    return plan, planning


def _budget(model: Any, analysis: LLMAnalysis, config: LLMBuildConfig) -> float | None:
    """--size-budget as bytes of the planned linears: the program's budget less what the rest takes."""
    if config.size_budget is None:
        return None
    float_bytes = 4.0 * sum(v.numel() for v in executorch_state_dict(model).values())
    budget = config.size_budget if config.size_budget > 1 else config.size_budget * float_bytes
    linear_params = sum(layer.params for layer in analysis.layers)
    other = float_bytes - 4.0 * linear_params  # the token table, norms: priced at float, an upper bound
    if config.head is not None:  # left in `other` at float by the analysis; priced at its precision
        head = model.get_output_embeddings().weight
        other -= 4.0 * head.numel() - weight_bytes(head.numel(), head.shape[0], config.head, bool(analysis.zero_points))
    if config.embedding != "float":
        table = model.get_input_embeddings().weight
        # e8: a byte per weight and a float scale per row; e4g32: half a byte and a scale per 32
        kept = weight_bytes(table.numel(), table.shape[0], "w8dyn" if config.embedding == "e8" else "w4g32")
        other -= 4.0 * table.numel() - kept
    return budget - other


def _pick(
    model: Any,
    candidates: list[tuple[LLMPlan, dict[str, Any]]],
    check_windows: list[list[int]],
    hessians: Hessians | None,
    by_size: bool,
) -> tuple[LLMPlan, dict[str, Any]]:
    """The plan on the 4-bit grid that measured better on training text (never eval_text()): under
    --max-drop (``by_size``; each plan checked) the smaller one, the lower measured perplexity when
    their sizes are within 1%; under --size-budget (both fit) the one of lower perplexity on the check
    text (predicted without it). Symmetric groups are smaller and decode faster; zero points win where a model's
    weights sit on an asymmetric grid (llama.cpp's Q4_1 checkpoints) or lose much on a symmetric one."""
    scores = []
    for plan, planning in candidates:
        check = planning.get("check")
        if check is not None:
            ratio = check["measured"].get(str(check["kept"]), 1.0)
        elif check_windows:
            ratio = planning["measured_perplexity_ratio"] = measure_plan(model, plan, check_windows, hessians)
        else:
            ratio = planning["predicted_perplexity_ratio"]
        scores.append((planning["planned_linear_bytes"], ratio))
    smallest = min(size for size, _ in scores)
    best = min(range(len(scores)), key=lambda i: (by_size and scores[i][0] > 1.01 * smallest, scores[i][1]))
    plan, planning = candidates[best]
    grids = {("zero points" if c[0].zero_points else "symmetric"): {"linear_bytes": s, "perplexity_ratio": r}
             for c, (s, r) in zip(candidates, scores)}  # fmt: skip
    lower = f"the lower {'measured' if check_windows else 'predicted'} perplexity"
    rule = f"the smaller (within 1%, {lower})" if by_size else lower
    return plan, {**planning, "grids": grids, "grid_rule": rule}


def _smooth(
    model: Any,
    tokenizer: Path,
    texts: list[str],
    max_seq_len: int,
    plan: LLMPlan,
    config: LLMBuildConfig,
    hessians: Hessians | None,
) -> tuple[Any, Smoothing | None, Hessians | None]:
    """The model the program is made from: a copy of ``model`` whose inputs to quantized linears are
    smoothed for their 8-bit dynamic activations (edgeq.llm.smooth), with GPTQ's statistics rescaled
    to it; ``model`` itself with smooth_tokens 0 or a float plan. ``model`` stays the float reference."""
    if not config.smooth_tokens or all(p in FLOATS for p in plan.linears.values()):
        return model, None, hessians
    smoothed = copy.deepcopy(model)
    smoothing = smooth_activations(smoothed, encode_windows(tokenizer, texts, max_seq_len, config.smooth_tokens), plan)
    if hessians is not None:
        weights = {t: smoothed.get_submodule(n).weight.detach() for n, t in linear_modules(smoothed).items()}
        hessians = hessians.rescaled(smoothing.scales, weights)
    return smoothed, smoothing, hessians


def _qat(
    model: Any, tokenizer: Path, texts: list[str], plan: LLMPlan, config: LLMBuildConfig
) -> tuple[Any, LLMQATResult | None]:
    """The model the program is lowered from: ``model`` itself, or QAT's trained copy (edgeq.llm.qat)
    with its record. The first windows of the training text are held out of QAT's training and
    decide which check ships."""
    qat = config.qat
    if not qat.steps or all(p in FLOATS for p in plan.linears.values()):
        return model, None
    tokens = (qat.steps + qat.held_out_windows) * qat.window
    windows = encode_windows(tokenizer, texts, qat.window, tokens)
    held_out, windows = windows[: qat.held_out_windows], windows[qat.held_out_windows :]
    if not windows:
        raise EdgeqError("the recipe's text() is too short for QAT's held-out windows", "give more text or --steps 0")
    trained, result = distill(model, plan, windows, held_out, qat)
    # no check beat the rounded model (step 0): the program is the plan without QAT, with the
    # searched scales and GPTQ, not the rounded weights on QAT's min-max grid
    return (trained if result.best_step else model), result


def _planning_windows(
    tokenizer: Path, texts: list[str], max_seq_len: int, config: LLMBuildConfig, after_gptq: bool
) -> tuple[list[list[int]], list[list[int]]]:
    """The analysis's windows and the plan check's: the training text after the tokens GPTQ fits its
    integers to (``after_gptq``), then analysis_tokens, then check_tokens. On the very tokens GPTQ
    read, its linears look better than anywhere else (SmolLM2's whole w4g32 plan measured 0.984x
    float there and 1.117x on held-out text), so neither may score there."""
    skip = config.gptq_tokens if after_gptq else 0
    total = skip + config.analysis_tokens + config.check_tokens
    windows = encode_windows(tokenizer, texts, max_seq_len, total)
    if skip:
        windows = _split_windows(windows, skip)[1]
    if not windows:
        raise EdgeqError(
            f"the recipe's text() ends within the {skip:,} tokens GPTQ reads: the per-layer analysis has none left",
            "give text() more text, or pass --precision (no analysis)",
        )
    return _split_windows(windows, config.analysis_tokens)


def _split_windows(windows: list[list[int]], tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """The windows scoring the first ``tokens`` tokens (the last one cut there), and the rest."""
    total = 0
    for i, window in enumerate(windows):
        if total + len(window) - 1 >= tokens:
            cut = tokens - total + 1
            rest = [window[cut:]] if len(window) - cut >= 2 else []
            return [*windows[:i], window[:cut]], rest + windows[i + 1 :]
        total += len(window) - 1
    return windows, []


def _metadata(model: Any, tokenizer: Path) -> dict[str, Any]:
    """The runner's bos/eos ids: the model config's, checked against the tokenizer's vocabulary."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer)).get_vocab_size(with_added_tokens=True)
    if vocab > model.config.vocab_size:
        raise EdgeqError(
            f"the tokenizer has {vocab} tokens but the model only {model.config.vocab_size}",
            "return the model's own tokenizer from tokenizer()",
        )
    bos = model.config.bos_token_id
    eos = model.config.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    metadata: dict[str, Any] = {"get_eos_ids": eos_ids}
    if bos is not None:
        metadata["get_bos_id"] = int(bos)
    return metadata


def build_llm(
    recipe: LLMRecipe | str | Path,
    config: LLMBuildConfig | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> LLMBuildResult:
    """Build, validate and package a decoder LLM (see the module docstring and :class:`LLMBuildConfig`);
    ``on_stage`` is told each stage's name as it starts (SmolLM2-135M builds for half an hour on 2 cores)."""
    recipe = load_llm_recipe(recipe)
    config = config or LLMBuildConfig(out=Path("edgeq-out") / recipe.name)
    stages = Stages(on_start=on_stage)
    begin = time.perf_counter()
    with stages("load"):
        model = recipe.model()
        check_causal_lm(model)
        model = model.eval()  # weights go to float32 in the conversion; a GGUF-loaded model refuses .float()
        tokenizer = recipe.tokenizer_file()
        metadata = _metadata(model, tokenizer)
        params = executorch_params(model, recipe.max_seq_len)
        texts, eval_texts, measured_on = recipe.split_texts()

    out = OutputDir(config.out)
    float_lowering = FloatLowering()
    try:
        with stages("float checkpoint"):  # lowered in a second process (edgeq.llm.background) from here on
            float_lowering.start(model, tokenizer, recipe.max_seq_len, metadata)
        with stages("gptq statistics"):
            hessians = _hessians(model, tokenizer, texts, recipe.max_seq_len, config)
        with stages("analyze"):
            plan, planning = _plan(model, tokenizer, texts, params, recipe.max_seq_len, config, hessians)
        with stages("smooth"):
            smoothed, smoothing, hessians = _smooth(model, tokenizer, texts, recipe.max_seq_len, plan, config, hessians)
        with stages("qat"):
            trained, qat = _qat(smoothed, tokenizer, texts, plan, config)
            del smoothed
        with stages("lower"):
            if qat is not None and qat.best_step:  # QAT's weights on its own grid; GPTQ would re-round them
                plan, hessians = dataclasses.replace(plan, scales="minmax"), None
            program = lower_llm(trained, tokenizer, recipe.max_seq_len, plan, metadata, hessians)
            del trained
        with stages("lower float"):  # what is left of it
            float_program = float_lowering.result()
        with stages("perplexity"):
            windows = encode_windows(tokenizer, eval_texts, recipe.max_seq_len, config.eval_tokens)
            reference = score_float(model, windows)
            scored = score_program(program, windows)
        write_bytes_atomic(out.path("model.pte"), program)  # where it ships: the runner reads it there
        prompts = prompts_from(eval_texts, config.prompts)
        runs = _run_programs(out.path("model.pte"), float_program, tokenizer, prompts, config.max_new_tokens, stages)
        generations, float_generations, memory = runs

        measured = _Measured(program, float_program, reference, scored, generations, float_generations, measured_on)
        report = _report(recipe, config, plan, params, metadata, measured)
        report["planning"] = planning
        report["memory"] = memory
        report["gptq"] = {"tokens": hessians.tokens, "seconds": hessians.seconds} if hessians else None
        report["smoothing"] = smoothing.to_dict() if smoothing else None
        report["qat"] = qat.to_dict() if qat else None
        report["float_lowering"] = float_lowering.record
        report["timings"] = dict(stages.seconds)
        report["wall_seconds"] = time.perf_counter() - begin
        _write(out, report, plan, program, tokenizer)
        _require_agreement(report, config)
        final = out.commit()
    except BaseException:
        out.abort()
        raise
    finally:
        float_lowering.close()
    return LLMBuildResult(final, report, dict(stages.seconds))


def _write(out: OutputDir, report: dict[str, Any], plan: LLMPlan, program: bytes, tokenizer: Path) -> None:
    write_bytes_atomic(out.path("tokenizer.json"), tokenizer.read_bytes())
    write_json_atomic(out.path("generation.json"), report["generation"])
    write_json_atomic(out.path("plan.json"), plan.to_dict())
    write_json_atomic(out.path("report.json"), report)
    write_bytes_atomic(out.path("report.html"), render("llm_report.html.j2", report=report).encode())
    _bundle(out, report, program, tokenizer)


def _require_agreement(report: dict[str, Any], config: LLMBuildConfig) -> None:
    agreement = report["accuracy"]["agreement"]
    if config.min_agreement is not None and agreement < config.min_agreement:
        from edgeq.errors import AccuracyError

        error = AccuracyError(
            f"the program's next-token agreement with the float model is {agreement:.2f}%, "
            f"below --min-agreement {config.min_agreement}",
            "pass a lower --max-drop, a wider --precision (w4g32 -> w8dyn) or --head w8dyn, or lower --min-agreement",
        )
        error.report = report
        raise error


def _run_programs(
    shipped: Path, float_program: bytes, tokenizer: Path, prompts: list[str], tokens: int, stages: Stages
) -> tuple[list[Generation], list[Generation], dict[str, Any]]:
    """The runner's greedy generations and peak memory on the shipped program (already at ``shipped``)
    and on the float program (written once, to a scratch file: the runner reads files)."""
    with tempfile.TemporaryDirectory(prefix="edgeq-llm-float-") as scratch:
        float_path = Path(scratch) / "float.pte"
        float_path.write_bytes(float_program)
        with stages("generate"):
            generations = generate(shipped, tokenizer, prompts, tokens)
            float_generations = generate(float_path, tokenizer, prompts, tokens)
        with stages("memory"):
            prompt = prompts[0] if prompts else "The"
            memory = {
                "program": runner_memory(shipped, tokenizer, prompt, tokens),
                "float_program": runner_memory(float_path, tokenizer, prompt, tokens),
            }
    return generations, float_generations, memory


@dataclass
class _Measured:
    """The two programs and what the build measured on them."""

    program: bytes
    float_program: bytes
    reference: TokenScores
    scored: TokenScores
    generations: list[Generation]
    float_generations: list[Generation]
    #: what the perplexity and agreement were measured on, in words
    measured_on: str


def _report(
    recipe: LLMRecipe,
    config: LLMBuildConfig,
    plan: LLMPlan,
    params: dict[str, Any],
    metadata: dict[str, Any],
    measured: _Measured,
) -> dict[str, Any]:
    program, float_program = measured.program, measured.float_program
    reference, scored = measured.reference, measured.scored
    generations, float_generations = measured.generations, measured.float_generations
    decode = median_rate([g.decode_tokens_per_s for g in generations])
    float_decode = median_rate([g.decode_tokens_per_s for g in float_generations])
    prefill = median_rate([g.prefill_tokens_per_s for g in generations])
    float_prefill = median_rate([g.prefill_tokens_per_s for g in float_generations])
    return {
        "kind": "llm",
        "recipe": recipe.name,
        "target": "android",
        "versions": versions(),
        "model": {
            "layers": params["n_layers"],
            "dim": params["dim"],
            "vocab": params["vocab_size"],
            "max_seq_len": recipe.max_seq_len,
        },  # fmt: skip
        "plan": plan.to_dict(),
        "size": {
            "program_bytes": len(program),
            "float_program_bytes": len(float_program),
            "ratio": len(program) / len(float_program),
            "sha256": sha256(program),
        },
        "accuracy": {**compare(reference, scored), "measured_on": measured.measured_on},
        "speed": {
            "prefill_tokens_per_s": prefill,
            "decode_tokens_per_s": decode,
            "float_prefill_tokens_per_s": float_prefill,
            "float_decode_tokens_per_s": float_decode,
            "decode_speedup": decode / float_decode if decode and float_decode else None,
            "runner": "executorch.extension.llm.runner.TextLLMRunner, host CPU",
        },
        "generations": [
            {"prompt": g.prompt, "program": g.text, "float": f.text} for g, f in zip(generations, float_generations)
        ],
        "generation": {
            **{k.removeprefix("get_"): v for k, v in metadata.items()},
            "max_seq_len": recipe.max_seq_len,
            "temperature": 0.0,
            "max_new_tokens": config.max_new_tokens,
            **({"chat_template": recipe.chat_template} if recipe.chat_template else {}),
        },
    }


def _bundle(out: OutputDir, report: dict[str, Any], program: bytes, tokenizer: Path) -> None:
    from edgeq.backends.xnnpack import XnnpackBackend
    from edgeq.ship.bundle import class_name

    manifest = {"versions": report["versions"], "recipe": {"name": report["recipe"]}}
    runtime = XnnpackBackend().app_runtime(manifest)
    context = {
        "class_name": class_name(report["recipe"]).removesuffix("Model") + "Generator",
        "package": "org.edgeq.generated",
        "generation": report["generation"],
        "edgeq_version": report["versions"]["edgeq"],
        "executorch_version": report["versions"]["executorch"],
        "recipe": report["recipe"],
    }
    write_bytes_atomic(out.path("bundle/model.pte"), program)
    write_bytes_atomic(out.path("bundle/tokenizer.json"), tokenizer.read_bytes())
    write_json_atomic(out.path("bundle/generation.json"), report["generation"])
    kotlin = render("LlmGenerator.kt.j2", **context)
    write_bytes_atomic(out.path(f"bundle/{context['class_name']}.kt"), kotlin.encode())
    gradle = render("dependencies.gradle.j2", runtime=runtime)
    write_bytes_atomic(out.path("bundle/dependencies.gradle"), gradle.encode())
    readme = render("llm_README.md.j2", report=report, runtime=runtime, **context)
    write_bytes_atomic(out.path("bundle/README.md"), readme.encode())
