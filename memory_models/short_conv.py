"""The short causal depthwise convolution that the fixed-state families put before their memory.

Without it a linear-attention layer cannot look at the previous token, and associative recall
needs exactly that: the value's position must know which key came just before it. H3 (Fu et al.,
2023) and Based (Arora et al., 2024, section 3) add a short convolution for that reason; Mamba
(Gu and Dao, 2023) has one in every block; DeltaNet (Yang et al., 2024) and Gated DeltaNet (Yang et
al., 2025) put one on q, k and v. Zoology (Arora et al., 2023, section 4) shows the gated
convolutions alone cannot recall; with attention-like memory after them they can.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

#: Either form of the convolution: `(inputs [B, T, C], history) -> (outputs, history)`.
Convolve = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class ShortConvolution(nn.Module):
    """`y_t = sum_{j<K} w_j * x_{t-K+1+j}` per channel (no bias), over `width` channels, with
    the last K-1 inputs carried in a history tensor `[B, K-1, width]` (zeros at the start: the
    causal zero padding of the first tokens), so any split of a sequence into calls gives the
    full pass. `size=None`: no convolution; inputs pass through and the history has no rows.
    """

    def __init__(self, width: int, size: int | None) -> None:
        super().__init__()
        self.width = width
        self.size = size
        self.conv = None
        if size is not None:
            self.conv = nn.Conv1d(width, width, size, groups=width, bias=False)

    @property
    def history_len(self) -> int:
        return 0 if self.size is None else self.size - 1

    def empty_history(self, batch_size: int, device=None, dtype=torch.float32) -> Tensor:
        return torch.zeros(batch_size, self.history_len, self.width, device=device, dtype=dtype)

    def history_numbers(self) -> int:
        """Numbers of state per sequence the convolution adds."""
        return self.history_len * self.width

    def forward(self, mixed: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """Convolve `mixed: [B, T, width]` after `history` in one call; returns the outputs and
        the history after the last token."""
        if self.conv is None:
            return mixed, history
        padded = torch.cat([history, mixed], dim=1)  # [B, K-1+T, width]
        convolved = self.conv(padded.transpose(1, 2)).transpose(1, 2)  # [B, T, width]
        return convolved, padded[:, padded.shape[1] - self.history_len :]

    def stepwise(self, mixed: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """The same convolution one token at a time, each output the weighted sum of its window
        of the last K inputs: the reference for `forward`."""
        if self.conv is None:
            return mixed, history
        taps = self.conv.weight[:, 0].T  # [K, width]: oldest first
        outputs = []
        for t in range(mixed.shape[1]):
            window = torch.cat([history, mixed[:, t : t + 1]], dim=1)  # [B, K, width]
            outputs.append((window * taps).sum(1))
            history = window[:, 1:]
        return torch.stack(outputs, dim=1), history
