"""Language-model losses and per-answer log-likelihoods over logits and -100-masked labels.

`lm_loss` is the token-mean cross-entropy that InstructBLIP trains with (loss on the answer
tokens only; IGNORE_INDEX on the visual prefix, instruction and padding). The same function
serves decoder-only LLMs (shift=True: the logit at position t predicts the label at t+1) and
encoder-decoder LLMs (shift=False: transformers' T5 already feeds the decoder the labels
shifted right, so logit t predicts label t), and the stage-1 ITG decoder.

`decoder_lm_loss` is the decoder-only `lm_loss` for training, computed from the LLM's inputs
without the work that cannot change it:

- Padding. Rows are right-padded, and under a causal mask a padded tail changes nothing for
  the real tokens before it. So the rows are sorted by length and run in a few groups, each
  cut to its own longest row. On the small model's instruction mixture a batch of 32 is
  about 57% real tokens; two groups bring the LLM's work down to about 77% of the padded
  batch (measured on 100 training batches).
- The LM head at positions that predict no label (the visual prompt, the instruction, the
  padding): about 3 of every 4 real positions. The head is the LLM's widest matrix
  (vocabulary x width), and its log-softmax runs over the whole vocabulary.

What it returns equals `lm_loss(logits, labels, shift=True)` on the full logits up to float
rounding (tests/test_decoder_lm_loss.py), so it is only for training, where the logits
themselves are not read.

`answer_log_likelihoods` gives, per row, the summed and the mean log-probability of the labelled
tokens: candidate ranking for closed-set tasks (InstructBLIP section 2.5, "vocabulary ranking")
scores each candidate answer with it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # label value that the LM loss skips (visual prefix, prompt, padding)


def _align(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and apply the next-token shift: -> logits (B, T', V), labels (B, T')."""
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be (B, T, V) and labels (B, T) with the same B and T; "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels.to(logits.device)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not IGNORE_INDEX.

    logits (B, T, V), labels (B, T). shift=True for decoder-only models (labels aligned with
    the inputs), shift=False when labels are already the targets of each position.
    A batch without a single labelled token is an error rather than a NaN loss.
    """
    logits, labels = _align(logits, labels, shift)
    if not (labels != IGNORE_INDEX).any():
        raise ValueError("no token in this batch has a label (all are IGNORE_INDEX): nothing to train on")
    return F.cross_entropy(
        logits.flatten(0, 1).float(),  # (B*T', V); fp32 so bf16 logits do not lose the loss' precision
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


class AnswerLogLikelihoods(NamedTuple):
    sum: torch.Tensor  # (B,) total log-probability of each row's labelled tokens
    mean: torch.Tensor  # (B,) the same divided by that row's number of labelled tokens


def answer_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> AnswerLogLikelihoods:
    """Per-row sum and mean log p(label) over the non-ignored tokens. logits (B, T, V), labels (B, T).

    Every row needs at least one labelled token (an empty answer has no likelihood to rank).
    """
    logits, labels = _align(logits, labels, shift)
    keep = labels != IGNORE_INDEX  # (B, T')
    counts = keep.sum(dim=1)  # (B,)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no labelled token (all IGNORE_INDEX): their answer is empty")
    log_probs = logits.float().log_softmax(dim=-1)  # (B, T', V)
    # Ignored positions gather an arbitrary valid id (0) and are zeroed right after.
    picked = log_probs.gather(-1, labels.masked_fill(~keep, 0).unsqueeze(-1)).squeeze(-1)  # (B, T')
    total = picked.masked_fill(~keep, 0.0).sum(dim=1)  # (B,); masked_fill, as -inf * 0 would be NaN
    return AnswerLogLikelihoods(sum=total, mean=total / counts)


# A group costs its rows x its longest row, plus a fixed price for running the LLM once more
# (Python, kernel launches, small matrices): about as much as this many tokens of work.
GROUP_OVERHEAD_TOKENS = 256


def length_groups(lengths: list[int], max_groups: int = 4, overhead: int = GROUP_OVERHEAD_TOKENS) -> list[list[int]]:
    """Row indices in groups of similar length (sorted, contiguous), chosen to minimise
    sum(rows x longest row) + overhead per group; at most `max_groups` groups."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    # best[k][j]: least cost of the first j sorted rows in k groups; cut[k][j]: where the last group starts
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0
    for k in range(1, max_groups + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):  # last group = sorted rows i..j-1, longest = sorted_lengths[j-1]
                cost = best[k - 1][i] + (j - i) * sorted_lengths[j - 1] + overhead
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    k = min(range(1, max_groups + 1), key=lambda g: best[g][n])
    groups, j = [], n
    while k > 0:
        i = cut[k][j]
        groups.append(order[i:j])
        j, k = i, k - 1
    return groups[::-1]


def _right_padded(mask: torch.Tensor) -> bool:
    """True when every row's kept positions are a prefix (then cutting columns loses nothing)."""
    lengths = mask.sum(-1, keepdim=True)  # (B, 1)
    return bool((mask.bool() == (torch.arange(mask.shape[1], device=mask.device) < lengths)).all())


def _plain_head(language_model: nn.Module) -> bool:
    """Logits = lm_head(last hidden state), nothing after it (no softcapping, no logit scale)."""
    config = language_model.config
    return (
        language_model.get_output_embeddings() is not None
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) is None
    )


def decoder_lm_loss(
    language_model: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    max_groups: int = 4,
    group_overhead: int = GROUP_OVERHEAD_TOKENS,
) -> torch.Tensor:
    """
    inputs_embeds (B, L, C), attention_mask / position_ids / labels (B, L): labels aligned
    with the inputs (token t's label is what position t-1 must predict), IGNORE_INDEX where none.
    Returns the mean cross-entropy over the labelled tokens (a scalar).
    """
    targets = labels[:, 1:]  # (B, L-1): position t predicts token t+1
    # Under LoRA, peft's wrapper: its adapters sit inside the wrapped model's layers, so the body
    # and head are taken from the wrapped model.
    causal = language_model.get_base_model() if hasattr(language_model, "get_base_model") else language_model
    if not _plain_head(causal):
        logits = language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids).logits
        return lm_loss(logits, labels, shift=True)
    body, head = causal.base_model, causal.get_output_embeddings()
    # A row's extent: its kept positions, and any label beyond them (collators make none, but a
    # label there would count in the full loss, so it must not be cut away).
    positions = torch.arange(labels.shape[1], device=labels.device)  # (L,)
    last_label = torch.where(labels != IGNORE_INDEX, positions, -1).max(-1).values  # (B,)
    extents = torch.maximum(attention_mask.sum(-1), last_label + 1).tolist()
    if _right_padded(attention_mask):
        groups = length_groups(extents, max_groups, group_overhead)
    else:  # left padding: columns cannot be cut, so one group at full width
        groups, extents = [list(range(labels.shape[0]))], [labels.shape[1]] * labels.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=inputs_embeds.device)
    for rows in groups:
        index = torch.tensor(rows, device=inputs_embeds.device)
        width = max(extents[r] for r in rows)
        hidden = body(
            inputs_embeds=inputs_embeds[index, :width],
            attention_mask=attention_mask[index, :width],
            position_ids=position_ids[index, :width],
        ).last_hidden_state  # (b, width, C)
        wanted = targets[index, : width - 1]  # (b, width-1)
        keep = wanted != IGNORE_INDEX
        if keep.any():
            logits = head(hidden[:, :-1][keep])  # (n, V): only where a label is predicted
            total = total + F.cross_entropy(logits.float(), wanted[keep], reduction="sum")
    return total / (targets != IGNORE_INDEX).sum()


__all__ = ["AnswerLogLikelihoods", "answer_log_likelihoods", "decoder_lm_loss", "length_groups", "lm_loss"]
