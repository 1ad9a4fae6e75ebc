"""The Q-Former: a BERT whose learned query tokens read the image through cross-attention.

References: BLIP-2 (Li et al. 2023) section 3.1; InstructBLIP (Dai et al. 2023) section 2.3.
- Queries (n_query of them) are prepended to the (optional) instruction tokens; all of them
  share self-attention, so with an instruction the queries extract instruction-aware features.
- Only query positions cross-attend to the image, every `cross_attention_frequency` layers, and
  query positions have their own feed-forward (`intermediate_query` / `output_query`).
- BLIP-2 mode (`use_text_input=False`): no word embeddings, the queries are just LayerNorm-ed.

Attribute names follow the Hugging Face checkpoint keys under `qformer.` (BERT's `LayerNorm`,
`attention.attention.query`, `crossattention`, ...) so real weights load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activations import get_activation
from .config import QFormerConfig
from .dropout import Dropout, dropout


def to_sdpa_mask(mask: torch.Tensor | None, n_queries: int) -> torch.Tensor | None:
    """Turn a keep-mask into a boolean SDPA mask of shape (B, 1, Tq, Tk) or (B, 1, 1, Tk).

    mask: None (attend everywhere), (B, Tk) key padding (1 = keep), or (B, Tq, Tk) full mask
    (used by the stage-1 objectives, e.g. the multimodal causal mask of ITG).
    """
    if mask is None:
        return None
    mask = mask.bool()
    if mask.dim() == 2:
        return mask[:, None, None, :]
    if mask.dim() == 3:
        if mask.shape[1] != n_queries:
            raise ValueError(f"attention mask has {mask.shape[1]} query rows, expected {n_queries}")
        return mask[:, None, :, :]
    raise ValueError(f"attention mask must be (B, T) or (B, T, T), got shape {tuple(mask.shape)}")


class QFormerMultiHeadAttention(nn.Module):
    """Self-attention (keys from the hidden states) or cross-attention (keys from the image)."""

    def __init__(self, config: QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_probs_dropout_prob
        kv_width = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, T, d)

    def _weights(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5  # (B, h, Tq, Tk)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return scores.softmax(-1)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        context = x if context is None else context
        q, k, v = self._heads(self.query(x)), self._heads(self.key(context)), self._heads(self.value(context))
        mask = to_sdpa_mask(mask, x.shape[1])
        weights = None
        p = self.dropout if self.training else 0.0
        if need_weights:
            # Eager path only when someone wants to look at the attention (the "where did it look" view).
            weights = self._weights(q, k, mask)  # (B, h, Tq, Tk)
            y = weights @ v
        elif p > 0.0 and q.device.type == "cpu":
            # SDPA would drop attention weights with bernoulli_, about 4x the cost of this mask (dropout.py).
            y = dropout(self._weights(q, k, mask), p, True) @ v  # (B, h, Tq, d)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, h, Tq, d)
        B, _, T, _ = y.shape
        return y.transpose(1, 2).reshape(B, T, -1), weights


class QFormerSelfOutput(nn.Module):
    """Output projection + dropout + post-LN residual (BERT style)."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(y)) + residual)


class QFormerAttention(nn.Module):
    def __init__(self, config: QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.attention = QFormerMultiHeadAttention(config, is_cross_attention)
        self.output = QFormerSelfOutput(config)

    def forward(self, x, context=None, mask=None, need_weights=False):
        y, weights = self.attention(x, context, mask, need_weights)
        return self.output(y, x), weights


class QFormerIntermediate(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerOutput(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, layer_idx: int):
        super().__init__()
        self.attention = QFormerAttention(config)
        self.has_cross_attention = config.has_cross_attention(layer_idx)
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(config, is_cross_attention=True)
        # Text positions and query positions have separate feed-forward weights.
        if config.has_text_ffn:
            self.intermediate = QFormerIntermediate(config)
            self.output = QFormerOutput(config)
        self.intermediate_query = QFormerIntermediate(config)
        self.output_query = QFormerOutput(config)

    def forward(self, x, mask, image_embeds, n_query: int, need_weights: bool = False):
        """x: (B, n_query + T, C); image_embeds: (B, N_img, C_img). Returns (x, cross-attention or None)."""
        x, _ = self.attention(x, mask=mask)
        cross_weights = None
        if n_query == 0:  # text only (stage-1 text encoder / decoder)
            return self.output(self.intermediate(x), x), None
        queries = x[:, :n_query]  # (B, n_query, C)
        if self.has_cross_attention:
            if image_embeds is None:
                raise ValueError("this Q-Former layer cross-attends to the image, but no image tokens were given")
            queries, cross_weights = self.crossattention(queries, context=image_embeds, need_weights=need_weights)
        out = self.output_query(self.intermediate_query(queries), queries)
        if x.shape[1] > n_query:
            text = x[:, n_query:]  # (B, T, C)
            out = torch.cat([out, self.output(self.intermediate(text), text)], dim=1)
        return out, cross_weights


class QFormerEncoder(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x, mask, image_embeds, n_query, need_weights=False):
        cross_attentions = []
        for layer in self.layer:
            if self.gradient_checkpointing and self.training:
                x, w = torch.utils.checkpoint.checkpoint(
                    layer, x, mask, image_embeds, n_query, need_weights, use_reentrant=False
                )
            else:
                x, w = layer(x, mask, image_embeds, n_query, need_weights)
            if w is not None:
                cross_attentions.append(w)
        return x, cross_attentions


class QFormerEmbeddings(nn.Module):
    """Word + absolute position embeddings for the text; queries are prepended without positions."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None], persistent=False)

    def forward(self, input_ids: torch.Tensor | None, query_embeds: torch.Tensor | None) -> torch.Tensor:
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds)  # (B, n_query, C)
        if input_ids is not None:
            T = input_ids.shape[1]
            if T > self.position_ids.shape[1]:
                raise ValueError(f"Q-Former text has {T} tokens, more than its {self.position_ids.shape[1]} positions")
            text = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:, :T])  # (B, T, C)
            parts.append(text)
        x = torch.cat([p.to(self.layernorm.weight.dtype) for p in parts], dim=1)  # (B, n_query + T, C)
        return self.dropout(self.layernorm(x))


class QFormerModel(nn.Module):
    """(queries, instruction ids, image tokens) -> hidden states (B, n_query + T, C)."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = config
        if config.use_text_input:
            self.embeddings = QFormerEmbeddings(config)
        else:  # BLIP-2 checkpoints keep just a LayerNorm for the queries
            self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.dropout = Dropout(config.hidden_dropout_prob)
        self.encoder = QFormerEncoder(config)

    def embed(self, query_embeds: torch.Tensor | None, input_ids: torch.Tensor | None) -> torch.Tensor:
        if self.config.use_text_input:
            return self.embeddings(input_ids, query_embeds)
        if input_ids is not None:
            raise ValueError("a BLIP-2 Q-Former takes no instruction text (use an InstructBLIP checkpoint)")
        return self.dropout(self.layernorm(query_embeds.to(self.layernorm.weight.dtype)))

    def forward(
        self,
        query_embeds: torch.Tensor | None,
        image_embeds: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """
        query_embeds: (B, n_query, C) or None; image_embeds: (B, N_img, C_img) or None;
        input_ids: (B, T) instruction tokens; attention_mask: keep-mask over the n_query + T
        positions, (B, n_query + T) padding or (B, L, L) full. Returns the hidden states
        (B, n_query + T, C) and, with need_weights, each cross-attention layer's weights
        (B, heads, n_query, N_img).
        """
        n_query = 0 if query_embeds is None else query_embeds.shape[1]
        x = self.embed(query_embeds, input_ids)  # (B, n_query + T, C)
        if image_embeds is not None:
            image_embeds = image_embeds.to(x.dtype)
        return self.encoder(x, attention_mask, image_embeds, n_query, need_weights)
