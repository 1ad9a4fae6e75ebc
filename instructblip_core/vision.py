"""The frozen image encoder: an EVA-CLIP style ViT (pre-LN, fused qkv, final LayerNorm).

References: EVA-CLIP (Sun et al. 2023); BLIP-2 (Li et al. 2023) section 3.1. Attribute names
equal the Hugging Face checkpoint keys under `vision_model.` (`embeddings.class_embedding`,
`encoder.layers.N.self_attn.qkv`, `post_layernorm`, ...) so real weights load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activations import get_activation
from .config import VisionConfig


class VisionEmbeddings(nn.Module):
    """Patchify with a strided conv, prepend CLS, add learned absolute positions."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        C = config.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, C))
        self.patch_embedding = nn.Conv2d(3, C, kernel_size=config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_positions, C))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # (B, C, H/p, W/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.to(dtype).expand(patches.shape[0], -1, -1)  # (B, 1, C)
        x = torch.cat([cls, patches], dim=1)  # (B, N+1, C)
        if x.shape[1] != self.position_embedding.shape[1]:
            raise ValueError(
                f"image gives {x.shape[1] - 1} patches but the encoder was trained with "
                f"{self.position_embedding.shape[1] - 1}: resize the image to the model's image_size"
            )
        return x + self.position_embedding.to(dtype)


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with one fused qkv projection."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        C = config.hidden_size
        # One bias of size 3C as in the checkpoints; EVA has no key bias, so its slice is stored as zeros.
        self.qkv = nn.Linear(C, 3 * C, bias=config.qkv_bias)
        self.projection = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, T, d)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, h, T, d)
        return self.projection(y.transpose(1, 2).reshape(B, T, C))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.act = get_activation(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class VisionModel(nn.Module):
    """pixel_values (B, 3, H, W) -> image tokens (B, N+1, C), LayerNorm-ed, CLS first."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)  # (B, N+1, C)
        x = self.encoder(x)  # (B, N+1, C)
        return self.post_layernorm(x)  # (B, N+1, C)
