"""Tiny random InstructBLIP / BLIP-2 checkpoints in Hugging Face format, built offline.

Our parity tests compare `instructblip_core` against the reference implementation in
`transformers` (modeling_instructblip.py / modeling_blip_2.py). Real checkpoints need the
hub, which our machines cannot reach, so this module builds miniature ones locally with
transformers' own classes and saves them as transformers 5.23 writes a model and
its processor (the Q-Former tokenizer in qformer_tokenizer/, as on the hub):

    config.json, model.safetensors, generation_config.json     (model.save_pretrained)
    processor_config.json, tokenizer.json, tokenizer_config.json,
    qformer_tokenizer/{tokenizer.json, tokenizer_config.json}  (processor.save_pretrained;
                                                                InstructBLIP only)
    preprocessor_config.json                                   (image_processor.save_pretrained)

Everything is derived from a fixed corpus and a seed, so the same arguments give
byte-identical weights. One checkpoint takes well under a second to build.

Usage:
    folder = build_tiny_checkpoint("instructblip-llama", tmp_path / "ckpt", seed=0)
    model = InstructBlipForConditionalGeneration.from_pretrained(folder)
"""

from __future__ import annotations

import pathlib
import string
from dataclasses import dataclass

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BertTokenizerFast,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    T5Config,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

KINDS = ("instructblip-llama", "instructblip-opt", "instructblip-t5", "blip2-opt", "blip2-t5")

IMAGE_TOKEN = "<image>"
NUM_QUERY_TOKENS = 4
IMAGE_SIZE = 28  # patch 7 -> 4 x 4 = 16 patches + CLS = 17 image tokens
QFORMER_MAX_POSITIONS = 64
LLM_MAX_POSITIONS = 512
LLM_VOCAB_TARGET = 256  # BPE vocabulary size incl. special tokens, before <image>
INIT_STD = 0.02

# A fixed English corpus in the visual world of our default model (shapes, colours,
# animals, counts, positions) plus the instruction phrasing of the InstructBLIP
# templates. The BPE merges and the Q-Former word list are learned from it, so any
# edit changes every tiny checkpoint's token ids.
CORPUS = """
What colour is the square? The square is red. What colour is the circle? The circle is blue.
Is there a green triangle in the picture? Yes, there is a small green triangle on the left.
How many stars are there in the image? There are three yellow stars at the top.
Where is the purple heart? The purple heart is at the bottom right of the image.
Which shape is the biggest? The big orange hexagon is the biggest shape.
A cat sits next to a dog. The brown dog is running and the white cat is sleeping.
A bird flies over the tree. The black horse stands in the field near a cow.
The fish swims in the water. A rabbit and a mouse eat a piece of cheese.
Describe the image in detail. The picture shows two circles and one square on a grey background.
A short image caption: a red square and a blue circle.
Question: what is the colour of the large triangle? Short answer: pink.
Question: how many animals are in the photo? Options: (a) one (b) two (c) four. Answer: (b) two.
Write a short description of this picture. Please answer the question briefly.
Can you tell me what you see? I see a tiny white diamond above a large black rectangle.
Is the circle bigger than the square? No, the circle is smaller than the square.
What is written in the image? The word hello is written in capital letters.
Count the objects. There are five objects: two squares, two circles and one star.
What animal is this? This is an elephant. What animal is next to the lion? A zebra.
The sheep and the goat are on the grass. The duck is swimming with the frog.
The first shape is on the top left, the second is in the middle, the last is under it.
Look at the colours: red, green, blue, yellow, orange, purple, pink, brown, black, white, grey.
Shapes: square, circle, triangle, star, heart, hexagon, diamond, rectangle, oval, cross.
Numbers: zero, one, two, three, four, five, six, seven, eight, nine, ten, 0 1 2 3 4 5 6 7 8 9.
Why is the dog happy? Because it is playing with a ball. Who is holding the cup?
Answer the following question about the image with a single word or a short phrase.
Based on the image, respond to this question with a short answer: what colour is the sky?
"""


@dataclass(frozen=True)
class _LlmFamily:
    """Special-token layout of one LLM family (ids follow the real tokenizers)."""

    special_tokens: tuple[str, ...]  # ids 0, 1, 2, ... in this order
    bos: str | None
    eos: str
    pad: str
    unk: str
    add_bos: bool  # prepend BOS (LLaMA `<s>`, OPT `</s>`)
    add_eos: bool  # append EOS (T5)
    padding_side: str


_FAMILIES = {
    # LLaMA / Vicuna: <unk>=0, <s>=1, </s>=2; Vicuna ships a separate pad token.
    "llama": _LlmFamily(("<unk>", "<s>", "</s>", "<pad>"), "<s>", "</s>", "<pad>", "<unk>", True, False, "left"),
    # OPT (GPT-2 vocabulary): <s>=0, <pad>=1, </s>=2, <unk>=3; BOS is </s> and is prepended.
    "opt": _LlmFamily(("<s>", "<pad>", "</s>", "<unk>"), "</s>", "</s>", "<pad>", "<unk>", True, False, "left"),
    # T5 / Flan-T5: <pad>=0, </s>=1, <unk>=2; no BOS, EOS appended; the decoder starts from pad.
    "t5": _LlmFamily(("<pad>", "</s>", "<unk>"), None, "</s>", "<pad>", "<unk>", False, True, "right"),
}


def _split_kind(kind: str) -> tuple[str, str]:
    """'instructblip-llama' -> ('instructblip', 'llama')."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    arch, family = kind.split("-")
    return arch, family


# ----------------------------------------------------------------------------- tokenizers


def _train_llm_backend(family: _LlmFamily) -> Tokenizer:
    """A SentencePiece-like BPE (Metaspace `▁` word boundaries, as LLaMA and T5 use).

    Metaspace keeps the spaces inside the tokens, so decode(encode(text)) gives back the
    text exactly, punctuation and newlines included. Every printable ASCII character is in
    the base alphabet, so English text never falls back to <unk>.
    """
    backend = Tokenizer(models.BPE(unk_token=family.unk))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    alphabet = [c for c in string.printable if c not in " \r\x0b\x0c"] + ["▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=LLM_VOCAB_TARGET,
        special_tokens=list(family.special_tokens),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS.strip().splitlines(), trainer)
    return backend


def _post_processor(family: _LlmFamily, backend: Tokenizer) -> processors.TemplateProcessing:
    """BOS-prefix / EOS-suffix template, the same one the real fast tokenizers carry."""

    def template(seq: str, type_id: int) -> str:
        bos = f"{family.bos}:{type_id} " if family.add_bos else ""
        eos = f" {family.eos}:{type_id}" if family.add_eos else ""
        return f"{bos}${seq}:{type_id}{eos}"

    used = [t for t, on in ((family.bos, family.add_bos), (family.eos, family.add_eos)) if on]
    return processors.TemplateProcessing(
        single=template("A", 0),
        pair=f"{template('A', 0)} {template('B', 1)}",
        special_tokens=[(t, backend.token_to_id(t)) for t in used],
    )


def build_llm_tokenizer(family_name: str) -> PreTrainedTokenizerFast:
    """The LLM tokenizer of one family ('llama', 'opt', 't5'), with `<image>` added last.

    The `<image>` id is len(base vocabulary), known before the model config is built.
    """
    family = _FAMILIES[family_name]
    backend = _train_llm_backend(family)
    backend.post_processor = _post_processor(family, backend)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=family.bos,
        eos_token=family.eos,
        unk_token=family.unk,
        pad_token=family.pad,
        padding_side=family.padding_side,
        model_max_length=LLM_MAX_POSITIONS // 2,
    )
    # Not registered as `tokenizer.image_token`: the 5.23 processors then expect an
    # AddedToken there but get a str back. They add "<image>" themselves when the attribute
    # is missing, which is a no-op once the token is in the vocabulary.
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == backend.get_vocab_size(with_added_tokens=False)
    return tokenizer


def _qformer_vocab() -> list[str]:
    """BERT-style vocab.txt lines: specials, single characters, ##pieces, corpus words.

    Single characters and their `##` continuations guarantee that any lowercase ASCII
    word tokenises (letter by letter at worst); whole corpus words keep common text short.
    """
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase)
    pieces = [f"##{c}" for c in string.digits + string.ascii_lowercase] + ["##ing", "##ed", "##er", "##es", "##ly"]
    words = "".join(c if c.isalnum() else " " for c in CORPUS.lower()).split()
    vocab = specials + chars + pieces
    vocab += sorted(set(words) - set(vocab))
    return vocab


def build_qformer_tokenizer() -> BertTokenizerFast:
    """Q-Former BERT tokenizer: lowercase WordPiece + `[DEC]` as BOS, truncating from the left.

    As in the Salesforce checkpoints, `[DEC]` is added after the base vocabulary (it is the
    BOS of the stage-1 ITG decoder) and the instruction is cut from the left so that the end
    of a long instruction, usually the question, survives.
    """
    vocab = {token: i for i, token in enumerate(_qformer_vocab())}
    tokenizer = BertTokenizerFast(
        vocab=vocab,
        do_lower_case=True,
        truncation_side="left",
        model_max_length=QFORMER_MAX_POSITIONS,
    )
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


# ----------------------------------------------------------------------------- configs


def _vision_and_qformer_kwargs(qformer_vocab_size: int) -> tuple[dict, dict]:
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=7,
        qkv_bias=True,
    )
    # 2 layers with cross_attention_frequency 2: layer 0 cross-attends, layer 1 does not.
    qformer = dict(
        vocab_size=qformer_vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        cross_attention_frequency=2,
        max_position_embeddings=QFORMER_MAX_POSITIONS,
    )
    return vision, qformer


def _text_config(family_name: str, tokenizer, vocab_size: int, layers: int, hidden: int, intermediate: int):
    """LLM config of the family with the tokenizer's special ids; 4 heads of hidden/4."""
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family_name == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=LLM_MAX_POSITIONS,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,  # Vicuna has a separate lm_head
            **ids,
        )
    if family_name == "opt":
        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            ffn_dim=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=LLM_MAX_POSITIONS,
            word_embed_proj_dim=hidden,  # no project_in/project_out, as in OPT-2.7B/6.7B
            **ids,
        )
    # Flan-T5: gated-GELU feed-forward, untied lm_head (so no d_model**-0.5 output rescale).
    return T5Config(
        vocab_size=vocab_size,
        d_model=hidden,
        d_kv=hidden // 4,
        d_ff=intermediate,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,  # stored by transformers 5.23 as scale_decoder_outputs=False
        decoder_start_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_config(kind: str, llm_tokenizer, qformer_tokenizer, *, llm_layers=2, llm_hidden=64, llm_intermediate=128):
    """Top-level InstructBlipConfig / Blip2Config for `kind`."""
    arch, family_name = _split_kind(kind)
    image_token_id = llm_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab_size = len(llm_tokenizer)  # <image> is the last id, so this covers it
    assert image_token_id == vocab_size - 1
    vision, qformer = _vision_and_qformer_kwargs(len(qformer_tokenizer))
    text = _text_config(family_name, llm_tokenizer, vocab_size, llm_layers, llm_hidden, llm_intermediate)
    config_cls = InstructBlipConfig if arch == "instructblip" else Blip2Config
    return config_cls(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text.to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token_id,
    )


# ----------------------------------------------------------------------------- weights


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every floating parameter with noise; norms get weight 1 + N(0, 0.02).

    HF's own init leaves some tensors at zero (query_tokens, biases) or at one (norm
    weights); a parity test on such weights would miss bugs (e.g. a dropped bias). A
    dedicated generator walking the modules in a fixed order makes the result depend on
    the seed only.
    """
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()  # tied weights (OPT lm_head = embed_tokens) are drawn once
    for module in model.modules():
        is_norm = "Norm" in type(module).__name__  # LayerNorm, LlamaRMSNorm, T5LayerNorm
        for name, param in module.named_parameters(recurse=False):
            if not param.is_floating_point() or id(param) in seen:
                continue
            seen.add(id(param))
            # Matrices get std 1/sqrt(fan_in) so signals keep their size through the tiny
            # network: with 0.02 everywhere the image barely moves the logits, and a parity
            # test could not tell a broken image path from a working one.
            std = INIT_STD if param.dim() < 2 else (param.numel() / param.shape[0]) ** -0.5
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
            if is_norm and name == "weight":
                noise += 1.0
            param.copy_(noise.to(param.dtype))


def build_model(config):
    """Model of the config's class in eval mode (fp32, HF init; see randomize_weights)."""
    is_instruct = isinstance(config, InstructBlipConfig)
    model_cls = InstructBlipForConditionalGeneration if is_instruct else Blip2ForConditionalGeneration
    model = model_cls(config)
    if not config.use_decoder_only_language_model:
        _untie_t5_lm_head(model)
    return model.eval()


def _untie_t5_lm_head(model) -> None:
    """Give the T5 lm_head its own weight, as Flan-T5 checkpoints have.

    transformers 5.23 forces `T5Config.tie_word_embeddings = True` (keeping the Flan-T5
    meaning of `tie_word_embeddings=False` only as `scale_decoder_outputs=False`) and ties
    lm_head to `shared` at construction. save_pretrained drops only tensors that share
    storage, so a separate Parameter is saved; on reload transformers sees two different
    tensors and leaves them untied (with a warning), exactly as for the real checkpoints.
    """
    lm = model.language_model
    lm.lm_head.weight = torch.nn.Parameter(lm.lm_head.weight.detach().clone())
    model.all_tied_weights_keys.pop("language_model.lm_head.weight", None)
    lm.all_tied_weights_keys.pop("lm_head.weight", None)


# ----------------------------------------------------------------------------- processor


def build_image_processor() -> BlipImageProcessorPil:
    """BLIP preprocessing at 28 px: bicubic resize, CLIP mean/std (the PIL backend, no torchvision)."""
    return BlipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=PILImageResampling.BICUBIC,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )


def build_processor(kind: str, llm_tokenizer, qformer_tokenizer):
    arch, _ = _split_kind(kind)
    if arch == "instructblip":
        return InstructBlipProcessor(
            image_processor=build_image_processor(),
            tokenizer=llm_tokenizer,
            qformer_tokenizer=qformer_tokenizer,
            num_query_tokens=NUM_QUERY_TOKENS,
        )
    return Blip2Processor(build_image_processor(), llm_tokenizer, num_query_tokens=NUM_QUERY_TOKENS)


# ----------------------------------------------------------------------------- entry point


def build_tiny_checkpoint(
    kind: str,
    folder,
    *,
    seed: int = 0,
    llm_layers: int = 2,
    llm_hidden: int = 64,
    llm_intermediate: int = 128,
) -> pathlib.Path:
    """Build and save a tiny random checkpoint of `kind` (one of KINDS) into `folder`.

    The folder loads with `<Model>.from_pretrained(folder)` and `AutoProcessor.from_pretrained(folder)`.
    The caller's global torch RNG state is left untouched.
    """
    _, family_name = _split_kind(kind)
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    llm_tokenizer = build_llm_tokenizer(family_name)
    qformer_tokenizer = build_qformer_tokenizer()
    config = build_config(
        kind,
        llm_tokenizer,
        qformer_tokenizer,
        llm_layers=llm_layers,
        llm_hidden=llm_hidden,
        llm_intermediate=llm_intermediate,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config)
        randomize_weights(model, seed)

    model.save_pretrained(folder)
    processor = build_processor(kind, llm_tokenizer, qformer_tokenizer)
    processor.save_pretrained(folder)
    # transformers 5 nests the image processor inside processor_config.json; the hub repos
    # also carry the classic preprocessor_config.json, so write it too for loaders that read it.
    processor.image_processor.save_pretrained(folder)
    return folder
