"""QAT with the model's own dropout rates against torchao's train switch (every dropout at 0.5).

torchao 0.18's ``move_exported_model_to_train`` rewrites every dropout of an exported
graph to p=0.5 (edgeq.upstream.move_to_train puts each model's rate back). This measures
what that did to QAT on real models, side by side in one run: the held-out loss at each
QAT check with torchao's switch and with edgeq's, same build otherwise (QAT only,
``--precision int8``, the build's default QAT settings).

    python scripts/bench_dropout.py [--models lite0 minilm] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_report import machine, table, write_section  # noqa: E402

from edgeq import upstream  # noqa: E402


def _recipe(name: str):
    if name == "minilm":
        from edgeq.recipe import load_recipe

        upstream.register_quantized_embedding_ops()
        return load_recipe("edgeq.examples.minilm")
    import imagenet_recipes

    return imagenet_recipes.recipe(name)


def _torchao_switch(model, train: bool):
    """What edgeq did before: torchao's switch as it is (every dropout rewritten to p=0.5)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    (move_exported_model_to_train if train else move_exported_model_to_eval)(model)
    return model


def run(name: str, rates: str) -> dict:
    from bench_imagenet import edgeq_build

    recipe = _recipe(name)
    settings = dict(precision="int8", ptq_batches=0, fallback_layers=0, max_drop=100.0, debug_program=False)
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.object(upstream, "_switch", _torchao_switch if rates == "torchao" else upstream._switch),
    ):
        report = edgeq_build(recipe, Path(tmp) / "out", **settings)
    qat = report["qat"]
    return {
        "program": report["accuracy"]["program"],
        "float": report["accuracy"]["float"],
        **{key: qat[key] for key in ("holdout_losses", "best_step", "steps", "planned_steps", "first_loss")},
        "wall_seconds": report["wall_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["lite0", "minilm"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    details: dict = {"machine": machine()}
    rows = []
    for name in args.models:
        for rates in ("torchao", "model"):
            d = details[f"{name}, {rates}"] = run(name, rates)
            print(name, rates, json.dumps(d), flush=True)
            losses = ", ".join(f"{s}: {v:.4f}" for s, v in d["holdout_losses"])
            rows.append(
                [
                    name,
                    "0.5 everywhere (torchao)" if rates == "torchao" else "the model's (edgeq)",
                    f"{d['first_loss']:.4f}",
                    losses,
                    f"{d['best_step']} of {d['steps']}/{d['planned_steps']}",
                    f"{d['float']:.2f}",
                    f"**{d['program']:.2f}**",
                ]
            )
    header = [
        "model",
        "dropout in QAT",
        "first training loss",
        "held-out loss by step",
        "kept step (ran/planned)",
        "float",
        ".pte",
    ]
    body = (
        "## QAT dropout rates: torchao's train switch against the model's own (scripts/bench_dropout.py)\n\n"
        "`--precision int8`, QAT only (no PTQ candidate, no fallback), the build's default QAT otherwise; "
        "the same build twice, once with torchao's `move_exported_model_to_train` as it is (it writes p=0.5 "
        f"into every dropout), once with edgeq's, which keeps each rate. Machine: {details['machine']}.\n\n"
        + table(header, rows)
    )
    Path(__file__).with_name("bench_dropout.json").write_text(json.dumps(details, indent=1))
    if not args.no_write:
        write_section("QAT dropout rates", body)
    print(body)


if __name__ == "__main__":
    main()
