"""Candidate ranking equals log-likelihoods computed independently from the model's logits,
in one LLM pass per image (the encoder once for encoder-decoder LLMs)."""

import pytest
import torch
import torch.nn.functional as F

from engine_helpers import coloured, count_calls
from instructblip_core import GenerationOptions, load_pretrained

PROMPT = "Question: what colour is the square? Answer:"
CANDIDATES = ["red", "blue", "a big green square", "yellow"]


@pytest.fixture(scope="module", params=["instructblip-llama", "instructblip-opt", "instructblip-t5", "blip2-t5"])
def model(request, tiny_checkpoints):
    return load_pretrained(tiny_checkpoints(request.param))


def independent_log_likelihood(model, image, prompt, candidate) -> float:
    """One candidate on its own: full forward pass, log-softmax, sum over the answer tokens."""
    batch = model.prepare(image, prompt)
    answer = model.processor.encode_answer(prompt, candidate)
    with torch.no_grad():
        if model.model.is_encoder_decoder:
            labels = torch.tensor([answer])
            logits = model.model(**batch, labels=labels).logits[0]  # (T_dec, V)
            targets = answer
        else:
            input_ids = torch.cat([batch["input_ids"], torch.tensor([answer])], dim=1)
            logits = model.model(**{**batch, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}).logits[0]
            start = logits.shape[0] - len(answer) - 1  # the position predicting the first answer token
            logits = logits[start:-1]
            targets = answer
    logprobs = F.log_softmax(logits.float(), dim=-1)
    return sum(logprobs[i, t].item() for i, t in enumerate(targets))


def test_scores_equal_independent_log_likelihoods(model):
    image = coloured("red")
    scores = model.score_candidates(image, PROMPT, CANDIDATES)
    for candidate, total, mean, n in zip(CANDIDATES, scores.sum, scores.mean, scores.num_tokens):
        expected = independent_log_likelihood(model, image, PROMPT, candidate)
        assert total == pytest.approx(expected, abs=1e-4)
        assert n == len(model.processor.encode_answer(PROMPT, candidate))
        assert mean == pytest.approx(total / n, abs=1e-6)
    assert model.rank_candidates(image, PROMPT, CANDIDATES) == scores.sum
    assert model.rank_candidates(image, PROMPT, CANDIDATES, reduction="mean") == scores.mean
    assert len(set(round(s, 4) for s in scores.sum)) == len(CANDIDATES)  # they really differ


def test_one_llm_pass_per_image(model):
    lm = model.model.language_model
    counted = lm.get_encoder() if model.model.is_encoder_decoder else lm
    with count_calls(counted) as calls:
        model.score_candidates(coloured("blue"), PROMPT, CANDIDATES)
    assert calls[0] == 1


def test_encode_answer_matches_generation_tokens(model):
    """The answer tokens ranking scores are the ones greedy decoding produces for that text."""
    image = coloured("green")
    batch = model.prepare(image, PROMPT)
    opts = model.generation_kwargs(GenerationOptions(max_new_tokens=6, min_new_tokens=6))
    generated = model.model.generate_ids(**batch, **opts)[0].tolist()
    text = model.processor.decode(torch.tensor([generated]))[0]
    answer_ids = model.processor.encode_answer(PROMPT, text)[:-1]  # without EOS
    assert model.processor.tokenizer.decode(answer_ids, skip_special_tokens=True).strip() == text


def test_no_candidates_is_an_error(model):
    with pytest.raises(ValueError, match="no candidates"):
        model.rank_candidates(coloured("red"), PROMPT, [])
