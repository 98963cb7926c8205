"""4-bit grids on a truly float decoder: the bundled tiny LM (edgeq.examples.tiny_lm), symmetric groups vs zero points.

SmolLM2's benchmark checkpoint already sits on an asymmetric 4-bit grid (Q4_1), which flatters any method
that matches it; the tiny LM of the package was trained in float32 here (a 2-layer Llama, about 0.4M
weights, on the Python reference manual's topics, its own BPE tokenizer), so no grid is baked into it.
Every row is one `edgeq build` of that recipe with w4g32 everywhere and an 8-bit token table; perplexity
and agreement are teacher-forced through the .pte against the float model on the same held-out tokens.

    python scripts/bench_llm_float.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_report import commit, machine, perplexity_cells, table, write_section

from edgeq.llm.build import LLMBuildConfig, build_llm

READING = """Reading it:

- On weights with no grid baked in, zero points help where rounding is plain: rounded to nearest, 1.0053x
  [1.0026, 1.0081] against 1.0111x [1.0084, 1.0141] with symmetric groups (the intervals do not overlap; each
  is against float on the same tokens, the two programs were not paired token by token). With GPTQ the gap
  closes: 1.0030x [1.0013, 1.0046], 95.9% agreement, against 1.0035x [1.0016, 1.0053], 94.7%.
- They cost bytes: 0.241x against 0.209x of the float program here, more than the 0.25 bits per weight they
  cost at SmolLM2's widths, because this model's rows are short (96 to 256 inputs: 3 to 8 groups a row, and
  each row of the offsets linear keeps a float scale).
- So neither grid is always better, and the build decides by measurement (no `--[no-]zero-points`): each
  linear's 4-bit moves measured on both grids, a plan made and checked on each on training text, the smaller
  kept. On this model the last row's two plans were symmetric 188 kB of linears at 1.0059x and zero points
  209 kB at 1.0048x, both within --max-drop 5, so symmetric groups shipped (every linear w4g32): 0.202x at
  1.0049x [1.0029, 1.0069], 94.6% [93.8, 95.2]. On SmolLM2's Q4_1 checkpoint the same rule ships zero points
  (`scripts/bench_llm.py`). The four uniform rows were measured at older commits (before activation smoothing
  was on by default and before the fused lowering), so read each against its own float, not across rows.
"""

ROWS = {
    "symmetric groups, round to nearest": {"gptq_tokens": 0},
    "symmetric groups, GPTQ": {},
    "zero points, round to nearest": {"zero_points": True, "gptq_tokens": 0},
    "zero points, GPTQ": {"zero_points": True},
    # no --precision: the per-layer plan at --max-drop 5, each 4-bit move measured on both grids, a plan
    # made and checked on each, the smaller kept (edgeq.llm.build._pick)
    "the default build (planned, --max-drop 5, 4-bit grid chosen by measurement)": {"linear": None},
}


def _row(name: str, report: dict) -> list[str]:
    acc, size = report["accuracy"], report["size"]
    planning = report.get("planning") or {}
    if planning.get("grids"):
        linears = list(report["plan"]["linears"].values())
        counts = ", ".join(f"{linears.count(p)} {p}" for p in ("float", "fp16", "w8dyn", "w4g32") if p in linears)
        shipped = "zero points" if report["plan"].get("zero_points") else "symmetric"
        checked = "; ".join(
            f"{g} {v['linear_bytes'] / 1e3:.0f} kB of linears at {v['perplexity_ratio']:.4f}x"
            for g, v in planning["grids"].items()
        )
        name += f": {counts}; plans checked on training text: {checked}; {shipped} shipped"
    return [
        name,
        f"{size['program_bytes'] / 1e3:.0f} kB ({size['ratio']:.3f}x)",
        *perplexity_cells(acc, ppl_digits=3, ratio_digits=4),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS))
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    saved = Path(__file__).with_name("bench_llm_float.json")
    results = json.loads(saved.read_text()) if saved.exists() else {}
    for row in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            settings = {"linear": "w4g32", "eval_tokens": args.eval_tokens, "prompts": 1, **ROWS[row]}
            report = build_llm("edgeq.examples.tiny_lm", LLMBuildConfig(out=Path(tmp) / "out", **settings)).report
        report["measured"] = time.strftime("%Y-%m-%d %H:%M")
        report["commit"] = commit()
        results[row] = report
        print(row, json.dumps({k: report[k] for k in ("size", "accuracy")}), flush=True)
        if not args.no_write:
            saved.write_text(json.dumps(results, indent=1, default=str))
    body = (
        "## 4-bit grids on a truly float decoder: the bundled tiny LM (`scripts/bench_llm_float.py`)\n\n"
        f"Machine: {machine()}.\n\n"
        "`edgeq.examples.tiny_lm`: a 2-layer Llama (hidden 96, about 0.4M weights) trained in float32 on the "
        "Python reference manual's topics with its own BPE tokenizer, so no quantization grid is baked into its "
        "weights (unlike SmolLM2's Q4_1 checkpoint). Each row: w4g32 for every linear (8-bit dynamic "
        f"activations), an 8-bit token table; {args.eval_tokens} held-out tokens teacher-forced through the .pte "
        "against the float model (perplexity ratio with its paired bootstrap 95% interval, agreement with its "
        "Wilson interval). Zero points: each group's own min-max in 16 levels, the zero points carried by an "
        "8-bit linear over the input's group sums (`edgeq/llm/zero_points.py`).\n\n"
        + table(
            [
                "row (w4g32 everywhere unless planned)",
                "program (vs float)",
                "float ppl",
                ".pte ppl (ratio, 95%)",
                "agreement %",
            ],
            [_row(name, results[name]) for name in ROWS if name in results],
        )
        + "\n\n"
        + READING
    )
    print(body)
    if not args.no_write:
        write_section("llm_float", body)


if __name__ == "__main__":
    main()
