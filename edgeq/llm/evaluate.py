"""What LLM users trust, measured on the program itself: perplexity, next-token agreement,
greedy generations and tokens/s.

Perplexity and agreement are teacher-forced through the ``.pte``'s own
``forward(tokens, input_pos)``, one token at a time, as the runner decodes (so
the KV cache and the custom SDPA are what is measured), against the float
Hugging Face model on the same tokens. Generations and tokens/s come from
ExecuTorch's ``TextLLMRunner``, the runner Android's ``LlmModule`` wraps.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Generation", "TokenScores", "compare", "encode_windows", "generate", "load_kernels", "median_rate", "prompts_from",
    "score_program", "score_float",
]  # fmt: skip


@dataclass
class TokenScores:
    #: next-token negative log-likelihood per scored token (nats)
    nll: torch.Tensor
    #: the argmax prediction per scored token
    predictions: torch.Tensor

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.mean()))

    @property
    def tokens(self) -> int:
        return int(self.nll.numel())


def compare(reference: TokenScores, scored: TokenScores) -> dict[str, Any]:
    """The program's scores against the float model's on the same tokens: perplexities, their ratio
    with the paired bootstrap interval of the mean per-token NLL difference (as a ratio), and
    next-token agreement with its Wilson interval."""
    from edgeq.checks.stats import mean_interval, wilson

    difference, low, high = mean_interval(scored.nll - reference.nll)
    agree = int((scored.predictions == reference.predictions).sum())
    agree_low, agree_high = wilson(agree, reference.tokens)
    return {
        "tokens": reference.tokens,
        "float_perplexity": reference.perplexity,
        "program_perplexity": scored.perplexity,
        "perplexity_ratio": math.exp(difference),
        "perplexity_ratio_interval": [math.exp(low), math.exp(high)],
        "agreement": 100.0 * agree / reference.tokens,
        "agreement_interval": [agree_low, agree_high],
    }


def prompts_from(texts: list[str], count: int) -> list[str]:
    """The first words of the first eval texts' opening lines: prompts the model has not trained on."""
    prompts = []
    for text in texts:
        line = next((ln.strip() for ln in text.splitlines() if len(ln.split()) >= 6), "")
        if line:
            prompts.append(" ".join(line.split()[:6]))
        if len(prompts) == count:
            break
    return prompts


def median_rate(values: list[float]) -> float:
    """The median of the measured rates (0.0: a window too short to time), 0.0 when none was."""
    values = sorted(v for v in values if v > 0)
    return values[len(values) // 2] if values else 0.0


def encode_windows(tokenizer: Path, texts: list[str], window: int, max_tokens: int) -> list[list[int]]:
    """The texts tokenized and cut into windows of at most ``window`` tokens, ``max_tokens`` in all."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    windows: list[list[int]] = []
    total = 0
    for text in texts:
        ids = tok.encode(text).ids
        for start in range(0, len(ids) - 1, window):
            piece = ids[start : start + window]
            if len(piece) < 2:
                continue
            piece = piece[: max(2, max_tokens - total + 1)]
            windows.append(piece)
            total += len(piece) - 1
            if total >= max_tokens:
                return windows
    return windows


def _scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float()
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return nll, logits.argmax(-1)


def score_float(model: Any, windows: list[list[int]]) -> TokenScores:
    """The Hugging Face model's teacher-forced scores on the windows."""
    nll, predictions = [], []
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window])
            logits = model(input_ids=ids).logits[0, :-1]
            n, p = _scores(logits, ids[0, 1:])
            nll.append(n)
            predictions.append(p)
    return TokenScores(torch.cat(nll), torch.cat(predictions))


def load_llm_program(program: bytes) -> Any:
    """The program's ``forward`` in ExecuTorch's Python runtime, with the LLM and quantized kernels."""
    from executorch.runtime import Runtime

    load_kernels()

    return Runtime.get().load_program(program).load_method("forward")


def load_kernels() -> None:
    """Registers the kernels an LLM program calls outside its delegate with ExecuTorch's runtime."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401 - custom SDPA / update_cache
    import executorch.kernels.quantized  # noqa: F401 - the quantized embedding kernels


def score_program(program: bytes, windows: list[list[int]]) -> TokenScores:
    """The program's teacher-forced scores, one decode step per token (each window from position 0)."""
    method = load_llm_program(program)
    nll, predictions = [], []
    for window in windows:
        logits = []
        for position, token in enumerate(window[:-1]):
            out = method.execute([torch.tensor([[token]]), torch.tensor([position])])[0]
            logits.append(out.reshape(-1, out.shape[-1])[-1])
        n, p = _scores(torch.stack(logits), torch.tensor(window[1:]))
        nll.append(n)
        predictions.append(p)
    return TokenScores(torch.cat(nll), torch.cat(predictions))


@dataclass
class Generation:
    prompt: str
    text: str
    prompt_tokens: int = 0
    generated_tokens: int = 0
    #: tokens/s of prompt evaluation and of decoding, from the runner's own timers
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate(program: bytes | Path, tokenizer: Path, prompts: list[str], max_new_tokens: int) -> list[Generation]:
    """Greedy generations of ExecuTorch's ``TextLLMRunner`` from the program (its file, or its bytes:
    written to a scratch file, the runner reads a path), with its timings."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from edgeq.logs import native_stderr

    load_kernels()  # the runner resolves them when it loads the program
    # the runner prints its stats and load lines from C++; the report carries them (--verbose keeps them)
    with tempfile.TemporaryDirectory(prefix="edgeq-llm-run-") as scratch, native_stderr(stdout=True):
        path = program if isinstance(program, Path) else Path(scratch) / "model.pte"
        if not isinstance(program, Path):
            path.write_bytes(program)
        runner = TextLLMRunner(str(path), str(tokenizer))
        results = []
        for prompt in prompts:
            pieces: list[str] = []
            stats: list[Any] = []
            config = GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=0.0)
            runner.generate(prompt, config, token_callback=pieces.append, stats_callback=stats.append)
            runner.reset()
            results.append(_generation(prompt, "".join(pieces), stats[-1] if stats else None))
        return results


def _generation(prompt: str, text: str, stats: Any) -> Generation:
    if stats is None:
        return Generation(prompt, text)
    prefill_ms = stats.prompt_eval_end_ms - stats.inference_start_ms
    decode_ms = stats.inference_end_ms - stats.prompt_eval_end_ms
    decoded = max(0, stats.num_generated_tokens - 1)  # the first token comes out of the prefill
    return Generation(
        prompt,
        text,
        prompt_tokens=stats.num_prompt_tokens,
        generated_tokens=stats.num_generated_tokens,
        prefill_tokens_per_s=_rate(stats.num_prompt_tokens, prefill_ms),
        decode_tokens_per_s=_rate(decoded, decode_ms),
    )


#: the runner's clock counts milliseconds: a window shorter than this is not timed (0.0: unmeasured)
MIN_TIMED_MS = 20


def _rate(tokens: int, milliseconds: int) -> float:
    return 1000.0 * tokens / milliseconds if milliseconds >= MIN_TIMED_MS and tokens else 0.0
