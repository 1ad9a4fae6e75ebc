"""AdamW over the trainable parameters, and the learning-rate schedule of the papers.

References: BLIP-2 / InstructBLIP training details (AdamW, linear warmup, cosine decay) and
the LAVIS optimiser setup, whose rule for weight decay we follow: parameters with fewer than
two dimensions (biases, LayerNorm / RMSNorm scales) get no decay. Decaying a bias or a norm's
gain towards zero only fights the normalisation; matrices, embeddings and the query tokens
are decayed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float = 1e-5  # peak learning rate (InstructBLIP: 1e-5)
    weight_decay: float = 0.05  # applied to matrices only
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 1000  # linear warmup from 0 to `lr`
    total_steps: int = 60_000  # optimizer steps; the cosine reaches `min_lr_ratio * lr` here
    min_lr_ratio: float = 0.0  # floor of the cosine as a fraction of `lr`

    def __post_init__(self):
        checks = [
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (all(0 <= b < 1 for b in self.betas), "betas must be in [0, 1)"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.total_steps >= 1, "total_steps must be >= 1"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self})")


def is_decayed(param: nn.Parameter) -> bool:
    return param.dim() >= 2


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the parameters that require grad: decayed and not decayed.

    Each group carries `names` (not used by torch) so logs and tests can see the split.
    """
    decay, no_decay = {}, {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if is_decayed(param) else no_decay)[name] = param
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    return [
        {"params": list(decay.values()), "names": list(decay), "weight_decay": weight_decay},
        {"params": list(no_decay.values()), "names": list(no_decay), "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, settings: OptimizerSettings) -> torch.optim.AdamW:
    groups = [g for g in parameter_groups(model, settings.weight_decay) if g["params"]]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear up, cosine down."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, settings: OptimizerSettings) -> LambdaLR:
    return LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, settings.warmup_steps, settings.total_steps, settings.min_lr_ratio),
    )
