"""Run an ExecuTorch program (.pte) in ExecuTorch's runtime like a torch module.

The program has the static input shape it was exported with (usually batch
1, as an app calls it); evaluation batches are split into chunks of that
batch size, and a short last chunk is padded and its padding dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edgeq.errors import EdgeqError
from edgeq.logs import native_stderr


@dataclass
class ProgramSignature:
    inputs: list[tuple[tuple[int, ...], str]]
    outputs: list[tuple[tuple[int, ...], str]]


_ET_DTYPES = {
    0: "uint8",
    1: "int8",
    2: "int16",
    3: "int32",
    4: "int64",
    5: "float16",
    6: "float32",
    7: "float64",
    11: "bool",
}


class ProgramRunner:
    """Calls a .pte's ``forward`` like a torch module, for any batch size."""

    def __init__(self, program: bytes | str | Path) -> None:
        from executorch.runtime import Runtime

        from edgeq import upstream

        upstream.register_quantized_embedding_ops()  # kernels for quantized embedding tables

        data = Path(program).read_bytes() if isinstance(program, (str, Path)) else program
        # The native runtime prints CPU probing lines when it first sets up a delegate.
        with native_stderr(stdout=True):
            try:
                self._program = Runtime.get().load_program(data)
            except Exception as exc:  # noqa: BLE001 - ExecuTorch's loader raises bare RuntimeErrors and more
                raise EdgeqError(f"ExecuTorch cannot load the program: {exc}", "rebuild it with `edgeq build`") from exc
            self._method = self._program.load_method("forward")
        meta = self._program.metadata("forward")
        self.signature = ProgramSignature(
            inputs=[
                (tuple(meta.input_tensor_meta(i).sizes()), _ET_DTYPES.get(meta.input_tensor_meta(i).dtype(), "?"))
                for i in range(meta.num_inputs())
            ],
            outputs=[
                (tuple(meta.output_tensor_meta(i).sizes()), _ET_DTYPES.get(meta.output_tensor_meta(i).dtype(), "?"))
                for i in range(meta.num_outputs())
            ],
        )
        self.batch = self.signature.inputs[0][0][0] if self.signature.inputs and self.signature.inputs[0][0] else 1
        #: the output a call returns: the recipe's scored one (manifest "scored_output")
        self.scored = 0

    def close(self) -> None:
        """Free the loaded program; delegates log their teardown from C++, kept off the terminal."""
        with native_stderr(stdout=True):
            self.__dict__.pop("_method", None)
            self.__dict__.pop("_program", None)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: streams may already be gone
            pass

    def execute(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """One call of the program, inputs at exactly its shape."""
        return list(self._method.execute(tuple(t.contiguous() for t in inputs)))

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The scored output (``scored``: its index among the program's outputs; the first by default)."""
        return self.outputs(*inputs)[self.scored]

    def outputs(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Every output of ``forward`` for a batch of any size (one program call per chunk)."""
        for (shape, _), tensor in zip(self.signature.inputs, inputs):
            if tuple(tensor.shape[1:]) != tuple(shape[1:]) and not tensor.is_floating_point() and len(shape) == 2:
                raise EdgeqError(
                    f"input of {tensor.shape[-1]} tokens does not fit the program, exported for exactly "
                    f"{shape[-1]} tokens",
                    f"pad (or cut) every sequence to {shape[-1]} tokens, as the recipe's tokenizer does",
                )
            if tuple(tensor.shape[1:]) != tuple(shape[1:]):
                raise EdgeqError(
                    f"input of shape {tuple(tensor.shape)} does not fit the program's input {shape}",
                    "feed the data the program was built for (same recipe and preprocessing)",
                )
        calls = [(self.execute(*chunk), real) for chunk, real in program_batches(inputs, self.batch)]
        return [torch.cat([out[j][:real].clone() for out, real in calls]) for j in range(len(calls[0][0]))]


def program_batches(inputs: tuple[torch.Tensor, ...], batch: int) -> list[tuple[list[torch.Tensor], int]]:
    """Split inputs into chunks of the program's static batch size, padding the last one
    by repeating its final sample; returns (chunk, real samples in it) pairs."""
    chunks = []
    for start in range(0, inputs[0].shape[0], batch):
        chunk = [t[start : start + batch] for t in inputs]
        real = chunk[0].shape[0]
        if real < batch:
            chunk = [torch.cat([c, c[-1:].expand(batch - real, *c.shape[1:])]) for c in chunk]
        chunks.append((chunk, real))
    return chunks
