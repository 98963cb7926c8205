"""A Hugging Face decoder as ExecuTorch's own Llama transformer: weights renamed, arguments mapped.

ExecuTorch's LLM export (``executorch.examples.models.llama``) builds its
static-KV-cache transformer with the custom SDPA and cache-update ops from a
Meta-format checkpoint and a ``params.json``. Llama, Qwen2 and Mistral-style
decoders (SmolLM is a Llama) share one layout, so converting is a rename of
the state dict plus the model's hyper-parameters. Hugging Face's rotary
embedding (rotate-half) is kept as it is with ``use_hf_rope``, so no q/k
weight is permuted; the test holds the unquantized program's logits equal to
the Hugging Face model's.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from edgeq.errors import EdgeqError

__all__ = ["SUPPORTED", "check_causal_lm", "executorch_name", "executorch_params", "executorch_state_dict"]

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")

_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}
_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def check_causal_lm(model: Any) -> None:
    """One line naming the fix when ``model`` is not a decoder this flow converts."""
    kind = type(model).__name__
    config = getattr(model, "config", None)
    if kind not in SUPPORTED or config is None:
        raise EdgeqError(
            f"model() returned a {kind}, not a supported causal LM",
            f"return a Hugging Face {', '.join(SUPPORTED)} (AutoModelForCausalLM.from_pretrained(...))",
        )
    scaling = getattr(config, "rope_scaling", None)
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise EdgeqError(
            f"the model's rope_scaling {scaling.get('rope_type') or scaling.get('type')!r} is not converted yet",
            "use a model without RoPE scaling (SmolLM2, Qwen2.5 up to 32k positions)",
        )
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", False):
        raise EdgeqError("the model uses sliding-window attention", "use a model with full attention")


def executorch_name(module: str) -> str | None:
    """The ExecuTorch transformer's name for a Hugging Face linear ("model.layers.0.mlp.up_proj" ->
    "layers.0.feed_forward.w3", "lm_head" -> "output"), or None for a module it has no linear for."""
    if module == "lm_head":
        return "output"
    match = re.match(r"^model\.layers\.(\d+)\.(.+)$", module)
    if match is None or match.group(2) not in _LAYER:
        return None
    return f"layers.{match.group(1)}.{_LAYER[match.group(2)]}"


def executorch_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under ExecuTorch's Llama names (tied output weights written out). Float32
    weights are the model's own tensors, not copies: a checkpoint is written from them and a size
    counted, neither needs a second copy of every weight."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key in _TOP:
            converted[_TOP[key]] = value.detach().float()
            continue
        match = _KEY.match(key)
        if match is None or match.group(2) not in _LAYER:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            raise EdgeqError(f"the model has a weight {key} this conversion does not know", "use a Llama-style decoder")
        layer, module, kind = match.groups()
        converted[f"layers.{layer}.{_LAYER[module]}.{kind}"] = value.detach().float()
    converted.setdefault("output.weight", converted["tok_embeddings.weight"])
    return converted


def executorch_params(model: Any, max_seq_len: int) -> dict[str, Any]:
    """ExecuTorch's ``ModelArgs`` for the model, as ``params.json`` holds them."""
    c = model.config
    heads = c.num_attention_heads
    params: dict[str, Any] = {
        "dim": c.hidden_size,
        "n_layers": c.num_hidden_layers,
        "n_heads": heads,
        "n_kv_heads": getattr(c, "num_key_value_heads", None) or heads,
        "vocab_size": c.vocab_size,
        "hidden_dim": c.intermediate_size,
        "norm_eps": c.rms_norm_eps,
        "rope_theta": _rope_theta(c),
        "use_hf_rope": True,
        "use_scaled_rope": False,
        "attention_qkv_bias": type(model).__name__ == "Qwen2ForCausalLM",
    }
    head_dim = getattr(c, "head_dim", None)
    if head_dim and head_dim != c.hidden_size // heads:
        params["head_dim"] = head_dim
    positions = getattr(c, "max_position_embeddings", None)
    if positions and max_seq_len > positions:
        raise EdgeqError(
            f"max_seq_len {max_seq_len} is above the model's {positions} positions",
            f"set max_seq_len <= {positions} in the recipe",
        )
    return params


def _rope_theta(config: Any) -> float:
    """The RoPE base: transformers 5 keeps it in ``rope_parameters`` (also read as ``rope_scaling``)."""
    theta = getattr(config, "rope_theta", None)
    for name in ("rope_parameters", "rope_scaling"):
        theta = theta or (getattr(config, name, None) or {}).get("rope_theta")
    return float(theta or 10000.0)
