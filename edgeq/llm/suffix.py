"""Scoring a change inside one decoder block by running that block and the ones after it only.

The per-layer analysis changes one linear at a time and measures the next-token loss on the same
windows hundreds of times. Everything before the changed linear's block computes exactly what the
float model computes, so the hidden states entering each block are recorded once and each
measurement starts from its block's: on SmolLM2 (30 blocks and a head a quarter of the compute) that
is about 60% of a full forward pass on average.

The suffix runs through the Hugging Face model's own forward: its decoder's ``layers`` are swapped
for the blocks from the changed one on, and the recorded hidden states go in as ``inputs_embeds``
(positions, the causal mask and rotary embeddings depend on positions only, and are made as before).
A model whose forward does more to ``inputs_embeds`` than pass them to its first block (Gemma's scaled
them until transformers moved that into its embedding) would compute something else: the recording is
checked against the full forward once, and a model that does not match is scored with full forward
passes, as before.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["BlockInputs", "token_losses"]

#: largest difference of the suffix's losses from the full forward's that counts as the same computation
_TOLERANCE = 1e-4


def _decoder(model: Any) -> Any | None:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return decoder if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def token_losses(model: Any, windows: list[list[int]], predictions: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The next-token loss of every scored token of ``windows``, in order (full forward passes); the
    most likely next token at each is appended to ``predictions`` when given."""
    losses = []
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window])
            logits = model(input_ids=ids).logits[0, :-1].float()
            losses.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none"))
            if predictions is not None:
                predictions.append(logits.argmax(-1))
    return torch.cat(losses) if losses else torch.zeros(0)


class BlockInputs:
    """The float model's hidden states entering each block on ``windows`` (and leaving the last one),
    and the per-token losses of the full forward pass (``base``)."""

    def __init__(self, model: Any, windows: list[list[int]]) -> None:
        self.model, self.windows = model, windows
        self.decoder = _decoder(model)
        self.states: list[list[torch.Tensor]] = []  # [window][block], the last entry after the last block
        if self.decoder is None:
            self.base = token_losses(model, windows)
            return
        layers = list(self.decoder.layers)
        current: list[torch.Tensor] = []
        handles = [layer.register_forward_pre_hook(lambda _, args: current.append(args[0].detach()))
                   for layer in layers]  # fmt: skip
        handles.append(layers[-1].register_forward_hook(lambda _, __, out: current.append(_hidden(out).detach())))
        try:
            losses = []
            for window in windows:
                current.clear()
                losses.append(token_losses(model, [window]))
                self.states.append(list(current))
        finally:
            for handle in handles:
                handle.remove()
        self.base = torch.cat(losses) if losses else torch.zeros(0)
        if any(len(states) != len(layers) + 1 for states in self.states):
            self.decoder, self.states = None, []  # a block ran twice or not at all: not a plain stack
        elif windows and not self._matches(len(layers) // 2):
            self.decoder, self.states = None, []

    def _matches(self, block: int) -> bool:
        return bool((self.losses(block) - self.base).abs().max() <= _TOLERANCE)

    @property
    def enabled(self) -> bool:
        """Whether measurements start at their block (False: full forward passes)."""
        return self.decoder is not None

    def block_of(self, module: torch.nn.Module) -> int:
        """The block a change to ``module`` first affects: its decoder block's index, the number of
        blocks for the output head, 0 (the whole model) for anything else."""
        if self.decoder is None:
            return 0
        for index, layer in enumerate(self.decoder.layers):
            if any(m is module for m in layer.modules()):
                return index
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        return len(self.decoder.layers) if module is head else 0

    def losses(self, block: int) -> torch.Tensor:
        """The model's per-token losses on the windows as it is now, computing blocks ``block``.. only
        (every block before it must compute what it computed when recorded)."""
        if self.decoder is None or block == 0:
            return token_losses(self.model, self.windows)
        layers = self.decoder.layers
        losses = []
        try:
            self.decoder.layers = torch.nn.ModuleList(list(layers)[block:])
            with torch.no_grad():
                for window, states in zip(self.windows, self.states):
                    ids = torch.tensor([window])
                    logits = self.model(inputs_embeds=states[block], use_cache=False).logits[0, :-1].float()
                    losses.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none"))
        finally:
            self.decoder.layers = layers
        return torch.cat(losses) if losses else torch.zeros(0)


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output
