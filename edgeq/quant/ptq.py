"""Post-training quantization of the same plan: the baseline every QAT build is measured against."""

from __future__ import annotations

import torch

from edgeq import capture as capture_mod
from edgeq.configs import QATConfig
from edgeq.quant.convert import convert, prepare
from edgeq.quant.qat import is_held_out
from edgeq.quant.spec import QuantSpec
from edgeq.recipe import Recipe, as_tuple


def post_training_quantize(
    model: torch.nn.Module,
    recipe: Recipe,
    spec: QuantSpec,
    config: QATConfig,
    batches: int,
    holdout: int = 0,
) -> torch.fx.GraphModule:
    """The plan quantized by calibration alone, with the backend's PTQ observers; the converted reference.
    See :func:`calibrate`."""
    return convert(calibrate(model, recipe, spec, config, batches, holdout))


def calibrate(
    model: torch.nn.Module,
    recipe: Recipe,
    spec: QuantSpec,
    config: QATConfig,
    batches: int,
    holdout: int = 0,
) -> torch.fx.GraphModule:
    """The prepared graph with its observers calibrated, before conversion.

    ``spec`` is the plan's PTQ spec (``edgeq.backends.quant_spec(plan, target, qat=False)``).
    The observers are the backend quantizer's own for PTQ (XNNPACK's static activations use
    a histogram observer that clips outliers), so this is the documented by-hand flow.
    Batches held out of training (every ``holdout``-th, see :mod:`edgeq.quant.qat`) are skipped.
    """
    graph = capture_mod.capture_for_quantization(model, recipe.example_inputs(), config.fold_bn)
    prepared = prepare(graph, spec)
    seen = 0
    with torch.no_grad():
        for index, (inputs, _) in enumerate(recipe.train_data()):
            if is_held_out(index, holdout):
                continue
            prepared(*as_tuple(inputs))
            seen += 1
            if seen >= batches:
                break
    return prepared
