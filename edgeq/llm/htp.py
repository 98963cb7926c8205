"""Decoders on Qualcomm's HTP: the model of ExecuTorch's QNN LLM flow, quantized per layer and scored
on Qualcomm's HTP simulator.

ExecuTorch's Qualcomm LLM flow (``executorch.examples.qualcomm.oss_scripts.llama``) lowers its own
static Llama (``static_llama.LlamaModel``: fixed shapes, the attention mask an input, KV caches as
plain inputs and outputs) with ``QnnQuantizer`` at 16-bit activations and 4- or 8-bit weights. edgeq
takes that model, loads the Hugging Face decoder's weights into it (the same conversion as the
XNNPACK program's, :func:`edgeq.llm.convert.executorch_state_dict`), gives each linear the HTP
precision of its place in the plan (:data:`HTP_PRECISION`: a 4-bit linear 16a4w_block, an 8-bit
one 16a8w), calibrates on training text, lowers with the QNN backend, and runs the program on the host's
HTP simulator, teacher-forced, against the float model.

What this is and is not: the graph is the flow's batch-prefill mode (one call scores ``seq_len``
tokens; no KV-cache inputs), which is what teacher-forced perplexity needs and what the simulator
runs in seconds. Generation on a phone goes through ExecuTorch's ``qnn_llama_runner``, a C++ binary
built from ExecuTorch's source against a QAIRT SDK, with the flow's KV-cache decode graph beside
this one; neither is built here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from edgeq.errors import EdgeqError
from edgeq.llm.convert import executorch_params, executorch_state_dict
from edgeq.llm.evaluate import TokenScores, _scores, compare
from edgeq.llm.export import LLMPlan
from edgeq.timing import Stages

__all__ = ["HTP_PRECISION", "HtpResult", "build_htp", "generate_on_htp", "generate_static", "static_decoder"]

#: the HTP precision of each LLM precision, as ExecuTorch's Qualcomm LLM recipes quantize (the HTP runs
#: integer activations only, at 16 bits there): 4-bit weights in blocks of the same size along the input
#: channels (QnnQuantizer's 16a4w_block, the HTP's block quantization), 8-bit weights per channel
HTP_PRECISION = {"w4g32": "16a4w_block", "w4g64": "16a4w_block", "w4g128": "16a4w_block", "w8dyn": "16a8w",
                 "fp16": "16a8w"}  # fmt: skip
#: what the rest of the graph (attention, norms, embedding gather) takes
HTP_DEFAULT = "16a8w"


@dataclass
class HtpResult:
    """What the HTP program measured against the float model, and how it was made."""

    program_bytes: int
    #: edgeq.llm.evaluate.compare's dict: perplexities, their ratio with its interval, agreement
    accuracy: dict[str, Any]
    #: linear -> HTP precision
    precisions: dict[str, str]
    seq_len: int
    calibration_windows: int
    timings: dict[str, float] = field(default_factory=dict)
    #: the QNN libraries that compiled and ran it
    qnn: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def static_decoder(model: Any, seq_len: int) -> torch.nn.Module:
    """The QNN flow's static Llama in batch-prefill mode (``seq_len`` tokens a call) holding the Hugging
    Face decoder's weights, its linears turned into the 1x1 convolutions the flow gives the HTP (named
    ``<linear>_conv``): ``forward(tokens int32 [1, seq_len], mask [1, seq_len, seq_len])`` returns the
    logits at every position."""
    from edgeq import upstream

    static_llama = upstream.qnn_static_llama()
    from executorch.examples.models.llama.model_args import ModelArgs

    params = executorch_params(model, seq_len)
    args = ModelArgs(**params, max_batch_size=1, max_seq_len=seq_len, max_context_len=seq_len, use_kv_cache=False)
    decoder = static_llama.LlamaModel(args, ar_len=seq_len, output_new_cache_only=False, output_cache=False)
    decoder.load_state_dict(executorch_state_dict(model), strict=True)
    for layer in decoder.layers:
        layer.attention.prepare_attention_conv()
        layer.feed_forward.prepare_feedforward_conv()
    decoder.prepare_output_conv()
    return decoder.eval()


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def causal_mask(seq_len: int) -> torch.Tensor:
    """The additive mask the static Llama takes: 0 where a position may attend, -255 where not (the
    value ExecuTorch's flow uses, finite so that 16-bit activations can hold it)."""
    return torch.full((1, seq_len, seq_len), -255.0).triu(1)


def _padded(window: list[int], seq_len: int) -> torch.Tensor:
    # padding after the window's last token changes no earlier position under the causal mask
    ids = window[:seq_len] + [0] * (seq_len - min(len(window), seq_len))
    return torch.tensor([ids], dtype=torch.int32)


def _quantizer(plan: LLMPlan, graph: torch.fx.GraphModule) -> Any:
    from executorch.backends.qualcomm.quantizer.quantizer import (
        ModuleQConfig,
        QnnQuantizer,
        QuantDtype,
        get_submodule_name_predicate,
    )

    from edgeq import upstream

    upstream.forbid_qnn_sdk_download()

    def config(name: str) -> Any:
        return ModuleQConfig(getattr(QuantDtype, f"use_{name}"), is_conv_per_channel=True, is_linear_per_channel=True)

    quantizer = QnnQuantizer()
    quantizer.default_quant_config = config(HTP_DEFAULT)
    made = {name: config(name) for name in set(HTP_PRECISION.values())}
    convs = {_module_path(n): n.name for n in graph.graph.nodes if n.target == torch.ops.aten.conv2d.default}
    rules, blocks = [], {}
    for linear, precision in plan.linears.items():
        if precision not in HTP_PRECISION:
            continue
        module = f"{linear}_conv"
        if module not in convs:
            raise EdgeqError(f"the plan names a linear {linear} the decoder lacks", "plan this model's own linears")
        rules.append((get_submodule_name_predicate(module), made[HTP_PRECISION[precision]]))
        if precision.startswith("w4g"):  # groups of the weight's input channels, as torchao's PerGroup
            blocks[convs[module]] = (1, int(precision[3:]), 1, 1)
    quantizer.set_submodule_qconfig_list(rules)
    quantizer.set_block_size_map(blocks)
    return quantizer


def quantize_static(decoder: torch.nn.Module, plan: LLMPlan, calibration: list[list[int]], seq_len: int) -> Any:
    """``decoder`` exported, quantized by ``plan`` with QnnQuantizer and calibrated on the windows."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    mask = causal_mask(seq_len)
    graph = torch.export.export(decoder, (_padded(calibration[0], seq_len), mask), strict=False).module()
    prepared = prepare_pt2e(graph, _quantizer(plan, graph))  # type: ignore[arg-type]
    with torch.no_grad():
        for window in calibration:
            prepared(_padded(window, seq_len), mask)
    return convert_pt2e(prepared)


def score_static(forward: Any, windows: list[list[int]], seq_len: int) -> TokenScores:
    """Teacher-forced scores of a batch-prefill forward (the static model, or the HTP program's)."""
    nll, predictions = [], []
    mask = causal_mask(seq_len)
    for window in windows:
        window = window[:seq_len]
        logits = forward(_padded(window, seq_len), mask)[0, : len(window) - 1]
        n, p = _scores(logits, torch.tensor(window[1:]))
        nll.append(n)
        predictions.append(p)
    return TokenScores(torch.cat(nll), torch.cat(predictions))


def generate_static(forward: Any, prompt: list[int], seq_len: int, new_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt`` by a batch-prefill forward (the static model, or the HTP
    program's): each token is the argmax at the last position of the whole window run again, since
    the program has no KV cache; ``seq_len`` bounds prompt plus continuation."""
    if len(prompt) + new_tokens > seq_len:
        raise EdgeqError(
            f"a prompt of {len(prompt)} tokens and {new_tokens} new ones do not fit the program's {seq_len}",
            "shorten the prompt or generate fewer tokens",
        )
    mask = causal_mask(seq_len)
    tokens = list(prompt)
    for _ in range(new_tokens):
        logits = forward(_padded(tokens, seq_len), mask)
        tokens.append(int(logits[0, len(tokens) - 1].argmax()))
    return tokens[len(prompt) :]


def generate_on_htp(program: bytes, prompts: list[list[int]], seq_len: int, new_tokens: int) -> list[list[int]]:
    """Greedy continuations of each prompt by the HTP program on the simulator (:func:`generate_static`)."""
    from edgeq.runtime import ProgramRunner

    runner = ProgramRunner(program)
    try:
        return [generate_static(lambda ids, m: runner.execute(ids, m)[0], p, seq_len, new_tokens) for p in prompts]
    finally:
        runner.close()


def build_htp(
    model: Any,
    plan: LLMPlan,
    calibration: list[list[int]],
    windows: list[list[int]],
    seq_len: int,
    target: str = "qualcomm-sm8650",
    reference: Any = None,
) -> tuple[bytes, HtpResult]:
    """The HTP program of ``model`` (a Hugging Face decoder) at ``plan``'s precisions, calibrated on
    ``calibration`` (training text) and scored on the HTP simulator on ``windows`` (held-out text)
    against the float model (``reference``; unset: ``model`` itself, which is wrong when ``model``
    holds weights trained for quantization). Needs Qualcomm's QNN libraries (``ensure_sdk``)."""
    from edgeq.backends.qnn import QnnBackend, ensure_sdk
    from edgeq.llm.evaluate import score_float
    from edgeq.runtime import ProgramRunner
    from edgeq.targets import read_target

    if plan.zero_points:
        raise EdgeqError(
            "the plan asks for 4-bit zero points, which QnnQuantizer's block grid (symmetric) does not hold",
            "build the HTP program from a plan without zero_points",
        )
    libraries = ensure_sdk()
    stages = Stages()
    with stages("quantize"):
        quantized = quantize_static(static_decoder(model, seq_len), plan, calibration, seq_len)
    with stages("lower"):
        example = (_padded(calibration[0], seq_len), causal_mask(seq_len))
        program = QnnBackend().to_edge(quantized, example, read_target(target)).to_executorch().buffer
    with stages("simulate"):
        runner = ProgramRunner(program)
        scored = score_static(lambda ids, m: runner.execute(ids, m)[0], windows, seq_len)
        runner.close()
    float_scores = score_float(model if reference is None else reference, [w[:seq_len] for w in windows])
    precisions = {linear: HTP_PRECISION.get(p, HTP_DEFAULT) for linear, p in plan.linears.items()}
    accuracy = compare(float_scores, scored)
    qnn = f"{libraries.source} {libraries.version}"
    result = HtpResult(len(program), accuracy, precisions, seq_len, len(calibration), dict(stages.seconds), qnn)
    return program, result
