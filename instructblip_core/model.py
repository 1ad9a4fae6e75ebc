"""InstructBLIP / BLIP-2: image encoder -> Q-Former -> projection -> frozen LLM.

References: BLIP-2 (Li et al. 2023), InstructBLIP (Dai et al. 2023); Hugging Face
`modeling_instructblip.py` for the checkpoint layout. The attribute names (`vision_model`,
`query_tokens`, `qformer`, `language_projection`, `language_model`) equal the checkpoint
keys, so official weights load with strict key checking and no rename table.

The forward pass, numbered as in the paper's figure:
  1. vision_model:        pixel_values (B, 3, H, W)          -> image tokens (B, N+1, Cv)
  2. qformer:             queries (+ instruction) x image      -> query outputs (B, Q, Cq)
  3. language_projection: (B, Q, Cq)                           -> soft visual prompt (B, Q, Cl)
  4. language_model:      [visual prompt ; prompt embeddings]  -> logits
The soft prompt sits before the prompt tokens, which is what the Hugging Face processor's 32
`<image>` placeholders before BOS amount to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig, PreTrainedModel

from .config import InstructBlipConfig
from .losses import IGNORE_INDEX, decoder_lm_loss
from .qformer import QFormerModel
from .vision import VisionModel


def build_language_model(text_config: PretrainedConfig) -> PreTrainedModel:
    """The frozen LLM, straight from transformers (decoder-only or encoder-decoder)."""
    auto = AutoModelForSeq2SeqLM if text_config.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_config(text_config)


@dataclass
class VisualFeatures:
    """What the image side hands to the LLM, kept together so callers can cache and inspect it."""

    language_inputs: torch.Tensor  # (B, Q, C_llm) soft visual prompt
    query_output: torch.Tensor  # (B, Q, Cq) Q-Former outputs at the query positions
    cross_attentions: list[torch.Tensor]  # per cross-attention layer (B, heads, Q, N+1); empty unless asked


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # decoder-only: (B, Q + T, V); encoder-decoder: (B, T_dec, V); None: loss only
    loss: torch.Tensor | None = None


class InstructBlipForConditionalGeneration(nn.Module):
    def __init__(self, config: InstructBlipConfig, language_model: PreTrainedModel | None = None):
        super().__init__()
        self.config = config
        Cq = config.qformer_config.hidden_size
        self.vision_model = VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, Cq))
        self.qformer = QFormerModel(config.qformer_config)
        self.language_projection = nn.Linear(Cq, config.llm_hidden_size)
        self.language_model = language_model if language_model is not None else build_language_model(config.text_config)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.config.is_encoder_decoder

    @property
    def is_instruction_aware(self) -> bool:
        return self.config.qformer_config.use_text_input

    # ---- 1. image encoder -------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N+1, Cv). Depends on the image only, so callers may cache it."""
        return self.vision_model(pixel_values)

    # ---- 2.+3. Q-Former and projection --------------------------------------------------
    def visual_features(
        self,
        image_embeds: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        output_cross_attentions: bool = False,
    ) -> VisualFeatures:
        """image_embeds (B, N+1, Cv) [+ instruction ids (B, Tq)] -> soft prompt (B, Q, C_llm)."""
        B = image_embeds.shape[0]
        queries = self.query_tokens.expand(B, -1, -1)  # (B, Q, Cq)
        mask = None
        if self.is_instruction_aware:
            if qformer_input_ids is None:
                raise ValueError("InstructBLIP needs the instruction for its Q-Former (qformer_input_ids)")
            if qformer_attention_mask is None:
                qformer_attention_mask = torch.ones_like(qformer_input_ids)
            query_mask = torch.ones(queries.shape[:2], dtype=qformer_attention_mask.dtype, device=queries.device)
            mask = torch.cat([query_mask, qformer_attention_mask.to(queries.device)], dim=1)  # (B, Q + Tq)
        else:
            qformer_input_ids = None  # BLIP-2: queries only
        hidden, cross = self.qformer(
            queries, image_embeds, qformer_input_ids, mask, need_weights=output_cross_attentions
        )  # (B, Q + Tq, Cq)
        query_output = hidden[:, : queries.shape[1]]  # (B, Q, Cq)
        language_inputs = self.language_projection(query_output.to(self.language_projection.weight.dtype))
        return VisualFeatures(language_inputs, query_output, cross)

    # ---- 4. LLM inputs -----------------------------------------------------------------
    def embed_with_visual_prompt(
        self, visual: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[visual (B, Q, C) ; embed(input_ids) (B, T, C)] -> embeds (B, Q + T, C), mask (B, Q + T)."""
        embed = self.language_model.get_input_embeddings()
        text = embed(input_ids)  # (B, T, C)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        visual = visual.to(device=text.device, dtype=text.dtype)
        ones = torch.ones(visual.shape[:2], dtype=attention_mask.dtype, device=text.device)
        return torch.cat([visual, text], dim=1), torch.cat([ones, attention_mask.to(text.device)], dim=1)

    def visual_prompt(
        self,
        pixel_values: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Steps 1-3 for images (B, 3, H, W) or videos (B, F, 3, H, W) -> soft prompt (B, F*Q, C_llm).

        Video, as in the paper: every frame goes through the image encoder and the Q-Former with
        the same instruction; the frames' query outputs are concatenated (no temporal embedding).
        `image_embeds` may be given instead of pixels: (B, N, Cv) or (B, F, N, Cv).
        """
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or precomputed image_embeds")
            frames = pixel_values.shape[1] if pixel_values.dim() == 5 else 1
            image_embeds = self.encode_images(pixel_values.flatten(0, 1) if pixel_values.dim() == 5 else pixel_values)
        else:
            frames = image_embeds.shape[1] if image_embeds.dim() == 4 else 1
            if image_embeds.dim() == 4:
                image_embeds = image_embeds.flatten(0, 1)  # (B*F, N, Cv)
        if frames > 1 and qformer_input_ids is not None:
            qformer_input_ids = qformer_input_ids.repeat_interleave(frames, dim=0)  # (B*F, Tq)
            if qformer_attention_mask is not None:
                qformer_attention_mask = qformer_attention_mask.repeat_interleave(frames, dim=0)
        visual = self.visual_features(image_embeds, qformer_input_ids, qformer_attention_mask).language_inputs  # (B*F, Q, C)
        return visual.reshape(-1, frames * visual.shape[1], visual.shape[2])  # (B, F*Q, C)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        visual: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> ModelOutput:
        """
        pixel_values: (B, 3, H, W), or (B, F, 3, H, W) for F video frames.
        input_ids (B, T): the LLM prompt (decoder-only: prompt + answer; encoder-decoder: encoder text).
        labels: decoder-only (B, T) aligned with input_ids, IGNORE_INDEX where no loss is wanted;
                encoder-decoder (B, T_dec), the target text.
        return_logits=False (training, with labels): the loss alone, from `losses.decoder_lm_loss`,
                which skips the padding and the LM head where no label is predicted (logits=None).
        """
        if visual is None:  # else: the soft prompt was computed already (cached, or shared by candidates)
            visual = self.visual_prompt(pixel_values, qformer_input_ids, qformer_attention_mask, image_embeds)  # (B, Q, C)
        inputs_embeds, mask = self.embed_with_visual_prompt(visual, input_ids, attention_mask)  # (B, Q+T, C)
        if self.is_encoder_decoder:
            out = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                labels=labels,
            )
            return ModelOutput(logits=out.logits, loss=out.loss)
        # Positions count only kept tokens, so left padding does not shift the prompt.
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if labels is not None:
            prefix = torch.full(visual.shape[:2], IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
            full = torch.cat([prefix, labels.to(prefix.device)], dim=1)  # (B, Q + T)
            if not return_logits:
                return ModelOutput(logits=None, loss=decoder_lm_loss(self.language_model, inputs_embeds, mask, position_ids, full))
        logits = self.language_model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids).logits
        loss = None
        if labels is not None:
            # token t predicts token t+1
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), full[:, 1:].flatten().to(logits.device), ignore_index=IGNORE_INDEX
            )
        return ModelOutput(logits=logits, loss=loss)

    # ---- decoding ------------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        visual: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Decode with the LLM's own transformers `generate` (greedy, beams, sampling, penalties).

        Returns only the new tokens, (B * num_return_sequences, T_new). `visual` (B, Q, C_llm)
        may be passed precomputed (e.g. cached across chat turns).
        """
        if visual is None:
            visual = self.visual_prompt(pixel_values, qformer_input_ids, qformer_attention_mask, image_embeds)
        inputs_embeds, mask = self.embed_with_visual_prompt(visual, input_ids, attention_mask)
        inputs = {"inputs_embeds": inputs_embeds, "attention_mask": mask}
        if self.is_encoder_decoder:
            out = self.language_model.generate(**inputs, **generate_kwargs)
            return out[:, 1:]  # drop the decoder start token
        prompt_len = inputs_embeds.shape[1]
        if self.config.image_token_index is not None:
            # Give generate the token ids too (the visual slots as `<image>`), so that the
            # repetition penalty sees the prompt exactly as the reference implementation does.
            slots = torch.full(visual.shape[:2], self.config.image_token_index, dtype=input_ids.dtype, device=input_ids.device)
            inputs["input_ids"] = torch.cat([slots, input_ids], dim=1)
        out = self.language_model.generate(**inputs, **generate_kwargs)
        return out[:, prompt_len:] if "input_ids" in inputs else out

    # ---- training helpers ------------------------------------------------------------------
    def freeze_for_instruction_tuning(self, train_vision: bool = False) -> None:
        """Paper default: only the Q-Former, queries and projection learn; ViT and LLM stay frozen."""
        for p in self.vision_model.parameters():
            p.requires_grad_(train_vision)
        for p in self.language_model.parameters():
            p.requires_grad_(False)
        for module in (self.qformer, self.language_projection):
            for p in module.parameters():
                p.requires_grad_(True)
        self.query_tokens.requires_grad_(True)

    def gradient_checkpointing_enable(self) -> None:
        self.vision_model.encoder.gradient_checkpointing = True
        self.qformer.encoder.gradient_checkpointing = True
        self.language_model.gradient_checkpointing_enable()
