"""The small model's two tokenizers, trained from scratch on the world's text.

- LLM tokenizer: byte-fallback-free BPE with SentencePiece-style word boundaries (`▁`), LLaMA's
  special ids (<unk>=0, <s>=1 prepended, </s>=2) plus <pad> and the `<image>` placeholder the
  Hugging Face processor expects.
- Q-Former tokenizer: a lowercase BERT WordPiece vocabulary of the world's words ([PAD]=0,
  [UNK], [CLS], [SEP], [MASK]) plus "[DEC]", the BOS of the Q-Former's text decoder (ITG), as
  in the real checkpoints.
Both are saved in transformers' format, so `AutoTokenizer` and the processor load them.
"""

from __future__ import annotations

import string
from collections import Counter

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertTokenizerFast, PreTrainedTokenizerFast

LLM_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
IMAGE_TOKEN = "<image>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DEC_TOKEN = "[DEC]"
# Every printable character is in the base alphabet, so user text never turns into <unk>.
ALPHABET = [c for c in string.printable if not c.isspace()]


def train_llm_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLM_SPECIALS, initial_alphabet=ALPHABET, show_progress=False)
    backend.train_from_iterator(texts, trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left", model_max_length=512,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(IMAGE_TOKEN, normalized=False, special=True)]})
    return tokenizer


def train_qformer_tokenizer(texts: list[str], vocab_size: int = 1024) -> BertTokenizerFast:
    """A WordPiece vocabulary of whole words, most frequent first, over every character of the
    alphabet alone and as a continuation ("##c"), so any printable text tokenizes without [UNK]
    (an unseen word falls back to its longest known start, then pieces).

    Built by counting rather than with tokenizers' WordPieceTrainer, whose result changed from
    run to run on the same text (ties broken in hash order: three runs gave three vocabularies
    of 569-571 tokens, differing in intermediate pieces such as "##ght" or "disa"), which made
    the whole recipe unrepeatable. The world's text has a few hundred distinct words, so at
    the default size every one of them is a single token.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = list(dict.fromkeys(c.lower() for c in ALPHABET))
    base = BERT_SPECIALS + characters + ["##" + c for c in characters]
    if vocab_size < len(base):
        raise ValueError(f"vocab_size {vocab_size} cannot hold the {len(base)} special and character tokens")
    known = set(base)
    words = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if w not in known]
    vocab = base + words[: vocab_size - len(base)]
    tokenizer = BertTokenizerFast(vocab=dict(zip(vocab, range(len(vocab)))), do_lower_case=True, truncation_side="left",
                                  model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer
