"""Evaluation metrics (VQA normalisation and accuracy, exact match, ranking accuracy, CIDEr-D)
on hand-checkable cases, and the LM losses against a hand computation on a tiny model's logits."""

import itertools
import math

import pytest
import torch

from instructblip_core import load_pretrained
from instructblip_core.losses import answer_log_likelihoods, lm_loss
from instructblip_core.metrics import (
    caption_tokens,
    cider,
    exact_match,
    mean_accuracy,
    mean_exact_match,
    mean_vqa_accuracy,
    normalize_answer,
    ranking_accuracy,
    vqa_accuracy,
)
from instructblip_core.model import IGNORE_INDEX

# ----------------------------------------------------------------------------- VQA normalisation


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Two dogs.", "2 dogs"),  # number word -> digit, final period dropped
        ("none", "0"),
        ("ten", "10"),
        ("The cat", "cat"),  # articles go
        ("a", ""),
        ("an apple", "apple"),
        ("dont know", "don't know"),  # a dropped apostrophe is restored
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("somebodyd", "somebody'd"),
        ("its", "its"),  # an ordinary word that is also an apostrophe-less contraction stays
        ("im", "im"),  # the official table keys "Im" with a capital I, so it never applies
        ("I'm", "i'm"),
        ("yes!", "yes"),
        ("Yes.", "yes"),
        ("e.g.", "eg"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # digit,digit: every mark is deleted, not spaced
        ("t-shirt", "t shirt"),  # a mark inside a word becomes a space
        ("left - right", "left right"),  # a mark next to a space is deleted
        ("red, white and blue", "red white and blue"),
        ("(a) red", "red"),  # multiple-choice letter: "(" -> space, ") " deleted, "a" is an article
        ("  Two\tcats\n", "2 cats"),
        ("UPPER Case", "upper case"),
    ],
)
def test_vqa_answer_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


# ----------------------------------------------------------------------------- VQA accuracy


def official_by_subsets(prediction: str, answers: list[str]) -> float:
    """The VQA rule spelled out: over all 10-choose-9 annotator subsets, min(#matches / 3, 1)."""
    predicted = normalize_answer(prediction)
    accs = []
    for subset in itertools.combinations(answers, len(answers) - 1):
        accs.append(min(sum(normalize_answer(a) == predicted for a in subset) / 3, 1.0))
    return sum(accs) / len(accs)


@pytest.mark.parametrize("n_matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_with_ten_annotators_is_the_official_number(n_matching, expected):
    answers = ["2"] * n_matching + ["3"] * (10 - n_matching)
    assert vqa_accuracy("two", answers) == pytest.approx(expected)
    assert vqa_accuracy("two", answers) == pytest.approx(official_by_subsets("two", answers))


def test_vqa_accuracy_with_few_annotators():
    assert vqa_accuracy("The Dog", ["dog"]) == 1.0  # a single answer: exact match
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    assert vqa_accuracy("dog", ["dog", "dog", "dog"]) == 1.0  # unanimous small panels still reach 1
    assert vqa_accuracy("dog", ["dog", "dog", "cat"]) == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("dog", [])
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("dog", "dog")


def test_exact_match_and_means():
    assert exact_match("The Dog.", "dog") == 1.0
    assert exact_match("two", ["3", "2"]) == 1.0
    assert exact_match("dogs", "dog") == 0.0
    assert mean_exact_match(["yes", "No."], ["yes", "yes"]) == 0.5
    assert mean_vqa_accuracy(["two", "red"], [["2"] * 10, ["blue"] * 10]) == 0.5
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        mean_exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="evaluation set is empty"):
        mean_accuracy([])


def test_ranking_accuracy_counts_strict_wins_only():
    scores = [[0.1, 0.5, 0.2], [1.0, 1.0, 0.0], [-3.0, -1.0], torch.tensor([-2.0, -0.5, -7.0])]
    assert ranking_accuracy(scores, [1, 0, 0, 1]) == pytest.approx(2 / 4)  # the tie does not count
    with pytest.raises(ValueError, match="item 1: correct index 2 is outside its 2 candidates"):
        ranking_accuracy([[0.0, 1.0], [0.0, 1.0]], [0, 2])
    with pytest.raises(ValueError, match="2 score lists but 1 correct"):
        ranking_accuracy([[0.0], [0.0]], [0])


# ----------------------------------------------------------------------------- CIDEr


def test_caption_tokens():
    assert caption_tokens("A Red-Square, on grey!") == "a red square on grey"
    assert caption_tokens("  two  dogs.") == "two dogs"


def test_cider_identical_caption_scores_ten_on_a_disjoint_corpus():
    # Each n-gram occurs in one image's references: idf = log(2 / 1) for all, so the tf-idf
    # vectors of an identical caption equal the reference's: cosine 1 for n = 1..4, no length
    # penalty, mean 1, times pycocoevalcap's 10.
    refs = {1: ["a red square on grey"], 2: ["two blue circles far away"]}
    assert cider({1: "A red square on grey.", 2: "two blue circles far away"}, refs) == pytest.approx(10.0)


def test_cider_partial_caption_matches_the_hand_computation():
    refs = {"x": ["red square on grey"], "y": ["two blue circles away"]}
    preds = {"x": "red square on", "y": "two blue circles away"}
    # Image x: every n-gram has the same weight w = log 2, so the clipped cosines are
    # 1-grams 3/(sqrt(3)*2), 2-grams 2/(sqrt(2)*sqrt(3)), 3-grams 1/(1*sqrt(2)), 4-grams 0 (the
    # prediction has none); length difference -1 -> penalty exp(-1 / (2 * 6^2)).
    x = 10 * math.exp(-1 / 72) * (3 / (2 * math.sqrt(3)) + 2 / math.sqrt(6) + 1 / math.sqrt(2) + 0) / 4
    y = 10.0
    assert cider(preds, refs) == pytest.approx((x + y) / 2, rel=1e-9)


def test_cider_prefers_the_right_caption_to_an_unrelated_one():
    refs = {
        1: ["a red square on the left", "a red square next to nothing"],
        2: ["two blue circles at the top", "blue circles, two of them"],
        3: ["a yellow star in the middle", "one yellow star"],
    }
    right = {1: "a red square on the left", 2: "two blue circles at the top", 3: "a yellow star"}
    wrong = {1: "two blue circles at the top", 2: "a yellow star", 3: "a red square on the left"}
    assert cider(right, refs) > 2.0 > cider(wrong, refs)
    assert cider({1: "zebra", 2: "zebra", 3: "zebra"}, refs) == 0.0


def test_cider_rejects_what_it_cannot_score():
    with pytest.raises(ValueError, match=r"no prediction for \['2'\]"):
        cider({1: "a"}, {1: ["a"], 2: ["b"]})
    with pytest.raises(ValueError, match="at least 2 images"):
        cider({1: "a"}, {1: ["a"]})
    with pytest.raises(ValueError, match="list of reference captions"):
        cider({1: "a", 2: "b"}, {1: ["a"], 2: []})


# ----------------------------------------------------------------------------- losses


def hand_log_prob(row: torch.Tensor, target: int) -> float:
    """log softmax(row)[target] in float64, from the definition."""
    row = row.double()
    m = row.max()
    return float(row[target] - m - torch.log(torch.exp(row - m).sum()))


def hand_losses(logits: torch.Tensor, labels: torch.Tensor, shift: bool):
    """Per-row lists of log p(label) of the labelled tokens, position by position."""
    per_row = []
    for b in range(labels.shape[0]):
        row = []
        for t in range(labels.shape[1] - int(shift)):
            target = int(labels[b, t + int(shift)])
            if target != IGNORE_INDEX:
                row.append(hand_log_prob(logits[b, t], target))
        per_row.append(row)
    return per_row


def tiny_inputs(model_wrapper, B: int = 3, T: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    vocab = model_wrapper.model.config.text_config.vocab_size - 1  # below <image>
    qformer = model_wrapper.processor.tokenize_instructions(["what colour is it?", "how many stars?", "describe"])
    return {
        "input_ids": torch.randint(4, vocab, (B, T), generator=g),
        "pixel_values": torch.randn(B, 3, 28, 28, generator=g),
        **qformer,
    }


def test_lm_loss_decoder_only_matches_hand_computation_and_the_model(tiny_checkpoints):
    wrapper = load_pretrained(tiny_checkpoints("instructblip-opt"))
    batch = tiny_inputs(wrapper)
    labels = batch["input_ids"].clone()
    labels[0, :5] = IGNORE_INDEX  # prompt tokens of different lengths: rows keep 2, 4, 6 answer tokens
    labels[1, :3] = IGNORE_INDEX
    labels[2, :1] = IGNORE_INDEX
    with torch.no_grad():
        out = wrapper.model(**batch, labels=labels)
    Q = wrapper.model.config.num_query_tokens
    full = torch.cat([torch.full((3, Q), IGNORE_INDEX), labels], dim=1)  # the visual prefix has no labels

    per_row = hand_losses(out.logits, full, shift=True)
    tokens = [lp for row in per_row for lp in row]
    assert [len(r) for r in per_row] == [2, 4, 6]
    expected = -sum(tokens) / len(tokens)
    assert lm_loss(out.logits, full, shift=True).item() == pytest.approx(expected, rel=1e-5)
    assert lm_loss(out.logits, full, shift=True).item() == pytest.approx(out.loss.item(), rel=1e-6)

    lls = answer_log_likelihoods(out.logits, full, shift=True)
    assert lls.sum.tolist() == pytest.approx([sum(r) for r in per_row], rel=1e-5)
    assert lls.mean.tolist() == pytest.approx([sum(r) / len(r) for r in per_row], rel=1e-5)


def test_lm_loss_encoder_decoder_matches_hand_computation_and_transformers(tiny_checkpoints):
    wrapper = load_pretrained(tiny_checkpoints("instructblip-t5"))
    batch = tiny_inputs(wrapper)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(3, 200, (3, 5), generator=g)
    labels[0, 3:] = IGNORE_INDEX  # target padding
    with torch.no_grad():
        out = wrapper.model(**batch, labels=labels)  # transformers' T5 computes its own loss
    per_row = hand_losses(out.logits, labels, shift=False)
    tokens = [lp for row in per_row for lp in row]
    assert [len(r) for r in per_row] == [3, 5, 5]
    assert lm_loss(out.logits, labels, shift=False).item() == pytest.approx(-sum(tokens) / len(tokens), rel=1e-5)
    assert lm_loss(out.logits, labels, shift=False).item() == pytest.approx(out.loss.item(), rel=1e-6)
    lls = answer_log_likelihoods(out.logits, labels, shift=False)
    assert lls.sum.tolist() == pytest.approx([sum(r) for r in per_row], rel=1e-5)

    # Label smoothing eps: (1 - eps) * NLL + eps * mean over the vocabulary of -log p.
    eps = 0.1
    keep = labels != IGNORE_INDEX
    uniform = -out.logits.double().log_softmax(-1)[keep].mean(-1).mean().item()
    smoothed = (1 - eps) * (-sum(tokens) / len(tokens)) + eps * uniform
    assert lm_loss(out.logits, labels, shift=False, label_smoothing=eps).item() == pytest.approx(smoothed, rel=1e-5)


def test_losses_reject_batches_without_answers():
    logits = torch.randn(2, 4, 10)
    labels = torch.full((2, 4), IGNORE_INDEX)
    with pytest.raises(ValueError, match="no token in this batch has a label"):
        lm_loss(logits, labels, shift=True)
    labels[0, 2] = 3
    with pytest.raises(ValueError, match=r"rows \[1\] have no labelled token"):
        answer_log_likelihoods(logits, labels, shift=True)
    with pytest.raises(ValueError, match=r"logits must be \(B, T, V\) and labels \(B, T\)"):
        lm_loss(logits, labels[:, :3], shift=True)
