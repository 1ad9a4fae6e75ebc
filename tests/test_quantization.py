"""8-bit and 4-bit loading for real through bitsandbytes on the CPU."""

import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
from finetune_fixtures import subprocess_env
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


# ---- T5's wo: kept out of quantisation by default (as transformers does), 4-bit on request ----
@pytest.fixture(scope="module")
def t5_folder(tiny_checkpoints):
    return tiny_checkpoints("instructblip-t5", **SIZES)


def wo_layers(llm) -> list[torch.nn.Module]:
    return [m for n, m in llm.named_modules() if n.endswith("DenseReluDense.wo")]


def test_t5_wo_can_be_quantized_in_4bit_and_then_matches_transformers_quantizing_it_too(t5_folder, monkeypatch):
    import transformers.models.t5.modeling_t5 as modeling_t5
    from transformers import AutoProcessor, BitsAndBytesConfig
    from transformers import InstructBlipForConditionalGeneration as Reference

    fp16_bytes = sum(p.numel() for p in load_pretrained(t5_folder).model.language_model.parameters()) * 2
    default = load_pretrained(t5_folder, dtype="bfloat16", load_in_4bit=True).model.language_model
    assert {type(m) for m in wo_layers(default)} == {torch.nn.Linear}  # transformers' rule: wo stays float
    ours = load_pretrained(t5_folder, dtype="bfloat16", load_in_4bit=True, quantize_fp32_modules=True)
    llm = ours.model.language_model
    assert len(wo_layers(llm)) == 8 and {type(m) for m in wo_layers(llm)} == {bnb.nn.Linear4bit}
    ratio, default_ratio = weight_bytes(llm) / fp16_bytes, weight_bytes(default) / fp16_bytes
    print(f"4-bit T5 weights: {default_ratio:.3f} x fp16 with wo in bf16, {ratio:.3f} with wo in 4-bit")
    assert ratio < default_ratio - 0.08

    # transformers quantises wo too once T5 no longer lists it as kept in fp32: same tokens.
    monkeypatch.setattr(modeling_t5.T5PreTrainedModel, "_keep_in_fp32_modules", [])
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=["vision_model", "qformer", "language_projection", "lm_head"],
    )
    reference = Reference.from_pretrained(t5_folder, dtype=torch.bfloat16, quantization_config=quantization).eval()
    assert len(wo_layers(reference.language_model)) == 8
    assert {type(m) for m in wo_layers(reference.language_model)} == {bnb.nn.Linear4bit}
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    batch = ours.prepare(image, PROMPT)
    options = ours.generation_kwargs(GenerationOptions(max_new_tokens=8, min_new_tokens=8))
    ours_ids = ours.model.generate_ids(**batch, **options)[0].tolist()
    inputs = AutoProcessor.from_pretrained(t5_folder)(images=image, text=PROMPT, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    reference_ids = reference.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, num_beams=1)[0].tolist()
    assert reference_ids[1:] == ours_ids  # the reference's first id is T5's decoder start


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(dtype="bfloat16", load_in_8bit=True), "needs load_in_4bit: bitsandbytes' 8-bit matmul computes in fp16"),
    (dict(dtype="float16", load_in_4bit=True), "needs dtype=bfloat16: this LLM keeps wo in fp32"),
    (dict(dtype="bfloat16"), "needs load_in_4bit"),
])
def test_quantizing_t5_wo_where_it_would_overflow_fp16_is_refused_with_the_reason(t5_folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_pretrained(t5_folder, quantize_fp32_modules=True, **kwargs)


# ---- without bitsandbytes: a float model saves and generates; asking for 8-bit says what is missing ----
WITHOUT_BITSANDBYTES = """
import sys
sys.modules["bitsandbytes"] = None  # `import bitsandbytes` now raises ImportError, as where it is not installed
from PIL import Image
from instructblip_core import load_pretrained
model = load_pretrained(sys.argv[1])
model.save_pretrained(sys.argv[2])
print("answer:", model.generate(Image.new("RGB", (40, 40), "blue"), "what colour?", max_new_tokens=4)[0])
try:
    load_pretrained(sys.argv[1], load_in_8bit=True)
except ImportError as e:
    print("8-bit:", e)
"""


def test_a_float_model_needs_no_bitsandbytes_to_save_and_generate(folder, tmp_path):
    done = subprocess.run([sys.executable, "-c", WITHOUT_BITSANDBYTES, str(folder), str(tmp_path / "saved")],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "answer:" in done.stdout
    assert (tmp_path / "saved" / "model.safetensors").exists()
    assert "8-bit: 8-bit / 4-bit loading needs bitsandbytes: pip install bitsandbytes" in done.stdout
