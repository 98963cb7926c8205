"""The float program lowered in a second process (edgeq.llm.background): the same bytes as lowering
it in the build's own process, and a child that fails costs time, not the build."""

from __future__ import annotations

import sys

import pytest
from test_llm import _tiny_llama, _tokenizer

from edgeq.llm.background import FloatLowering
from edgeq.llm.export import lower_llm

METADATA = {"get_bos_id": 0, "get_eos_ids": [0]}


@pytest.fixture(scope="module")
def lowered_here(tmp_path_factory):
    """A tiny Llama, its tokenizer, and its float program lowered in this process, from a working
    directory the test then finds empty (ExecuTorch's save_to_pte wrote model.pte there)."""
    root = tmp_path_factory.mktemp("background")
    model, tokenizer = _tiny_llama(), _tokenizer(root, 256)
    work = root / "work"
    work.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        program = lower_llm(model, tokenizer, 32, None, METADATA)
    return model, tokenizer, program, work


def test_the_second_process_lowers_the_same_program_as_this_one(lowered_here):
    model, tokenizer, here, work = lowered_here
    assert not list(work.iterdir())  # nothing written where the user stands
    with FloatLowering() as lowering:
        lowering.start(model, tokenizer, 32, METADATA)
        root = lowering.root
        there = lowering.result()
        assert lowering.record["where"] == "a second process (nice 19)" and "failed" not in lowering.record
        assert lowering.record["seconds"] > 0
    assert there == here
    assert not root.exists()  # the checkpoint and the child's files go with it


def test_a_child_that_fails_leaves_the_lowering_to_this_process(lowered_here, monkeypatch):
    model, tokenizer, here, _ = lowered_here
    # a Python that exits at once with an error, as a child killed for memory would
    monkeypatch.setattr(sys, "executable", "false")
    with FloatLowering() as lowering:
        lowering.start(model, tokenizer, 32, METADATA)
        assert lowering.result() == here
        assert lowering.record["where"] == "this process, after the second one failed"
        assert lowering.record["failed"].startswith("exit 1")
