"""Configuration of InstructBLIP / BLIP-2, read from and written to Hugging Face `config.json`.

The vision encoder and the Q-Former are ours, so their settings are plain dataclasses. The
frozen LLM is a transformers model, so its settings stay a transformers `PretrainedConfig`
(`text_config`) and are passed through untouched.

Field names equal the keys of the Hugging Face configs, so a `config.json` written by
transformers loads here and ours loads there. Keys we do not use are kept in `extra` and
written back, so a round trip loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

INSTRUCTBLIP = "instructblip"
BLIP2 = "blip-2"
MODEL_TYPES = (INSTRUCTBLIP, BLIP2)


def _split_known(cls, data: dict) -> tuple[dict, dict]:
    """Split a config dict into the fields `cls` declares and everything else."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names}
    return known, extra


@dataclass
class VisionConfig:
    """EVA-CLIP style ViT (defaults: ViT-g/14 of the official checkpoints)."""

    hidden_size: int = 1408  # width of every token
    intermediate_size: int = 6144  # MLP hidden width
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224  # square input side in pixels
    patch_size: int = 14  # 224 / 14 = 16 -> 256 patches + CLS = 257 tokens
    hidden_act: str = "gelu"  # exact (erf) GELU
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    qkv_bias: bool = True  # q and v biases (the k slice of the fused bias is zero in the checkpoints)
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.patches_per_side = self.image_size // self.patch_size  # the patch grid is square
        self.num_patches = self.patches_per_side**2
        self.num_positions = self.num_patches + 1  # + CLS

    @classmethod
    def from_dict(cls, data: dict) -> "VisionConfig":
        known, extra = _split_known(cls, data)
        return cls(**known, extra=extra)

    def to_dict(self, model_type: str) -> dict:
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        out["model_type"] = "instructblip_vision_model" if model_type == INSTRUCTBLIP else "blip_2_vision_model"
        return out


@dataclass
class QFormerConfig:
    """BERT-base Q-Former (defaults: the official checkpoints)."""

    vocab_size: int = 30522  # BERT vocabulary (+ [DEC] in the InstructBLIP checkpoints: 30523)
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_frequency: int = 2  # layers 0, 2, 4, ... cross-attend to the image
    encoder_hidden_size: int = 1408  # width of the image tokens; always set from the vision config
    # InstructBLIP feeds the instruction to the Q-Former (it owns word/position embeddings);
    # BLIP-2's Q-Former sees only the queries.
    use_text_input: bool = True
    # BLIP-2 only: whether the layers carry the text feed-forward (needed by stage-1 training).
    use_qformer_text_input: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"Q-Former hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def has_text_ffn(self) -> bool:
        return self.use_text_input or self.use_qformer_text_input

    def has_cross_attention(self, layer_idx: int) -> bool:
        return layer_idx % self.cross_attention_frequency == 0

    @classmethod
    def from_dict(cls, data: dict, *, use_text_input: bool) -> "QFormerConfig":
        known, extra = _split_known(cls, data)
        known.pop("use_text_input", None)
        return cls(**known, use_text_input=use_text_input, extra=extra)

    def to_dict(self, model_type: str) -> dict:
        out = dict(self.extra)
        skip = {"extra", "use_text_input"} | ({"use_qformer_text_input"} if model_type == INSTRUCTBLIP else set())
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip})
        out["model_type"] = "instructblip_qformer" if model_type == INSTRUCTBLIP else "blip_2_qformer"
        return out


@dataclass
class InstructBlipConfig:
    """Whole-model configuration: vision encoder + Q-Former + projection + frozen LLM."""

    model_type: str = INSTRUCTBLIP  # "instructblip" or "blip-2"
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    qformer_config: QFormerConfig = field(default_factory=QFormerConfig)
    text_config: PretrainedConfig | None = None  # the LLM's own transformers config
    num_query_tokens: int = 32  # learned queries = visual tokens handed to the LLM
    image_token_index: int | None = None  # LLM id of the `<image>` placeholder, when the tokenizer has one
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.text_config is None:
            self.text_config = AutoConfig.for_model("opt")
        # Derived once: the Q-Former's cross-attention width follows the vision encoder.
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        self.qformer_config.use_text_input = self.model_type == INSTRUCTBLIP
        self.is_encoder_decoder = bool(self.text_config.is_encoder_decoder)
        if not self.is_encoder_decoder and self.text_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"LLM type {self.text_config.model_type!r} is neither a causal LM nor encoder-decoder")

    @property
    def llm_hidden_size(self) -> int:
        return self.text_config.hidden_size if hasattr(self.text_config, "hidden_size") else self.text_config.d_model

    @classmethod
    def from_dict(cls, data: dict) -> "InstructBlipConfig":
        data = dict(data)
        model_type = data.pop("model_type", None)
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"config.json has model_type {model_type!r}; this loader reads InstructBLIP ('instructblip') "
                f"and BLIP-2 ('blip-2') checkpoints"
            )
        vision = VisionConfig.from_dict(data.pop("vision_config", None) or {})
        qformer = QFormerConfig.from_dict(data.pop("qformer_config", None) or {}, use_text_input=model_type == INSTRUCTBLIP)
        text = dict(data.pop("text_config", None) or {"model_type": "opt"})
        text_config = AutoConfig.for_model(text.pop("model_type", "opt"), **text)
        known, extra = _split_known(cls, data)
        for name in ("vision_config", "qformer_config", "text_config", "model_type"):
            known.pop(name, None)
        return cls(model_type=model_type, vision_config=vision, qformer_config=qformer, text_config=text_config, **known, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "InstructBlipConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        out = dict(self.extra)
        out.update(
            model_type=self.model_type,
            architectures=[
                "InstructBlipForConditionalGeneration" if self.model_type == INSTRUCTBLIP else "Blip2ForConditionalGeneration"
            ],
            vision_config=self.vision_config.to_dict(self.model_type),
            qformer_config=self.qformer_config.to_dict(self.model_type),
            text_config=self.text_config.to_dict(),
            num_query_tokens=self.num_query_tokens,
            image_token_index=self.image_token_index,
        )
        return out

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
