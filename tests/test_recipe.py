"""Recipe loading: the function protocol, and one-line errors for bad recipes."""

from __future__ import annotations

import pytest

from edgeq.errors import EdgeqError
from edgeq.recipe import load_recipe, top1_accuracy


def test_bundled_recipe_loads_with_defaults():
    recipe = load_recipe(None)
    assert recipe.name == "digits"
    assert recipe.labels == [str(i) for i in range(10)]
    x, y = next(iter(recipe.eval_data()))
    assert x.shape[1:] == (1, 8, 8)


def test_missing_file(tmp_path):
    with pytest.raises(EdgeqError, match="not found"):
        load_recipe(str(tmp_path / "nope.py"))


def test_missing_functions_are_named(tmp_path):
    path = tmp_path / "partial.py"
    path.write_text("def example_inputs():\n    return ()\n\ndef train_data():\n    return []\n")
    with pytest.raises(EdgeqError) as err:
        load_recipe(str(path))
    assert "model()" in str(err.value) and "eval_data()" in str(err.value)


def test_recipe_raising_on_import_names_the_line(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import torch\n\nraise RuntimeError('no weights here')\n")
    with pytest.raises(EdgeqError, match=r"RuntimeError on import at line 3: no weights here"):
        load_recipe(str(path))


def test_unknown_module():
    with pytest.raises(EdgeqError, match="neither a file nor an importable module"):
        load_recipe("not_a_module_anywhere")


def test_default_metric_is_top1_percent():
    import torch

    assert top1_accuracy(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1])) == 50.0


def test_recipe_qat_settings_are_checked_in_one_line(tmp_path):
    from edgeq.configs import BuildConfig
    from edgeq.recipe import Recipe

    path = tmp_path / "tuned.py"
    body = "def model(): pass\ndef example_inputs(): pass\ndef train_data(): pass\ndef eval_data(): pass\n"
    path.write_text(body + 'qat = {"optimizer": "adam", "lr": 1e-5}\n')
    assert load_recipe(str(path)).qat == {"optimizer": "adam", "lr": 1e-5}
    assert BuildConfig().qat is None  # a build without its own QATConfig takes the recipe's
    for bad, message in [
        ('qat = {"learning_rate": 1e-5}', "recipe tuned: qat has unknown setting.s. learning_rate. use some of: steps"),
        ('qat = {"lr": -1.0}', "recipe tuned: qat: invalid QAT setting: lr must be > 0"),
        ('qat = ["adam"]', "recipe tuned: qat is a list"),
    ]:
        path.write_text(body + bad + "\n")
        with pytest.raises(EdgeqError, match=message) as info:
            load_recipe(str(path))
        assert "\n" not in str(info.value)
    with pytest.raises(EdgeqError, match="qat has unknown setting"):
        Recipe("r", model=list, example_inputs=tuple, train_data=list, eval_data=list, qat={"ranges": "ema"})
