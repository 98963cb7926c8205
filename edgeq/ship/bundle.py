"""The app bundle: everything an Android developer needs to ship the program.

``bundle/`` holds the program, its manifest and the manifest's JSON Schema,
the labels, a Kotlin class that loads the program with ExecuTorch's Android
API (``org.pytorch.executorch`` Module, Tensor, EValue), applies the recipe's
preprocessing and returns the top-k labels, the Gradle dependency the
target's backend needs at the exporter's ExecuTorch version, and a README.
All text files come from the Jinja2 templates in ``edgeq/ship/templates``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from edgeq.backends import get_backend
from edgeq.errors import EdgeqError
from edgeq.ship.templating import render, schema_text


def class_name(recipe_name: str) -> str:
    words = re.split(r"[^0-9A-Za-z]+", recipe_name)
    name = "".join(w[:1].upper() + w[1:] for w in words if w) or "Edgeq"
    return (name if not name[0].isdigit() else "M" + name) + "Model"


def scored_index(manifest: dict[str, Any]) -> int:
    """Which output the build scored (manifest "scored_output"; the first in manifests without it)."""
    return int(manifest.get("scored_output", 0))


def scored(manifest: dict[str, Any]) -> dict[str, Any]:
    """The output the build scored."""
    return manifest["outputs"][scored_index(manifest)]


def _generated_by(manifest: dict[str, Any]) -> dict[str, Any]:
    """What every generated file names: the versions that built the program, the recipe, and which
    of the program's outputs it reads."""
    return {
        "edgeq_version": manifest["versions"]["edgeq"],
        "executorch_version": manifest["versions"]["executorch"],
        "recipe": manifest["recipe"]["name"],
        "scored_output": scored_index(manifest),
    }


def text_sources(manifest: dict[str, Any], package: str = "org.edgeq.generated") -> dict[str, str]:
    """For a text model: the Kotlin class returning an embedding, and the WordPiece tokenizer it uses."""
    text = manifest["text"]
    if text.get("tokenizer") != "wordpiece":
        raise EdgeqError(
            f"the app bundle has no {text.get('tokenizer')!r} tokenizer",
            'set the recipe\'s text["tokenizer"] to "wordpiece" (BERT-style vocab.txt)',
        )
    names = [i["name"] for i in manifest["inputs"]]
    if names != ["input_ids", "attention_mask"] or any(i["dtype"] != "int64" for i in manifest["inputs"]):
        raise EdgeqError(
            f"a text model's program must take input_ids and attention_mask as int64, this one takes {names}",
            "make the model's forward(input_ids, attention_mask) and the example inputs int64 token tensors",
        )
    common = _generated_by(manifest) | {"package": package, "max_length": manifest["inputs"][0]["shape"][-1]}
    name = class_name(manifest["recipe"]["name"])
    return {
        f"{name}.kt": render(
            "TextModel.kt.j2",
            name=name,
            inputs=names,
            lowercase=bool(text.get("lowercase", True)),
            pooling=text.get("pooling", ""),
            dimension=scored(manifest)["shape"][-1],
            **common,
        ),
        "WordPieceTokenizer.java": render("WordPieceTokenizer.java.j2", **common),
    }


#: the native app's executable name
NATIVE_BINARY = "edgeq_runner"


def _image_context(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the Kotlin class and the native app both bake in: input, preprocessing, labels."""
    inp = manifest["inputs"][0]
    out = scored(manifest)
    if inp["dtype"] != "float32":
        raise ValueError(f"the generated class feeds float32 inputs; this program takes {inp['dtype']}")
    shape = inp["shape"]
    numel = 1
    for d in shape:
        numel *= d
    pre = manifest.get("preprocessing") or {}
    channels = shape[1] if len(shape) == 4 else 1

    def per_channel(value: Any) -> list[Any]:
        return list(value) if isinstance(value, (list, tuple)) else [value] * channels

    return _generated_by(manifest) | {
        "input": inp,
        "numel": numel,
        "labels": manifest.get("labels") or [str(i) for i in range(out["shape"][-1])],
        "scale": float(pre.get("scale", 1.0)),
        "mean": per_channel(pre.get("mean", 0.0)),
        "std": per_channel(pre.get("std", 1.0)),
        "channels": channels,
        # the recipe's preprocessing is an edgeq.tasks.image.ImageInput: the bundle has ImageInput.java
        "image_input": pre.get("kind") == "image",
        "layout": pre.get("layout", "as exported"),
    }


def detection_sources(manifest: dict[str, Any], package: str = "org.edgeq.generated") -> dict[str, str]:
    """For a detector: the Kotlin class returning boxes, and Detections.java (decode + per-class NMS,
    the same steps as the recipe's edgeq.tasks.detection decoder, from the manifest's parameters)."""
    post = manifest["postprocessing"]
    out = scored(manifest)["shape"]
    want = 4 if post["decoder"] == "grid" else 3
    if len(out) != want or out[1 if want == 4 else 2] != 5 + post["classes"]:
        layout = "[1, 5 + classes, H, W]" if want == 4 else "[1, N, 5 + classes]"
        raise EdgeqError(
            f"the {post['decoder']} decoder reads {layout} with {post['classes']} classes; the program's "
            f"first output is {out}",
            "set the recipe's postprocessing decoder and classes to match the model's head",
        )
    context = _image_context(manifest) | {"package": package} | post
    name = class_name(manifest["recipe"]["name"])
    return {
        f"{name}.kt": render("DetectorModel.kt.j2", name=name, **context),
        "Detections.java": render("Detections.java.j2", **context),
        **image_input_sources(manifest, package),
    }


def image_input_sources(manifest: dict[str, Any], package: str = "org.edgeq.generated") -> dict[str, str]:
    """ImageInput.java (resize or letterbox, channel order, normalisation of a photo's ARGB pixels)
    when the recipe's preprocessing is an edgeq.tasks.image.ImageInput; nothing otherwise."""
    pre = manifest.get("preprocessing") or {}
    if pre.get("kind") != "image":
        return {}
    shape = manifest["inputs"][0]["shape"]
    if len(shape) != 4 or shape[1] != 3 or list(shape[2:]) != list(pre["size"]):
        raise EdgeqError(
            f"ImageInput makes [1, 3, {pre['size'][0]}, {pre['size'][1]}] inputs; the program takes {shape}",
            "set the recipe's ImageInput size to the program's input (height, width)",
        )
    return {"ImageInput.java": render("ImageInput.java.j2", **_generated_by(manifest), package=package, **pre)}


def voc_palette(count: int) -> list[str]:
    """The PASCAL VOC colour map (class bits spread over R, G, B), as Java ARGB literals."""
    colours = []
    for label in range(count):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append(f"0xFF{r:02X}{g:02X}{b:02X}")
    return colours


def segmentation_sources(manifest: dict[str, Any], package: str = "org.edgeq.generated") -> dict[str, str]:
    """For a segmenter: the Kotlin class returning a class mask, and Segmentation.java (the argmax of
    edgeq.tasks.segmentation.SegmentationMasks, and a palette to draw the mask with)."""
    post = manifest["postprocessing"]
    out = scored(manifest)["shape"]
    if len(out) != 4 or out[1] != post["classes"]:
        raise EdgeqError(
            f"the argmax mask reads [1, {post['classes']}, H, W] class scores; the program's scored output is {out}",
            "set the recipe's SegmentationMasks classes to the model's class count",
        )
    context = _image_context(manifest) | {"package": package, "palette": voc_palette(post["classes"])} | post
    context["labels"] = manifest.get("labels") or [str(i) for i in range(post["classes"])]
    name = class_name(manifest["recipe"]["name"])
    return {
        f"{name}.kt": render("SegmenterModel.kt.j2", name=name, **context),
        "Segmentation.java": render("Segmentation.java.j2", **context),
        **image_input_sources(manifest, package),
    }


def audio_sources(manifest: dict[str, Any], package: str = "org.edgeq.generated") -> dict[str, str]:
    """For a keyword spotter: the Kotlin class taking a recording, and AudioFeatures.java (the log-mel
    features the model was trained on, from the manifest's parameters)."""
    from edgeq.tasks.audio import LogMel

    features = manifest["features"]
    if features.get("kind") != "log-mel":
        raise EdgeqError(
            f"the app bundle cannot compute {features.get('kind')!r} features", "use edgeq.tasks.audio.LogMel"
        )
    mel = LogMel(**{k: v for k, v in features.items() if k not in ("kind", "window", "mel_scale")})
    inp = manifest["inputs"][0]
    if inp["shape"][-2:] != list(mel.shape) or inp["dtype"] != "float32":
        raise EdgeqError(
            f"the features are {list(mel.shape)} (n_mels x frames) but the program takes {inp['dtype']} {inp['shape']}",
            "make the recipe's features the LogMel the model was trained on, and example_inputs its shape",
        )
    out = scored(manifest)
    context = _generated_by(manifest) | {
        "package": package,
        "input": inp,
        "labels": manifest.get("labels") or [str(i) for i in range(out["shape"][-1])],
        "frames": mel.frames,
        **features,
    }
    name = class_name(manifest["recipe"]["name"])
    return {
        f"{name}.kt": render("KeywordModel.kt.j2", name=name, **context),
        "AudioFeatures.java": render("AudioFeatures.java.j2", **context),
    }


def kotlin_source(manifest: dict[str, Any], package: str = "org.edgeq.generated") -> str:
    return render(
        "Model.kt.j2", package=package, name=class_name(manifest["recipe"]["name"]), **_image_context(manifest)
    )


def native_sources(manifest: dict[str, Any]) -> dict[str, str]:
    """The native app (C++, ExecuTorch's Module API) and its CMake project, under native/."""
    context = _image_context(manifest) | {"binary": NATIVE_BINARY, "detection": bool(manifest.get("postprocessing"))}
    return {
        "native/main.cpp": render("native_main.cpp.j2", **context),
        "native/CMakeLists.txt": render("native_CMakeLists.txt.j2", **context),
    }


def bundle_task(manifest: dict[str, Any]) -> str:
    """What the bundle's sources and README are written for: text, keywords, segmentation,
    detection or classification."""
    if manifest.get("text"):
        return "text"
    if manifest.get("features"):
        return "keywords"
    post = manifest.get("postprocessing")
    return str(post.get("task") or "detection") if post else "classification"


def write_bundle(directory: Path, program: bytes, manifest: dict[str, Any], vocab: bytes | None = None) -> list[str]:
    """Write bundle/ into ``directory``; returns the file names. ``vocab``: a text model's vocab.txt."""
    if manifest.get("text") and vocab is None:
        raise EdgeqError("a text model's bundle needs its vocab.txt", 'set the recipe\'s text["vocab_file"]')
    task = bundle_task(manifest)
    if task == "text":
        sources = text_sources(manifest)
    elif task == "keywords":
        sources = audio_sources(manifest)
    elif task == "segmentation":
        sources = {**segmentation_sources(manifest), **native_sources(manifest)}
    elif task == "detection":
        sources = {**detection_sources(manifest), **native_sources(manifest)}
    else:
        sources = {
            f"{class_name(manifest['recipe']['name'])}.kt": kotlin_source(manifest),
            **native_sources(manifest),
            **image_input_sources(manifest),
        }
    directory.mkdir(parents=True, exist_ok=True)
    runtime = get_backend(manifest["target"]["backend"]).app_runtime(manifest)
    name = class_name(manifest["recipe"]["name"])
    labels = manifest.get("labels") or []
    readme = render(
        "README.md.j2",
        task=task,
        manifest=manifest,
        runtime=runtime,
        name=name,
        input=manifest["inputs"][0],
        output=scored(manifest),
        preprocessing=json.dumps(manifest.get("preprocessing") or {}),
    )
    files = {
        "model.pte": program,
        "manifest.json": (json.dumps(manifest, indent=2) + "\n").encode(),
        "manifest.schema.json": schema_text().encode(),
        "labels.txt": ("\n".join(labels) + "\n").encode() if labels else b"",
        **{fname: text.encode() for fname, text in sources.items()},
        **({"vocab.txt": vocab} if vocab is not None else {}),
        "dependencies.gradle": render("dependencies.gradle.j2", runtime=runtime).encode(),
        "README.md": readme.encode(),
    }
    for fname, data in files.items():
        (directory / fname).parent.mkdir(exist_ok=True)
        (directory / fname).write_bytes(data)
    return sorted(files)
