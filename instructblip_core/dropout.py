"""Dropout with its mask drawn by `torch.rand` on the CPU.

Same distribution and scaling as `F.dropout` (each element kept with probability 1 - p, kept
ones scaled by 1 / (1 - p)), but on the CPU `F.dropout` draws its mask with `bernoulli_`, which
costs about 4x as much as `torch.rand` (15 ms against 4 ms for a (64, 4, 60, 60) tensor on 2
cores). At the small model's size that was 17% of a grounding step and 8% of an
instruction-tuning step. Elsewhere (CUDA) `F.dropout` is fused and is used as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p == 1.0:
        return F.dropout(x, p, True)
    keep = torch.rand(x.shape, device=x.device) >= p  # same shape as x
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """`nn.Dropout` (same `p`, same state) drawing its mask as `dropout` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

