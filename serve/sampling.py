"""Choosing the next token, and turning a byte-level model's tokens into text as they come.

Sampling: greedy at temperature 0; otherwise softmax at the temperature, restricted to the `top_k`
most likely tokens and to the smallest set whose probability reaches `top_p` (nucleus sampling,
Holtzman et al., 2020). Text: UTF-8 bytes decoded incrementally (a character split across tokens
appears once complete), cut at the first stop string, which is never emitted even in part.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def generator(self, offset: int = 0) -> torch.Generator | None:
        """A seeded generator (`offset` tells choices apart), or None for an unseeded run."""
        return None if self.seed is None else torch.Generator().manual_seed(self.seed + offset)


def sample(logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.temperature == 0.0:
        return int(logits.argmax())
    # A tiny temperature is greedy in effect; the floor keeps the division finite.
    scaled = logits.float() / max(sampling.temperature, 1e-3)
    if sampling.top_k is not None and sampling.top_k < scaled.shape[0]:
        floor = scaled.topk(sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < floor, float("-inf"))
    probs = scaled.softmax(-1)
    if sampling.top_p < 1.0:
        probs = _nucleus(probs, sampling.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Zero every token outside the smallest most-likely set whose mass reaches `top_p`."""
    ordered, order = probs.sort(descending=True)
    before = ordered.cumsum(-1) - ordered  # mass of the more likely tokens
    kept = torch.zeros_like(probs).scatter(0, order, (before < top_p).to(probs.dtype))
    return probs * kept


class TextStream:
    """Bytes in, text out: `add(token)` returns the text that may be shown now; `done` is set
    once a stop string appears (the text then ends before it)."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.shown = 0
        self.done = False

    def add(self, token: int) -> str:
        self.text += self.decoder.decode(bytes([token]))
        cut = self._stop_at()
        if cut is not None:
            self.text, self.done = self.text[:cut], True
            return self._release(len(self.text))
        # Hold back what could still become the start of a stop string.
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._release(max(self.shown, len(self.text) - hold))

    def finish(self) -> str:
        """The rest, when generation ends for another reason (the token budget)."""
        if not self.done:
            self.text += self.decoder.decode(b"", final=True)
        return self._release(len(self.text))

    def _stop_at(self) -> int | None:
        found = [self.text.find(s) for s in self.stop]
        found = [index for index in found if index >= 0]
        return min(found) if found else None

    def _release(self, upto: int) -> str:
        out, self.shown = self.text[self.shown : upto], upto
        return out
