"""A WordPiece vocabulary learned from real text, for tests of text models (no download)."""

from __future__ import annotations

from pathlib import Path


def learn_vocab(sentences: list[str], folder: Path, size: int) -> Path:
    """Train Hugging Face's BERT WordPiece on ``sentences``; returns the vocab.txt path."""
    from tokenizers import BertWordPieceTokenizer

    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(sentences, vocab_size=size, min_frequency=2)
    trainer.save_model(str(folder), "learned")
    return folder / "learned-vocab.txt"
