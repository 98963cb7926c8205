"""Where the program's next-token agreement goes: SmolLM2's shipped plan in the eager model against the .pte.

The plan check (edgeq.llm.plan.check_plan) measures a plan in the Hugging Face model, unsmoothed, on
training text; the build's program is smoothed (edgeq.llm.smooth) and measured on eval text. When
the check says 91.4% and the program 89.75%, three things differ: the text, the smoothing and the
runtime. This takes the plan a recorded `scripts/bench_llm.py` row shipped (its report's plan) and
scores it in the eager model, without and with the build's smoothing, on the check's training
tokens and on the program's eval tokens, each against the float model on the same tokens. It
decides nothing: the build never reads eval text; this only says which of the three the gap is.

    EDGEQ_WIKITEXT=wiki.test.raw python scripts/bench_llm_gap.py [--row ROW]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import llm_recipes
from bench_report import commit, machine, perplexity_cells, table, write_section

from edgeq.llm.build import LLMBuildConfig, _hessians, _planning_windows, _smooth
from edgeq.llm.evaluate import compare, encode_windows, score_float
from edgeq.llm.export import LLMPlan
from edgeq.llm.plan import _Swapper
from edgeq.llm.recipe import load_llm_recipe

DEFAULT_ROW = "planned --max-drop 5 from float, 4-bit grid chosen by measurement (the default build)"


def _eager(model: Any, hessians: Any, plan: LLMPlan, windows: list[list[int]]) -> Any:
    """The plan's scores on ``windows``: its linears and token table as the program holds them (GPTQ's
    integers, zero points), swapped into ``model`` the way the plan check does."""
    with _Swapper(model, hessians, plan.embedding, plan.zero_points).applied(plan.linears) as swapped:
        return score_float(swapped, windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", default=DEFAULT_ROW)
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    recorded = json.loads(Path(__file__).with_name("bench_llm.json").read_text())[args.row]
    shipped = recorded["plan"]
    plan = LLMPlan(dict(shipped["linears"]), shipped["embedding"], zero_points=shipped["zero_points"])
    recipe = load_llm_recipe(llm_recipes.__file__)
    model, tokenizer = recipe.model().eval(), recipe.tokenizer_file()
    texts, eval_texts, _ = recipe.split_texts()
    config = LLMBuildConfig()  # the default build's GPTQ, check and smoothing tokens
    hessians = _hessians(model, tokenizer, texts, recipe.max_seq_len, config)
    _, check_windows = _planning_windows(tokenizer, texts, recipe.max_seq_len, config, hessians is not None)
    texts_scored = {
        "training text (the plan check's tokens)": check_windows,
        "eval text (the program's tokens)": encode_windows(tokenizer, eval_texts, recipe.max_seq_len, args.eval_tokens),
    }
    smoothed, _, smoothed_hessians = _smooth(model, tokenizer, texts, recipe.max_seq_len, plan, config, hessians)
    rows: dict[str, Any] = {}
    for text, windows in texts_scored.items():
        reference = score_float(model, windows)
        rows[f"eager, unsmoothed (as the check scores), {text}"] = compare(
            reference, _eager(model, hessians, plan, windows)
        )
        rows[f"eager, smoothed (as the program is made), {text}"] = compare(
            reference, _eager(smoothed, smoothed_hessians, plan, windows)
        )
    rows["the .pte (the build's own measurement), eval text (the program's tokens)"] = recorded["accuracy"]
    for name, acc in rows.items():
        print(f"{name}: {acc['perplexity_ratio']:.4f}x, {acc['agreement']:.2f}%", flush=True)
    body = (
        "## Where the LLM program's agreement goes (`scripts/bench_llm_gap.py`)\n\n"
        f"Machine: {machine()}; commit {commit()}. The plan the row "
        f"'{args.row}' of `scripts/bench_llm.py` shipped (recorded at commit {recorded.get('commit')}), "
        "scored in the eager Hugging Face model with the program's integers (GPTQ, zero points) and token "
        "table, without and with the build's activation smoothing, on the plan check's training tokens and "
        "on the program's eval tokens, each against the float model on the same tokens. Nothing here decides "
        "what ships.\n\n"
        + table(
            ["model, text", "float ppl", "ppl (ratio, 95%)", "agreement % (95%)"],
            [[name, *perplexity_cells(acc)] for name, acc in rows.items()],
        )
    )
    print(body)
    if not args.no_write:
        write_section("llm_gap", body)


if __name__ == "__main__":
    main()
