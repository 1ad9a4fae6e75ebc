"""`InstructBlip`: the network and its processor together, with a text-in, text-out API.

    model = load_pretrained("Salesforce/instructblip-flan-t5-xl")
    model.generate(image, "What is unusual about this image?", num_beams=5)
    for piece in model.stream(image, "Describe the picture.", stop=event): ...
    model.rank_candidates(image, "Question: what colour is it? Answer:", ["red", "blue"])

Images: one entry per prompt, each an image (path, bytes, PIL, array) or, for a video, a
list of frames (`video.sample_frames` makes one). A single entry is shared by all prompts.
The image encoder's output is cached per image content (`feature_cache`), so later questions
and retries about the same image skip it. The network (`model.model`) keeps a tensor-only
API for training (`model.model(**batch)`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from functools import partial

import torch
from transformers import StoppingCriteriaList

from .features import FeatureCache
from .generation import GenerationOptions
from .model import InstructBlipForConditionalGeneration
from .processing import Processor
from .quantization import is_quantized
from .prompts import QFORMER_INSTRUCTION_KEY
from .ranking import CandidateScores, score_candidates
from .streaming import StopOnEvent, stream_generate

DEFAULT_CACHE_ENTRIES = 32


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _cuda_graphs_from_any_thread() -> None:
    """Streaming decodes in a worker thread, and inductor's default CUDA-graph trees keep their
    state in thread-local storage set up only on the main thread (an AssertionError in any
    other thread). Its plain CUDA graphs have no such state. Process-wide, and only ever set
    when static-cache decoding runs on a GPU."""
    import torch._inductor.config as inductor_config

    inductor_config.triton.cudagraph_trees = False


class InstructBlip:
    def __init__(
        self,
        model: InstructBlipForConditionalGeneration,
        processor: Processor,
        source: str = "",
        feature_cache: FeatureCache | None = None,
        static_cache: bool = False,
    ):
        self.model = model
        self.processor = processor
        self.source = source  # hub id or folder it was loaded from, for logs and the UI
        self.feature_cache = feature_cache if feature_cache is not None else FeatureCache(DEFAULT_CACHE_ENTRIES)
        # Decode with a preallocated (static) KV cache. On CUDA, transformers then compiles the
        # one-token decode step into CUDA graphs: batch-1 decoding is bound by kernel launches,
        # not by the GPU, and this removes most of them. The first answers are slow while it
        # compiles (per new cache size); beam search and 8/4-bit LLMs keep the dynamic cache.
        self.static_cache = static_cache

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.query_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_projection.weight.dtype

    @property
    def context_length(self) -> int:
        """Tokens the LLM reads at most (visual tokens included)."""
        text = self.config.text_config
        return int(getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 512)

    def __call__(self, **batch):
        return self.model(**batch)

    def to(self, *args, **kwargs) -> "InstructBlip":
        self.model.to(*args, **kwargs)
        self.feature_cache.clear()
        return self

    def save_pretrained(self, folder: str | os.PathLike):
        from .loading import save_pretrained

        return save_pretrained(self.model, self.processor, folder)

    # ---- inputs ---------------------------------------------------------------------------
    def prepare(self, images, prompts: Sequence[str] | str, instructions=None) -> dict[str, torch.Tensor]:
        """Tensors on the model's device; see the module docstring for `images`."""
        prompts = _as_list(prompts)
        if not prompts:
            raise ValueError("no prompt given")
        if isinstance(images, (list, tuple)) and len(prompts) == 1 and len(images) > 1:
            prompts = prompts * len(images)  # several images, one question each
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(images) == 1 and len(prompts) > 1:
            images = images * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; give one image per prompt")
        if instructions is not None:
            instructions = _as_list(instructions)
        if not self.config.extra.get(QFORMER_INSTRUCTION_KEY, True):
            instructions = [""] * len(prompts)  # trained instruction-blind: inference must match
        batch = self.processor(images, prompts, instructions)
        pixel_dtype = self.model.vision_model.embeddings.patch_embedding.weight.dtype
        return {
            k: v.to(self.device, pixel_dtype) if k == "pixel_values" else v.to(self.device) for k, v in batch.items()
        }

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) -> (b, N, Cv), or clips (b, F, 3, H, W) -> (b, F, N, Cv)."""
        if pixel_values.dim() == 5:
            return self.model.encode_images(pixel_values.flatten(0, 1)).unflatten(0, pixel_values.shape[:2])
        return self.model.encode_images(pixel_values)

    @torch.no_grad()
    def visual_prompt(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Soft visual prompt (B, F*Q, C_llm), the image encoder's part served from the cache."""
        image_embeds = self.feature_cache.get_or_compute(batch["pixel_values"], self._encode)
        return self.model.visual_prompt(
            image_embeds=image_embeds,
            qformer_input_ids=batch.get("qformer_input_ids"),
            qformer_attention_mask=batch.get("qformer_attention_mask"),
        )

    def generation_kwargs(self, options: GenerationOptions) -> dict:
        kwargs = options.generate_kwargs_for(self.model.language_model, self.processor.tokenizer)
        if self.static_cache and options.num_beams == 1 and not is_quantized(self.model.language_model):
            kwargs["cache_implementation"] = "static"
            if self.device.type == "cuda":
                _cuda_graphs_from_any_thread()
        return kwargs

    def _decoder(self, batch, options: GenerationOptions):
        """A `generate_ids` call with everything bound but the streamer/stopping criteria."""
        if options.seed is not None:
            torch.manual_seed(options.seed)
        return partial(
            self.model.generate_ids,
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            visual=self.visual_prompt(batch),
            **self.generation_kwargs(options),
        )

    # ---- outputs ------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, images, prompts: Sequence[str] | str, *, instructions=None, stop: threading.Event | None = None, **options) -> list[str]:
        """Answer each prompt about its image. Options: see `GenerationOptions`.

        `instructions`: what the Q-Former reads (default: the prompts). `stop`: an event that
        ends decoding early (the text so far is returned).
        """
        opts = GenerationOptions.from_kwargs(**options)
        run = self._decoder(self.prepare(images, prompts, instructions), opts)
        criteria = StoppingCriteriaList([StopOnEvent(stop)]) if stop is not None else None
        return self.processor.decode(run(stopping_criteria=criteria))

    def stream(self, image, prompt: str, *, instruction: str | None = None, stop: threading.Event | None = None, **options) -> Iterator[str]:
        """Yield the answer in pieces as tokens are decoded; their concatenation is the answer.

        `stop`: set it from any thread to end the decoding loop within one token. Beam search
        cannot stream: it yields the final answer once (and still honours `stop`).
        """
        opts = GenerationOptions.from_kwargs(**options)
        if opts.num_beams > 1 or opts.num_return_sequences > 1:
            yield self.generate([image], prompt, instructions=instruction, stop=stop, **options)[0]
            return
        with torch.inference_mode():
            run = self._decoder(self.prepare([image], [prompt], instruction), opts)
        decode = partial(self.processor.tokenizer.decode, skip_special_tokens=True)
        yield from stream_generate(run, decode, stop)

    @torch.inference_mode()
    def score_candidates(self, image, prompt: str, candidates: Sequence[str], *, instruction: str | None = None) -> CandidateScores:
        """Log-likelihood of each candidate answer (sum and per-token mean), one LLM pass per image."""
        candidates = list(candidates)
        if not candidates:
            raise ValueError("no candidates to rank")
        batch = self.prepare([image], [prompt], instruction)
        ids = [self.processor.encode_answer(prompt, c) for c in candidates]
        prompt_ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
        return score_candidates(self.model, self.visual_prompt(batch), prompt_ids, ids, self.processor.tokenizer.pad_token_id)

    def rank_candidates(self, image, prompt: str, candidates: Sequence[str], *, reduction: str = "sum", instruction: str | None = None) -> list[float]:
        """Each candidate's log-likelihood ("sum" or per-token "mean"); the best is the largest."""
        if reduction not in ("sum", "mean"):
            raise ValueError('reduction must be "sum" or "mean"')
        scores = self.score_candidates(image, prompt, candidates, instruction=instruction)
        return scores.sum if reduction == "sum" else scores.mean
