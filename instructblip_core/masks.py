"""Self-attention keep-masks of the three BLIP-2 stage-1 objectives (True = may attend).

Reference: BLIP-2 (Li et al. 2023), section 3.2 and figure 2 (right). The Q-Former runs on the
sequence [queries ; text] of length L = Q + T; row i of a mask says which positions j the
position i may attend to. Every mask is (B, L, L) and goes straight into
`QFormerModel(attention_mask=...)`.

- ITC, `unimodal_mask`: queries see only queries, text sees only text, so the image features
  and the text feature are computed independently of each other (no leakage between the two
  sides of the contrast).
- ITM, `bidirectional_mask`: everything sees everything, so the query outputs fuse image and
  text.
- ITG, `multimodal_causal_mask`: queries see only queries (they must not read the caption they
  are asked to produce); text token t sees all queries and the text tokens 0..t.

Padding follows BERT's convention: a padded text position is hidden as a KEY in every row, but
a padded position still has a row of its own (it attends to the real tokens). A row that could
attend to nothing would make the attention softmax produce NaN, which backpropagates into the
weights even though nothing reads that position's output.
"""

from __future__ import annotations

import torch


def _check(n_query: int, text_mask: torch.Tensor) -> torch.Tensor:
    if text_mask.dim() != 2:
        raise ValueError(f"text_mask must be (B, T), got shape {tuple(text_mask.shape)}")
    if n_query < 0:
        raise ValueError(f"n_query must be >= 0, got {n_query}")
    return text_mask.bool()


def _key_keep(n_query: int, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, Q + T): which positions are real keys (every query; text that is not padding)."""
    B = text_mask.shape[0]
    queries = torch.ones(B, n_query, dtype=torch.bool, device=text_mask.device)
    return torch.cat([queries, text_mask], dim=1)


def unimodal_mask(n_query: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITC: queries <-> queries, text <-> non-padding text. text_mask (B, T) -> (B, Q+T, Q+T)."""
    text_mask = _check(n_query, text_mask)
    L = n_query + text_mask.shape[1]
    is_query = torch.arange(L, device=text_mask.device) < n_query  # (L,)
    same_side = is_query[:, None] == is_query[None, :]  # (L, L)
    return same_side[None] & _key_keep(n_query, text_mask)[:, None, :]  # (B, L, L)


def bidirectional_mask(n_query: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITM: every position sees every query and all non-padding text. (B, T) -> (B, Q+T, Q+T)."""
    text_mask = _check(n_query, text_mask)
    L = n_query + text_mask.shape[1]
    return _key_keep(n_query, text_mask)[:, None, :].expand(-1, L, -1).clone()  # (B, L, L)


def multimodal_causal_mask(n_query: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITG: queries see queries; text position t sees all queries and text 0..t (not padding).

    text_mask (B, T) -> (B, Q+T, Q+T).
    """
    text_mask = _check(n_query, text_mask)
    L = n_query + text_mask.shape[1]
    pos = torch.arange(L, device=text_mask.device)
    is_query = pos < n_query  # (L,)
    # Row i may see column j when j is a query, or when both are text and j comes no later than i.
    allowed = is_query[None, :] | (~is_query[:, None] & (pos[None, :] <= pos[:, None]))  # (L, L)
    return allowed[None] & _key_keep(n_query, text_mask)[:, None, :]  # (B, L, L)


__all__ = ["bidirectional_mask", "multimodal_causal_mask", "unimodal_mask"]
