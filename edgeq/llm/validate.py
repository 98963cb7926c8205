"""``edgeq validate`` for a decoder LLM program: what the build measured, re-measured on a shipped file.

Perplexity and next-token agreement teacher-forced through the program's own ``forward``
against the recipe's float model on the same held-out tokens (with intervals), greedy
generations of ExecuTorch's ``TextLLMRunner`` beside the float model's own greedy ones,
the runner's prefill and decode tokens/s, and its peak memory (edgeq.llm.memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgeq.errors import EdgeqError
from edgeq.llm.convert import check_causal_lm
from edgeq.llm.evaluate import (
    compare,
    encode_windows,
    generate,
    median_rate,
    prompts_from,
    score_float,
    score_program,
)  # fmt: skip
from edgeq.llm.memory import runner_memory
from edgeq.llm.recipe import LLMRecipe, load_llm_recipe

__all__ = ["LLMValidation", "validate_llm"]


@dataclass
class LLMValidation:
    tokens: int
    float_perplexity: float
    program_perplexity: float
    perplexity_ratio: float
    perplexity_ratio_interval: tuple[float, float]
    agreement: float
    agreement_interval: tuple[float, float]
    measured_on: str
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    #: peak resident bytes of the runner process, and what it had before loading the program
    memory: dict[str, Any] | None = None
    generations: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        low, high = self.perplexity_ratio_interval
        line = (
            f"perplexity {self.program_perplexity:.3f} vs float {self.float_perplexity:.3f} "
            f"({self.perplexity_ratio:.4f}x, 95% [{low:.4f}, {high:.4f}]); next-token agreement "
            f"{self.agreement:.1f}% [{self.agreement_interval[0]:.1f}, {self.agreement_interval[1]:.1f}] "
            f"on {self.tokens} tokens of {self.measured_on}"
        )
        if self.decode_tokens_per_s:
            line += f"; prefill {self.prefill_tokens_per_s:.0f}, decode {self.decode_tokens_per_s:.1f} tokens/s"
        if self.memory:
            line += f"; runner peak memory {self.memory['peak_bytes'] / 2**20:.0f} MiB"
            line += f" ({self.memory['runtime_bytes'] / 2**20:.0f} MiB over the bare runtime)"
        return line


def _program_ints(program: bytes, *methods: str) -> list[int]:
    """The values of the program's metadata methods (``get_vocab_size``, ...), loading it once."""
    from executorch.runtime import Runtime

    loaded = Runtime.get().load_program(program)
    for method in methods:
        if method not in loaded.method_names:
            raise EdgeqError(
                f"the program has no {method}() method: it is not an LLM program",
                "pass a model.pte that `edgeq build` wrote for an LLM recipe",
            )
    return [int(loaded.load_method(method).execute([])[0]) for method in methods]


def _float_generations(model: Any, tokenizer: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The float model's own greedy continuations (the reference the program's are read beside)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    texts = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tok.encode(prompt).ids])
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
            texts.append(tok.decode(out[0, ids.shape[1] :].tolist()))
    return texts


def validate_llm(
    program_path: Path,
    recipe: LLMRecipe | str | Path,
    tokenizer: Path | None = None,
    eval_tokens: int = 512,
    prompts: int = 3,
    max_new_tokens: int = 32,
) -> LLMValidation:
    """Measure ``program_path`` (a .pte from an LLM build) against ``recipe``'s float model on its
    held-out text; ``tokenizer``: default tokenizer.json beside the program, else the recipe's."""
    if not program_path.is_file():
        raise EdgeqError(f"no program at {program_path}", "pass the model.pte an LLM build wrote")
    recipe = load_llm_recipe(recipe)
    program = program_path.read_bytes()
    model = recipe.model()
    check_causal_lm(model)
    model = model.eval()
    vocab, max_seq_len = _program_ints(program, "get_vocab_size", "get_max_seq_len")
    if vocab != model.config.vocab_size:
        raise EdgeqError(
            f"the program has a vocabulary of {vocab} tokens, the recipe's model {model.config.vocab_size}",
            "validate with the recipe the program was built from",
        )
    if tokenizer is None:
        beside = program_path.with_name("tokenizer.json")
        tokenizer = beside if beside.is_file() else recipe.tokenizer_file()
    _, eval_texts, measured_on = recipe.split_texts()
    windows = encode_windows(tokenizer, eval_texts, max_seq_len, eval_tokens)
    accuracy = compare(score_float(model, windows), score_program(program, windows))
    chosen = prompts_from(eval_texts, prompts)
    generations = generate(program_path, tokenizer, chosen, max_new_tokens)
    floats = _float_generations(model, tokenizer, chosen, max_new_tokens)
    memory = runner_memory(program_path, tokenizer, chosen[0] if chosen else "The", max_new_tokens)
    return LLMValidation(
        tokens=accuracy["tokens"],
        float_perplexity=accuracy["float_perplexity"],
        program_perplexity=accuracy["program_perplexity"],
        perplexity_ratio=accuracy["perplexity_ratio"],
        perplexity_ratio_interval=tuple(accuracy["perplexity_ratio_interval"]),
        agreement=accuracy["agreement"],
        agreement_interval=tuple(accuracy["agreement_interval"]),
        measured_on=measured_on,
        prefill_tokens_per_s=median_rate([g.prefill_tokens_per_s for g in generations]),
        decode_tokens_per_s=median_rate([g.decode_tokens_per_s for g in generations]),
        memory=memory,
        generations=[{"prompt": g.prompt, "program": g.text, "float model": f} for g, f in zip(generations, floats)],
    )
