"""Run the shipped program (the .pte) in ExecuTorch's runtime and score it.

The program has the static input shape it was exported with (usually batch
1, as an app calls it); evaluation batches are split into chunks of that
batch size, and a short last chunk is padded and its padding dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import EdgeqError


@dataclass
class ProgramSignature:
    inputs: list[tuple[tuple[int, ...], str]]
    outputs: list[tuple[tuple[int, ...], str]]


_ET_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 7: "float64", 11: "bool"}


class ProgramRunner:
    """Calls a .pte's ``forward`` like a torch module, for any batch size."""

    def __init__(self, program: bytes | str | Path) -> None:
        from executorch.runtime import Runtime

        data = Path(program).read_bytes() if isinstance(program, (str, Path)) else program
        try:
            self._program = Runtime.get().load_program(data)
        except Exception as exc:
            raise EdgeqError(f"ExecuTorch cannot load the program: {exc}", "rebuild it with `edgeq build`") from exc
        self._method = self._program.load_method("forward")
        meta = self._program.metadata("forward")
        self.signature = ProgramSignature(
            inputs=[(tuple(meta.input_tensor_meta(i).sizes()), _ET_DTYPES.get(meta.input_tensor_meta(i).dtype(), "?"))
                    for i in range(meta.num_inputs())],
            outputs=[(tuple(meta.output_tensor_meta(i).sizes()), _ET_DTYPES.get(meta.output_tensor_meta(i).dtype(), "?"))
                     for i in range(meta.num_outputs())],
        )
        self.batch = self.signature.inputs[0][0][0] if self.signature.inputs and self.signature.inputs[0][0] else 1

    def execute(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """One call of the program, inputs at exactly its shape."""
        return list(self._method.execute(tuple(t.contiguous() for t in inputs)))

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for (shape, _), tensor in zip(self.signature.inputs, inputs):
            if tuple(tensor.shape[1:]) != tuple(shape[1:]):
                raise EdgeqError(
                    f"input of shape {tuple(tensor.shape)} does not fit the program's input {shape}",
                    "feed the data the program was built for (same recipe and preprocessing)",
                )
        return torch.cat([self.execute(*chunk)[0][:real].clone() for chunk, real in program_batches(inputs, self.batch)])


def program_batches(inputs: tuple[torch.Tensor, ...], batch: int) -> list[tuple[list[torch.Tensor], int]]:
    """Split inputs into chunks of the program's static batch size, padding the last one
    by repeating its final sample; returns (chunk, real samples in it) pairs."""
    chunks = []
    for start in range(0, inputs[0].shape[0], batch):
        chunk = [t[start:start + batch] for t in inputs]
        real = chunk[0].shape[0]
        if real < batch:
            chunk = [torch.cat([c, c[-1:].expand(batch - real, *c.shape[1:])]) for c in chunk]
        chunks.append((chunk, real))
    return chunks


def run_program(program: bytes | str | Path) -> Callable[..., torch.Tensor]:
    return ProgramRunner(program)


@dataclass
class Validation:
    """What ``edgeq validate`` reports about a program on a recipe's evaluation data."""

    where: str
    samples: int
    program: float
    float: float
    reference: float | None
    agreement_float: float
    agreement_reference: float | None
    #: per output: SQNR (dB) and cosine similarity against the reference (or float)
    sqnr_db: list[float]
    cosine: list[float]


def validate(program: str | Path, recipe, reference: torch.nn.Module | None = None,
             device: str | None = None, runner: str | Path | None = None, on_phone: bool = False) -> Validation:
    """Score ``program`` on the host (ExecuTorch runtime) or on a phone over adb."""
    from .evaluate import agreement, collect, cosine, sqnr_db

    program = Path(program)
    if not program.is_file():
        raise EdgeqError(f"program {program} not found", "pass the path of a model.pte written by `edgeq build`")
    if on_phone or device is not None or runner is not None:
        from .device import device_runner

        run = device_runner(program, device, runner)
        where = f"phone {run.device.serial}"
    else:
        run, where = ProgramRunner(program), "host (executorch.runtime)"
    outputs, targets = collect(run, recipe.eval_data())
    float_out, _ = collect(recipe.model().eval(), recipe.eval_data())
    ref_out = collect(reference, recipe.eval_data())[0] if reference is not None else None
    against = ref_out if ref_out is not None else float_out
    return Validation(
        where=where,
        samples=len(outputs),
        program=float(recipe.metric(outputs, targets)),
        float=float(recipe.metric(float_out, targets)),
        reference=float(recipe.metric(ref_out, targets)) if ref_out is not None else None,
        agreement_float=agreement(float_out, outputs),
        agreement_reference=agreement(ref_out, outputs) if ref_out is not None else None,
        sqnr_db=[sqnr_db(against, outputs)],
        cosine=[cosine(against, outputs)],
    )


def load_reference(path: str | Path) -> torch.nn.Module:
    """The converted PT2E reference a build saved beside its program (reference.pt2)."""
    # Registers the quantized_decomposed ops the saved graph calls.
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401

    try:
        return torch.export.load(str(path)).module()
    except Exception as exc:  # a corrupt or foreign file
        raise EdgeqError(f"cannot load the quantized reference {path}: {exc}", "rebuild with `edgeq build`") from exc
