"""Sizes of the small InstructBLIP and the assembly of its first checkpoint.

The sizes follow the compute budget (../shared/DESIGN.md section 4): 64 px images in 8 px
patches (64 patches + CLS), a 4-layer 128-wide ViT, a 4-layer 128-wide Q-Former with 16
query tokens for the 65 image tokens (a bottleneck, so that reading the instruction has
something to gain; the fourth build's 8 scored within noise of 16, and 16 showed the
instruction-aware effect more clearly) and a 4-layer 192-wide LLaMA. About 4.6M parameters,
18 MB in fp32.
"""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from instructblip_core.config import InstructBlipConfig, QFormerConfig, VisionConfig
from instructblip_core.images import ImageProcessor
from instructblip_core.model import InstructBlipForConditionalGeneration
from instructblip_core.pipeline import InstructBlip
from instructblip_core.processing import Processor
from instructblip_core.prompts import TEMPLATE_KEY, PromptTemplate
from instructblip_core.vision import VisionModel

from .tokenizers import IMAGE_TOKEN

IMAGE_SIZE = 64
NUM_QUERY_TOKENS = 16


def vision_config() -> VisionConfig:
    return VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                        image_size=IMAGE_SIZE, patch_size=8, layer_norm_eps=1e-6)


def qformer_config(vocab_size: int) -> QFormerConfig:
    return QFormerConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=512, max_position_embeddings=96, cross_attention_frequency=2)


def llm_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def image_processor() -> ImageProcessor:
    return ImageProcessor(size=(IMAGE_SIZE, IMAGE_SIZE))


def match_word_embedding_scale(model: InstructBlipForConditionalGeneration) -> None:
    """Scale the fresh projection so the soft prompt starts at the size of the LLM's word vectors.

    The Q-Former's output is layer-normed (norm about sqrt(width) = 11), and a default-initialised
    projection keeps that size, while this LLM's pretrained word embeddings have norm about 0.3.
    Tokens 30x larger than any it was trained on sit in the frozen LLM's residual stream almost
    untouched by its layers; starting at the words' scale lets the LLM read them like words.
    """
    import torch

    projection = model.language_projection
    with torch.no_grad():
        words = model.language_model.get_input_embeddings().weight.norm(dim=-1).mean()
        probe = torch.nn.functional.layer_norm(torch.randn(1024, projection.in_features), (projection.in_features,))
        soft = projection(probe).norm(dim=-1).mean()
        projection.weight.mul_(words / soft)
        projection.bias.zero_()


def assemble(
    folder: Path,
    vision: VisionModel,
    llm: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    qformer_tokenizer: PreTrainedTokenizerBase,
) -> Path:
    """The first full checkpoint: pretrained ViT and LLM, a not yet trained Q-Former and projection."""
    config = InstructBlipConfig(
        model_type="instructblip",
        vision_config=vision.config,
        qformer_config=qformer_config(len(qformer_tokenizer)),
        text_config=llm.config,
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        extra={TEMPLATE_KEY: PromptTemplate().to_dict()},
    )
    model = InstructBlipForConditionalGeneration(config, language_model=llm)
    model.vision_model.load_state_dict(vision.state_dict())
    match_word_embedding_scale(model)
    processor = Processor(image_processor(), tokenizer, qformer_tokenizer, NUM_QUERY_TOKENS, is_encoder_decoder=False)
    InstructBlip(model, processor).save_pretrained(folder)
    return folder
