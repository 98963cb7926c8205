"""Load a user's recipe: the float model, its data, and how to score it.

A recipe is a Python file or an importable module with module-level functions
``model``, ``example_inputs``, ``train_data``, ``eval_data`` and, optionally,
``loss``, ``metric``, ``labels``, ``preprocessing``, ``postprocessing`` (a
detector's decoder, :mod:`edgeq.tasks.detection`) and ``features`` (a keyword
spotter's log-mel, :mod:`edgeq.tasks.audio`). :class:`Recipe` is the
same thing as a dataclass, for users who prefer to build one in code.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from edgeq.errors import EdgeqError

REQUIRED = ("model", "example_inputs", "train_data", "eval_data")
BUNDLED = "edgeq.examples.digits"


def _check_classes(output: torch.Tensor, target: torch.Tensor, what: str) -> None:
    """Class-index targets must name one of the model's outputs (the defaults' contract)."""
    if target.dtype.is_floating_point or target.numel() == 0 or output.dim() < 2:
        return
    classes = output.shape[-1]
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= classes:
        raise EdgeqError(
            f"{what} targets reach class {high if high >= classes else low}, but the model has {classes} outputs",
            "yield class indices 0..N-1 matching the model's outputs, or give the recipe its own loss()/metric()",
        )


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    _check_classes(output, target, "train_data()")
    return torch.nn.functional.cross_entropy(output, target)


def top1_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy in percent (see :func:`top1_hits`)."""
    return 100.0 * float(top1_hits(outputs, targets).mean())


def top1_hits(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1.0 where a sample's top-1 prediction is its class, else 0.0. ``targets``: class indices, or
    per-class scores shaped like the outputs (a teacher's logits in train_data(), one-hot labels),
    whose argmax is the class: the build's decisions score the metric on held-out training
    batches, whatever their targets."""
    if targets.shape == outputs.shape and targets.dim() > 1 and targets.is_floating_point():
        targets = targets.argmax(dim=-1)
    if outputs.shape[0] != targets.shape[0] or (targets.dim() > 1 and targets.shape[-1] > 1):
        raise EdgeqError(
            f"the default top-1 metric got outputs of shape {tuple(outputs.shape)} and targets of shape "
            f"{tuple(targets.shape)}",
            "make eval_data() yield class-index targets, or give the recipe its own metric()",
        )
    _check_classes(outputs, targets, "eval_data()")
    return (outputs.argmax(dim=-1) == targets).float()


def select_output(output: Any, key: str | int | None = None) -> torch.Tensor:
    """The tensor a recipe scores from a model's output: the tensor itself, ``key`` of a tuple or dict,
    else the first element of a tuple or a dict's ``logits``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        if key is None and "logits" in output:
            key = "logits"
        if key is None or key not in output:
            raise EdgeqError(
                f"the model returns a dict with keys {sorted(output)}",
                'set the recipe\'s `output` to the key to score (e.g. output = "logits")',
            )
        return select_output(output[key])
    if isinstance(output, (tuple, list)) and output:
        index = key if isinstance(key, int) else 0
        if not -len(output) <= index < len(output):
            raise EdgeqError(
                f"the recipe's output = {index}, but the model returns {len(output)} outputs",
                f"set the recipe's `output` to an index from 0 to {len(output) - 1}",
            )
        return select_output(output[index])
    raise EdgeqError(f"the model returned a {type(output).__name__}", "return a tensor, a tuple or a dict of tensors")


def output_leaves(output: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output in the order torch.export flattens it: the program's outputs."""
    import torch.utils._pytree as pytree

    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def _guarded(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """The user's loss/metric, with any exception it raises turned into one line naming it."""
    if getattr(fn, "_edgeq_guarded", False):
        return fn

    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except EdgeqError:
            raise
        except Exception as exc:  # the user's code: say which function, and what it got
            shapes = ", ".join(str(tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)
            raise EdgeqError(
                f"recipe {name}() raised {type(exc).__name__} on arguments of shape {shapes}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                f"fix the recipe's {name}()",
            ) from exc

    call._edgeq_guarded = True  # type: ignore[attr-defined]
    call.__wrapped__ = fn  # type: ignore[attr-defined]  # what it guards (edgeq.checks.stats picks its test by it)
    return call


@dataclass
class Recipe:
    """A model, its example inputs, its data and how to score it."""

    name: str
    model: Callable[[], torch.nn.Module]
    example_inputs: Callable[[], tuple]
    train_data: Callable[[], Iterable]
    eval_data: Callable[[], Iterable]
    loss: Callable[[Any, Any], torch.Tensor] = cross_entropy
    metric: Callable[[Any, Any], float] = top1_accuracy
    labels: list[str] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    #: sha256 of the recipe's source, recorded so a build can be traced to it
    fingerprint: str = ""
    #: which output to score when the model returns a tuple (an index) or a dict (a key);
    #: None: the tensor itself, a tuple's first element, or a dict's "logits"
    output: str | int | None = None
    #: for text models: tokenizer facts the app bundle needs ("tokenizer": "wordpiece", "lowercase",
    #: "max_length", "inputs", "pooling", "vocab_file": path to vocab.txt)
    text: dict[str, Any] = field(default_factory=dict)
    #: QAT settings the model trains best with (QATConfig field names, e.g. a pretrained
    #: transformer's {"optimizer": "adam", "lr": 1e-5}); a build uses them unless it is given
    #: its own QATConfig, and `edgeq build` flags override them one by one
    qat: dict[str, Any] = field(default_factory=dict)
    #: what the app runs on the output, e.g. an edgeq.tasks.detection decoder or
    #: edgeq.tasks.segmentation.SegmentationMasks: written to the manifest, and the bundle carries
    #: its implementation (Detections.java, Segmentation.java)
    postprocessing: Any = None
    #: what the app computes from its raw input before the program runs, e.g. edgeq.tasks.audio.LogMel:
    #: written to the manifest, and the bundle carries its implementation (AudioFeatures.java)
    features: Any = None

    def __post_init__(self) -> None:
        self.qat = recipe_qat(self.qat, self.name)
        # an edgeq.tasks.image.ImageInput is kept as its manifest entry (every parameter), which the
        # bundle's ImageInput.java implements
        manifest = getattr(self.preprocessing, "manifest", None)
        self.preprocessing = dict(manifest() if callable(manifest) else self.preprocessing)
        if self.postprocessing is not None and not callable(getattr(self.postprocessing, "manifest", None)):
            raise EdgeqError(
                f"recipe {self.name}: postprocessing is a {type(self.postprocessing).__name__}",
                "set it to a decoder from edgeq.tasks.detection (GridDecoder or YoloDecoder), "
                "edgeq.tasks.segmentation.SegmentationMasks, or leave it out",
            )
        if self.features is not None and not callable(getattr(self.features, "manifest", None)):
            raise EdgeqError(
                f"recipe {self.name}: features is a {type(self.features).__name__}",
                "set it to edgeq.tasks.audio.LogMel(...) with the parameters the model was trained on, or leave it out",
            )
        self.loss = _guarded("loss", self.loss)
        self.metric = _guarded("metric", self.metric)

    def score_output(self, output: Any) -> torch.Tensor:
        return select_output(output, self.output)

    def scored_index(self, output: Any) -> int:
        """Which of the program's outputs is the scored one (its position among ``output``'s tensors)."""
        scored = self.score_output(output)
        return next(i for i, leaf in enumerate(output_leaves(output)) if leaf is scored)


#: QATConfig fields a recipe may set (the rest belong to the build: ranges, device, seed, checkpoints)
RECIPE_QAT_FIELDS = (
    "steps",
    "epochs",
    "holdout",
    "patience",
    "lr",
    "optimizer",
    "weight_decay",
    "calibration_batches",
    "freeze_bn",
    "freeze_ranges",
    "intermediate_share",
    "loss",
    "dropout",
)


def recipe_qat(settings: Any, where: str) -> dict[str, Any]:
    """A recipe's QAT defaults, checked: known fields with values QATConfig accepts."""
    from edgeq.configs import QATConfig

    if not isinstance(settings, dict):
        raise EdgeqError(
            f"recipe {where}: qat is a {type(settings).__name__}", 'make it a dict, e.g. qat = {"lr": 1e-5}'
        )
    unknown = sorted(set(settings) - set(RECIPE_QAT_FIELDS))
    if unknown:
        raise EdgeqError(
            f"recipe {where}: qat has unknown setting(s) {', '.join(unknown)}",
            f"use some of: {', '.join(RECIPE_QAT_FIELDS)}",
        )
    try:
        QATConfig(**settings)
    except EdgeqError as exc:
        raise EdgeqError(f"recipe {where}: qat: {exc.cause}", exc.fix) from exc
    except TypeError as exc:
        raise EdgeqError(f"recipe {where}: qat {exc}", "give each setting a value of QATConfig's type") from exc
    return dict(settings)


def _import_file(path: Path) -> ModuleType:
    name = f"edgeq_recipe_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise EdgeqError(f"cannot load recipe {path}", "pass a .py file or an importable module name")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: report where it failed
        del sys.modules[name]
        raise EdgeqError(
            f"recipe {path} raised {type(exc).__name__} on import at {_user_frame(exc, str(path))}: {exc}",
            "fix the recipe so that `python " + str(path) + "` imports cleanly",
        ) from exc
    return module


def _user_frame(exc: BaseException, filename: str) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
    frame = frames[-1] if frames else traceback.extract_tb(exc.__traceback__)[-1]
    return f"line {frame.lineno}"


def _import_module(spec: str) -> ModuleType:
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name and spec.startswith(exc.name):
            raise EdgeqError(
                f"recipe '{spec}' is neither a file nor an importable module",
                "pass a path to a .py file (e.g. --recipe my_recipe.py) or a module on PYTHONPATH",
            ) from exc
        raise EdgeqError(f"recipe '{spec}' failed to import: {exc}", "install what it needs") from exc
    except Exception as exc:  # noqa: BLE001 - the user's module: whatever it raises becomes one line naming it
        raise EdgeqError(
            f"recipe '{spec}' raised {type(exc).__name__} on import: {exc}",
            "fix the recipe so that it imports cleanly",
        ) from exc


def load_recipe(spec: str | Path | ModuleType | Recipe | None = None) -> Recipe:
    """Load a recipe from a file path, a module name, a module, or pass a Recipe through.

    ``None`` loads the bundled digits example.
    """
    if isinstance(spec, Recipe):
        return spec
    module, source = import_recipe(spec)
    return recipe_from_module(module, source)


def import_recipe(spec: str | Path | ModuleType | None) -> tuple[ModuleType, str]:
    """The recipe's module and where it came from (``None``: the bundled digits example)."""
    if spec is None:
        spec = BUNDLED
    if isinstance(spec, ModuleType):
        return spec, spec.__name__
    text = str(spec)
    path = Path(text)
    if text.endswith(".py") or path.exists():
        if not path.is_file():
            raise EdgeqError(f"recipe file {text} not found", "check the path given to --recipe")
        return _import_file(path), str(path.resolve())
    return _import_module(text), text


def recipe_identity(module: ModuleType, source: str) -> tuple[str, str]:
    """A recipe module's name (its ``name``, else its module or file name) and its source text (what
    its fingerprint hashes)."""
    name = getattr(module, "name", None) or module.__name__.rsplit(".", 1)[-1]
    if name.startswith("edgeq_recipe_"):
        name = Path(source).stem
    try:
        text = inspect.getsource(module)
    except (OSError, TypeError):
        text = source
    return str(name), text


def recipe_from_module(module: ModuleType, source: str = "") -> Recipe:
    missing = [name for name in REQUIRED if not callable(getattr(module, name, None))]
    if missing:
        raise EdgeqError(
            f"recipe {source or module.__name__} lacks {', '.join(f'{m}()' for m in missing)}",
            "define " + " and ".join(f"def {m}()" for m in missing) + " at module level (see README: Recipes)",
        )
    labels = getattr(module, "labels", None)
    if labels is not None:
        labels = [str(label) for label in labels]
    name, text = recipe_identity(module, source)
    return Recipe(
        name=str(name),
        model=module.model,
        example_inputs=module.example_inputs,
        train_data=module.train_data,
        eval_data=module.eval_data,
        loss=getattr(module, "loss", cross_entropy),
        metric=getattr(module, "metric", top1_accuracy),
        output=getattr(module, "output", None),
        labels=labels,
        preprocessing=getattr(module, "preprocessing", None) or {},
        text=dict(getattr(module, "text", {}) or {}),
        qat=getattr(module, "qat", None) or {},
        postprocessing=getattr(module, "postprocessing", None),
        features=getattr(module, "features", None),
        source=source,
        fingerprint=hashlib.sha256(text.encode()).hexdigest(),
    )


def as_tuple(inputs: Any) -> tuple:
    """Recipes may yield a bare tensor or a tuple of tensors as model inputs."""
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
