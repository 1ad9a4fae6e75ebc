"""Evaluation metrics: VQA accuracy, exact match, ranking accuracy and CIDEr-D.

References:
- VQA (Antol et al. 2015) and the VQA evaluation rules (visualqa.org/evaluation.html): the
  answer normalisation and the consensus accuracy, min(#humans who gave the answer / 3, 1),
  averaged over the 10 leave-one-annotator-out subsets of 9. Written here from those published
  rules; the quirks of the official script that change results are kept and named below.
- CIDEr (Vedantam et al. 2015): scored by pycocoevalcap's CIDEr-D scorer (the COCO caption
  evaluation), fed with our own tokens instead of its Java PTB tokenizer.

All accuracies are fractions in [0, 1] (multiply by 100 for the papers' tables).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence

# ----------------------------------------------------------------------------- VQA normalisation

# Characters the VQA script treats as punctuation. The apostrophe is not one of them (it keeps
# contractions) and the period has a rule of its own.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)"; its first group is a look-AHEAD for the text
# "<=digit", always true in front of a ".", so in effect a period goes unless a digit follows
# ("3.5" keeps it, "yes." and "e.g." lose theirs).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions the VQA script restores when an answer dropped one of their apostrophes
# ("dont" -> "don't", "couldnt've" -> "couldn't've"). Forms whose apostrophe-less spelling is
# an ordinary word (we'll / well, she'll / shell, it's / its, we're / were) are not here, as
# in the official table. The official table's "I'm", "I've", "I'd've" are left out too: their
# keys start with a capital I, which never matches the lowercased text, so the official script
# never restores them. One official entry maps the wrong way round ("somebody'd" ->
# "somebodyd"); here "somebodyd" is restored to "somebody'd" like every other entry.
_CONTRACTIONS_SPELLED_OUT = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
    "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's",
    "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't",
    "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "should've",
    "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's", "someone'd",
    "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's",
    "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've",
    "'twas", "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's",
    "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're",
    "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd",
    "you'd've", "you'll", "you're", "you've",
)  # fmt: skip


def _drop_one_apostrophe(word: str) -> list[str]:
    """"couldn't've" -> ["couldnt've", "couldn'tve"]: the spellings the official table repairs."""
    return [word[:i] + word[i + 1 :] for i, c in enumerate(word) if c == "'"]


_CONTRACTIONS = {variant: word for word in _CONTRACTIONS_SPELLED_OUT for variant in _drop_one_apostrophe(word)}


def _strip_punctuation(text: str) -> str:
    """VQA punctuation rule: a mark next to a space (or any mark, once the text has a number
    like "1,000") is deleted; a mark inside a word becomes a space ("t-shirt" -> "t shirt")."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # The official script tests the ORIGINAL text for the neighbouring space, mark by mark.
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    """Lowercase; number words -> digits ("two" -> "2", "none" -> "0"); drop a/an/the; repair contractions."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation: "Two dogs." -> "2 dogs", "the T-shirt" -> "t shirt"."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(text))


# ----------------------------------------------------------------------------- accuracies


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA consensus accuracy of one prediction against the annotators' answers.

    With the 10 answers of VQA v2 / VizWiz / OK-VQA this is the official number: for each of
    the 10 subsets of 9 annotators, min(#matches in the subset / 3, 1), averaged. (We use the
    official average rather than the simpler min(#matches / 3, 1) because published results are
    computed with it; the two differ: 3 matching annotators give 0.9, not 1.0.) Generalised to
    other counts: with n answers a prediction needs min(3, n - 1) matches within each subset of
    n - 1, so a question with fewer annotators can still reach 1.0; a single answer is exact
    match. Prediction and answers are both normalised (the official script normalises the
    references less because VQA's were normalised when they were collected; ours may not be).
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"answers must be a non-empty list of strings, got {answers!r}")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(a) == predicted for a in answers]
    if len(matches) == 1:
        return float(matches[0])
    needed = min(3, len(matches) - 1)
    total = sum(matches)
    # Leaving out annotator k: the others' matches are total - matches[k].
    return sum(min((total - m) / needed, 1.0) for m in matches) / len(matches)


def exact_match(prediction: str, answer: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals the normalised answer (or any of several), else 0.0."""
    options = [answer] if isinstance(answer, str) else list(answer)
    if not options:
        raise ValueError("exact_match needs at least one reference answer")
    predicted = normalize_answer(prediction)
    return float(any(normalize_answer(a) == predicted for a in options))


def ranking_accuracy(scores_per_item: Sequence[Sequence[float]], correct_index: Sequence[int]) -> float:
    """Fraction of items whose correct candidate has the strictly highest score.

    scores_per_item: one score per candidate (e.g. log-likelihoods), items may have different
    numbers of candidates. A tie for the top with the correct candidate counts as wrong: a
    model that cannot tell the options apart earns nothing (argmax would credit index 0).
    """
    if len(scores_per_item) != len(correct_index):
        raise ValueError(f"{len(scores_per_item)} score lists but {len(correct_index)} correct indices")
    hits = []
    for item, (scores, correct) in enumerate(zip(scores_per_item, correct_index)):
        scores = [float(s) for s in scores]
        if not 0 <= int(correct) < len(scores):
            raise ValueError(f"item {item}: correct index {correct} is outside its {len(scores)} candidates")
        best = scores[int(correct)]
        hits.append(all(s < best for i, s in enumerate(scores) if i != int(correct)))
    return mean_accuracy(hits)


def mean_accuracy(values: Sequence[float | bool]) -> float:
    """Mean of per-item scores; an empty evaluation is an error, not 0 or NaN."""
    if len(values) == 0:
        raise ValueError("no items to average: the evaluation set is empty")
    return sum(float(v) for v in values) / len(values)


def _paired(predictions: Sequence[str], answers: Sequence) -> None:
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} reference entries")


def mean_vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    _paired(predictions, answers)
    return mean_accuracy([vqa_accuracy(p, a) for p, a in zip(predictions, answers)])


def mean_exact_match(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
    _paired(predictions, answers)
    return mean_accuracy([exact_match(p, a) for p, a in zip(predictions, answers)])


# ----------------------------------------------------------------------------- CIDEr


def caption_tokens(text: str) -> str:
    """Lowercase words and numbers joined by single spaces, punctuation dropped.

    Stands in for the PTB tokenizer of the COCO evaluation (a Java program): the same for plain
    captions, except that PTB splits contractions ("dog's" -> "dog 's") where we split at the
    apostrophe ("dog s"). Scores are comparable with each other, not digit-for-digit with
    published COCO numbers.
    """
    return " ".join(re.findall(r"[^\W_]+", text.lower()))


def cider(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
    """Corpus CIDEr-D (pycocoevalcap: n-grams 1-4, Gaussian length penalty sigma 6, clipping).

    predictions: id -> one caption; references: id -> its reference captions. The ids must be
    the same. The IDF weights come from the references of all ids, so a corpus of one image
    scores 0 whatever is said: that is an error here. The result is on pycocoevalcap's scale
    (identical to the only reference = 10); papers print 100 x this value.
    """
    missing, extra = set(references) - set(predictions), set(predictions) - set(references)
    if missing or extra:
        raise ValueError(
            f"predictions and references must have the same ids: no prediction for {sorted(map(str, missing))[:5]}, "
            f"no references for {sorted(map(str, extra))[:5]}"
        )
    if len(references) < 2:
        raise ValueError("CIDEr needs at least 2 images: its IDF weights log(#images / df) are all zero for one")
    empty = [str(k) for k, refs in references.items() if isinstance(refs, str) or len(refs) == 0]
    if empty:
        raise ValueError(f"each id needs a list of reference captions; not so for {empty[:5]}")
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:
        raise ImportError("CIDEr needs pycocoevalcap: pip install pycocoevalcap") from e
    ids = list(references)
    gts = {i: [caption_tokens(r) for r in references[i]] for i in ids}
    res = {i: [caption_tokens(predictions[i])] for i in ids}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


__all__ = [
    "caption_tokens",
    "cider",
    "exact_match",
    "mean_accuracy",
    "mean_exact_match",
    "mean_vqa_accuracy",
    "normalize_answer",
    "ranking_accuracy",
    "vqa_accuracy",
]
