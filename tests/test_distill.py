"""QAT by distillation from the float model: no labels needed, and one-sided training data cannot bias it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from edgeq.configs import BuildConfig, QATConfig
from edgeq.errors import EdgeqError
from edgeq.quant.qat import distillation_loss


def test_distillation_loss_is_zero_at_the_teacher_and_positive_elsewhere():
    logits = torch.randn(8, 10)
    assert distillation_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits + torch.randn(8, 10), logits).item() > 0
    embeddings = torch.randn(8, 1)  # not logits: mean squared error
    assert distillation_loss(embeddings * 2, embeddings).item() == pytest.approx(float((embeddings**2).mean()))
    # A detector's output mixes pixels with probabilities: MSE with each channel weighed by the
    # teacher's variance, so an error of one standard deviation costs the same on every channel.
    rows = torch.cat([torch.rand(4, 16, 4) * 320, torch.rand(4, 16, 11)], dim=-1)  # [B, N, 4 + 1 + 10]
    off = rows.clone()
    off[..., 0] += rows[..., 0].std(unbiased=False)  # one std on the x pixel channel
    one_pixel = distillation_loss(off, rows).item()
    off = rows.clone()
    busiest = 4 + int(rows[..., 4:].flatten(0, 1).var(0).argmax())  # a probability channel above the median
    off[..., busiest] += rows[..., busiest].std(unbiased=False)  # one std on it
    assert distillation_loss(off, rows).item() == pytest.approx(one_pixel, rel=1e-4)
    # A near-constant channel (a rare class) weighs no more than the median channel.
    rare = rows.clone()
    rare[..., 14] = 1e-4 * torch.rand(4, 16)
    bumped = rare.clone()
    bumped[..., 14] += 0.1
    median = rare.flatten(0, 1).var(0, unbiased=False).median()
    assert distillation_loss(bumped, rare).item() == pytest.approx(0.01 / median.item() / 15, rel=1e-3)
    head = rows.transpose(1, 2).reshape(4, 15, 4, 4)  # the same values as a [B, C, H, W] map
    assert distillation_loss(head, head).item() == 0.0
    assert distillation_loss(off.transpose(1, 2).reshape(4, 15, 4, 4), head).item() == pytest.approx(
        one_pixel, rel=1e-4
    )


def test_unknown_loss_is_one_line():
    with pytest.raises(EdgeqError, match="unknown QAT loss 'kl'"):
        QATConfig(loss="kl")


@pytest.mark.slow
def test_distillation_ignores_useless_labels_that_the_task_loss_learns(tmp_path):
    """Every training target is class 0: the task loss teaches the model to say 0, distillation does not."""
    from edgeq.pipeline import build
    from edgeq.recipe import load_recipe

    base = load_recipe(None)

    def zero_targets():
        for inputs, target in base.train_data():
            yield inputs, torch.zeros_like(target)

    recipe = dataclasses.replace(base, train_data=zero_targets)
    scores = {}
    for loss in ("task", "distill"):
        config = BuildConfig(
            out=tmp_path / loss,
            precision="int8",
            qat=QATConfig(steps=60, lr=0.05, loss=loss),
            max_drop=100.0,
            debug_program=False,
            ptq_batches=0,
        )
        scores[loss] = build(recipe, config).scores
    assert scores["task"].program < scores["task"].float - 20  # learned the label bias
    assert scores["distill"].program >= scores["distill"].float - 1.0


def test_every_output_distils_not_only_the_scored_one():
    """A model with two outputs (probabilities first, the scored logits second): distillation
    counts the other output too, the task loss reads the scored one only, and the held-out loss
    per sample sums to the batch's."""
    from recipes import batches_of, recipe_of

    from edgeq.quant.qat import HeldOut, objective

    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(6, 4)

        def forward(self, x):
            out = self.net(x)
            return {"probs": out.softmax(-1), "logits": out}

    torch.manual_seed(0)
    model = TwoHeads().eval()
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    recipe = dataclasses.replace(recipe_of(model, batches_of(x, y, 16), "two_heads"), output="logits")
    with torch.no_grad():
        teacher = model(x)
    assert objective("distill", recipe, teacher, y, teacher).item() == pytest.approx(0.0, abs=1e-6)
    drifted = {"probs": teacher["probs"].roll(1, dims=-1), "logits": teacher["logits"]}  # only the other output moved
    other = distillation_loss(drifted["probs"], teacher["probs"]).item()
    assert other > 0.01
    assert objective("distill", recipe, drifted, y, teacher).item() == pytest.approx(other, rel=1e-5)
    task = torch.nn.functional.cross_entropy(teacher["logits"], y).item()
    assert objective("task", recipe, drifted, y, teacher).item() == pytest.approx(task, rel=1e-6)
    held = HeldOut("distill", recipe, batches_of(x, y, 16), model, "cpu")

    def drifting(inputs):
        out = model(inputs)
        return {"probs": out["probs"].roll(1, dims=-1), "logits": out["logits"]}

    total, per_sample = held.loss_and_samples(drifting)
    assert total == pytest.approx(other, rel=1e-4) and per_sample.shape == (32,)
    assert held.loss(model) == pytest.approx(0.0, abs=1e-6)
