"""A BERT-style sentence embedder end to end on android: planned embeddings, float attention
sentinels, a mixed program, and a text bundle (tokenizer, vocab, Kotlin class).

The model is a small Hugging Face BertModel (2 layers, hidden 64) with the
MiniLM example's pooling, built from a config (its weights are seeded, not
downloaded); the data are real sentences tokenized by a WordPiece vocabulary
learned from them. Needs the text extra's transformers (in the dev extra).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")

from edgeq import BuildConfig, QATConfig, build  # noqa: E402
from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.recipe import Recipe  # noqa: E402

pytestmark = pytest.mark.slow
SEQ = 32


@pytest.fixture(scope="module")
def text_recipe(tmp_path_factory):
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel
    from wordpiece import learn_vocab

    from edgeq.examples import minilm

    sentences = list(minilm.sentences())[:320]
    vocab = learn_vocab(sentences, tmp_path_factory.mktemp("vocab"), 1200)
    tokenizer = BertWordPieceTokenizer(str(vocab), lowercase=True)
    tokenizer.enable_truncation(SEQ)
    tokenizer.enable_padding(length=SEQ)
    vocab_size = len(vocab.read_text().splitlines())

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=SEQ,
    )
    model = minilm.SentenceEmbedder(BertModel(config, add_pooling_layer=False).eval()).eval()

    def batches(chosen):
        out = []
        for i in range(0, len(chosen), 16):
            encoded = tokenizer.encode_batch(chosen[i : i + 16])
            ids = torch.tensor([e.ids for e in encoded])
            mask = torch.tensor([e.attention_mask for e in encoded])
            with torch.no_grad():
                out.append(((ids, mask), model(ids, mask)))
        return out

    train, held = batches(sentences[::2]), batches(sentences[1::2][:64])
    return Recipe(
        name="tiny-bert",
        model=lambda: copy.deepcopy(model),
        example_inputs=lambda: (train[0][0][0][:1].clone(), train[0][0][1][:1].clone()),
        train_data=lambda: train,
        eval_data=lambda: held,
        loss=minilm.loss,
        metric=minilm.metric,
        text={**minilm.text, "max_length": SEQ, "vocab_file": str(vocab)},
    )


def test_a_text_model_builds_with_planned_embeddings_and_a_text_bundle(tmp_path, text_recipe):
    out = tmp_path / "out"
    result = build(
        text_recipe,
        BuildConfig(out=out, qat=QATConfig(steps=8), max_drop=2.0, debug_program=False),
    )
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    kinds = {entry["kind"] for entry in plan["layers"]}
    assert kinds == {"linear", "embedding"}
    assert all(e["precision"] != "float" for e in plan["layers"] if e["kind"] == "embedding")
    # Both ways of treating the ops between layers were measured, and the plan records the winner.
    assert set(report["other_ops"]["holdout_loss"]) == {"quantized", "float"}
    assert plan["other_ops"] == report["other_ops"]["chosen"]
    assert result.scores.program >= result.scores.float - 2.0
    by_op = report["delegation"]["by_op"]
    assert any("embedding" in op for op in by_op), "no quantized embedding lookup in the program"

    bundle = out / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    assert manifest["text"]["vocab"] == "vocab.txt" and manifest["text"]["max_length"] == SEQ
    assert (bundle / "vocab.txt").read_text() == open(text_recipe.text["vocab_file"]).read()
    kotlin = (bundle / "TinyBertModel.kt").read_text()
    assert "fun embed(text: String" in kotlin and "longArrayOf(1, 32)" in kotlin
    assert "MAX_LENGTH = 32;" in (bundle / "WordPieceTokenizer.java").read_text()

    from edgeq.runtime import ProgramRunner

    runner = ProgramRunner(out / "model.pte")
    ids = torch.ones(1, SEQ + 8, dtype=torch.long)
    with pytest.raises(EdgeqError, match="input of 40 tokens does not fit the program, exported for exactly 32"):
        runner(ids, ids)
