"""Language-model losses and per-answer log-likelihoods over logits and -100-masked labels.

`lm_loss` is the token-mean cross-entropy that InstructBLIP trains with (loss on the answer
tokens only; IGNORE_INDEX on the visual prefix, instruction and padding). The same function
serves decoder-only LLMs (shift=True: the logit at position t predicts the label at t+1) and
encoder-decoder LLMs (shift=False: transformers' T5 already feeds the decoder the labels
shifted right, so logit t predicts label t), and the stage-1 ITG decoder.

`answer_log_likelihoods` gives, per row, the summed and the mean log-probability of the labelled
tokens: candidate ranking for closed-set tasks (InstructBLIP section 2.5, "vocabulary ranking")
scores each candidate answer with it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .model import IGNORE_INDEX


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


__all__ = ["AnswerLogLikelihoods", "answer_log_likelihoods", "lm_loss"]
