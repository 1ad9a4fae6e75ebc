"""The tiny random checkpoints load and run in transformers exactly like hub checkpoints.

The parity tests trust these folders as the reference, so here we check them against
transformers itself: reload, processor round trip, forward, generate, special tokens.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the network

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoProcessor,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
)

try:  # tests/ as a package (repo root on sys.path) or as a plain folder (pytest rootdir insertion)
    from tests.tiny_checkpoints import IMAGE_TOKEN, KINDS, NUM_QUERY_TOKENS, build_tiny_checkpoint
except ImportError:
    from tiny_checkpoints import IMAGE_TOKEN, KINDS, NUM_QUERY_TOKENS, build_tiny_checkpoint

PROMPT = "what colour is the square?"

# Special-token ids of the real families (see tiny_checkpoints._FAMILIES).
EXPECTED_IDS = {
    "llama": dict(unk=0, bos=1, eos=2, pad=3),
    "opt": dict(pad=1, bos=2, eos=2, unk=3),
    "t5": dict(pad=0, eos=1, unk=2, bos=None),
}


def _family(kind):
    return kind.split("-")[1]


def _model_class(kind):
    return InstructBlipForConditionalGeneration if kind.startswith("instructblip") else Blip2ForConditionalGeneration


def _image():
    """A deterministic non-square RGB image, so resizing is exercised."""
    pixels = (np.arange(40 * 36 * 3).reshape(40, 36, 3) * 7 % 256).astype("uint8")
    return Image.fromarray(pixels)


@pytest.fixture(scope="module", params=KINDS)
def checkpoint(request, tmp_path_factory):
    kind = request.param
    folder = build_tiny_checkpoint(kind, tmp_path_factory.mktemp(kind))
    return kind, folder


@pytest.fixture(scope="module")
def loaded(checkpoint):
    kind, folder = checkpoint
    model = _model_class(kind).from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    return kind, folder, model, processor


def test_folder_layout(checkpoint):
    kind, folder = checkpoint
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "processor_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    if kind.startswith("instructblip"):
        expected |= {"qformer_tokenizer/tokenizer.json", "qformer_tokenizer/tokenizer_config.json"}
    assert files == expected


def test_processor_class_and_image_token(loaded):
    kind, _, model, processor = loaded
    expected_cls = InstructBlipProcessor if kind.startswith("instructblip") else Blip2Processor
    assert type(processor) is expected_cls
    assert processor.num_query_tokens == NUM_QUERY_TOKENS == model.config.num_query_tokens

    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == model.config.image_token_index
    assert model.config.text_config.vocab_size == len(tokenizer) == image_id + 1

    inputs = processor(images=_image(), text=PROMPT, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 28, 28)
    ids = inputs["input_ids"][0].tolist()
    assert ids[:NUM_QUERY_TOKENS] == [image_id] * NUM_QUERY_TOKENS  # placeholders come before BOS
    assert ids.count(image_id) == NUM_QUERY_TOKENS


def _forward_inputs(model, inputs):
    """T5 needs decoder input ids for a plain forward; start from decoder_start_token_id."""
    if model.config.use_decoder_only_language_model:
        return dict(inputs)
    start = model.config.text_config.decoder_start_token_id
    return dict(inputs, decoder_input_ids=torch.tensor([[start]]))


def test_forward_and_generate(loaded):
    _, _, model, processor = loaded
    inputs = processor(images=_image(), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**_forward_inputs(model, inputs)).logits
    assert logits.shape[-1] == model.config.text_config.vocab_size
    assert torch.isfinite(logits).all()
    assert logits.std() > 1e-3  # random weights, not a degenerate all-equal output

    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    prompt = inputs["input_ids"]
    if model.config.use_decoder_only_language_model:
        # transformers 5.23 returns prompt (incl. <image> placeholders) + new tokens.
        assert torch.equal(out[:, : prompt.shape[1]], prompt)
        assert 0 < out.shape[1] - prompt.shape[1] <= 5
    else:
        # T5: decoder output only, starting with decoder_start_token_id.
        assert out[0, 0].item() == model.config.text_config.decoder_start_token_id
        assert 1 < out.shape[1] <= 6
    assert isinstance(processor.batch_decode(out, skip_special_tokens=True)[0], str)


def test_llm_tokenizer_special_tokens(loaded):
    kind, _, model, processor = loaded
    tokenizer, expected, text_config = processor.tokenizer, EXPECTED_IDS[_family(kind)], model.config.text_config
    for name, token_id in expected.items():
        assert getattr(tokenizer, f"{name}_token_id") == token_id, name
    assert text_config.eos_token_id == expected["eos"]
    assert text_config.pad_token_id == expected["pad"]

    ids = tokenizer(PROMPT).input_ids
    if _family(kind) == "t5":
        assert tokenizer.padding_side == "right"
        assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[:-1]
        assert text_config.decoder_start_token_id == tokenizer.pad_token_id
    else:
        assert tokenizer.padding_side == "left"
        assert ids[0] == tokenizer.bos_token_id and ids[-1] != tokenizer.eos_token_id
        assert text_config.bos_token_id == expected["bos"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT


def test_llm_tokenizer_round_trip_and_padding(loaded):
    _, _, _, processor = loaded
    tokenizer = processor.tokenizer
    text = "Is there a Zebra next to 3 red squares?\nNo, a cat."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids  # every printable ASCII character is in the alphabet
    assert tokenizer.decode(ids) == text
    assert 150 <= len(tokenizer) <= 300

    batch = tokenizer(["a cat", "a big red square"], padding=True, return_tensors="pt")
    pad_column = 0 if tokenizer.padding_side == "left" else -1
    assert batch["input_ids"][0, pad_column] == tokenizer.pad_token_id
    assert batch["attention_mask"][0, pad_column] == 0


@pytest.mark.parametrize("kind", [k for k in KINDS if k.startswith("instructblip")])
def test_qformer_tokenizer(kind, tmp_path):
    folder = build_tiny_checkpoint(kind, tmp_path / kind)
    model = _model_class(kind).from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    tokenizer = processor.qformer_tokenizer
    assert len(tokenizer) == model.config.qformer_config.vocab_size
    assert tokenizer.pad_token_id == 0
    assert tokenizer.bos_token == "[DEC]" and tokenizer.bos_token_id == len(tokenizer) - 1
    assert tokenizer.truncation_side == "left"

    tokens = tokenizer.convert_ids_to_tokens(tokenizer("What Colour is the SQUARE?").input_ids)
    assert tokens == ["[CLS]", "what", "colour", "is", "the", "square", "?", "[SEP]"]

    long_text = "describe the image in detail . " * 3 + "what colour is the square ?"
    ids = tokenizer(long_text, truncation=True, max_length=8).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "what", "colour", "is", "the", "square", "?", "[SEP]"]


def test_weights_are_random_and_nontrivial(checkpoint):
    _, folder = checkpoint
    with safe_open(folder / "model.safetensors", "pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if not tensor.is_floating_point():
                continue
            assert tensor.std() > 0.005 or tensor.numel() == 1, key  # no all-zero / constant tensor
            if "norm" in key.lower() and key.endswith("weight"):
                assert (tensor.mean() - 1).abs() < 0.05, key  # norm gains stay near 1
            else:
                assert tensor.abs().mean() < 0.5, key  # std 0.02 or 1/sqrt(fan_in)


def test_deterministic_per_seed(tmp_path):
    kind = "instructblip-opt"
    first = build_tiny_checkpoint(kind, tmp_path / "a", seed=3)
    second = build_tiny_checkpoint(kind, tmp_path / "b", seed=3)
    other = build_tiny_checkpoint(kind, tmp_path / "c", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "qformer_tokenizer/tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_global_rng_untouched(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_checkpoint("blip2-opt", tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_llm_size_arguments(tmp_path):
    folder = build_tiny_checkpoint("instructblip-t5", tmp_path, llm_layers=1, llm_hidden=32, llm_intermediate=48)
    text_config = InstructBlipForConditionalGeneration.config_class.from_pretrained(folder).text_config
    assert (text_config.num_layers, text_config.d_model, text_config.d_ff) == (1, 32, 48)
    assert text_config.feed_forward_proj == "gated-gelu"


def test_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown kind"):
        build_tiny_checkpoint("instructblip-gpt2", tmp_path)
