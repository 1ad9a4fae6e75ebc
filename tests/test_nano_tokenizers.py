"""The small model's tokenizers: the same on every run (the recipe must be repeatable), and
the Q-Former's keeps the world's words whole without ever producing [UNK]."""

from finetune.nano.tokenizers import ALPHABET, BERT_SPECIALS, train_llm_tokenizer, train_qformer_tokenizer

TEXTS = [
    "There is a small red circle at the top left.",
    "What colour is the large blue square? Blue.",
    "The green triangle is to the left of the yellow star.",
    "How many objects are there? Three.",
    "A purple diamond with the word cat on it.",
    "Is the circle above or below the square? Above.",
]


def test_both_tokenizers_are_the_same_on_every_run():
    # tokenizers' own WordPiece trainer gave 8 different vocabularies in 8 runs on these 6 lines
    assert len({tuple(sorted(train_qformer_tokenizer(TEXTS).get_vocab().items())) for _ in range(3)}) == 1
    assert len({tuple(sorted(train_llm_tokenizer(TEXTS).get_vocab().items())) for _ in range(3)}) == 1


def test_qformer_tokenizer_keeps_every_word_whole_and_never_says_unk():
    tokenizer = train_qformer_tokenizer(TEXTS)
    for text in TEXTS:
        words = text.lower().replace(".", " .").replace("?", " ?").split()
        assert tokenizer.tokenize(text) == words
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    unseen = "Which ZEBRA is disappearing, #42 or ~x?"
    assert tokenizer.unk_token_id not in tokenizer(unseen).input_ids
    assert tokenizer.decode(tokenizer(unseen).input_ids, skip_special_tokens=True) == "which zebra is disappearing, # 42 or ~ x?"
    assert tokenizer.bos_token == "[DEC]" and tokenizer.pad_token_id == 0


def test_a_small_qformer_vocabulary_keeps_the_most_frequent_words():
    characters = len({c.lower() for c in ALPHABET})
    tokenizer = train_qformer_tokenizer(TEXTS, vocab_size=len(BERT_SPECIALS) + 2 * characters + 3)
    words = {w for w in tokenizer.get_vocab() if len(w) > 1 and not w.startswith(("[", "##"))}
    # "the" 8 times, "is" 4, then six words twice, alphabetically first "above" (characters are already in)
    assert words == {"the", "is", "above"}
