"""Text side of the processor: the LLM tokenizer and the Q-Former's BERT tokenizer, plus images.

Folder layout (that of the Hugging Face InstructBLIP repos): the LLM tokenizer at the root,
the Q-Former tokenizer in `qformer_tokenizer/`, image settings in `preprocessor_config.json`.
Tokenising happens here, never inside the model's forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .images import ImageProcessor

QFORMER_TOKENIZER_FOLDER = "qformer_tokenizer"
QFORMER_MAX_LENGTH = 128  # the Q-Former's text limit in the paper; longer instructions lose their start


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    # LLaMA tokenizers ship without a pad token; padding only needs some id that the mask hides.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token


@dataclass
class Processor:
    image_processor: ImageProcessor
    tokenizer: PreTrainedTokenizerBase  # the LLM's
    qformer_tokenizer: PreTrainedTokenizerBase | None  # None for BLIP-2 (its Q-Former reads no text)
    num_query_tokens: int
    is_encoder_decoder: bool
    qformer_max_length: int = QFORMER_MAX_LENGTH

    def __post_init__(self):
        _ensure_pad_token(self.tokenizer)
        if self.qformer_tokenizer is not None:
            # Keep the end of a long instruction (the question), as the original code does.
            self.qformer_tokenizer.truncation_side = "left"

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        num_query_tokens: int,
        is_encoder_decoder: bool,
        instruction_aware: bool,
        qformer_positions: int = QFORMER_MAX_LENGTH,
    ) -> "Processor":
        """`qformer_positions`: the Q-Former's position table; instructions are cut to fit it."""
        folder = Path(folder)
        qformer_tokenizer = None
        if instruction_aware:
            sub = folder / QFORMER_TOKENIZER_FOLDER
            if not sub.is_dir():
                raise FileNotFoundError(f"{folder} has no {QFORMER_TOKENIZER_FOLDER}/ folder with the Q-Former's tokenizer")
            qformer_tokenizer = AutoTokenizer.from_pretrained(sub)
        return cls(
            image_processor=ImageProcessor.from_folder(folder),
            tokenizer=AutoTokenizer.from_pretrained(folder),
            qformer_tokenizer=qformer_tokenizer,
            num_query_tokens=num_query_tokens,
            is_encoder_decoder=is_encoder_decoder,
            qformer_max_length=min(QFORMER_MAX_LENGTH, qformer_positions),
        )

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        if self.qformer_tokenizer is not None:
            self.qformer_tokenizer.save_pretrained(folder / QFORMER_TOKENIZER_FOLDER)
        (folder / "preprocessor_config.json").write_text(json.dumps(self.image_processor.to_dict(), indent=2) + "\n")
        processor_class = "InstructBlipProcessor" if self.qformer_tokenizer is not None else "Blip2Processor"
        (folder / "processor_config.json").write_text(
            json.dumps({"processor_class": processor_class, "num_query_tokens": self.num_query_tokens}, indent=2) + "\n"
        )

    # ---- text -----------------------------------------------------------------------------
    def tokenize_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """LLM prompt ids, padded on the side generation needs (left for decoder-only)."""
        side = "right" if self.is_encoder_decoder else "left"
        enc = self.tokenizer(prompts, padding=True, padding_side=side, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def tokenize_instructions(self, instructions: list[str]) -> dict[str, torch.Tensor]:
        """Q-Former ids, left-truncated to its limit; empty for BLIP-2."""
        if self.qformer_tokenizer is None:
            return {}
        enc = self.qformer_tokenizer(instructions, padding=True, truncation=True, max_length=self.qformer_max_length)
        # Padded lists to tensors here: the tokenizer's own return_tensors="pt" walks every id in
        # Python (and builds token_type_ids too), most of a training batch's collation time.
        return {"qformer_input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),  # (B, T)
                "qformer_attention_mask": torch.tensor(enc["attention_mask"], dtype=torch.long)}

    def encode_prompt(self, prompt: str) -> list[int]:
        """LLM prompt ids with the tokenizer's special tokens (BOS for LLaMA/OPT, EOS for T5)."""
        return self.tokenizer(prompt).input_ids

    def encode_answer(self, prompt: str, answer: str, prompt_ids: list[int] | None = None) -> list[int]:
        """The answer's ids as the LLM produces them after `prompt`, EOS included (`prompt_ids`:
        `encode_prompt(prompt)` when the caller has it already).

        Shared by training (labels) and candidate ranking, so both score exactly the tokens
        generation would emit. Decoder-only: the tokens that follow the prompt's in
        `prompt + " " + answer` (a word after a prompt carries its leading-space marker, for
        SentencePiece and byte-level BPE alike). Encoder-decoder: the answer alone, as target.
        """
        tok = self.tokenizer
        if self.is_encoder_decoder:
            ids = tok(answer).input_ids
            return ids if ids and ids[-1] == tok.eos_token_id else ids + [tok.eos_token_id]
        prompt_ids = self.encode_prompt(prompt) if prompt_ids is None else prompt_ids
        # No prompt (BLIP-2 captioning): the answer opens the text, with no space before it.
        full = tok(f"{prompt} {answer.lstrip()}" if prompt else answer.lstrip()).input_ids
        if full[: len(prompt_ids)] == prompt_ids:
            ids = full[len(prompt_ids):]
        else:  # the boundary merged into one token: fall back to the answer on its own
            ids = tok(" " + answer.lstrip(), add_special_tokens=False).input_ids
        return ids + [tok.eos_token_id]

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # ---- images -----------------------------------------------------------------------------
    def pixel_values(self, samples: list) -> torch.Tensor:
        """One entry per sample: an image, or a list of video frames (same count in a batch).

        Returns (B, 3, H, W) for images, (B, F, 3, H, W) for videos.
        """
        if not any(isinstance(s, (list, tuple)) for s in samples):
            return self.image_processor(samples)  # (B, 3, H, W)
        counts = {len(s) if isinstance(s, (list, tuple)) else 1 for s in samples}
        if len(counts) != 1:
            raise ValueError(f"all videos in a batch need the same number of frames, got {sorted(counts)}")
        clips = [self.image_processor(list(s) if isinstance(s, (list, tuple)) else [s]) for s in samples]
        return torch.stack(clips)  # (B, F, 3, H, W)

    # ---- both -------------------------------------------------------------------------------
    def __call__(self, images: list, prompts: list[str], instructions: list[str] | None = None) -> dict[str, torch.Tensor]:
        """images (one entry per prompt: an image or a list of frames) + prompts -> model inputs.
        `instructions` (what the Q-Former reads) default to the prompts, as in single-turn InstructBLIP."""
        batch = {"pixel_values": self.pixel_values(images)}  # (B, 3, H, W) or (B, F, 3, H, W)
        batch.update(self.tokenize_prompts(prompts))
        batch.update(self.tokenize_instructions(instructions if instructions is not None else prompts))
        return batch
