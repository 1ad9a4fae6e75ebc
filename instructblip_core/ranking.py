"""Candidate ranking: the paper's vocabulary ranking for closed-set tasks.

Each candidate answer is scored by the LLM's log-likelihood of its tokens (EOS included, so a
candidate that is only the start of a longer answer is not favoured) given the image and the
prompt. All candidates of one image go through the LLM in one batch; for encoder-decoder
LLMs the encoder runs once and its output is shared by every candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .collate import pad_rows
from .losses import answer_log_likelihoods
from .model import IGNORE_INDEX, InstructBlipForConditionalGeneration


@dataclass
class CandidateScores:
    sum: list[float]  # total log-likelihood of each candidate's tokens
    mean: list[float]  # per-token average (length-normalised)
    num_tokens: list[int]

    def best(self, reduction: str = "sum") -> int:
        values = self.sum if reduction == "sum" else self.mean
        return max(range(len(values)), key=values.__getitem__)


def _scores(logits: torch.Tensor, labels: torch.Tensor) -> CandidateScores:
    """logits (K, T, V) predicting labels (K, T) position by position; IGNORE_INDEX skipped."""
    ll = answer_log_likelihoods(logits, labels, shift=False)
    return CandidateScores(sum=ll.sum.tolist(), mean=ll.mean.tolist(), num_tokens=(labels != IGNORE_INDEX).sum(-1).tolist())


@torch.no_grad()
def score_candidates(
    model: InstructBlipForConditionalGeneration,
    visual: torch.Tensor,
    prompt_ids: list[int],
    candidate_ids: list[list[int]],
    pad_token_id: int,
) -> CandidateScores:
    """visual (1, Q, C) soft prompt of one image; prompt_ids the LLM prompt; candidate_ids each
    candidate's answer tokens (EOS included), as `Processor.encode_answer` makes them."""
    K = len(candidate_ids)
    device = visual.device
    if model.is_encoder_decoder:
        return _score_encoder_decoder(model, visual, prompt_ids, candidate_ids, device)
    rows = [prompt_ids + c for c in candidate_ids]
    input_ids = pad_rows(rows, pad_token_id).to(device)  # (K, T)
    attention = pad_rows([[1] * len(r) for r in rows], 0).to(device)
    labels = pad_rows([[IGNORE_INDEX] * len(prompt_ids) + c for c in candidate_ids], IGNORE_INDEX).to(device)
    logits = model(input_ids=input_ids, attention_mask=attention, visual=visual.expand(K, -1, -1)).logits
    Q = visual.shape[1]
    # logits at position p predict token p+1; the text starts after the Q visual slots.
    return _scores(logits[:, Q - 1 : -1], labels)


def _score_encoder_decoder(model, visual, prompt_ids, candidate_ids, device):
    K = len(candidate_ids)
    prompt = torch.tensor([prompt_ids], device=device)
    embeds, mask = model.embed_with_visual_prompt(visual, prompt, None)  # (1, Q+T, C)
    encoder_out = model.language_model.get_encoder()(inputs_embeds=embeds, attention_mask=mask)  # once
    hidden = encoder_out.last_hidden_state.expand(K, -1, -1)  # (K, Q+T, C), a view: no copy
    labels = pad_rows(candidate_ids, IGNORE_INDEX).to(device)  # (K, T_dec)
    out = model.language_model(
        encoder_outputs=(hidden,), attention_mask=mask.expand(K, -1), labels=labels
    )
    return _scores(out.logits, labels)
