"""Lower a decoder LLM to an ExecuTorch program that ExecuTorch's LLM runner generates from.

ExecuTorch's own LLM export does the model side (``executorch.examples.models.llama``'s
``LLMEdgeManager`` flow, the path ``export_llm`` takes): its static-KV-cache
transformer, the custom SDPA and cache-update ops, dynamic prompt length, the
metadata methods the runner reads (``get_max_seq_len``, ``get_vocab_size``,
``get_bos_id``, ``get_eos_ids``, ``use_kv_cache``, ...) and the XNNPACK
lowering. What edgeq adds is the precision of each layer: instead of one
``qmode`` for every linear, each linear and the token table get their own
torchao config (:data:`LINEAR`, :data:`EMBEDDING`), applied with ``quantize_``
and a filter before export; and a graph XNNPACK runs in a few delegate calls per
block instead of a dozen: q/k/v and gate/up stacked (edgeq.llm.fuse), the
norms as XNNPACK ops (edgeq.llm.norm), one greedy partitioner. Those change how
the numbers are computed, not which: the tests hold the program to the model.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgeq.llm.convert import executorch_params, executorch_state_dict
from edgeq.llm.fuse import fuse_projections, merge_duplicates
from edgeq.llm.gptq import Hessians, apply_gptq
from edgeq.llm.norm import replace_rms_norms
from edgeq.llm.zero_points import zero_point_linear

__all__ = [
    "EMBEDDING", "FLOATS", "HEAD", "LINEAR", "SCALES", "LLMPlan", "linear_config", "lower_checkpoint", "lower_llm",
    "quantize_layers", "write_checkpoint"
]  # fmt: skip

#: linear precisions: 8-bit dynamic activations with 4-bit weights in groups (XNNPACK's 8da4w),
#: or 8-bit per-channel weights (8da8w), or float16 weights and arithmetic (XNNPACK's fp16 kernels
#: between casts, edgeq.quant.half.HalfLinear), or float
LINEAR = ("w4g32", "w4g64", "w4g128", "w8dyn", "fp16", "float")
#: the linear precisions that keep float activations: no integers, nothing to smooth, GPTQ or train
FLOATS = ("fp16", "float")
#: 4-bit group scale choices: torchao's HQQ scale search, or min-max (what torchao's QAT fake-quantizes to)
SCALES = ("hqq", "minmax")
#: token-table precisions: 8-bit per row, 4-bit in groups of 32, float
EMBEDDING = ("e8", "e4g32", "float")


@dataclass
class LLMPlan:
    """Each linear's precision (by its name in ExecuTorch's transformer, e.g. ``layers.0.attention.wq``)
    and the token table's."""

    linears: dict[str, str] = field(default_factory=dict)
    embedding: str = "e8"
    #: how 4-bit group scales are chosen (:data:`SCALES`): "hqq" searches each group's scale for
    #: round-to-nearest; "minmax" is the grid QAT trained against (edgeq.llm.qat)
    scales: str = "hqq"
    #: 4-bit groups on an asymmetric grid (a step and a zero point per group, min-max), the zero
    #: points carried by a small 8-bit linear beside each (edgeq.llm.zero_points); False: symmetric
    zero_points: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "linears": dict(self.linears),
            "embedding": self.embedding,
            "scales": "minmax" if self.zero_points else self.scales,
            "zero_points": self.zero_points,
        }

    @classmethod
    def uniform(cls, names: list[str], linear: str, embedding: str, zero_points: bool = False) -> LLMPlan:
        return cls({name: linear for name in names}, embedding, zero_points=zero_points)


#: torch's type stubs lack the sub-byte dtypes
_INT4: torch.dtype = torch.int4  # type: ignore[attr-defined]


def linear_config(precision: str, scales: str = "hqq") -> Any:
    """The torchao config a linear at ``precision`` is lowered with (and QAT fake-quantizes to)."""
    if scales not in SCALES:
        raise ValueError(f"scales {scales!r} is not one of {SCALES}")
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig

    if precision.startswith("w4g"):
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=_INT4,
            weight_granularity=PerGroup(int(precision[3:])),
            intx_choose_qparams_algorithm="hqq_scale_only" if scales == "hqq" else "affine",
        )
    if precision == "w8dyn":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    raise ValueError(precision)


def _embedding_config(precision: str) -> Any:
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import IntxWeightOnlyConfig

    if precision == "e8":
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    if precision == "e4g32":
        return IntxWeightOnlyConfig(
            weight_dtype=_INT4, granularity=PerGroup(32), intx_choose_qparams_algorithm="hqq_scale_only"
        )
    raise ValueError(precision)


def quantize_layers(module: torch.nn.Module, plan: LLMPlan, hessians: Hessians | None = None) -> torch.nn.Module:
    """``module``'s linears and token table quantized in place as ``plan`` says (torchao ``quantize_``);
    with ``hessians``, each quantized linear gets GPTQ's integers on its grid. With the plan's
    ``zero_points``, each 4-bit linear is replaced by its ZeroPointLinear (edgeq.llm.zero_points);
    each fp16 linear by its HalfLinear (edgeq.quant.half)."""
    from torchao.quantization.quant_api import quantize_

    from edgeq.quant.half import HalfLinear

    for name in sorted(n for n, p in plan.linears.items() if p == "fp16"):
        linear = module.get_submodule(name)
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError(f"{name or 'the module'} is not a linear: it cannot be fp16")
        half = HalfLinear(linear)
        if not name:
            return half
        module.set_submodule(name, half)

    if plan.embedding != "float":
        quantize_(
            module,
            _embedding_config(plan.embedding),
            filter_fn=lambda m, fqn: isinstance(m, torch.nn.Embedding),
        )
    split = {n for n, p in plan.linears.items() if plan.zero_points and p.startswith("w4g")}
    for precision in sorted(set(plan.linears.values()) - set(FLOATS)):
        names = {name for name, p in plan.linears.items() if p == precision} - split
        quantize_(
            module,
            linear_config(precision, plan.scales),
            filter_fn=lambda m, fqn, names=names: isinstance(m, torch.nn.Linear) and fqn in names,
        )
    if hessians is not None:
        for name, precision in plan.linears.items():
            if precision not in FLOATS and name not in split:
                apply_gptq(module.get_submodule(name), name, hessians)
    for name in sorted(split):
        linear = module.get_submodule(name)
        replaced = zero_point_layer(linear, plan.linears[name], hessians, name)
        if not name:
            return replaced
        module.set_submodule(name, replaced)
    return module


def zero_point_layer(
    linear: torch.nn.Module, precision: str, hessians: Hessians | None = None, name: str = ""
) -> torch.nn.Module:
    """``linear`` at the 4-bit ``precision`` with zero points (edgeq.llm.zero_points), its two parts
    quantized with the program's own configs: the symmetric groups min-max, the offsets w8dyn."""
    configs = (linear_config(precision, "minmax"), linear_config("w8dyn"))
    return zero_point_linear(linear, int(precision[3:]), configs, hessians, name)


#: the output head's name in ExecuTorch's transformer
HEAD = "output"


def linear_names(params: dict[str, Any]) -> list[str]:
    """The linears of ExecuTorch's transformer for ``params``, in order (the output head last)."""
    per_layer = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                 "feed_forward.w3", "feed_forward.w2")  # fmt: skip
    return [f"layers.{i}.{name}" for i in range(params["n_layers"]) for name in per_layer] + [HEAD]


def _quantize_and_fuse(
    module: torch.nn.Module, plan: LLMPlan | None, hessians: Hessians | None, params: dict[str, Any]
) -> torch.nn.Module:
    """``module`` quantized by ``plan`` (None: float), then each block's siblings of one precision
    stacked into one linear (edgeq.llm.fuse) and its norms made XNNPACK ops (edgeq.llm.norm): the
    same numbers in fewer, larger delegate calls, which also lower faster."""
    if plan is not None:
        module = quantize_layers(module, plan, hessians)
    fuse_projections(module, plan.linears if plan is not None else {}, params["n_layers"])
    replace_rms_norms(module)
    return module


def write_checkpoint(model: Any, max_seq_len: int, root: Path) -> None:
    """``model``'s weights and params as ExecuTorch's Llama transformer reads them, into ``root``
    (``checkpoint.pth``, ``params.json``): what :func:`lower_checkpoint` lowers, here or in another
    process (edgeq.llm.background)."""
    torch.save(executorch_state_dict(model), root / "checkpoint.pth")
    (root / "params.json").write_text(json.dumps(executorch_params(model, max_seq_len)))


def lower_llm(
    model: Any,
    tokenizer: Path,
    max_seq_len: int,
    plan: LLMPlan | None,
    metadata: dict[str, Any],
    hessians: Hessians | None = None,
) -> bytes:
    """The ``.pte`` of ``model`` (a Hugging Face decoder) quantized by ``plan`` (None: float),
    lowered with XNNPACK, static KV cache of ``max_seq_len`` positions; ``metadata``: the
    runner's ``get_bos_id`` / ``get_eos_ids``; ``hessians``: GPTQ the quantized linears
    (edgeq.llm.gptq)."""
    with tempfile.TemporaryDirectory(prefix="edgeq-llm-") as scratch:
        write_checkpoint(model, max_seq_len, Path(scratch))
        return lower_checkpoint(Path(scratch), tokenizer, max_seq_len, plan, metadata, hessians)


def lower_checkpoint(
    root: Path,
    tokenizer: Path,
    max_seq_len: int,
    plan: LLMPlan | None,
    metadata: dict[str, Any],
    hessians: Hessians | None = None,
) -> bytes:
    """:func:`lower_llm` of the checkpoint :func:`write_checkpoint` wrote into ``root``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.examples.models.llama.export_llama_lib import _prepare_for_llama_export
    from executorch.extension.llm.export.config.llm_config import LlmConfig, ModelType

    params = json.loads((root / "params.json").read_text())
    config = LlmConfig()
    config.base.model_class = ModelType.llama3
    config.base.checkpoint = str(root / "checkpoint.pth")
    config.base.params = str(root / "params.json")
    config.base.tokenizer_path = str(tokenizer)
    config.base.metadata = json.dumps(metadata)
    config.model.use_kv_cache = True
    config.model.use_sdpa_with_kv_cache = True
    config.model.enable_dynamic_shape = True
    config.export.max_seq_length = max_seq_len
    config.export.max_context_length = max_seq_len
    config.export.output_dir = str(root)
    config.backend.xnnpack.enabled = True
    # float and fp16 layers run in XNNPACK too, not only the dynamically quantized ones
    config.backend.xnnpack.extended_ops = True
    builder = _prepare_for_llama_export(config)
    builder = builder.source_transform([lambda module: _quantize_and_fuse(module, plan, hessians, params)])
    exported = builder.export()
    exported.run_canonical_optimizations()
    merge_duplicates(exported.pre_autograd_graph_module)
    # one greedy partitioner, where export_llama runs a dynamic-quantization-only one first and
    # a second for the rest: that splits every block into a dozen delegate calls, each lowered
    # on its own (most of the lowering time) and entered on its own at each token
    lowered = exported.to_edge_transform_and_lower([XnnpackPartitioner()]).to_executorch(passes=[])
    # the bytes, not save_to_pte: it writes a name ending in .pte into the working directory
    # (clobbering a user's model.pte there, and racing the float program's lowering beside it)
    assert lowered.export_program is not None
    return bytes(lowered.export_program.buffer)
