"""Parity with transformers' reference implementation on tiny random checkpoints.

The checkpoints are written by transformers' own `save_pretrained`; ours loads them through
`load_pretrained`. Same image, same prompt: logits within 1e-4 (fp32) and the same tokens
for greedy decoding and beam search.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

from instructblip_core import load_pretrained
from tiny_checkpoints import KINDS

PROMPT = "what colour is the square on the left?"
TOLERANCE = 1e-4


def reference_class(kind: str):
    return InstructBlipForConditionalGeneration if kind.startswith("instructblip") else Blip2ForConditionalGeneration


def make_image(seed: int = 0, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def load_both(folder, kind):
    reference = reference_class(kind).from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    ours = load_pretrained(folder)
    return reference, processor, ours


def reference_inputs(processor, image, prompt, kind):
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    return dict(inputs)


def reference_new_tokens(reference, inputs, **kwargs) -> list[list[int]]:
    out = reference.generate(**inputs, **kwargs)
    if reference.config.use_decoder_only_language_model:
        out = out[:, inputs["input_ids"].shape[1]:]  # transformers returns the prompt too
    else:
        out = out[:, 1:]  # decoder start token
    return out.tolist()


def strip_padding(rows: list[list[int]], pad_id: int) -> list[list[int]]:
    out = []
    for row in rows:
        while row and row[-1] == pad_id:
            row = row[:-1]
        out.append(row)
    return out


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tiny_checkpoints):
    kind = request.param
    folder = tiny_checkpoints(kind)
    return (kind, *load_both(folder, kind))


def test_inputs_match_the_reference_processor(pair):
    kind, reference, processor, ours = pair
    image = make_image()
    ref = reference_inputs(processor, image, PROMPT, kind)
    batch = ours.prepare(image, PROMPT)
    torch.testing.assert_close(batch["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)
    n_query = ours.config.num_query_tokens
    # transformers puts n_query `<image>` placeholders before the prompt; we prepend the soft prompt itself.
    assert batch["input_ids"].tolist() == ref["input_ids"][:, n_query:].tolist()
    if kind.startswith("instructblip"):
        assert batch["qformer_input_ids"].tolist() == ref["qformer_input_ids"].tolist()


def test_logits_match_reference(pair):
    kind, reference, processor, ours = pair
    image = make_image(1)
    ref_inputs = reference_inputs(processor, image, PROMPT, kind)
    batch = ours.prepare(image, PROMPT)
    extra = {}
    if ours.model.is_encoder_decoder:
        start = reference.config.text_config.decoder_start_token_id
        extra["decoder_input_ids"] = torch.tensor([[start, 5, 17, 33, 9]])
    with torch.no_grad():
        expected = reference(**ref_inputs, **extra).logits
        got = ours.model(**batch, **extra).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOLERANCE
    # Not vacuous: the image moves the logits far more than the tolerance.
    with torch.no_grad():
        other = ours.model(**ours.prepare(make_image(2), PROMPT), **extra).logits
    assert (other - got).abs().max().item() > 100 * TOLERANCE


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_matches_reference(pair, num_beams):
    kind, reference, processor, ours = pair
    image = make_image(3)
    ref_inputs = reference_inputs(processor, image, PROMPT, kind)
    kwargs = dict(max_new_tokens=20, num_beams=num_beams, do_sample=False)
    expected = reference_new_tokens(reference, ref_inputs, **kwargs)
    batch = ours.prepare(image, PROMPT)
    opts = ours.generation_kwargs(ours_options(num_beams))
    got = ours.model.generate_ids(**batch, **opts).tolist()
    pad = ours.processor.tokenizer.pad_token_id
    assert strip_padding(got, pad) == strip_padding(expected, pad)
    text = ours.generate(image, PROMPT, max_new_tokens=20, min_new_tokens=0, num_beams=num_beams)
    assert text == [t.strip() for t in processor.batch_decode(expected, skip_special_tokens=True)]
    assert len(expected[0]) > 1  # decoding went somewhere


def ours_options(num_beams):
    from instructblip_core import GenerationOptions

    return GenerationOptions(max_new_tokens=20, min_new_tokens=0, num_beams=num_beams)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_prompts_give_the_same_text_as_one_by_one(pair, num_beams):
    kind, _, _, ours = pair
    images = [make_image(10), make_image(11), make_image(12)]
    prompts = ["what is it?", "how many red circles are in the picture on the right side?", PROMPT]
    options = dict(max_new_tokens=12, min_new_tokens=0, num_beams=num_beams, repetition_penalty=1.5)
    batched = ours.generate(images, prompts, **options)
    single = [ours.generate(img, p, **options)[0] for img, p in zip(images, prompts)]
    assert batched == single
    assert len(set(single)) > 1  # different inputs, different answers: the comparison means something


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_keeps_the_reference_dtypes_and_logits(kind, dtype, tiny_checkpoints):
    """In fp16 transformers keeps some weights in fp32 (the query tokens, a BLIP-2 Q-Former,
    T5's `wo`, and by its name matching the Q-Former's word embeddings next to T5); in bf16
    it keeps none. Ours loads every weight in the reference's dtype, so the logits agree to
    the last bit the arithmetic allows and greedy decoding picks the same tokens."""
    folder = tiny_checkpoints(kind)
    reference = reference_class(kind).from_pretrained(folder, dtype=dtype).eval()
    ours = load_pretrained(folder, dtype=dtype)
    expected = {n: p.dtype for n, p in reference.named_parameters()}
    got = {n: p.dtype for n, p in ours.model.named_parameters()}
    assert {n: (got.get(n), d) for n, d in expected.items() if got.get(n) != d} == {}
    if dtype == torch.float16 and kind.endswith("t5"):
        assert got["language_model.encoder.block.0.layer.1.DenseReluDense.wo.weight"] == torch.float32
    processor = AutoProcessor.from_pretrained(folder)
    image = make_image(3)
    ref_inputs = reference_inputs(processor, image, PROMPT, kind)
    ref_inputs["pixel_values"] = ref_inputs["pixel_values"].to(dtype)
    expected_ids = reference_new_tokens(reference, ref_inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    expected_text = [t.strip() for t in processor.tokenizer.batch_decode(expected_ids, skip_special_tokens=True)]
    assert ours.generate(image, PROMPT, max_new_tokens=8, min_new_tokens=8) == expected_text
