"""Decoder LLMs: conversion to ExecuTorch's Llama, a program ExecuTorch's LLM runner generates from,
and one-line errors for bad recipes. Real export, real lowering, real runtime and runner."""

from __future__ import annotations

import json
import types

import pytest
import torch

from edgeq.errors import EdgeqError


def _tiny_llama(vocab: int = 256, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        rope_theta=100000.0,  # SmolLM2's base; transformers 5 files it under rope_parameters
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _tokenizer(tmp_path, vocab: int):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def word_texts(tmp_path, seed: int = 1, words: int = 200):
    """A whitespace word-level tokenizer over w0..w255 saved under ``tmp_path``, and four texts of
    ``words`` random words from it (a seeded generator): (tokenizer path, texts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    g = torch.Generator().manual_seed(seed)
    texts = [" ".join(f"w{i}" for i in torch.randint(0, 256, (words,), generator=g).tolist()) for _ in range(4)]
    return path, texts


def assert_program_computes(program: bytes, model, tolerance: float) -> None:
    """The program's logits are ``model``'s (a tiny Llama of 256 tokens, the HF model with the modules the
    program was made from) within ``tolerance`` of their largest, through a prefill of 8 tokens and 4
    decode steps through the static KV cache."""
    from edgeq.llm.evaluate import load_llm_program

    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = model(tokens).logits[0]
    method = load_llm_program(program)
    close = {"atol": tolerance * float(eager.abs().max()), "rtol": 0}
    prefill = method.execute([tokens[:, :8], torch.tensor([0])])[0]
    torch.testing.assert_close(prefill.reshape(-1, 256)[-1], eager[7], **close)
    for position in range(8, 12):
        step = method.execute([tokens[:, position : position + 1], torch.tensor([position])])[0]
        torch.testing.assert_close(step.reshape(-1, 256)[-1], eager[position], **close)


def test_the_unquantized_program_computes_the_hugging_face_models_logits(tmp_path):
    from edgeq.llm.evaluate import load_llm_program
    from edgeq.llm.export import lower_llm

    model = _tiny_llama(layers=1)  # the cache, rope and every kind of linear, at half the lowering time
    program = lower_llm(model, _tokenizer(tmp_path, 256), 32, None, {"get_bos_id": 0, "get_eos_ids": [0]})
    method = load_llm_program(program)
    tokens = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(tokens).logits[0]
    prefill = method.execute([tokens[:, :6], torch.tensor([0])])[0]  # dynamic-length prompt
    torch.testing.assert_close(prefill.reshape(-1, 256)[-1], reference[5], atol=1e-4, rtol=1e-4)
    for position in range(6, 10):  # decode steps through the static KV cache
        step = method.execute([tokens[:, position : position + 1], torch.tensor([position])])[0]
        torch.testing.assert_close(step.reshape(-1, 256)[-1], reference[position], atol=1e-4, rtol=1e-4)


def _module(**functions) -> types.ModuleType:
    module = types.ModuleType("bad_llm")
    for name, value in functions.items():
        setattr(module, name, value)
    return module


@pytest.mark.parametrize(
    "case, message",
    [
        ("not_causal", "not a supported causal LM"),
        ("tokenizer", "the tokenizer has 300 tokens but the model only 256"),
        ("context", "max_seq_len 128 is above the model's 64 positions"),
        ("empty", "text() yielded no text"),
        ("no_len", "has max_seq_len = None"),
    ],
)
def test_bad_llm_recipes_are_one_line(tmp_path, case, message):
    from edgeq.llm.build import LLMBuildConfig, build_llm
    from edgeq.llm.recipe import llm_recipe_from_module

    functions = {
        "model": (lambda: torch.nn.Linear(2, 2)) if case == "not_causal" else _tiny_llama,
        "tokenizer": lambda: _tokenizer(tmp_path, 300 if case == "tokenizer" else 256),
        "text": (lambda: ["", "  "]) if case == "empty" else (lambda: ["w1 w2 w3 w4"] * 4),
        "max_seq_len": 128 if case == "context" else (None if case == "no_len" else 32),
    }
    out = tmp_path / "out"
    with pytest.raises(EdgeqError) as raised:
        build_llm(llm_recipe_from_module(_module(**functions), "bad_llm"), LLMBuildConfig(out=out))
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not out.exists()


def test_an_llm_recipe_for_a_qualcomm_target_is_one_line_naming_what_exists(tmp_path):
    from typer.testing import CliRunner

    from edgeq.cli import app

    out = tmp_path / "llm"
    args = ["build", "--recipe", "edgeq.examples.tiny_lm", "--target", "qualcomm-sm8650", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "android only so far" in result.output and "edgeq.llm.htp" in result.output
    assert not out.exists()


@pytest.mark.slow
def test_a_small_causal_lm_builds_a_program_the_llm_runner_generates_from(tmp_path):
    """`edgeq build` on the bundled tiny LM (real BPE tokenizer, real text): the program carries the
    runner's metadata, TextLLMRunner generates from it, and the report and bundle are complete."""
    from typer.testing import CliRunner

    from edgeq.cli import app
    from edgeq.llm.evaluate import generate, load_llm_program

    out = tmp_path / "llm"
    result = CliRunner().invoke(app, ["build", "--recipe", "edgeq.examples.tiny_lm", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    # a half-hour build says which stage it is in, and times each
    stages = ["load", "float checkpoint", "gptq statistics", "analyze", "smooth", "qat", "lower", "lower float",
              "perplexity", "generate", "memory"]  # fmt: skip
    assert list(report["timings"]) == stages
    assert all(f"edgeq: {stage}" in result.output for stage in stages), result.output
    acc, size = report["accuracy"], report["size"]
    assert size["ratio"] < 0.3  # 4-bit linears, 8-bit token table
    assert acc["perplexity_ratio"] < 1.1 and acc["agreement"] > 80.0
    assert acc["perplexity_ratio_interval"][0] <= acc["perplexity_ratio"] <= acc["perplexity_ratio_interval"][1]
    program = (out / "model.pte").read_bytes()
    from executorch.runtime import Runtime

    loaded = Runtime.get().load_program(program)
    methods = set(loaded.method_names)
    assert {"forward", "get_max_seq_len", "get_vocab_size", "get_bos_id", "get_eos_ids", "use_kv_cache"} <= methods
    assert loaded.load_method("get_max_seq_len").execute([]) == [128]
    assert load_llm_program(program) is not None
    # the runner Android's LlmModule wraps generates from the shipped files
    texts = generate(program, out / "tokenizer.json", ["Assignment statements are used to"], 12)
    assert texts[0].generated_tokens >= 1 and texts[0].text.strip()
    assert all(g["program"] for g in report["generations"])
    bundle = out / "bundle"
    kotlin = (bundle / "TinyLmGenerator.kt").read_text()
    assert "LlmModule(modelPath, tokenizerPath, temperature)" in kotlin and "MAX_SEQ_LEN = 128" in kotlin
    assert json.loads((bundle / "generation.json").read_text())["eos_ids"] == [0]
    assert "org.pytorch:executorch-android:" in (bundle / "dependencies.gradle").read_text()
    assert (bundle / "model.pte").read_bytes() == program
    html = (out / "report.html").read_text()
    assert "Greedy generations" in html and "next-token agreement" in html and "Peak resident memory" in html
    memory = report["memory"]["program"]
    assert memory["peak_bytes"] > memory["baseline_bytes"] > 0
    planning = report["planning"]  # moves from float, each linear's precisions measured, the whole plan checked
    assert report["gptq"]["tokens"] > 1000 and planning["check"]["kept"] <= planning["check"]["planned"]
    assert planning["check"]["planned"] == len(planning["order"]) == len(planning["steps"])
    assert all({"fp16", "w8dyn", "w4g32"} <= set(layer["losses"]) for layer in planning["analysis"]["layers"])
    smoothing = report["smoothing"]  # every block's three inputs and the head's, searched on training text
    assert smoothing["inputs"] == 3 * 2 + 1 and smoothing["error_after"] <= smoothing["error_before"]
    assert "Activations smoothed" in html
    # the float program came from the second process (edgeq.llm.background), and the report says so, or why not
    assert report["float_lowering"]["where"] == "a second process (nice 19)" and report["float_lowering"]["seconds"] > 0
    assert "The float program was lowered in a second process" in html
    from edgeq.ship.templating import render

    failed = {**report, "float_lowering": {"where": "this process, after the second one failed", "failed": "exit 1: x"}}
    assert "the second process failed (exit 1: x)" in render("llm_report.html.j2", report=failed)

    # `edgeq validate` re-measures the shipped file: the same held-out tokens give the build's numbers
    validate = ["validate", str(out / "model.pte"), "--recipe", "edgeq.examples.tiny_lm"]
    checked = CliRunner().invoke(app, validate)
    assert checked.exit_code == 0, checked.output
    assert f"({acc['perplexity_ratio']:.4f}x" in checked.output and f"{acc['agreement']:.1f}%" in checked.output
    assert "runner peak memory" in checked.output and "float model:" in checked.output
    refused = CliRunner().invoke(app, [*validate, "--min-agreement", "100"])
    assert refused.exit_code == 3 and "below --min-agreement 100" in refused.output
    on_phone = CliRunner().invoke(app, [*validate, "--device", "emulator-5554"])
    assert on_phone.exit_code != 0 and "host runtime only" in on_phone.output


@pytest.mark.parametrize("linear, embedding", [("w4g32", "e4g32"), ("w4g64", "e8"), ("w4g128", "e8"), ("w8dyn", "e8")])
def test_each_precision_quantizes_its_layers_on_its_own_grid(linear, embedding):
    from edgeq.llm.export import LLMPlan, quantize_layers

    torch.manual_seed(0)
    module = torch.nn.ModuleDict({"table": torch.nn.Embedding(64, 128), "proj": torch.nn.Linear(128, 128)})
    weights = {name: m.weight.detach().clone() for name, m in module.items()}
    quantize_layers(module, LLMPlan({"proj": linear, "other": "float"}, embedding))
    for name, precision in (("proj", linear), ("table", embedding)):
        quantized = module[name].weight
        group = int(precision.split("g")[1]) if "g" in precision else 128  # per row: the whole row is one group
        assert tuple(quantized.block_size) == (1, group)
        bits = int(precision[1])
        row = quantized.dequantize()[0, :group]
        assert len(torch.unique(row)) <= 2**bits
        error = (quantized.dequantize() - weights[name]).abs().max() / weights[name].abs().max()
        assert 0 < error < (0.2 if bits == 4 else 0.02)


def test_validating_a_program_that_is_not_an_llm_program_is_one_line(tmp_path):
    from executorch.exir import to_edge_transform_and_lower

    from edgeq.llm.recipe import llm_recipe_from_module
    from edgeq.llm.validate import validate_llm

    linear = torch.nn.Linear(4, 4).eval()
    program = to_edge_transform_and_lower(torch.export.export(linear, (torch.randn(1, 4),))).to_executorch()
    path = tmp_path / "model.pte"
    path.write_bytes(program.buffer)
    functions = {"model": _tiny_llama, "tokenizer": lambda: _tokenizer(tmp_path, 256),
                 "text": lambda: ["w1 w2 w3 w4"] * 4, "max_seq_len": 32}  # fmt: skip
    recipe = llm_recipe_from_module(_module(**functions), "bad_llm")
    with pytest.raises(EdgeqError) as raised:
        validate_llm(path, recipe)
    assert "no get_vocab_size() method: it is not an LLM program" in str(raised.value)
    with pytest.raises(EdgeqError, match="no program at"):
        validate_llm(tmp_path / "missing.pte", recipe)
