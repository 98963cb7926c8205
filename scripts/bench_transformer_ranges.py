"""Adaptive ranges against PT2E's moving-average (ema) ranges on MiniLM, with a QAT that trains.

QAT with the recipe's own settings (Adam at a fine-tuning learning rate on 1 - cosine to float,
dropout off), on more sentences than the example's default build, QAT only (``ptq_batches=0``,
no fallback), so that each .pte is the QAT program. Rows are side by side
in one run, each an ``edgeq build --target android --precision P`` of the MiniLM example with
``ranges`` adaptive or ema; .pte in executorch.runtime on the 256 held-out sentences.

    python scripts/bench_transformer_ranges.py [--precisions int8 w4dyn] [--epochs 3] [--lr 1e-5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_report import machine, table, write_section  # noqa: E402
from bench_transformer import run_row  # noqa: E402


def _training(qat: dict) -> str:
    losses = ", ".join(f"{step}: {loss:.4f}" for step, loss in qat.get("holdout_losses") or [])
    early = " (stopped early)" if qat.get("stopped_early") else ""
    return f"{qat['steps']}/{qat['planned_steps']} steps{early}; {losses}; kept {qat['best_step']}; {qat['commits']} commits"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="*", default=["int8", "w4dyn", "w4g32"])
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--train", type=int, default=560, help="training sentences (the recipe's default is 256)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    from edgeq import upstream
    from edgeq.examples import minilm
    from edgeq.recipe import load_recipe

    upstream.register_quantized_embedding_ops()
    minilm._TRAIN = args.train  # more training text than the example's default build uses
    recipe = load_recipe("edgeq.examples.minilm")
    saved = Path(__file__).with_name("bench_transformer_ranges.json")
    details: dict = {"machine": machine(), "settings": vars(args)}
    qat = {"lr": args.lr}  # over the recipe's own settings (run_row)
    for precision in args.precisions:
        for ranges in ("adaptive", "ema"):
            name = f"{precision}, {ranges}"
            settings = {"precision": precision, "ranges": ranges, "ptq_batches": 0, "fallback_layers": 0}
            with tempfile.TemporaryDirectory() as tmp:
                details[name] = run_row(recipe, name, settings, Path(tmp) / "out", args.epochs, **qat)
            details[name]["measured"] = time.strftime("%Y-%m-%d %H:%M")
            print(
                name, json.dumps({k: details[name][k] for k in ("cosine", "retrieval", "accuracy", "qat")}), flush=True
            )
            if not args.no_write:
                saved.write_text(json.dumps(details, indent=1, default=str))
    rows = []
    for precision in args.precisions:
        for ranges in ("adaptive", "ema"):
            d = details[f"{precision}, {ranges}"]
            cand = d["accuracy"].get("candidates", {})
            rows.append(
                [
                    precision,
                    ranges,
                    f"**{d['cosine']:.4f}**",
                    f"{d['retrieval']:.1f}%",
                    " / ".join(f"{k} {v['metric']:.2f}" for k, v in cand.items() if v.get("metric") is not None),
                    _training(d["qat"]),
                    f"{d['wall_seconds'] / 60:.1f} min",
                ]
            )
    header = [
        "precision",
        "ranges",
        "cosine to float (.pte)",
        "retrieval agreement",
        "QAT reference x100",
        "training (held-out 1 - cosine by step; kept step; range commits)",
        "build time",
    ]
    body = (
        "## MiniLM: adaptive ranges against ema, QAT that trains (scripts/bench_transformer_ranges.py)\n\n"
        f"QAT only (the .pte is the QAT program): {recipe.qat.get('optimizer')} lr {args.lr:g}, loss 1 - cosine to "
        f"float, dropout {'on' if recipe.qat.get('dropout', True) else 'off'}, {args.epochs:g} "
        f"passes over {args.train} training sentences (held-out share excluded), 256 held-out sentences. "
        f"Machine: {details['machine']}.\n\n" + table(header, rows)
    )
    if not args.no_write:
        write_section("MiniLM adaptive vs ema", body)
    print(body)


if __name__ == "__main__":
    main()
