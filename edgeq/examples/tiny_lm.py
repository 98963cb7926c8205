"""A small causal LM for the LLM flow's end-to-end test: `edgeq build --recipe edgeq.examples.tiny_lm`.

Real text and a real tokenizer, nothing downloaded: the Python reference
manual's topics that ship with every CPython (``pydoc_data.topics``, 465 KB of
English prose and grammar), a byte-level BPE tokenizer trained on them with
Hugging Face ``tokenizers`` (a genuine ``tokenizer.json`` that ExecuTorch's
runner reads), and a 2-layer Llama (``transformers.LlamaForCausalLM``, about
0.4M weights) trained on it for under a minute. Every 8th topic is held out as
``eval_text()``. Tokenizer and weights are cached under ``$EDGEQ_CACHE``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from edgeq.examples._cache import cache_path, cached_model

name = "tiny_lm"
max_seq_len = 128

VOCAB = 1024
SETTINGS = f"tiny_lm vocab={VOCAB} hidden=96 layers=2 heads=4 kv=2 ffn=256 steps=300 seq=64 batch=16 lr=3e-3 seed=0"
EOS = "<|endoftext|>"


def _topics(held_out: bool) -> list[str]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    return [topics[n] for i, n in enumerate(names) if (i % 8 == 7) == held_out]


def text() -> list[str]:
    return _topics(False)


def eval_text() -> list[str]:
    return _topics(True)


def _tokenizer_path() -> Path:
    path = cache_path("tiny_lm-tokenizer", SETTINGS).with_suffix(".json")
    if path.exists():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text(), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return path


def tokenizer() -> str:
    return str(_tokenizer_path())


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )


def _train():
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tok = Tokenizer.from_file(str(_tokenizer_path()))
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for chunk in text():
        ids += tok.encode(chunk).ids + [eos]
    data = torch.tensor(ids)
    model = LlamaForCausalLM(_config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    steps, seq, batch = 300, 64, 16
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        x = torch.stack([data[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def model():
    from transformers import LlamaForCausalLM

    return cached_model(cache_path("tiny_lm", SETTINGS), LlamaForCausalLM(_config()), _train)
