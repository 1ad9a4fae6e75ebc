"""The base of training wrappers: modules that change what `module(**batch)` computes around the
InstructBLIP model but own no weights of their own, so an export unwraps them (`unwrap`)."""

from __future__ import annotations

import torch
from torch import nn


class ModelWrapper(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)


class LossOnly(ModelWrapper):
    """`model(**batch)` as training needs it: the loss, without the full (B, L, V) logits that
    nothing reads (the decoder-only loss then skips padding and unlabelled positions: `losses.decoder_lm_loss`)."""

    def forward(self, **batch):
        return self.model(**batch, return_logits=False)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside any number of wrappers (whose weights are the model's)."""
    while isinstance(module, ModelWrapper):
        module = module.model
    return module
