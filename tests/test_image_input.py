"""Image input: the letterbox/stretch reference, and the bundle's ImageInput.java against it on real photos.

The photos are the two that ship inside scikit-learn (china.jpg, flower.jpg,
427x640 JPEGs), so the test needs no network and no shared data.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeq.errors import EdgeqError
from edgeq.tasks.image import ImageInput


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_image

    # a portrait crop too, so letterboxing pads left and right as well as top and bottom
    return [load_sample_image("china.jpg"), load_sample_image("flower.jpg")[:, 150:450]]


LETTERBOX = ImageInput(size=(320, 320), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), color="BGR")
STRETCH = ImageInput(size=(96, 160), resize="stretch", scale=1.0, pad=0.0)


def test_letterbox_keeps_the_aspect_and_centres_the_photo(photos):
    at = LETTERBOX.placement(427, 640)
    assert (at.height, at.width, at.top, at.left) == (214, 320, 53, 0)
    x = LETTERBOX(photos[0])
    assert x.shape == (3, 320, 320)
    pad = (LETTERBOX.pad / 255.0 - torch.tensor(LETTERBOX.mean)) / torch.tensor(LETTERBOX.std)
    assert torch.allclose(x[:, 0, 0], pad)  # mean and std are in the program's channel order
    assert not torch.allclose(x[:, 160, 160], pad)
    rgb = ImageInput(size=(320, 320), scale=1.0)(photos[0])
    assert torch.allclose(x[0, 160] * LETTERBOX.std[0] + LETTERBOX.mean[0], rgb[2, 160] / 255.0, atol=1e-6)  # BGR


def test_boxes_map_back_to_the_photo(photos):
    height, width = 427, 640
    box = torch.tensor([[0.1, 0.2, 0.7, 0.9]])  # on the photo
    at = LETTERBOX.placement(height, width)
    on_canvas = torch.tensor(
        [[(0.1 * at.width + at.left) / 320, (0.2 * at.height + at.top) / 320,
          (0.7 * at.width + at.left) / 320, (0.9 * at.height + at.top) / 320]]
    )  # fmt: skip
    assert torch.allclose(LETTERBOX.to_image(on_canvas, height, width), box, atol=1e-6)


def test_bad_settings_and_inputs_are_one_line_errors():
    with pytest.raises(EdgeqError, match='resize="letterbox"'):
        ImageInput(size=(8, 8), resize="crop")
    with pytest.raises(EdgeqError, match="RGB photo"):
        LETTERBOX(np.zeros((8, 8), dtype=np.uint8))


HARNESS = """
package t;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Files;
import java.nio.file.Paths;

public class Harness {
    public static void main(String[] args) throws Exception {
        ByteBuffer in = ByteBuffer.wrap(Files.readAllBytes(Paths.get(args[0]))).order(ByteOrder.LITTLE_ENDIAN);
        int height = in.getInt(), width = in.getInt();
        int[] argb = new int[height * width];
        for (int i = 0; i < argb.length; i++) argb[i] = in.getInt();
        float[] out = ImageInput.toInput(argb, width, height);
        ByteBuffer result = ByteBuffer.allocate(4 * out.length).order(ByteOrder.LITTLE_ENDIAN);
        for (float v : out) result.putFloat(v);
        Files.write(Paths.get(args[1]), result.array());
    }
}
"""


@pytest.mark.skipif(shutil.which("javac") is None, reason="no JDK (javac) on this machine")
@pytest.mark.parametrize("pre", [LETTERBOX, STRETCH], ids=["letterbox", "stretch"])
def test_bundle_java_preprocesses_real_photos_like_the_reference(tmp_path: Path, photos, pre):
    from edgeq.ship.templating import render

    src, classes = tmp_path / "src", tmp_path / "classes"
    src.mkdir()
    (src / "ImageInput.java").write_text(
        render("ImageInput.java.j2", edgeq_version="test", recipe="test", package="t", **pre.manifest())
    )
    (src / "Harness.java").write_text(HARNESS)
    subprocess.run(["javac", "-d", str(classes), *map(str, src.glob("*.java"))], check=True, capture_output=True)
    for n, photo in enumerate(photos):
        rgb = photo.astype(np.uint32)
        argb = (0xFF << 24) | (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        data, result = tmp_path / f"photo{n}.bin", tmp_path / f"input{n}.bin"
        data.write_bytes(struct.pack("<2i", *photo.shape[:2]) + argb.astype("<u4").tobytes())
        subprocess.run(["java", "-cp", str(classes), "t.Harness", str(data), str(result)], check=True)
        java = torch.from_numpy(np.frombuffer(result.read_bytes(), dtype="<f4").copy()).view(3, *pre.size)
        expected = pre(photo)
        # float32 interpolation weights computed in a different order: 1e-5 of a 0..255 pixel
        assert (java - expected).abs().max().item() < 2e-4 * max(1.0, float(expected.abs().max()))


def test_the_manifest_carries_every_parameter_and_the_bundle_its_java():
    from edgeq.recipe import Recipe
    from edgeq.ship.bundle import detection_sources
    from edgeq.tasks.detection import YoloDecoder

    recipe = Recipe(
        name="photo_detector",
        model=lambda: torch.nn.Identity(),
        example_inputs=lambda: (torch.zeros(1, 3, 320, 320),),
        train_data=lambda: iter(()),
        eval_data=lambda: iter(()),
        preprocessing=LETTERBOX,
    )
    assert recipe.preprocessing == LETTERBOX.manifest() and recipe.preprocessing["pad"] == 114.0
    manifest = {
        "recipe": {"name": "photo_detector"},
        "versions": {"edgeq": "t", "executorch": "t"},
        "inputs": [{"name": "x", "shape": [1, 3, 320, 320], "dtype": "float32"}],
        "outputs": [{"name": "output_0", "shape": [1, 100, 7], "dtype": "float32"}],
        "preprocessing": recipe.preprocessing,
        "postprocessing": {"task": "detection", **YoloDecoder(classes=2, input_size=(320, 320)).manifest()},
    }
    sources = detection_sources(manifest)
    assert "public static final int HEIGHT = 320, WIDTH = 320;" in sources["ImageInput.java"]
    assert "fun detect(argb: IntArray, width: Int, height: Int" in sources["PhotoDetectorModel.kt"]
    manifest["inputs"][0]["shape"] = [1, 3, 256, 256]
    with pytest.raises(EdgeqError, match="ImageInput size"):
        detection_sources(manifest)
