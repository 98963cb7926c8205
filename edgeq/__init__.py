"""edgeq: float PyTorch model -> adaptive-range QAT -> ExecuTorch program for phones.

The public API is a few plain functions and dataclass configs::

    import edgeq
    result = edgeq.build("my_recipe.py", edgeq.BuildConfig(target="android"))
    print(result.scores.program, result.out_dir)

Heavy imports (torch, torchao, executorch) happen on first use, so that
``import edgeq`` and ``edgeq --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "build": "edgeq.build",
    "BuildConfig": "edgeq.build",
    "BuildResult": "edgeq.build",
    "QATConfig": "edgeq.qat",
    "RangeConfig": "edgeq.quantizer",
    "VoteConfig": "edgeq.ranges",
    "apply_vote": "edgeq.ranges",
    "AdaptiveRangeFakeQuantize": "edgeq.fake_quant",
    "Recipe": "edgeq.recipe",
    "load_recipe": "edgeq.recipe",
    "load_target": "edgeq.targets",
    "Plan": "edgeq.plan",
    "EdgeqError": "edgeq.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        if name == "build":
            return module.build
        return getattr(module, name)
    raise AttributeError(f"module 'edgeq' has no attribute {name!r}")
