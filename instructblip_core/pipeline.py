"""`InstructBlip`: the network and its processor together, with a text-in, text-out API.

    model = load_pretrained("Salesforce/instructblip-flan-t5-xl")
    model.generate(image, "What is unusual about this image?", num_beams=5)

The network (`model.model`) keeps a tensor-only API for training (`model.model(**batch)`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .generation import GenerationOptions
from .model import InstructBlipForConditionalGeneration
from .processing import Processor


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


class InstructBlip:
    def __init__(self, model: InstructBlipForConditionalGeneration, processor: Processor, source: str = ""):
        self.model = model
        self.processor = processor
        self.source = source  # hub id or folder it was loaded from, for logs and the UI

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.query_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_projection.weight.dtype

    def __call__(self, **batch):
        return self.model(**batch)

    def to(self, *args, **kwargs) -> "InstructBlip":
        self.model.to(*args, **kwargs)
        return self

    def save_pretrained(self, folder: str | os.PathLike):
        from .loading import save_pretrained

        return save_pretrained(self.model, self.processor, folder)

    # ---- inputs ---------------------------------------------------------------------------
    def prepare(self, images, prompts: Sequence[str] | str, instructions=None) -> dict[str, torch.Tensor]:
        """One image per prompt (a single image is shared by all prompts) -> tensors on device."""
        prompts = _as_list(prompts)
        images = _as_list(images)
        if not prompts:
            raise ValueError("no prompt given")
        if len(images) == 1 and len(prompts) > 1:
            images = images * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; give one image per prompt")
        batch = self.processor(images, prompts, instructions)
        pixel_dtype = self.model.vision_model.embeddings.patch_embedding.weight.dtype
        return {
            k: v.to(self.device, pixel_dtype) if k == "pixel_values" else v.to(self.device) for k, v in batch.items()
        }

    def generation_kwargs(self, options: GenerationOptions) -> dict:
        tok = self.processor.tokenizer
        gen_config = getattr(self.model.language_model, "generation_config", None)
        eos = getattr(gen_config, "eos_token_id", None) or tok.eos_token_id
        return options.to_generate_kwargs(pad_token_id=tok.pad_token_id, eos_token_id=eos)

    # ---- outputs ------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, images, prompts: Sequence[str] | str, **options) -> list[str]:
        """Answer each prompt about its image. Options: see `GenerationOptions`."""
        opts = GenerationOptions.from_kwargs(**options)
        batch = self.prepare(images, prompts)
        if opts.seed is not None:
            torch.manual_seed(opts.seed)
        ids = self.model.generate_ids(**batch, **self.generation_kwargs(opts))  # (B * n, T_new)
        return self.processor.decode(ids)
