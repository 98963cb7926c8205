"""The causal-LM recipe: a Hugging Face decoder, its tokenizer and text.

A recipe module for a decoder LLM defines, at module level:

- ``model()``: a Hugging Face causal LM (Llama-, Qwen2-, SmolLM-style);
- ``tokenizer()``: the path of its ``tokenizer.json`` (or a directory holding
  one), or the loaded tokenizer (``transformers`` fast tokenizer or
  ``tokenizers.Tokenizer``);
- ``text()``: calibration and training text, an iterable of strings;
- ``eval_text()`` (optional): held-out text the report's perplexity is measured on;
- ``max_seq_len``: the program's context length in tokens (int).

Every mistake is one line naming the fix: a model that is not a causal LM, a
tokenizer whose ids reach beyond the model's vocabulary, a context longer than
the model's positions, empty text.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from edgeq.errors import EdgeqError

__all__ = ["LLMRecipe", "is_llm_module", "llm_recipe_from_module", "load_llm_recipe"]

#: what makes a recipe module an LLM recipe (a CNN recipe has example_inputs/train_data instead)
MARKERS = ("tokenizer", "text")


@dataclass
class LLMRecipe:
    name: str
    model: Callable[[], Any]
    tokenizer: Callable[[], Any]
    text: Callable[[], Iterable[str]]
    max_seq_len: int
    eval_text: Callable[[], Iterable[str]] | None = None
    source: str = ""
    fingerprint: str = ""
    _tokenizer_file: Path | None = field(default=None, init=False, repr=False)
    #: the tokenizer's chat template, when it has one (for the app's generation settings)
    chat_template: str | None = field(default=None, init=False, repr=False)
    _scratch: Any = field(default=None, init=False, repr=False)

    def tokenizer_file(self) -> Path:
        """The recipe's tokenizer as a ``tokenizer.json`` file, the form ExecuTorch's runner reads."""
        if self._tokenizer_file is None:
            self._tokenizer_file = self._resolve_tokenizer()
        return self._tokenizer_file

    def _resolve_tokenizer(self) -> Path:
        given = self.tokenizer()
        if isinstance(given, (str, Path)):
            path = Path(given)
            if path.is_dir():
                path = path / "tokenizer.json"
            if not path.is_file():
                raise EdgeqError(
                    f"tokenizer() gave {given}, which holds no tokenizer.json",
                    "return the path of the model's tokenizer.json (or its directory), or the loaded tokenizer",
                )
            config = path.with_name("tokenizer_config.json")
            if config.is_file():
                self.chat_template = json.loads(config.read_text()).get("chat_template")
            return path
        template = getattr(given, "chat_template", None)
        self.chat_template = template if isinstance(template, str) else None
        backend = getattr(given, "backend_tokenizer", given)  # transformers fast tokenizer -> tokenizers.Tokenizer
        if not callable(getattr(backend, "save", None)) or not callable(getattr(backend, "encode", None)):
            raise EdgeqError(
                f"tokenizer() returned a {type(given).__name__}, which cannot be written as tokenizer.json",
                "return a transformers fast tokenizer, a tokenizers.Tokenizer, or a tokenizer.json path",
            )
        self._scratch = tempfile.TemporaryDirectory(prefix="edgeq-tokenizer-")
        path = Path(self._scratch.name) / "tokenizer.json"
        backend.save(str(path))
        return path

    def texts(self, evaluation: bool = False) -> list[str]:
        """The recipe's text (or its eval text) as a list, refusing empty text."""
        source = self.eval_text if evaluation else self.text
        what = "eval_text()" if evaluation else "text()"
        assert source is not None
        texts = [t for t in source() if isinstance(t, str) and t.strip()]
        if not texts:
            raise EdgeqError(f"{what} yielded no text", f"make {what} yield non-empty strings of real text")
        return texts

    def split_texts(self) -> tuple[list[str], list[str], str]:
        """(text the build may read, text the program is measured on, that text in words): eval_text()
        when the recipe has it, else the last eighth of text(), which the build then does not read."""
        texts = self.texts()
        if self.eval_text is not None:
            return texts, self.texts(evaluation=True), "eval_text()"
        if len(texts) > 1:
            held = max(1, len(texts) // 8)
            return texts[:-held], texts[-held:], "the last eighth of text(), which the plan does not read"
        return texts, texts, "text() (one text, no eval_text(): the plan read it too)"


def is_llm_module(module: ModuleType) -> bool:
    return all(callable(getattr(module, name, None)) for name in MARKERS) and not hasattr(module, "example_inputs")


def llm_recipe_from_module(module: ModuleType, source: str = "") -> LLMRecipe:
    missing = [name for name in ("model", *MARKERS) if not callable(getattr(module, name, None))]
    if missing:
        raise EdgeqError(
            f"LLM recipe {source or module.__name__} lacks {', '.join(f'{m}()' for m in missing)}",
            "define model(), tokenizer(), text() and max_seq_len at module level (see README: LLMs)",
        )
    max_seq_len = getattr(module, "max_seq_len", None)
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 2:
        raise EdgeqError(
            f"LLM recipe {source or module.__name__} has max_seq_len = {max_seq_len!r}",
            "set max_seq_len to the program's context length in tokens, e.g. max_seq_len = 512",
        )
    from edgeq.recipe import recipe_identity

    name, text = recipe_identity(module, source)
    eval_text = getattr(module, "eval_text", None)
    return LLMRecipe(
        name=name,
        model=module.model,
        tokenizer=module.tokenizer,
        text=module.text,
        max_seq_len=max_seq_len,
        eval_text=eval_text if callable(eval_text) else None,
        source=source,
        fingerprint=hashlib.sha256(text.encode()).hexdigest()[:16],
    )


def load_llm_recipe(spec: str | Path | ModuleType | LLMRecipe) -> LLMRecipe:
    """An LLM recipe from a file path, a module name or a module (an LLMRecipe passes through)."""
    if isinstance(spec, LLMRecipe):
        return spec
    from edgeq.recipe import import_recipe

    module, source = import_recipe(spec)
    return llm_recipe_from_module(module, source)
