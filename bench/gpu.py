"""GPU benchmark at the real sizes: ours vs transformers' InstructBlipForConditionalGeneration.

Random weights of the official shapes (no hub: the checkpoint is built here, once, and reused
by later runs), in Hugging Face format, loaded by both implementations from the same folder.
Per loading mode (fp16, 8-bit LLM, 4-bit NF4 LLM): first-turn latency (image never seen), a
later chat turn about the same image (ours serves the image encoder's output from its feature
cache; the reference recomputes it), time to the first streamed text piece, decode tokens/s
against the memory-bandwidth bound, whether the two generated the same tokens, and memory
(weights, resident, peak in a turn). Ours and the reference are interleaved in one process.

    python bench/gpu.py --model vicuna7b                  # fp16, int8, int4 on cuda
    python bench/gpu.py --model flant5xl --modes fp16
    python bench/gpu.py --model tiny --device cpu --repeats 2   # the same code path, in seconds
                                                                # (tiny-t5: the T5 path)
    python bench/gpu.py --model flant5xl --device cpu --weights-only   # memory of each mode, no GPU

Decode tokens/s = (n - 1) / (n-token later turn - 1-token later turn); its bound is the
measured copy bandwidth / the weight bytes one decode step reads. The first streamed piece
is timed on a 4-token answer (a piece needs 2 tokens; more would only cost time). Repeats
are cut, never below one, to end within --budget-s. Results: markdown tables on stdout (each
mode's as soon as it is done, a short summary last) and every number in
$OUT/gpu-<model>.json (else <workdir>/gpu-<model>.json).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machines have no network: fail fast, never wait
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import common  # noqa: E402  (sets sys.path)
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    BertTokenizerFast,
    BitsAndBytesConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    LlamaConfig,
    PreTrainedTokenizerFast,
    T5Config,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling  # noqa: E402
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil  # noqa: E402

from inference import QUESTION_1, QUESTION_2, first_turn_case, turn_cases  # noqa: E402
from instructblip_core import load_pretrained  # noqa: E402
from instructblip_core.prompts import build_prompt  # noqa: E402
from instructblip_core.quantization import weight_bytes  # noqa: E402
from tiny_checkpoints import _untie_t5_lm_head  # noqa: E402

GIB = 1024**3
INIT_STD = 0.02
SPEC_FILE = "bench-spec.json"  # written last: a folder without it is an interrupted build
MAX_SHARD = "4GB"
STREAM_TOKENS = 4  # the first piece needs 2 tokens; decoding more would only cost time
MODES = ("fp16", "int8", "int4", "int4-all")
# int4-all: the layers the LLM keeps in fp32 (T5's wo) in 4-bit too (`quantize_fp32_modules`),
# which needs bf16; the reference is loaded with T5's keep-in-fp32 list emptied, to match.
MODE_DTYPE = {"int4-all": torch.bfloat16}
# Text the benchmark feeds in; in the vocabularies so that prompts tokenise to real lengths.
WORDS = re.findall(r"\w+|[^\w\s]", f"{QUESTION_1} {QUESTION_2} Question: Answer:")


# ---- the shapes ------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """Special-token ids of an LLM family (those of the real tokenizers)."""

    specials: dict  # token -> id, below the image token
    bos: str | None
    eos: str
    pad: str
    unk: str
    padding_side: str


LLAMA = Family({"<unk>": 0, "<s>": 1, "</s>": 2}, "<s>", "</s>", "<pad>", "<unk>", "left")
T5 = Family({"<pad>": 0, "</s>": 1, "<unk>": 2}, None, "</s>", "<pad>", "<unk>", "right")


@dataclass(frozen=True)
class Spec:
    family: str  # "llama" | "t5"
    llm_vocab: int  # embedding rows; the hub configs pad the tokenizer's size to a multiple of 64
    image_token: int  # id of <image>, as in the hub checkpoints
    pad_token: int  # id of the pad token (LLaMA: added after the base vocabulary; T5: 0)
    text: dict  # LlamaConfig / T5Config keyword arguments
    vision: dict = field(default_factory=dict)  # InstructBlipVisionConfig kwargs; {} = ViT-g defaults
    qformer: dict = field(default_factory=dict)  # InstructBlipQFormerConfig kwargs; {} = BERT-base defaults
    qformer_vocab: int = 30523  # BERT-base uncased + [DEC]
    num_query_tokens: int = 32


VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
             image_size=224, patch_size=14, qkv_bias=True, layer_norm_eps=1e-6)  # 257 image tokens
QFORMER_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    max_position_embeddings=512, cross_attention_frequency=2)
TINY_VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                image_size=56, patch_size=14, qkv_bias=True, layer_norm_eps=1e-6)  # 17 image tokens
TINY_QFORMER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    max_position_embeddings=128, cross_attention_frequency=2)

SPECS = {
    # Salesforce/instructblip-vicuna-7b: Vicuna-7B v1.1, 32064 rows (32000 + [PAD] + <image>, padded to 64).
    "vicuna7b": Spec(
        "llama", llm_vocab=32064, image_token=32001, pad_token=32000, vision=VIT_G, qformer=QFORMER_BASE,
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False),
    ),
    # Salesforce/instructblip-flan-t5-xl: 32128 rows (32100 tokens, <image> at 32100).
    "flant5xl": Spec(
        "t5", llm_vocab=32128, image_token=32100, pad_token=0, vision=VIT_G, qformer=QFORMER_BASE,
        text=dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    ),
    # Miniatures of the two, for CPU runs of the same code path.
    "tiny": Spec(
        "llama", llm_vocab=2048, image_token=2001, pad_token=2000, vision=TINY_VIT, qformer=TINY_QFORMER,
        qformer_vocab=1024, num_query_tokens=8,
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False),
    ),
    "tiny-t5": Spec(
        "t5", llm_vocab=2048, image_token=2000, pad_token=0, vision=TINY_VIT, qformer=TINY_QFORMER,
        qformer_vocab=1024, num_query_tokens=8,
        text=dict(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    ),
}


# ---- tokenizers covering the whole vocabulary -----------------------------------------
def llm_vocab(spec: Spec, family: Family) -> dict[str, int]:
    """token -> id for every id below llm_vocab: specials, the benchmark's words, then "w<id>".

    Every id a random model can emit decodes to visible text, so streaming yields pieces.
    """
    fixed = {**family.specials, family.pad: spec.pad_token, "<image>": spec.image_token}
    free = [i for i in range(spec.llm_vocab) if i not in fixed.values()]
    words = [w for w in dict.fromkeys(WORDS) if w not in fixed]
    vocab = dict(fixed)
    for i in free:
        vocab[words.pop(0) if words else f"w{i}"] = i
    return vocab


def build_llm_tokenizer(spec: Spec) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (split on white space and punctuation); decode joins with spaces."""
    family = LLAMA if spec.family == "llama" else T5
    backend = Tokenizer(models.WordLevel(llm_vocab(spec, family), unk_token=family.unk))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # As the real tokenizers: LLaMA prepends BOS, T5 appends EOS.
    single, special = (f"{family.bos} $A", family.bos) if spec.family == "llama" else (f"$A {family.eos}", family.eos)
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=single.replace("$A", "$A $B"), special_tokens=[(special, backend.token_to_id(special))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=family.bos, eos_token=family.eos, unk_token=family.unk,
        pad_token=family.pad, padding_side=family.padding_side, model_max_length=512,
    )
    # <image> is already in the vocabulary, so this only marks it special (see tiny_checkpoints).
    tokenizer.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    assert tokenizer.convert_tokens_to_ids("<image>") == spec.image_token and len(tokenizer) == spec.llm_vocab
    return tokenizer


def build_qformer_tokenizer(spec: Spec) -> BertTokenizerFast:
    """BERT-uncased layout ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103) + [DEC] last."""
    fixed = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    words = [w for w in dict.fromkeys(w.lower() for w in WORDS)]
    vocab = dict(fixed)
    for i in range(spec.qformer_vocab - 1):  # the last id is [DEC]
        if i not in fixed.values():
            vocab[words.pop(0) if words else f"q{i}"] = i
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, truncation_side="left", model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    assert len(tokenizer) == spec.qformer_vocab
    return tokenizer


# ---- the checkpoint ------------------------------------------------------------------------
def hf_config(spec: Spec, llm_tok) -> InstructBlipConfig:
    if spec.family == "llama":
        text = LlamaConfig(vocab_size=spec.llm_vocab, bos_token_id=llm_tok.bos_token_id,
                           eos_token_id=llm_tok.eos_token_id, pad_token_id=spec.pad_token, **spec.text)
    else:
        text = T5Config(vocab_size=spec.llm_vocab, decoder_start_token_id=spec.pad_token,
                        eos_token_id=llm_tok.eos_token_id, pad_token_id=spec.pad_token, **spec.text)
    return InstructBlipConfig(
        vision_config=spec.vision, qformer_config=dict(spec.qformer, vocab_size=spec.qformer_vocab),
        text_config=text.to_dict(), num_query_tokens=spec.num_query_tokens, image_token_index=spec.image_token,
    )


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Matrices, embeddings and query tokens ~ N(0, 0.02); biases 0; norms weight 1, bias 0.

    In place on the model's device, so a 7B model takes a fraction of a second on a GPU.
    """
    generator = torch.Generator(device=model.query_tokens.device).manual_seed(seed)
    for module in model.modules():
        is_norm = "Norm" in type(module).__name__  # LayerNorm, LlamaRMSNorm, T5LayerNorm
        for name, param in module.named_parameters(recurse=False):
            if is_norm:
                param.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                param.zero_()
            else:
                param.normal_(0.0, INIT_STD, generator=generator)


def build_checkpoint(spec: Spec, folder: Path, device: torch.device, dtype: torch.dtype, log) -> dict:
    """Random weights of `spec` saved as transformers saves them (sharded safetensors) + processor."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPEC_FILE).unlink(missing_ok=True)
    llm_tok, qf_tok = build_llm_tokenizer(spec), build_qformer_tokenizer(spec)
    config = hf_config(spec, llm_tok)
    seconds = {}
    start = time.perf_counter()
    with torch.device(device):  # built where it will be randomised: no host copy of 16 GB
        model = InstructBlipForConditionalGeneration._from_config(config, dtype=dtype)
    if spec.family == "t5":
        _untie_t5_lm_head(model)  # Flan-T5 stores lm_head separately
    randomize(model, seed=0)
    common.sync()
    seconds["build"] = time.perf_counter() - start
    log(f"built random weights on {device} in {seconds['build']:.1f} s")
    start = time.perf_counter()
    model.save_pretrained(folder, max_shard_size=MAX_SHARD)
    seconds["save"] = time.perf_counter() - start
    params = {name: sum(p.numel() for p in getattr(model, name).parameters())
              for name in ("vision_model", "qformer", "language_model")}
    del model
    free_memory()
    log(f"saved {folder} in {seconds['save']:.1f} s")
    image_processor = BlipImageProcessorPil(
        size={"height": config.vision_config.image_size, "width": config.vision_config.image_size},
        resample=PILImageResampling.BICUBIC, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )
    InstructBlipProcessor(image_processor=image_processor, tokenizer=llm_tok, qformer_tokenizer=qf_tok,
                          num_query_tokens=spec.num_query_tokens).save_pretrained(folder)
    image_processor.save_pretrained(folder)
    info = {"spec": asdict(spec), "params": params, "seconds": seconds}
    (folder / SPEC_FILE).write_text(json.dumps(info, indent=2))
    return info


def ensure_checkpoint(name: str, workdir: Path, device, dtype, log) -> tuple[Path, dict]:
    """The folder for `name`, built unless an earlier run left a complete one of the same spec."""
    spec, folder = SPECS[name], workdir / name
    marker = folder / SPEC_FILE
    if marker.exists():
        info = json.loads(marker.read_text())
        if info["spec"] == json.loads(json.dumps(asdict(spec))):
            log(f"reusing {folder}")
            return folder, dict(info, reused=True)
    return folder, dict(build_checkpoint(spec, folder, device, dtype, log), reused=False)


def llm_fp16_bytes(folder: Path) -> int:
    """The LLM's size in 16 bits, from the checkpoint's tensor shapes (tied weights are stored once)."""
    from safetensors import safe_open

    from instructblip_core.loading import weight_files

    total = 0
    for file in weight_files(folder):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.startswith("language_model."):
                    total += 2 * torch.Size(f.get_slice(name).get_shape()).numel()
    return total


# ---- loading ---------------------------------------------------------------------------------
def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class GpuMemory:
    """Bytes the CUDA allocator holds for what was created inside the block, and its peak."""

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        self.resident = self.peak = None
        if self.cuda:
            torch.cuda.synchronize()
            self.resident = torch.cuda.memory_allocated() - self.before
            self.peak = torch.cuda.max_memory_allocated() - self.before


def load_ours(folder: Path, mode: str, device, dtype):
    kwargs = {"fp16": {}, "int8": {"load_in_8bit": True}, "int4": {"load_in_4bit": True},
              "int4-all": {"load_in_4bit": True, "quantize_fp32_modules": True}}[mode]
    return load_pretrained(folder, device=device, dtype=dtype, **kwargs)


@contextlib.contextmanager
def t5_keeps_nothing_in_fp32():
    """transformers with T5's `_keep_in_fp32_modules` (["wo"]) emptied: it then quantises wo too."""
    from transformers.models.t5.modeling_t5 import T5PreTrainedModel

    saved = T5PreTrainedModel._keep_in_fp32_modules
    T5PreTrainedModel._keep_in_fp32_modules = []
    try:
        yield
    finally:
        T5PreTrainedModel._keep_in_fp32_modules = saved


def load_reference(folder: Path, mode: str, device, dtype):
    kwargs = dict(dtype=dtype, device_map=str(device))
    if mode != "fp16":
        # As ours: only the LLM's linear layers, lm_head kept in float; 4-bit is NF4 with
        # nested (double) quantisation of the block scales, bitsandbytes' Params4bit default.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=mode == "int8", load_in_4bit=mode.startswith("int4"), llm_int8_threshold=6.0,
            bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=["vision_model", "qformer", "language_projection", "lm_head"],
        )
    with t5_keeps_nothing_in_fp32() if mode == "int4-all" else contextlib.nullcontext():
        model = InstructBlipForConditionalGeneration.from_pretrained(folder, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(folder)
    # With torchvision installed (the GPU machines) AutoProcessor picks the torch-resize backend,
    # whose pixels differ from PIL's by up to one 8-bit level (0.015 after normalising). Ours
    # follows the PIL backend (instructblip_core/images.py), so the reference must too, or the
    # two models see different images and their tokens part for that reason alone.
    processor.image_processor = BlipImageProcessorPil.from_pretrained(folder)
    return model, processor


def timed_load(fn):
    with GpuMemory() as mem:
        common.sync()
        start = time.perf_counter()
        loaded = fn()
        common.sync()
        seconds = time.perf_counter() - start
    return loaded, {"seconds": seconds, "resident_bytes": mem.resident, "load_peak_bytes": mem.peak}


def quantized_layers(module) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in module.modules())


def decode_step_bytes(llm) -> int:
    """Weight bytes one decode step reads: all of the LLM but the input embedding table (one row
    is read) and, for an encoder-decoder, the encoder (it ran once, on the prompt)."""
    total = weight_bytes(llm)
    embedding = llm.get_input_embeddings()
    if llm.config.is_encoder_decoder:
        return total - weight_bytes(llm.get_encoder())  # its embed_tokens is the shared table
    if embedding.weight is llm.get_output_embeddings().weight:  # tied: the head reads it all
        return total
    return total - weight_bytes(embedding)


def weights_report(model, llm, fp16_bytes: int) -> dict:
    llm_bytes = weight_bytes(llm)
    return {
        "llm_weight_bytes": llm_bytes, "llm_weights_over_fp16": llm_bytes / fp16_bytes,
        "all_weight_bytes": weight_bytes(model), "decode_step_bytes": decode_step_bytes(llm),
        "quantized_linear_layers": quantized_layers(model),
    }


# ---- one generation of each side --------------------------------------------------------
def reference_inputs(processor, image, prompt, device, dtype) -> dict:
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    return {k: v.to(device, dtype) if k == "pixel_values" else v.to(device) for k, v in inputs.items()}


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def clocked(fn) -> tuple[float, object]:
    common.sync()  # no-op without CUDA
    start = time.perf_counter()
    value = fn()
    common.sync()
    return time.perf_counter() - start, value


# ---- one mode ---------------------------------------------------------------------------------
@dataclass
class Setup:
    folder: Path
    device: torch.device
    dtype: torch.dtype
    new_tokens: int
    repeats: int
    bandwidth: float  # bytes/s
    fp16_llm_bytes: int
    deadline: float  # perf_counter() time by which this mode's repeats should end
    static_cache: bool = False  # ours decodes with a static KV cache (CUDA graphs on cuda)
    weights_only: bool = False  # load and weigh, no generation


def measure_cases(ours, reference, processor, setup: Setup, log) -> dict:
    """Token comparison, then interleaved timings (warm-up + repeats); returns raw numbers."""
    image, n, dev, dt = common.test_image(), setup.new_tokens, setup.device, setup.dtype
    ref_first = lambda: reference_inputs(processor, image, QUESTION_1, dev, dt)  # noqa: E731
    first = first_turn_case(ours, reference, image, ref_first, n)
    with torch.inference_mode():
        first_ids, peaks = first_turns(first)  # also the first turn's warm-up
    # The follow-up quotes ours' answer; both sides get the very same prompt text.
    answer = ours.processor.decode(torch.tensor([first_ids["ours"]]))[0]
    follow_up = build_prompt(QUESTION_2, [(QUESTION_1, answer)]).llm
    ref_later = lambda: reference_inputs(processor, image, follow_up, dev, dt)  # noqa: E731
    cases = turn_cases(ours, reference, processor, image, follow_up, ref_first, ref_later, n, min(STREAM_TOKENS, n))
    with torch.inference_mode():
        later_ids = {side: fn() for side, fn in zip(("ours", "reference"), cases["later turn, same image (s)"])}
        for name in ("first streamed piece (s)", "one token (s)"):  # the rest of the warm-up
            for fn in cases[name]:
                fn()
        times = timed_repeats(cases, setup, log)
    return {
        "times": times, "peaks": peaks, "answer": answer,
        "tokens": {turn: {**ids, "first_difference": first_difference(ids["ours"], ids["reference"])}
                   for turn, ids in (("first_turn", first_ids), ("later_turn", later_ids))},
    }


def first_turns(pair) -> tuple[dict, dict]:
    """Each side's first turn: its tokens, and the allocator's peak above what was allocated
    before it (activations, KV cache, logits; None without CUDA)."""
    ids, peaks = {}, {}
    for side, fn in zip(("ours", "reference"), pair):
        with GpuMemory() as mem:
            ids[side] = fn()
        peaks[side] = mem.peak
    return ids, peaks


def timed_repeats(cases: dict, setup: Setup, log) -> dict:
    """name -> side -> seconds per repeat, ours and the reference interleaved; stops early
    (after at least one repeat) when another would pass the mode's deadline."""
    times = {name: {"ours": [], "reference": []} for name in cases}
    repeat_seconds = 0.0
    for r in range(setup.repeats):
        if r and time.perf_counter() + repeat_seconds > setup.deadline:
            log(f"time budget: stopping after {r} of {setup.repeats} repeats")
            break
        start = time.perf_counter()
        for name, pair in cases.items():
            for side, fn in zip(("ours", "reference"), pair):
                seconds, value = clocked(fn)
                times[name][side].append(value if name.startswith("first streamed") else seconds)
        repeat_seconds = time.perf_counter() - start
    return times


def summarize(raw: dict, loads: dict, weights: dict, setup: Setup) -> dict:
    med = {name: {side: statistics.median(v) for side, v in sides.items()} for name, sides in raw["times"].items()}
    n = setup.new_tokens
    out = {"median_seconds": med, "decode_tokens_per_s": {}, "bound_tokens_per_s": {}, "fraction_of_bound": {},
           "peak_turn_bytes": {}, "repeats": len(raw["times"]["first turn (s)"]["ours"])}
    for side in ("ours", "reference"):
        step = med["later turn, same image (s)"][side] - med["one token (s)"][side]
        rate = (n - 1) / step if n > 1 and step > 0 else float("nan")
        bound = setup.bandwidth / weights[side]["decode_step_bytes"]
        out["decode_tokens_per_s"][side] = rate
        out["bound_tokens_per_s"][side] = bound
        out["fraction_of_bound"][side] = rate / bound
        peak = raw["peaks"][side]
        resident = loads[side]["resident_bytes"]
        out["peak_turn_bytes"][side] = None if peak is None else resident + peak
    return out


def run_mode(mode: str, setup: Setup, log) -> dict:
    setup = dataclasses.replace(setup, dtype=MODE_DTYPE.get(mode, setup.dtype))
    ours, ours_load = timed_load(lambda: load_ours(setup.folder, mode, setup.device, setup.dtype))
    ours.static_cache = setup.static_cache  # ignored by the engine for 8/4-bit LLMs
    log(f"{mode}: ours loaded in {ours_load['seconds']:.1f} s")
    ours_weights = weights_report(ours.model, ours.model.language_model, setup.fp16_llm_bytes)
    if setup.weights_only:  # one model in memory at a time: the real shapes fit a CPU machine
        del ours
        free_memory()
    (reference, processor), ref_load = timed_load(lambda: load_reference(setup.folder, mode, setup.device, setup.dtype))
    log(f"{mode}: transformers loaded in {ref_load['seconds']:.1f} s")
    loads = {"ours": ours_load, "reference": ref_load}
    weights = {"ours": ours_weights, "reference": weights_report(reference, reference.language_model, setup.fp16_llm_bytes)}
    if setup.weights_only:
        del reference, processor
        free_memory()
        return {"dtype": str(setup.dtype), "load": loads, "weights": weights}
    start = time.perf_counter()
    try:
        raw = measure_cases(ours, reference, processor, setup, log)
    finally:
        del ours, reference, processor
        free_memory()
    log(f"{mode}: measured in {time.perf_counter() - start:.1f} s")
    return {"load": loads, "weights": weights, **raw, **summarize(raw, loads, weights, setup)}


# ---- reporting ---------------------------------------------------------------------------------
def gib(x):
    return "n/a" if x is None else x / GIB


def ratio(a, b):
    return "n/a" if a is None or b is None or not b else a / b


def mode_table(result: dict) -> str:
    med, w, ld = result["median_seconds"], result["weights"], result["load"]
    rows = [[name, med[name]["ours"], med[name]["reference"], med[name]["ours"] / med[name]["reference"]]
            for name in med if name != "one token (s)"]
    per_side = {
        "decode tokens/s": lambda s: result["decode_tokens_per_s"][s],
        "decode / bandwidth bound": lambda s: result["fraction_of_bound"][s],
        "load (s)": lambda s: ld[s]["seconds"],
        "LLM weights (GiB)": lambda s: w[s]["llm_weight_bytes"] / GIB,
        "LLM weights / fp16": lambda s: w[s]["llm_weights_over_fp16"],
        "all weights (GiB)": lambda s: w[s]["all_weight_bytes"] / GIB,
        "GPU memory after load (GiB)": lambda s: gib(ld[s]["resident_bytes"]),
        "peak GPU memory in a turn (GiB)": lambda s: gib(result["peak_turn_bytes"][s]),
    }
    for name, get in per_side.items():
        o, r = get("ours"), get("reference")
        rows.append([name, o, r, ratio(o, r) if isinstance(o, float) else "n/a"])
    return common.table(["measure", "ours", "transformers", "ours / transformers"], rows)


def tokens_line(result: dict) -> str:
    parts = []
    for turn, t in result["tokens"].items():
        k = t["first_difference"]
        if k is None:
            parts.append(f"{turn.replace('_', ' ')}: same {len(t['ours'])} tokens")
        else:
            parts.append(f"{turn.replace('_', ' ')}: DIFFER from position {k} "
                         f"(ours {t['ours'][k:k + 3]}, transformers {t['reference'][k:k + 3]})")
    return "Generated tokens, " + "; ".join(parts) + f". Ours' first answer starts: {result['answer'][:60]!r}"


def summary_table(report: dict) -> str:
    def pair(a, b, fmt="{:.3g}"):
        return " / ".join("n/a" if v is None else fmt.format(v) for v in (a, b))

    rows = []
    for mode, r in report["modes"].items():
        if "error" in r:
            rows.append([mode, "failed: " + r["error"][:60]] + [""] * 6)
            continue
        med, dec, ours_w = r["median_seconds"], r["decode_tokens_per_s"], r["weights"]["ours"]
        same = all(t["first_difference"] is None for t in r["tokens"].values())
        rows.append([
            mode,
            pair(med["first turn (s)"]["ours"], med["first turn (s)"]["reference"]),
            pair(med["later turn, same image (s)"]["ours"], med["later turn, same image (s)"]["reference"]),
            pair(med["first streamed piece (s)"]["ours"], med["first streamed piece (s)"]["reference"]),
            pair(dec["ours"], dec["reference"]) + f" ({r['fraction_of_bound']['ours']:.1%} of bound)",
            f"{ours_w['llm_weight_bytes'] / GIB:.3g} ({ours_w['llm_weights_over_fp16']:.2f})",
            pair(*(None if v is None else v / GIB for v in r["peak_turn_bytes"].values())),
            "yes" if same else "no",
        ])
    headers = ["mode", "first turn (s) ours / tf", "later turn (s) ours / tf", "first piece (s) ours / tf",
               "decode tok/s ours / tf", "ours LLM GiB (/ fp16)", "peak GiB ours / tf", "same tokens"]
    return common.table(headers, rows)


def weights_table(report: dict) -> str:
    rows = []
    for mode, r in report["modes"].items():
        if "error" in r:
            rows.append([mode, "failed: " + r["error"][:60]] + [""] * 4)
            continue
        w = r["weights"]
        rows.append([mode, r["dtype"].replace("torch.", ""),
                     *(f"{w[side]['llm_weight_bytes'] / GIB:.3g} ({w[side]['llm_weights_over_fp16']:.3f})"
                       for side in ("ours", "reference")),
                     *(w[side]["quantized_linear_layers"] for side in ("ours", "reference"))])
    headers = ["mode", "float dtype", "ours LLM GiB (/ fp16)", "tf LLM GiB (/ fp16)", "ours quantised layers",
               "tf quantised layers"]
    return common.table(headers, rows)


def bnb_version() -> str:
    try:
        import bitsandbytes
    except ImportError:
        return "not installed"
    return bitsandbytes.__version__


def header(device: torch.device) -> str:
    command = "python bench/gpu.py " + " ".join(sys.argv[1:])
    return f"{common.machine()}, bitsandbytes {bnb_version()}; device {device}\n\nCommand: `{command}`"


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))


# ---- main -----------------------------------------------------------------------------------------
def memory_bandwidth(device: torch.device) -> float:
    """Device memory bandwidth, bytes/s: a large copy reads and writes every byte once."""
    size = (2 * GIB) if device.type == "cuda" else (256 * 1024**2)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    reps = 10 if device.type == "cuda" else 3

    def copies():
        for _ in range(reps):
            dst.copy_(src)

    best = min(clocked(copies)[0] for _ in range(3))
    return 2 * size * reps / best


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(SPECS), required=True)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, of " + ", ".join(MODES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                   help="float dtype of the weights (fp16 mode) and of what stays in float in int8/int4")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on cpu, torch's default with cuda)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gpu-bench"))
    p.add_argument("--static-cache", action="store_true",
                   help="ours decodes with a static KV cache, which transformers compiles into CUDA graphs on "
                        "cuda (the reference keeps its default dynamic cache); the warm-up turns absorb the compiling")
    p.add_argument("--weights-only", action="store_true",
                   help="load each side in each mode and report the weights only, no generation (one model in "
                        "memory at a time: the real shapes fit a CPU machine)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="whole-run time budget; repeats are cut (never below 1) to stay within it")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        p.error(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {message}", flush=True)

    transformers.utils.logging.set_verbosity_error()  # per-call generate warnings would bury the tables
    transformers.utils.logging.disable_progress_bar()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    # On a shared CPU every parallel op waits for its slowest thread (a scheduler slice when a
    # core is busy elsewhere): one thread keeps a CPU run, a check of the code path, quick and even.
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    out_path = Path(os.environ["OUT"]) if os.environ.get("OUT") else args.workdir
    out_path = out_path / f"gpu-{args.model}.json"
    print(header(device), flush=True)
    report = {
        "model": args.model, "command": sys.argv, "machine": common.machine(), "device": str(device),
        "dtype": args.dtype, "static_cache": args.static_cache, "new_tokens": args.new_tokens, "stream_tokens": min(STREAM_TOKENS, args.new_tokens),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "bitsandbytes": bnb_version()},
        "modes": {},
    }
    bandwidth = memory_bandwidth(device)
    free_memory()
    report["bandwidth_bytes_per_s"] = bandwidth
    log(f"memory bandwidth (copy): {bandwidth / 1e9:.0f} GB/s")
    folder, report["checkpoint"] = ensure_checkpoint(args.model, args.workdir, device, dtype, log)
    fp16_bytes = llm_fp16_bytes(folder)
    deadline = t0 + args.budget_s
    for i, mode in enumerate(args.modes):
        # Share what is left of the budget among this mode and the later ones (each needs ~ a load too).
        left = max(deadline - time.perf_counter(), 0.0)
        setup = Setup(folder, device, dtype, args.new_tokens, args.repeats, bandwidth, fp16_bytes,
                      deadline=time.perf_counter() + left / (len(args.modes) - i), static_cache=args.static_cache,
                      weights_only=args.weights_only)
        try:
            result = run_mode(mode, setup, log)
        except Exception as e:  # one mode failing (e.g. a bitsandbytes kernel) must not lose the others
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"}
        free_memory()  # out here: the exception's frames no longer hold the models
        report["modes"][mode] = result
        write_json(report, out_path)
        if "error" not in result and not args.weights_only:
            print(f"\n### {args.model}, {mode}, {args.new_tokens} new tokens, greedy, {result['repeats']} repeats\n")
            print(mode_table(result))
            print("\n" + tokens_line(result) + "\n", flush=True)
    log(f"done; numbers in {out_path}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n### summary: {args.model} on {where}, {args.new_tokens} new tokens, greedy; "
          f"memory bandwidth {bandwidth / 1e9:.0f} GB/s\n")
    print((weights_table if args.weights_only else summary_table)(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
