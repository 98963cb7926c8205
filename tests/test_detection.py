"""Detectors: targets of any structure, COCO mAP, the bundle's Java post-processing, mixed-range outputs.

The bundled digit detector (scikit-learn's real digits on 32x32 canvases) is the
real model here: its float outputs feed the Java parity test, its decoded
variant (pixel boxes concatenated with probabilities) the mixed-range tests.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from edgeq.errors import EdgeqError
from edgeq.samples import Samples, join, take
from edgeq.tasks.detection import GridDecoder, MeanAveragePrecision, YoloDecoder, yolo_targets


@pytest.fixture(scope="module")
def boxes_recipe():
    from edgeq.recipe import load_recipe

    return load_recipe("edgeq.examples.digit_boxes")


@pytest.fixture(scope="module")
def float_outputs(boxes_recipe):
    """The float detector's raw outputs on the evaluation canvases, and their real boxes."""
    from edgeq.checks.evaluate import collect

    return collect(boxes_recipe.model(), boxes_recipe.eval_data())


def test_targets_of_any_structure_join_and_resample_per_sample():
    per_image = [{"boxes": torch.rand(k, 4), "labels": torch.zeros(k, dtype=torch.long)} for k in (1, 2, 3)]
    joined = join([per_image[:2], per_image[2:]], [2, 1])
    assert isinstance(joined, Samples) and len(joined) == 3
    picked = take(joined, torch.tensor([2, 2, 0]))
    assert isinstance(picked, Samples) and [len(t["labels"]) for t in picked] == [3, 3, 1]
    assert isinstance(joined[1:], Samples)
    assert torch.equal(join([torch.tensor([1, 2]), [3]]), torch.tensor([1, 2, 3]))  # class indices concatenate
    batched = join([{"y": torch.ones(2, 3)}, {"y": torch.zeros(1, 3)}])
    assert batched["y"].shape == (3, 3) and take(batched, torch.tensor([2]))["y"].sum() == 0
    with pytest.raises(EdgeqError, match="a batch of 2 samples came with 3 targets"):
        join([per_image], [2])


def test_map_is_coco_eval_and_its_bootstrap_reuses_matches_exactly(float_outputs, boxes_recipe):
    """The fast bootstrap (evaluate once, accumulate per resample, edgeq.tasks.detection._accumulated,
    which reorders pycocotools' evalImgs) equals scoring each resampled image set from scratch."""
    outputs, targets = float_outputs
    metric = boxes_recipe.metric.__wrapped__  # the recipe's own MeanAveragePrecision, unguarded
    value = metric(outputs, targets)
    assert 60.0 < value <= 100.0  # the float detector finds digits (76 at the time of writing)
    assert metric(outputs, outputs) == pytest.approx(100.0)  # a teacher's own outputs as truth
    rows = torch.randint(0, len(targets), (3, len(targets)), generator=torch.Generator().manual_seed(1))
    fast = metric.resampled(outputs, targets, rows)
    slow = [metric(outputs[r], take(targets, r)) for r in rows]
    assert fast.tolist() == pytest.approx(slow, abs=1e-9)
    coco = MeanAveragePrecision(metric.decoder, iou="0.5:0.95")
    assert coco(outputs, targets) < value


def test_metric_refuses_boxes_in_the_wrong_format_in_one_line(float_outputs):
    outputs, targets = float_outputs
    metric = MeanAveragePrecision(GridDecoder(classes=10))
    pixels = Samples({"boxes": t["boxes"] * 32, "labels": t["labels"]} for t in targets)
    with pytest.raises(EdgeqError, match="pixels, not 0..1.*divide the target boxes"):
        metric(outputs, pixels)
    cxcywh = Samples({"boxes": t["boxes"][:, [2, 3, 0, 1]], "labels": t["labels"]} for t in targets)
    with pytest.raises(EdgeqError, match="x2 < x1.*box_format='cxcywh'"):
        metric(outputs, cxcywh)
    with pytest.raises(EdgeqError, match="not a dict with boxes and labels.*yolo_targets"):
        metric(outputs, Samples(t["boxes"] for t in targets))
    with pytest.raises(EdgeqError, match="decoder has 10 classes"):
        metric(outputs, Samples({"boxes": t["boxes"], "labels": t["labels"] + 10} for t in targets))
    with pytest.raises(EdgeqError, match="set the decoder's classes"):
        MeanAveragePrecision(GridDecoder(classes=80))(outputs, targets)
    with pytest.raises(EdgeqError, match='use iou="0.5"'):
        MeanAveragePrecision(GridDecoder(classes=10), iou="0.75")
    rows = yolo_targets([[3, 0.5, 0.5, 0.2, 0.4]])
    assert rows["labels"].tolist() == [3] and rows["boxes"][0].tolist() == pytest.approx([0.4, 0.3, 0.6, 0.7])


HARNESS = """
package t;
import java.io.*;
import java.nio.*;
import java.nio.file.*;
import java.util.List;
public class Harness {
    public static void main(String[] args) throws Exception {
        ByteBuffer buffer = ByteBuffer.wrap(Files.readAllBytes(Paths.get(args[0]))).order(ByteOrder.LITTLE_ENDIAN);
        int dims = buffer.getInt();
        long[] shape = new long[dims];
        int per = 1;
        for (int d = 0; d < dims; d++) { shape[d] = buffer.getInt(); if (d > 0) per *= shape[d]; }
        shape[0] = 1;
        StringBuilder out = new StringBuilder();
        for (int image = 0; buffer.remaining() > 0; image++) {
            float[] values = new float[per];
            buffer.asFloatBuffer().get(values);
            buffer.position(buffer.position() + 4 * per);
            for (Detections.Box b : Detections.decode(values, shape)) {
                out.append(image + " " + b.label + " " + b.score + " ");
                out.append(b.x1 + " " + b.y1 + " " + b.x2 + " " + b.y2 + "\\n");
            }
        }
        System.out.print(out);
    }
}
"""


def _java_detections(tmp_path: Path, decoder, outputs: torch.Tensor) -> list[list[float]]:
    from edgeq.ship.templating import render

    src, classes = tmp_path / "src", tmp_path / "classes"
    src.mkdir()
    (src / "Detections.java").write_text(
        render("Detections.java.j2", edgeq_version="test", recipe="test", package="t", **decoder.manifest())
    )
    (src / "Harness.java").write_text(HARNESS)
    subprocess.run(["javac", "-d", str(classes), *map(str, src.glob("*.java"))], check=True, capture_output=True)
    data = tmp_path / "outputs.bin"
    header = struct.pack(f"<i{outputs.dim()}i", outputs.dim(), *outputs.shape)
    data.write_bytes(header + outputs.contiguous().float().numpy().tobytes())
    run = subprocess.run(["java", "-cp", str(classes), "t.Harness", str(data)], check=True, capture_output=True)
    return [[float(v) for v in line.split()] for line in run.stdout.decode().splitlines()]


def _python_detections(decoder, outputs: torch.Tensor) -> list[list[float]]:
    rows = []
    for image, found in enumerate(decoder(outputs)):
        for box, score, label in zip(found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist()):
            rows.append([image, label, score, *box])
    return rows


def _same_detections(java: list[list[float]], python: list[list[float]]) -> None:
    assert len(java) == len(python) > 0
    for j, p in zip(java, python):
        assert j[:2] == p[:2]  # image, class
        assert j[2:] == pytest.approx(p[2:], abs=2e-6)  # score and box, float32 rounding


@pytest.mark.skipif(shutil.which("javac") is None, reason="no JDK (javac) on this machine")
def test_bundle_java_decodes_and_suppresses_like_the_python_reference(tmp_path, float_outputs, boxes_recipe):
    """Detections.java (grid decoder) on the real detector's outputs for 384 canvases: the same boxes,
    scores and classes as edgeq.tasks.detection.GridDecoder, NMS included."""
    outputs, _ = float_outputs
    decoder = boxes_recipe.postprocessing
    python = _python_detections(decoder, outputs)
    assert len(python) > len(outputs)  # several digits a canvas: NMS and max_detections are exercised
    _same_detections(_java_detections(tmp_path, decoder, outputs), python)


@pytest.mark.skipif(shutil.which("javac") is None, reason="no JDK (javac) on this machine")
def test_bundle_java_yolo_decoder_matches_python(tmp_path, float_outputs):
    from edgeq.examples import digit_boxes_decoded

    outputs = digit_boxes_decoded.model()(torch.cat([x for x, _ in digit_boxes_decoded.eval_data()][:2]))
    decoder: YoloDecoder = digit_boxes_decoded.postprocessing
    _same_detections(_java_detections(tmp_path, decoder, outputs.detach()), _python_detections(decoder, outputs))


def test_mixed_range_output_concatenation_is_found_measured_and_kept_float():
    """The decoded detector ends in cat(pixel boxes, probabilities): the analysis flags it (8 levels
    for the probabilities under one scale), measures one scale as worse, and the quantizer leaves
    it float while the branches stay quantized."""
    from edgeq.backends import load_target
    from edgeq.configs import QATConfig
    from edgeq.planning.analysis import _batches
    from edgeq.planning.concats import analyze_concats
    from edgeq.planning.plan import uniform_plan
    from edgeq.quant.ptq import post_training_quantize
    from edgeq.quant.spec import quant_spec
    from edgeq.recipe import load_recipe

    recipe = load_recipe("edgeq.examples.digit_boxes_decoded")
    model = recipe.model()
    found = analyze_concats(model, recipe, _batches(recipe, 2)[0])
    assert [c.node for c in found] == ["cat_1"]  # the head's inner cat feeds the decode, not the output
    tail = found[0]
    assert tail.narrowest_levels < 16 and tail.keep_float and tail.widen
    assert tail.one_scale_loss > max(tail.per_input_loss, tail.wide_loss)
    target = load_target("android")

    def quantized_sources(float_ops: list[str]) -> set[str]:
        plan = uniform_plan(model, target, example_inputs=recipe.example_inputs())
        plan.float_ops = float_ops
        reference = post_training_quantize(model, recipe, quant_spec(plan, target, qat=False), QATConfig(), 2)
        return {
            n.args[0].name
            for n in reference.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("quantized_decomposed.quantize_per_tensor")
        }

    assert "cat_1" in quantized_sources([])
    kept = quantized_sources(["cat_1"])
    assert "cat_1" not in kept and "cat" in kept  # the plan's float op only; the head's own cat stays int8


@pytest.mark.slow
def test_decoded_detector_builds_validates_and_bundles_its_post_processing(tmp_path):
    """Teacher targets in train_data, real boxes in eval_data, the mixed-range tail kept float: the
    program's mAP on the evaluation canvases is within 3 points of float, and the bundle holds the
    Java post-processing and a manifest that says how to run it."""
    import json

    import jsonschema

    from edgeq.checks.validate import validate
    from edgeq.configs import BuildConfig
    from edgeq.pipeline import build
    from edgeq.recipe import load_recipe
    from edgeq.ship.templating import schema_text

    recipe = load_recipe("edgeq.examples.digit_boxes_decoded")
    out = tmp_path / "out"
    # the weight-rounding and bias-correction candidates have their own tests: here QAT against plain PTQ
    config = BuildConfig(target="android", out=out, max_drop=100.0, rounding=False, bias_correction=False)
    result = build(recipe, config)
    assert result.plan.float_ops == ["cat_1"]
    manifest = json.loads((out / "manifest.json").read_text())
    jsonschema.validate(manifest, json.loads(schema_text()))
    assert manifest["postprocessing"]["decoder"] == "yolo" and manifest["postprocessing"]["classes"] == 10
    bundle = {p.name for p in (out / "bundle").iterdir()}
    assert {"Detections.java", "DigitBoxesDecodedModel.kt", "model.pte", "labels.txt"} <= bundle
    checked = validate(out / "model.pte", recipe)
    assert checked.float - checked.program < 3.0, (checked.float, checked.program)
    report = json.loads((out / "report.json").read_text())
    assert report["analysis"]["concats"][0]["keep_float"] is True


def test_on_the_htp_a_mixed_range_concatenation_takes_16_bit_activations():
    """The HTP runs no float op: the plan's wide_ops give the concatenation the target's 16-bit
    activations (QnnQuantizer, by node), while the rest stays at the 8-bit default."""
    from edgeq.backends import load_target
    from edgeq.configs import QATConfig
    from edgeq.planning.choose import _widest_activations
    from edgeq.planning.plan import uniform_plan
    from edgeq.quant.ptq import post_training_quantize
    from edgeq.quant.spec import quant_spec
    from edgeq.recipe import load_recipe

    recipe = load_recipe("edgeq.examples.digit_boxes_decoded")
    model = recipe.model()
    target = load_target("qualcomm-sm8650")
    assert _widest_activations(target) == "16a8w"
    plan = uniform_plan(model, target, example_inputs=recipe.example_inputs())
    plan.wide_ops = {"cat_1": "16a8w"}
    reference = post_training_quantize(model, recipe, quant_spec(plan, target, qat=False), QATConfig(), 2)
    widths = {
        n.args[0].name: int(n.args[4])
        for n in reference.graph.nodes
        if n.op == "call_function" and str(n.target).startswith("quantized_decomposed.quantize_per_tensor")
    }
    assert widths["cat_1"] == 65535
    assert widths["cat"] == 255


def test_a_concatenation_between_quantized_layers_loads_when_other_ops_are_float():
    """FastestDet's SPP: three conv branches concatenated into a conv. With ops between layers in
    float, the concatenation still takes one shared int8 scale: XNNPACK reads dequantize -> cat ->
    quantize as a quantized concatenation and refuses to load the program when its inputs' scales
    differ (error 0x1 at load_method)."""
    import dataclasses

    from torch import nn

    from edgeq.backends import load_target
    from edgeq.configs import QATConfig
    from edgeq.lower import lower
    from edgeq.planning.plan import uniform_plan
    from edgeq.quant.ptq import post_training_quantize
    from edgeq.quant.spec import quant_spec
    from edgeq.recipe import Recipe
    from edgeq.runtime import ProgramRunner

    class SPP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.branches = nn.ModuleList(
                nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU()) for _ in range(3)
            )
            with torch.no_grad():
                for k, branch in enumerate(self.branches):  # three output ranges, three scales
                    branch[0].weight.mul_(4**k)
            self.out = nn.Conv2d(24, 8, 1)

        def forward(self, x):
            x = self.stem(x)
            return self.out(torch.cat([b(x) for b in self.branches], 1))

    torch.manual_seed(0)
    model = SPP().eval()
    data = [(torch.randn(4, 3, 16, 16), torch.zeros(4)) for _ in range(2)]
    recipe = Recipe("spp", lambda: model, lambda: (torch.zeros(1, 3, 16, 16),), lambda: data, lambda: data)
    target = load_target("android")
    plan = dataclasses.replace(uniform_plan(model, target, example_inputs=recipe.example_inputs()), other_ops="float")
    reference = post_training_quantize(model, recipe, quant_spec(plan, target, qat=False), QATConfig(), 2)
    lowered = lower(reference, recipe.example_inputs(), target)
    out = ProgramRunner(lowered.program)(*recipe.example_inputs())
    assert out.shape == (1, 8, 16, 16)


def test_a_qnn_prepared_graph_with_a_concatenation_can_be_copied_and_converted():
    """QNN's ConcatObserver keeps fx nodes; edgeq converts a deep copy of the QAT graph, which failed
    on any model with a concatenation until upstream.copyable_concat_observer."""
    import copy

    from edgeq.backends import load_target
    from edgeq.capture import capture_for_quantization
    from edgeq.planning.plan import uniform_plan
    from edgeq.quant.convert import convert, prepare
    from edgeq.quant.spec import quant_spec
    from edgeq.recipe import load_recipe

    recipe = load_recipe("edgeq.examples.digit_boxes")
    model = recipe.model()
    target = load_target("qualcomm-sm8650")
    plan = uniform_plan(model, target, example_inputs=recipe.example_inputs())
    graph = capture_for_quantization(model, recipe.example_inputs(), True)
    prepared = prepare(graph, quant_spec(plan, target, qat=True))
    x = next(iter(recipe.train_data()))[0][:4]
    prepared(x)  # the observers link up
    reference = convert(copy.deepcopy(prepared))
    assert reference(x).shape == (4, 15, 4, 4)
    prepared(x)  # the original still runs after the copy


def test_an_edited_plan_naming_an_op_the_graph_lacks_is_one_line(tmp_path):
    from edgeq.backends import load_target
    from edgeq.configs import BuildConfig
    from edgeq.pipeline import build
    from edgeq.planning.plan import uniform_plan
    from edgeq.recipe import load_recipe

    recipe = load_recipe(None)
    plan = uniform_plan(recipe.model(), load_target("android"), example_inputs=recipe.example_inputs())
    plan.float_ops = ["cat_9"]
    with pytest.raises(EdgeqError, match="float_ops name ops the exported graph lacks: cat_9.*analysis.json"):
        build(recipe, BuildConfig(target="android", out=tmp_path / "out", plan=plan))
    assert not (tmp_path / "out").exists()
