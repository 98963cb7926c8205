"""Peak memory of ExecuTorch's LLM runner on a program, measured in a process of its own.

The child imports the runner, notes its resident memory (the interpreter, torch and the
runtime's libraries, before the program), then loads the program with ``TextLLMRunner`` and
generates; the kernel's high-water mark of resident memory (``VmHWM``) after generating,
less that baseline, is what the program and its KV cache, weights and scratch cost the
runtime. Linux only (``/proc/self/status``); elsewhere nothing is measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["runner_memory"]


def _status(field: str) -> int:
    """A ``/proc/self/status`` size field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def runner_memory(program: Path, tokenizer: Path, prompt: str, max_new_tokens: int = 16) -> dict[str, Any] | None:
    """Peak resident bytes of a process generating from ``program``, and its baseline before loading
    it (None where /proc is not there, or the child failed: memory is reported, never gated)."""
    if not Path("/proc/self/status").is_file():
        return None
    command = [sys.executable, "-m", "edgeq.llm.memory", str(program), str(tokenizer), prompt, str(max_new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return None
    measured = json.loads(lines[-1])
    measured["runtime_bytes"] = measured["peak_bytes"] - measured["baseline_bytes"]
    return measured


def _main(program: str, tokenizer: str, prompt: str, max_new_tokens: str) -> None:
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from edgeq.llm.evaluate import load_kernels

    load_kernels()

    baseline = _status("VmRSS")
    runner = TextLLMRunner(program, tokenizer)
    config = GenerationConfig(echo=False, max_new_tokens=int(max_new_tokens), temperature=0.0)
    runner.generate(prompt, config, token_callback=lambda _: None)
    print(json.dumps({"baseline_bytes": baseline, "peak_bytes": _status("VmHWM"), "prompt": prompt}), flush=True)


if __name__ == "__main__":
    _main(*sys.argv[1:5])
