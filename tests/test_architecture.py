"""Architecture fidelity: on the meta device (no memory), our parameter names and shapes equal
transformers' for the official configurations, so the real checkpoints load strictly."""

import pytest
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    InstructBlipConfig as HFInstructBlipConfig,
    InstructBlipForConditionalGeneration as HFInstructBlip,
    LlamaConfig,
    OPTConfig,
    T5Config,
)

from instructblip_core import InstructBlipConfig
from instructblip_core.loading import build_empty_model

VICUNA_7B = LlamaConfig(
    vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
FLAN_T5_XL = T5Config(
    vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False,
)
OPT_2_7B = OPTConfig(
    vocab_size=50304, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
    word_embed_proj_dim=2560,
)

OFFICIAL = {
    "instructblip-vicuna-7b": (HFInstructBlipConfig, HFInstructBlip, VICUNA_7B, {"vocab_size": 30523}),
    "instructblip-flan-t5-xl": (HFInstructBlipConfig, HFInstructBlip, FLAN_T5_XL, {"vocab_size": 30523}),
    "blip2-opt-2.7b": (Blip2Config, Blip2ForConditionalGeneration, OPT_2_7B, {}),
    "blip2-flan-t5-xl": (Blip2Config, Blip2ForConditionalGeneration, FLAN_T5_XL, {}),
}


def shapes(module: torch.nn.Module) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_parameter_names_and_shapes_equal_transformers(name):
    config_cls, model_cls, text_config, qformer = OFFICIAL[name]
    hf_config = config_cls(text_config=text_config.to_dict(), qformer_config=qformer, num_query_tokens=32)
    with torch.device("meta"):
        reference = model_cls(hf_config)
    ours = build_empty_model(InstructBlipConfig.from_dict(hf_config.to_dict()))
    ref_shapes, our_shapes = shapes(reference), shapes(ours)
    assert sorted(set(ref_shapes) - set(our_shapes)) == []
    assert sorted(set(our_shapes) - set(ref_shapes)) == []
    assert our_shapes == ref_shapes
    # The official sizes, spelled out: ViT-g 1408 x 39 with 257 tokens, BERT-base Q-Former, 32 queries.
    assert ours.vision_model.embeddings.position_embedding.shape == (1, 257, 1408)
    assert len(ours.vision_model.encoder.layers) == 39
    assert ours.query_tokens.shape == (1, 32, 768)
    assert len(ours.qformer.encoder.layer) == 12
    crossing = [i for i, layer in enumerate(ours.qformer.encoder.layer) if layer.has_cross_attention]
    assert crossing == [0, 2, 4, 6, 8, 10]
