"""Recipes that real projects write: distillation targets, tuple/dict outputs, broken loss/metric, bad targets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from recipes import batches_of, recipe_of
from torch import nn

from edgeq.errors import EdgeqError
from edgeq.recipe import Recipe, select_output


def _data(n: int = 64, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, :classes].argmax(1)).long()
    return x, y


class Logits(nn.Module):
    def __init__(self, kind: str = "tensor") -> None:
        super().__init__()
        self.kind = kind
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor):
        out = self.net(x)
        if self.kind == "tuple":
            return out, out.softmax(-1)
        if self.kind == "dict":
            return {"logits": out, "probs": out.softmax(-1)}
        if self.kind == "second":  # the scored output is not the first one
            return {"probs": out.softmax(-1), "logits": out}
        return out


def _recipe(kind: str = "tensor", **overrides) -> Recipe:
    torch.manual_seed(0)
    model = Logits(kind).eval()
    x, y = _data()
    recipe = recipe_of(model, batches_of(x, y, 16), f"r_{kind}")
    return dataclasses.replace(recipe, **overrides)


def test_analysis_scores_on_training_data_whose_targets_are_a_teachers_logits():
    """A distillation recipe: train targets are the float model's logits, eval targets are labels.
    The analysis (a decision) never reads eval data: the default metric reads a teacher's logits as
    their classes."""
    from edgeq.backends import load_target
    from edgeq.planning.analysis import analyze

    base = _recipe()
    model = base.model()
    x, y = _data()
    with torch.no_grad():
        teacher = model(x)
    train = [(x[i : i + 16], teacher[i : i + 16]) for i in range(0, 64, 16)]
    evaluation = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]

    def kl(output, target):
        return torch.nn.functional.kl_div(output.log_softmax(-1), target.softmax(-1), reduction="batchmean")

    recipe = _recipe(train_data=lambda: train, eval_data=lambda: evaluation, loss=kl)
    analysis = analyze(model, recipe, load_target("android"), batches=4)
    assert analysis.float_loss == pytest.approx(0.0, abs=1e-6)  # the teacher is the model itself
    assert analysis.float_metric == 100.0  # the float model agrees with itself on training inputs
    assert [layer.name for layer in analysis.layers] == ["net.0", "net.2"]


def test_an_exception_in_the_users_loss_or_metric_is_one_line_naming_it():
    def bad_loss(output, target):
        raise ValueError("shapes do not line up")

    recipe = _recipe(loss=bad_loss)
    x, y = _data()
    with pytest.raises(EdgeqError) as info:
        recipe.loss(torch.zeros(2, 4), y[:2])
    message = str(info.value)
    assert "recipe loss() raised ValueError" in message and "\n" not in message and "fix the recipe's loss()" in message


def test_targets_outside_the_models_classes_are_refused_in_one_line():
    recipe = _recipe()
    with pytest.raises(EdgeqError, match="targets reach class 9, but the model has 4 outputs"):
        recipe.loss(torch.zeros(2, 4), torch.tensor([1, 9]))
    with pytest.raises(EdgeqError, match="default top-1 metric got outputs of shape"):
        recipe.metric(torch.zeros(8, 4), torch.zeros(8, 256))


def test_tuple_and_dict_outputs_are_scored_on_the_logits_or_the_named_output():
    out = torch.randn(2, 4)
    assert select_output((out, out.softmax(-1))) is out
    assert select_output({"logits": out, "probs": out}) is out
    assert select_output({"a": out, "b": out * 2}, "b").equal(out * 2)
    with pytest.raises(EdgeqError, match="set the recipe's `output`"):
        select_output({"a": out, "b": out})
    with pytest.raises(EdgeqError, match="output = 2, but the model returns 2 outputs.*from 0 to 1"):
        select_output((out, out), 2)


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_a_model_returning_a_tuple_or_dict_builds(tmp_path, kind):
    from edgeq.configs import BuildConfig, QATConfig
    from edgeq.pipeline import build

    recipe = _recipe(kind)
    x, y = _data()
    with torch.no_grad():
        logits = select_output(recipe.model()(x))
    expected = 100.0 * float((logits.argmax(1) == y).float().mean())
    result = build(
        recipe, BuildConfig(out=tmp_path / "out", qat=QATConfig(steps=10), max_drop=100.0, debug_program=False)
    )
    # Scored on the logits (not the probabilities, not the dict), and the program's output is the same tensor.
    assert result.scores.float == pytest.approx(expected)
    assert result.scores.agreement["reference_vs_program"] >= 90


def test_the_scored_output_is_the_programs_too_when_it_is_not_the_first(tmp_path):
    """A model whose logits come second: the build scores and gates the program on its second
    output (not on the probabilities), writes which one in the manifest, reports every output's
    SQNR, and the Kotlin class reads that output."""
    import json

    from edgeq.configs import BuildConfig, QATConfig
    from edgeq.pipeline import build

    recipe = _recipe("second", output="logits")
    out = tmp_path / "out"
    result = build(recipe, BuildConfig(out=out, qat=QATConfig(steps=10), max_drop=100.0, debug_program=False))
    assert result.scores.agreement["reference_vs_program"] >= 90
    assert abs(result.scores.program - result.scores.float) <= 10
    assert result.scores.sqnr_db["reference_vs_program"] > 20  # logits against logits, not probabilities
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scored_output"] == 1 and manifest["outputs"][1]["shape"] == [1, 4]
    rows = json.loads((out / "report.json").read_text())["every_output_sqnr_db"]
    assert [r["scored"] for r in rows] == [False, True] and all(r["float_vs_program_db"] > 15 for r in rows)
    assert "[1].toTensor()" in (out / "bundle" / "RSecondModel.kt").read_text()
    assert "Every output of the program" in (out / "report.html").read_text()
    from edgeq.checks.validate import validate

    checked = validate(out / "model.pte", recipe)  # reads scored_output from the manifest beside it
    assert checked.program == pytest.approx(result.scores.program) and checked.sqnr_db[0] > 20
