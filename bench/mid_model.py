"""A "mid" InstructBLIP of realistic shape, scaled down to run on 2 CPU cores, random weights.

ViT 24 x 1024 at 224 px (257 tokens), Q-Former BERT-base with 32 queries, a LLaMA LLM of
~370M parameters (1024 wide, 24 layers, 32k vocabulary). Saved by transformers itself, so our
loader and the reference read the very same files.
"""

from __future__ import annotations

from pathlib import Path

import common  # noqa: F401  (sets sys.path)
import torch
from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor, LlamaConfig
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from tiny_checkpoints import IMAGE_TOKEN, build_llm_tokenizer, build_qformer_tokenizer

VOCAB = 32000


def build_mid_checkpoint(folder: Path, *, llm_layers: int = 24, vit_layers: int = 24, seed: int = 0) -> Path:
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    llm_tok, qf_tok = build_llm_tokenizer("llama"), build_qformer_tokenizer()
    image_token = llm_tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816, num_hidden_layers=llm_layers,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
        bos_token_id=llm_tok.bos_token_id, eos_token_id=llm_tok.eos_token_id, pad_token_id=llm_tok.pad_token_id,
        tie_word_embeddings=False,
    )
    config = InstructBlipConfig(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vit_layers, num_attention_heads=16,
                           image_size=224, patch_size=14),
        qformer_config=dict(vocab_size=len(qf_tok), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, max_position_embeddings=512),
        text_config=text.to_dict(), num_query_tokens=32, image_token_index=image_token,
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(0, 0.02)  # HF inits them to zero; random is closer to a trained model
    model.save_pretrained(folder)
    image_processor = BlipImageProcessorPil(
        size={"height": 224, "width": 224}, resample=PILImageResampling.BICUBIC,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True,
    )
    InstructBlipProcessor(image_processor=image_processor, tokenizer=llm_tok, qformer_tokenizer=qf_tok,
                          num_query_tokens=32).save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder


def parameter_counts(folder: Path) -> dict[str, int]:
    from instructblip_core import load_pretrained

    model = load_pretrained(folder).model
    return {name: sum(p.numel() for p in getattr(model, name).parameters())
            for name in ("vision_model", "qformer", "language_model")}
