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

# name -> (module, attribute); modules are named apart from the functions
# (pipeline.build, analysis.analyze_recipe) so that importing a submodule
# never shadows a function on the package.
_LAZY = {
    "build": ("edgeq.pipeline", "build"),
    "BuildConfig": ("edgeq.configs", "BuildConfig"),
    "BuildResult": ("edgeq.pipeline", "BuildResult"),
    "analyze": ("edgeq.planning.analysis", "analyze_recipe"),
    "Analysis": ("edgeq.planning.analysis", "Analysis"),
    "QATConfig": ("edgeq.configs", "QATConfig"),
    "RangeConfig": ("edgeq.configs", "RangeConfig"),
    "VoteConfig": ("edgeq.configs", "VoteConfig"),
    "resolve": ("edgeq.configs", "resolve"),
    "ConfigError": ("edgeq.errors", "ConfigError"),
    "apply_vote": ("edgeq.quant.ranges", "apply_vote"),
    "AdaptiveRangeFakeQuantize": ("edgeq.quant.fake_quant", "AdaptiveRangeFakeQuantize"),
    "Recipe": ("edgeq.recipe", "Recipe"),
    "load_recipe": ("edgeq.recipe", "load_recipe"),
    "load_target": ("edgeq.backends", "load_target"),
    "Plan": ("edgeq.planning.plan", "Plan"),
    "EdgeqError": ("edgeq.errors", "EdgeqError"),
    "build_llm": ("edgeq.llm.build", "build_llm"),
    "LLMBuildConfig": ("edgeq.llm.build", "LLMBuildConfig"),
    "load_llm_recipe": ("edgeq.llm.recipe", "load_llm_recipe"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'edgeq' has no attribute {name!r}")
