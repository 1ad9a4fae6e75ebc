"""8-bit and 4-bit loading for real through bitsandbytes on the CPU."""

import bitsandbytes as bnb
import pytest
import torch
from PIL import Image

from instructblip_core import GenerationOptions, load_pretrained
from instructblip_core.quantization import weight_bytes

# An LLM big enough that its linear layers dominate, as in any real LLM (embeddings ~5%).
SIZES = dict(llm_layers=4, llm_hidden=256, llm_intermediate=512)
PROMPT = "what colour is the big square?"
LIMITS = {8: 0.55, 4: 0.40}  # LLM weight bytes relative to its fp16 footprint


@pytest.fixture(scope="module")
def folder(tiny_checkpoints):
    return tiny_checkpoints("instructblip-llama", **SIZES)


@pytest.fixture(scope="module")
def reference(folder):
    return load_pretrained(folder)  # fp32


def first_token(model) -> int:
    batch = model.prepare(Image.new("RGB", (40, 40), (200, 30, 30)), PROMPT)
    options = model.generation_kwargs(GenerationOptions(max_new_tokens=1, min_new_tokens=1))
    return model.model.generate_ids(**batch, **options)[0, 0].item()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_loading(folder, reference, bits):
    model = load_pretrained(folder, load_in_8bit=bits == 8, load_in_4bit=bits == 4)
    lm = model.model.language_model
    quantized_type = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    float_linears = [n for n, m in reference.model.language_model.named_modules() if isinstance(m, torch.nn.Linear)]
    quantized = [n for n, m in lm.named_modules() if isinstance(m, quantized_type)]
    # Every linear layer of the LLM but the output head is quantised.
    assert sorted(quantized) == sorted(n for n in float_linears if not n.endswith("lm_head"))
    assert len(quantized) == 4 * 7
    # Vision encoder and Q-Former are untouched floats.
    assert not any(isinstance(m, quantized_type) for m in model.model.vision_model.modules())
    assert not any(isinstance(m, quantized_type) for m in model.model.qformer.modules())
    assert model.model.qformer.encoder.layer[0].attention.attention.query.weight.dtype == torch.float32

    fp16_bytes = sum(p.numel() for p in reference.model.language_model.parameters()) * 2
    ratio = weight_bytes(lm) / fp16_bytes
    print(f"{bits}-bit LLM weights: {ratio:.3f} x fp16")
    assert ratio <= LIMITS[bits]

    # Greedy decoding still starts where the fp32 model starts.
    assert first_token(model) == first_token(reference)
    assert model.generate(Image.new("RGB", (40, 40), "blue"), PROMPT, max_new_tokens=8)[0]


def test_quantized_model_cannot_be_saved_silently(folder, tmp_path):
    from instructblip_core import CheckpointError

    model = load_pretrained(folder, load_in_4bit=True)
    with pytest.raises(CheckpointError, match="8-bit/4-bit"):
        model.save_pretrained(tmp_path / "out")


def test_8bit_and_4bit_together_is_an_error(folder):
    with pytest.raises(ValueError, match="not both"):
        load_pretrained(folder, load_in_8bit=True, load_in_4bit=True)
