"""Decoding settings: one validated dataclass, turned into transformers `generate` arguments.

Greedy, beam search and sampling, with the knobs the original release exposes. The
original release's own defaults (beams 5, max length 256, min length 1, top-p 0.9,
repetition penalty 1.5, length penalty 1, temperature 1) are kept as `ORIGINAL_RELEASE`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 256
    min_new_tokens: int = 1
    num_beams: int = 1  # > 1: beam search (no sampling)
    do_sample: bool = False  # True: sample from the (temperature, top-p) filtered distribution
    temperature: float = 1.0  # sampling only
    top_p: float = 0.9  # nucleus mass, sampling only
    repetition_penalty: float = 1.0  # > 1 discourages repeating any token already in prompt or answer
    length_penalty: float = 1.0  # beam search only: > 1 favours longer answers
    num_return_sequences: int = 1
    seed: int | None = None  # sampling only: makes a sampled answer reproducible

    def __post_init__(self):
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be between 0 and max_new_tokens"),
            (self.num_beams >= 1, "num_beams must be at least 1"),
            (not (self.do_sample and self.num_beams > 1), "choose sampling or beam search, not both"),
            (self.temperature > 0, "temperature must be > 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (1 <= self.num_return_sequences <= max(self.num_beams, 1) or self.do_sample,
             "num_return_sequences cannot exceed num_beams without sampling"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self})")

    @property
    def mode(self) -> str:
        return "sample" if self.do_sample else "beam" if self.num_beams > 1 else "greedy"

    @classmethod
    def from_kwargs(cls, **kwargs) -> "GenerationOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)

    def generate_kwargs_for(self, language_model, tokenizer) -> dict:
        """`to_generate_kwargs` with the LLM's own EOS (its generation config may list several,
        e.g. Vicuna's) falling back to the tokenizer's, and the tokenizer's pad id."""
        gen_config = getattr(language_model, "generation_config", None)
        eos = getattr(gen_config, "eos_token_id", None) or tokenizer.eos_token_id
        return self.to_generate_kwargs(pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)

    def to_generate_kwargs(self, pad_token_id: int | None, eos_token_id) -> dict:
        """Arguments for transformers' `generate`, leaving out what the chosen mode ignores."""
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            num_beams=self.num_beams,
            do_sample=self.do_sample,
            repetition_penalty=self.repetition_penalty,
            num_return_sequences=self.num_return_sequences,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
        )
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:  # explicit neutral values, so a checkpoint's generation_config cannot switch sampling on
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.num_beams > 1:
            kwargs.update(length_penalty=self.length_penalty)
        return kwargs


ORIGINAL_RELEASE = GenerationOptions(
    num_beams=5, max_new_tokens=256, min_new_tokens=1, top_p=0.9, repetition_penalty=1.5, length_penalty=1.0
)
