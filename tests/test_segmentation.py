"""Segmenters: torchmetrics' mIoU and its per-image bootstrap, the bundle's Java argmax, an end-to-end build.

The bundled digit segmenter (scikit-learn's real digits on 32x32 canvases, a
class per pixel) is the real model here: its float outputs feed the metric and
Java parity tests, and the slow test builds, validates and bundles it.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from edgeq.errors import EdgeqError
from edgeq.tasks.segmentation import MeanIoU, SegmentationMasks


@pytest.fixture(scope="module")
def masks_recipe():
    from edgeq.recipe import load_recipe

    return load_recipe("edgeq.examples.digit_masks")


@pytest.fixture(scope="module")
def float_outputs(masks_recipe):
    from edgeq.checks.evaluate import collect

    return collect(masks_recipe.model(), masks_recipe.eval_data())


def test_miou_is_torchmetrics_and_its_bootstrap_equals_scoring_each_resample(float_outputs, masks_recipe):
    from torchmetrics.functional.classification import multiclass_jaccard_index

    outputs, targets = float_outputs
    metric = masks_recipe.metric.__wrapped__  # the recipe guards it; the bootstrap reads the raw one
    expected = multiclass_jaccard_index(outputs.argmax(1), targets, 11, average="macro")
    assert metric(outputs, targets) == pytest.approx(100 * float(expected))
    assert 60.0 < metric(outputs, targets) < 95.0  # the float segmenter learnt the digits
    indices = torch.randint(0, len(outputs), (4, len(outputs)), generator=torch.Generator().manual_seed(0))
    fast = metric.resampled(outputs, targets, indices)
    slow = [metric(outputs[row], targets[row]) for row in indices]
    assert fast.tolist() == pytest.approx(slow, abs=1e-4)  # torchmetrics sums in float32


def test_ignored_pixels_and_absent_classes_do_not_count():
    metric = MeanIoU(SegmentationMasks(classes=4, ignore_index=3))
    logits = torch.nn.functional.one_hot(torch.tensor([[[0, 2], [1, 2]]]), 4).permute(0, 3, 1, 2).float()
    # class 0 right (IoU 1), class 1 half found (1/2), class 2 only a false positive (0); the void
    # pixel's prediction (2) counts nowhere, and class 3 (void) is not averaged
    truth = torch.tensor([[[0, 1], [1, 3]]])
    assert metric(logits, truth) == pytest.approx(100 * (1.0 + 1.0 / 2 + 0.0) / 3)
    assert metric.resampled(logits, truth, torch.zeros(1, 2, dtype=torch.long)).item() == pytest.approx(50.0)
    # the void pixel predicted right: now class 2 never occurs outside void, and drops out
    fixed = torch.nn.functional.one_hot(torch.tensor([[[0, 1], [1, 2]]]), 4).permute(0, 3, 1, 2).float()
    assert metric(fixed, truth) == pytest.approx(100.0)


def test_a_teachers_scores_as_targets_are_scored_by_their_masks(float_outputs, masks_recipe):
    """Training targets distilled from the float model (its class scores) are what the held-out
    decisions score against: their argmax masks are the truth."""
    outputs = float_outputs[0][:32]
    metric = masks_recipe.metric.__wrapped__
    assert metric(outputs, outputs) == pytest.approx(100.0)
    noisy = outputs + 2.0 * torch.randn(outputs.shape, generator=torch.Generator().manual_seed(0))
    assert metric(noisy, outputs) == pytest.approx(metric(noisy, outputs.argmax(1)))
    assert metric(noisy, outputs) < 95.0


def test_wrong_shapes_are_one_line_errors(float_outputs):
    outputs, targets = float_outputs
    with pytest.raises(EdgeqError, match="resize labels with nearest"):
        MeanIoU(SegmentationMasks(classes=11))(outputs, targets[:, :16, :16])
    with pytest.raises(EdgeqError, match="set classes to the model's class count"):
        MeanIoU(SegmentationMasks(classes=12))(outputs, targets)


def test_segmenter_distillation_is_per_pixel_kl_and_qat_uses_it(masks_recipe, float_outputs):
    from edgeq.quant.qat import combined_loss

    outputs = float_outputs[0][:8]
    masks = masks_recipe.postprocessing
    assert masks.distillation_loss(outputs, outputs).item() == pytest.approx(0.0, abs=1e-6)
    shifted = outputs.clone()
    shifted[:, 0] += 3.0  # more background everywhere: a per-pixel decision moves
    expected = masks.distillation_loss(shifted, outputs)
    assert expected.item() > 0.01
    assert combined_loss("distill", masks_recipe, shifted, None, outputs).item() == pytest.approx(expected.item())


HARNESS = """
package t;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Files;
import java.nio.file.Paths;

public class Harness {
    public static void main(String[] args) throws Exception {
        ByteBuffer buffer = ByteBuffer.wrap(Files.readAllBytes(Paths.get(args[0]))).order(ByteOrder.LITTLE_ENDIAN);
        long[] shape = new long[4];
        for (int d = 0; d < 4; d++) shape[d] = buffer.getInt();
        int per = (int) (shape[1] * shape[2] * shape[3]);
        shape[0] = 1;
        StringBuilder out = new StringBuilder();
        while (buffer.remaining() > 0) {
            float[] values = new float[per];
            buffer.asFloatBuffer().get(values);
            buffer.position(buffer.position() + 4 * per);
            for (int c : Segmentation.argmax(values, shape)) out.append(c).append(' ');
            out.append('\\n');
        }
        System.out.print(out);
    }
}
"""


@pytest.mark.skipif(shutil.which("javac") is None, reason="no JDK (javac) on this machine")
def test_bundle_java_argmax_matches_the_python_masks(tmp_path: Path, float_outputs, masks_recipe):
    from edgeq.ship.bundle import voc_palette
    from edgeq.ship.templating import render

    outputs = float_outputs[0][:64].clone()
    outputs[0, 5] = outputs[0, 3]  # exact ties: the lower class wins in both
    masks = masks_recipe.postprocessing
    src, classes = tmp_path / "src", tmp_path / "classes"
    src.mkdir()
    context = {"edgeq_version": "test", "recipe": "test", "package": "t", "palette": voc_palette(11)}
    (src / "Segmentation.java").write_text(render("Segmentation.java.j2", **context, **masks.manifest()))
    (src / "Harness.java").write_text(HARNESS)
    subprocess.run(["javac", "-d", str(classes), *map(str, src.glob("*.java"))], check=True, capture_output=True)
    data = tmp_path / "outputs.bin"
    data.write_bytes(struct.pack("<4i", *outputs.shape) + outputs.contiguous().numpy().tobytes())
    run = subprocess.run(["java", "-cp", str(classes), "t.Harness", str(data)], check=True, capture_output=True)
    java = torch.tensor([[int(v) for v in line.split()] for line in run.stdout.decode().splitlines()])
    assert torch.equal(java, masks(outputs).flatten(1))


def test_voc_palette_is_the_pascal_colour_map():
    from edgeq.ship.bundle import voc_palette

    assert voc_palette(4) == ["0xFF000000", "0xFF800000", "0xFF008000", "0xFF808000"]


@pytest.mark.slow
def test_segmenter_builds_validates_and_bundles_its_argmax(tmp_path):
    """A real build through the CLI: the program's mIoU within 2 points of float, a manifest that
    follows the schema and says how to turn the output into a mask, and the bundle's sources."""
    import json

    import jsonschema
    from typer.testing import CliRunner

    from edgeq.checks.validate import validate
    from edgeq.cli import app
    from edgeq.recipe import load_recipe
    from edgeq.ship.templating import schema_text

    out = tmp_path / "out"
    run = CliRunner().invoke(
        app, ["build", "--target", "android", "--recipe", "edgeq.examples.digit_masks", "--out", str(out)]
    )
    assert run.exit_code == 0, run.output
    manifest = json.loads((out / "manifest.json").read_text())
    jsonschema.validate(manifest, json.loads(schema_text()))
    post = {"task": "segmentation", "decoder": "argmax", "classes": 11, "ignore_index": None}
    assert manifest["postprocessing"] == post
    bundle = {p.name for p in (out / "bundle").iterdir()}
    assert {"Segmentation.java", "DigitMasksModel.kt", "model.pte", "labels.txt", "README.md"} <= bundle
    assert "model.segment(rawValues)" in (out / "bundle" / "README.md").read_text()
    checked = validate(out / "model.pte", load_recipe("edgeq.examples.digit_masks"))
    assert checked.float - checked.program < 2.0, (checked.float, checked.program)
    assert checked.float > 60.0
