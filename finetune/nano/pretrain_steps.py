"""The optimiser, schedule and update step shared by the small model's two pretrainings (ViT, LLM).

Kept apart from `instructblip_core.optim` on purpose: these from-scratch runs decay every
parameter and multiply the warmup ramp into a cosine over the whole run, and the shipped
checkpoint was built with exactly this arithmetic.
"""

from __future__ import annotations

import math

import torch


class PretrainOptimizer:
    """AdamW (weight decay 0.05), 5% linear warmup times a cosine over `steps`, gradients clipped at 1."""

    def __init__(self, params, *, lr: float, steps: int, betas: tuple[float, float] = (0.9, 0.999)):
        self.params = list(params)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.05, betas=betas)
        warmup = max(1, steps // 20)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
        )

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.schedule.step()
