"""Batches for the LM loss on answer tokens only (InstructBLIP, BLIP-2 stage 2).

Decoder-only LLM (Vicuna, OPT), right-padded:
    input_ids       [BOS] prompt  answer  EOS  pad pad
    labels          -100  -100..  answer  EOS  -100 -100
    attention_mask  1     1 ...   1       1    0    0
The model puts the visual soft prompt in front and prepends -100 for it itself.

Encoder-decoder LLM (Flan-T5): the prompt goes to the encoder, the answer is the target:
    input_ids       prompt EOS pad        labels  answer EOS -100
    attention_mask  1      1   0          decoder_attention_mask  1  1  0

The answer's token ids come from `Processor.encode_answer`, the function candidate ranking
uses too: the tokens generation would emit after the prompt (leading-space marker included),
so the loss trains exactly what is later decoded and scored.

Too-long answers are the data layer's business (`load_records(max_answer_tokens=...)`
reports them per file:line); if one reaches the collator anyway it is an error naming the
item's source, never a silent cut. Too-long prompts are cut from the left (the question at
the end survives, as with the Q-Former's left truncation), keeping the special tokens, with a
warning naming the source.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch

from .data import DataError, DeferredImage
from .grounding import region_masks
from .model import IGNORE_INDEX
from .processing import Processor

ITEM_KEYS = ("pixel_values", "prompt", "qformer_text", "answer", "source")
WARN_TRUNCATIONS = 5  # prompts cut with a warning each; after that they are counted only


def answer_token_counter(processor: Processor) -> Callable[[str], int]:
    """answer -> its token count as the collator counts it (EOS excluded), for load-time checks.

    The exact ids depend a little on the prompt in front; a neutral prompt is used here and
    the collator checks the real count again.
    """
    # Cached: a training mixture repeats its short answers thousands of times ("red", "two"),
    # and tokenizing each one again was about half of loading 22,400 records.
    return functools.lru_cache(maxsize=65536)(lambda answer: len(processor.encode_answer("Answer:", answer)) - 1)


class InstructionCollator:
    def __init__(
        self,
        processor: Processor,
        *,
        max_prompt_tokens: int = 512,
        max_answer_tokens: int = 256,
        is_encoder_decoder: bool | None = None,
        region_grid: int | None = None,
        llm_inputs: bool = True,
    ):
        self.processor = processor
        # False for the grounding stage, which never runs the LLM: its batches then carry only the
        # images, the Q-Former's instruction and the region masks (tokenizing prompts and answers
        # was about a fifth of that stage's data time, for ids it threw away).
        self.llm_inputs = llm_inputs
        # Set (the image encoder's patches per side) when training with the grounding loss: items'
        # "regions" then become `region_masks` (B, K, 1 + grid*grid). Unset, regions are ignored,
        # so the same data also feeds evaluation and plain instruction tuning.
        self.region_grid = region_grid
        self.tokenizer = processor.tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.max_answer_tokens = max_answer_tokens  # the paper's limit, EOS not counted
        self.is_encoder_decoder = processor.is_encoder_decoder if is_encoder_decoder is None else is_encoder_decoder
        if self.tokenizer.eos_token_id is None or self.tokenizer.pad_token_id is None:
            raise ValueError("the LLM tokenizer needs an EOS and a pad token for training batches")
        self.truncated_prompts = 0  # how many prompts were cut to max_prompt_tokens so far

    # ---- one item -----------------------------------------------------------------------
    def prompt_ids(self, prompt: str, source: str, ids: list[int] | None = None) -> list[int]:
        """Prompt ids with special tokens (`ids`: the prompt already encoded), cut from the left to
        max_prompt_tokens if needed."""
        ids = self.processor.encode_prompt(prompt) if ids is None else ids
        if len(ids) <= self.max_prompt_tokens:
            return ids
        special = set(self.tokenizer.all_special_ids)
        head = 0
        while head < len(ids) and ids[head] in special:
            head += 1
        tail = 0
        while tail < len(ids) - head and ids[len(ids) - 1 - tail] in special:
            tail += 1
        keep = self.max_prompt_tokens - head - tail
        if keep <= 0:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens} leaves no room for text beside the special tokens")
        self.truncated_prompts += 1
        if self.truncated_prompts <= WARN_TRUNCATIONS:
            later = " (later cuts are only counted, in InstructionCollator.truncated_prompts)" if self.truncated_prompts == WARN_TRUNCATIONS else ""
            warnings.warn(
                f"{source}: prompt is {len(ids)} tokens, cut from the left to max_prompt_tokens={self.max_prompt_tokens}{later}",
                stacklevel=2,
            )
        return ids[:head] + ids[len(ids) - tail - keep : len(ids) - tail] + ids[len(ids) - tail :]

    def answer_ids(self, prompt: str, answer: str, source: str, prompt_ids: list[int] | None = None) -> list[int]:
        """Answer ids + EOS; an answer over max_answer_tokens is an error naming its source."""
        ids = self.processor.encode_answer(prompt, answer, prompt_ids)  # ends with EOS
        if len(ids) - 1 > self.max_answer_tokens:
            raise DataError(
                f"{source}: answer is {len(ids) - 1} tokens, over max_answer_tokens={self.max_answer_tokens} "
                "(filter such records at load with load_records(max_answer_tokens=...))"
            )
        return ids

    # ---- the batch ----------------------------------------------------------------------
    def __call__(self, items: list[dict]) -> dict:
        if not items:
            raise ValueError("cannot collate an empty list of items")
        for item in items:
            missing = [k for k in ITEM_KEYS if k not in item]
            if missing:
                raise KeyError(f"{item.get('source', 'an item')}: missing {missing} (items need {list(ITEM_KEYS)})")
        batch = self._llm_batch(items) if self.llm_inputs else {}
        batch["pixel_values"] = stack_pixels(items)
        batch.update(self.processor.tokenize_instructions([it["qformer_text"] for it in items]))
        if self.region_grid is not None and any(it.get("regions") for it in items):
            batch["region_masks"] = region_masks([it.get("regions") or [] for it in items], self.region_grid)  # (B, K, N+1)
        return batch

    def _llm_batch(self, items: list[dict]) -> dict[str, torch.Tensor]:
        # Each prompt encoded once, for its own ids and for where its answer starts.
        encoded = [self.processor.encode_prompt(it["prompt"]) for it in items]
        prompts = [self.prompt_ids(it["prompt"], it["source"], ids) for it, ids in zip(items, encoded)]
        answers = [self.answer_ids(it["prompt"], it["answer"], it["source"], ids) for it, ids in zip(items, encoded)]
        return self._encoder_decoder(prompts, answers) if self.is_encoder_decoder else self._decoder_only(prompts, answers)

    def _decoder_only(self, prompts: list[list[int]], answers: list[list[int]]) -> dict[str, torch.Tensor]:
        sequences = [p + a for p, a in zip(prompts, answers)]
        labels = [[IGNORE_INDEX] * len(p) + a for p, a in zip(prompts, answers)]
        return {
            "input_ids": pad_rows(sequences, self.tokenizer.pad_token_id),  # (B, T)
            "attention_mask": pad_rows([[1] * len(s) for s in sequences], 0),  # (B, T)
            "labels": pad_rows(labels, IGNORE_INDEX),  # (B, T)
        }

    def _encoder_decoder(self, prompts: list[list[int]], answers: list[list[int]]) -> dict[str, torch.Tensor]:
        return {
            "input_ids": pad_rows(prompts, self.tokenizer.pad_token_id),  # (B, T_enc)
            "attention_mask": pad_rows([[1] * len(p) for p in prompts], 0),  # (B, T_enc)
            "labels": pad_rows(answers, IGNORE_INDEX),  # (B, T_dec)
            "decoder_attention_mask": pad_rows([[1] * len(a) for a in answers], 0),  # (B, T_dec)
        }


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad rows of ids to one length -> (B, T) long."""
    length = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)


def stack_pixels(items: list[dict]) -> torch.Tensor | list[DeferredImage]:
    """(B, 3, H, W) for images, (B, F, 3, H, W) for videos; mixed shapes name the culprits.

    Items of a dataset with `defer_images` stay undecoded: their list goes to the feature cache."""
    deferred = [isinstance(it["pixel_values"], DeferredImage) for it in items]
    if all(deferred):
        return [it["pixel_values"] for it in items]
    if any(deferred):
        raise ValueError("a batch mixes decoded and deferred images (give every training dataset the same defer_images)")
    shapes = {tuple(it["pixel_values"].shape) for it in items}
    if len(shapes) > 1:
        listing = "; ".join(f"{it['source']}: {tuple(it['pixel_values'].shape)}" for it in items)
        raise ValueError(f"pixel_values of different shapes cannot share a batch ({listing})")
    return torch.stack([it["pixel_values"] for it in items])
