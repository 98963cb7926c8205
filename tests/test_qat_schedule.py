"""QAT's length follows the data: passes over the training batches, a held-out slice, early stopping."""

from __future__ import annotations

import math

import pytest
import torch

from edgeq.configs import QATConfig
from edgeq.errors import EdgeqError
from edgeq.quant.qat import holdout_every, is_held_out, schedule
from edgeq.recipe import load_recipe


def test_default_length_is_passes_over_the_batches_left_after_the_holdout():
    recipe = load_recipe(None)
    batches = sum(1 for _ in recipe.train_data())
    every = holdout_every(QATConfig(), batches)
    held = sum(is_held_out(i, every) for i in range(batches))
    plan = schedule(recipe, QATConfig())
    assert held >= 1 and plan.holdout_batches == held and plan.train_batches == batches - held
    assert plan.steps == math.ceil(QATConfig().epochs * plan.train_batches)
    assert schedule(recipe, QATConfig(steps=40)).steps == 40  # explicit steps win
    assert schedule(recipe, QATConfig(holdout=0.0)).holdout_batches == 0


def test_a_single_batch_is_never_held_out():
    assert holdout_every(QATConfig(), 1) == 0


def test_a_small_training_set_holds_out_enough_samples_to_decide():
    # 250 photos in batches of 25: 10% is one batch (25 photos); hold out every 3rd (75) instead
    assert holdout_every(QATConfig(), 10, 250) == 3
    assert holdout_every(QATConfig(min_holdout_samples=25), 10, 250) == 10
    # enough data: the share as asked; never more than a third of the batches
    assert holdout_every(QATConfig(), 40, 40 * 32) == 10
    assert holdout_every(QATConfig(), 4, 32) == 10  # a third cannot hold 64: as asked


@pytest.mark.parametrize(
    "field, value", [("holdout", 1.0), ("holdout", -0.1), ("epochs", -1.0), ("patience", -1), ("steps", -5)]
)
def test_bad_schedule_settings_are_one_line(field, value):
    with pytest.raises(EdgeqError, match=field):
        QATConfig(**{field: value})


def _quantized(recipe, config):
    from edgeq import capture, upstream
    from edgeq.backends import load_target, quant_spec
    from edgeq.planning.plan import uniform_plan
    from edgeq.quant.convert import prepare

    upstream.apply()
    target = load_target("android")
    model = recipe.model().eval()
    plan = uniform_plan(model, target, "int8", example_inputs=recipe.example_inputs())
    graph = capture.capture_for_quantization(model, recipe.example_inputs(), True)
    return model, prepare(graph, quant_spec(plan, target, qat=True, ranges=config.ranges))


def test_qat_that_only_hurts_stops_early_and_keeps_the_calibrated_model():
    from edgeq.quant.qat import run_qat

    recipe = load_recipe(None)
    config = QATConfig(steps=200, lr=5.0, patience=2)  # a rate that wrecks the model
    teacher, prepared = _quantized(recipe, config)
    report = run_qat(prepared, recipe, config, teacher=teacher)
    assert report.stopped_early and report.steps < 200
    assert report.best_step == 0
    # Both starting points were measured on the held-out slice, and the better one was kept.
    init = report.initial_ranges
    assert init["chosen"] == min(("minmax", "histogram"), key=lambda k: init[k])
    assert report.holdout_losses[0][0] == 0
    assert all(loss >= report.holdout_losses[0][1] for _, loss in report.holdout_losses[1:])
    # The kept state is the calibrated one: it scores like the float model, not like the wreck.
    inputs, target = next(iter(recipe.eval_data()))
    with torch.no_grad():
        accuracy = float((prepared(inputs).argmax(-1) == target).float().mean())
    assert accuracy > 0.9


def test_many_passes_over_a_small_set_warn():
    from edgeq.quant.qat import run_qat

    recipe = load_recipe(None)
    config = QATConfig(steps=30, patience=0)
    teacher, prepared = _quantized(recipe, config)
    assert run_qat(prepared, recipe, config, teacher=teacher).warnings == []
    # Two training batches a pass: 30 steps are 15 passes, 60 are 30.
    small = load_recipe(None)
    small.train_data = lambda: (batch for i, batch in zip(range(2), recipe.train_data()))
    config = QATConfig(steps=60, patience=0, holdout=0.0)
    teacher, prepared = _quantized(small, config)
    warnings = run_qat(prepared, small, config, teacher=teacher).warnings
    assert len(warnings) == 1 and "30 passes" in warnings[0] and "memorise" in warnings[0]


@pytest.mark.parametrize("dropout", [True, False])
def test_qat_trains_at_the_model_dropout_rate_or_with_dropout_off(dropout):
    import copy

    from torch import nn

    from edgeq import upstream
    from edgeq.quant.qat import run_qat
    from edgeq.recipe import Recipe

    digits = load_recipe(None)
    float_model = digits.model().eval()
    model = nn.Sequential(float_model, nn.Dropout(0.3)).eval()
    recipe = Recipe(
        name="digits-dropout",
        model=lambda: copy.deepcopy(model),
        example_inputs=digits.example_inputs,
        train_data=digits.train_data,
        eval_data=digits.eval_data,
    )
    config = QATConfig(steps=4, patience=0, checkpoint_every=0, dropout=dropout)
    teacher, prepared = _quantized(recipe, config)
    seen = []

    def rates(step, loss):
        seen.append([n.args[1:] for n in prepared.graph.nodes if n.target is torch.ops.aten.dropout.default])

    run_qat(prepared, recipe, config, on_step=rates, teacher=teacher)
    training = seen[0]
    assert training == ([(0.3, True)] if dropout else [(0.0, True)])
    assert prepared.meta[upstream.DROPOUT_RATES] == [0.3]  # the model's own rate, kept for later switches


def test_a_rate_search_trains_at_the_rate_whose_short_run_held_out_best(tmp_path):
    from edgeq import BuildConfig, build

    # --lr 5 wrecks the digits CNN; of 5, 1.6 and 0.5 the short runs must steer QAT away from it.
    config = BuildConfig(
        out=tmp_path / "out",
        precision="int8",
        qat=QATConfig(steps=24, lr=5.0, lr_candidates=3),
        ptq_batches=0,
        max_drop=100.0,
        debug_program=False,
    )
    result = build(None, config)
    search = result.report["qat"]["rate_search"]
    assert search["short_run_steps"] == 6 and set(search["losses"]) == {"5", "1.58", "0.5"}
    assert search["picked"] == min((5.0, 5.0 / 10**0.5, 0.5), key=lambda r: search["losses"][f"{r:.3g}"])
    assert search["picked"] < 5.0 and search["losses"]["5"] > min(search["losses"].values())
    html = (result.out_dir / "report.html").read_text()
    assert "picked by short runs of 6 steps" in html
