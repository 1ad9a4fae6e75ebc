"""Load and save Hugging Face-format InstructBLIP / BLIP-2 checkpoints.

A checkpoint is a folder (or a hub repo id, downloaded with huggingface_hub) holding
`config.json`, the weights (`model.safetensors`, sharded `model-0000x-of-0000y.safetensors` with
an index, or the older `pytorch_model*.bin`) and the processor files. The model is built on the
meta device and every tensor is assigned straight from the file, so a 7B checkpoint never
exists twice in memory and nothing is randomly initialised. Keys must match exactly: a
checkpoint key the model lacks, or a model parameter the checkpoint lacks (other than weights
the LLM ties to another), is an error, not a warning.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file

from .config import BLIP2, InstructBlipConfig
from .model import InstructBlipForConditionalGeneration
from .processing import Processor
from .quantization import is_quantized, quantize_linear_layers

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "qformer_tokenizer/*"]
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
MAX_SHARD_BYTES = 5 * 1024**3


class CheckpointError(RuntimeError):
    """The checkpoint is missing, unreachable, or does not fit this model."""


# ---- where the files are ------------------------------------------------------------------
def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded (or taken from the cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint's folder")
    name = str(name_or_path)
    if not HUB_ID.match(name):
        raise CheckpointError(f"{name} is neither a folder nor a Hugging Face repo id like 'Salesforce/instructblip-vicuna-7b'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        # Prefers safetensors; .bin files are fetched only for repos that have nothing else.
        folder = Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS + ["*.bin"]))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{name} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline mode or no network). Download it on a connected machine "
            f"(`hf download {name}`) or pass a local folder."
        ) from e
    except Exception as e:  # repo missing, gated, network error: say which repo and why
        raise CheckpointError(f"could not download {name}: {type(e).__name__}: {e}") from e
    return folder


def weight_files(folder: Path) -> list[Path]:
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return [folder / single]
    raise CheckpointError(f"{folder} holds no weights (model.safetensors, a sharded index or pytorch_model.bin)")


def iter_tensors(files: list[Path]):
    """(name, tensor) for every tensor of every shard, one shard in memory at a time."""
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            yield from torch.load(file, map_location="cpu", weights_only=True).items()


# ---- dtype policy --------------------------------------------------------------------------
def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantized_llm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Compute dtype of an 8/4-bit LLM: bitsandbytes works in 16 bits (fp32 inputs are cast to fp16)."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


# What transformers keeps in fp32 when asked for fp16 (`_keep_in_fp32_modules`): the composite
# model's own list, and the LLM's (T5: "wo", whose activations overflow fp16).
COMPOSITE_KEEP_IN_FP32 = {BLIP2: ("query_tokens", "qformer")}
DEFAULT_KEEP_IN_FP32 = ("query_tokens",)


def keep_in_fp32_patterns(model: InstructBlipForConditionalGeneration, dtype: torch.dtype | None,
                          *, quantize_fp32_modules: bool = False) -> list[str]:
    """Patterns of the weights kept in fp32 for `dtype` (None: the list whatever the dtype,
    which transformers also leaves out of 8/4-bit quantisation; with `quantize_fp32_modules`
    that list no longer holds the LLM's own, which is then quantised after all)."""
    llm = model.language_model
    composite = list(COMPOSITE_KEEP_IN_FP32.get(model.config.model_type, DEFAULT_KEEP_IN_FP32))
    llm_loose = list(getattr(llm, "_keep_in_fp32_modules", None) or [])
    strict = list(getattr(llm, "_keep_in_fp32_modules_strict", None) or [])
    if dtype is None:
        return composite + ([] if quantize_fp32_modules else llm_loose) + strict
    loose = composite + llm_loose if dtype == torch.float16 else []
    return loose + (strict if dtype in (torch.float16, torch.bfloat16) else [])


def check_quantize_fp32_modules(model, bits: int | None, llm_dtype: torch.dtype) -> None:
    """Quantising what the LLM keeps in fp32 is safe only where nothing computes in fp16."""
    if bits != 4:
        raise ValueError(
            "quantize_fp32_modules needs load_in_4bit: bitsandbytes' 8-bit matmul computes in fp16 whatever "
            "the dtype, and the layers an LLM keeps in fp32 (T5's wo) are kept there because their outputs overflow fp16"
        )
    kept = getattr(model.language_model, "_keep_in_fp32_modules", None)
    if kept and llm_dtype != torch.bfloat16:
        raise ValueError(
            f"quantize_fp32_modules needs dtype=bfloat16: this LLM keeps {', '.join(kept)} in fp32 because "
            f"its outputs overflow {str(llm_dtype).replace('torch.', '')}"
        )


def name_matcher(patterns: list[str]) -> re.Pattern | None:
    """transformers' rule: a pattern (with * globs) searched anywhere in the full weight name.
    So T5's "wo" also matches the Q-Former's "word_embeddings", which the reference therefore
    loads in fp32 as well; parity means doing the same."""
    return re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in patterns)) if patterns else None


def tensor_dtype(name: str, keep: re.Pattern | None, dtype: torch.dtype, llm_dtype: torch.dtype) -> torch.dtype:
    if keep is not None and keep.search(name):
        return torch.float32
    return llm_dtype if name.startswith("language_model.") else dtype


# ---- building the model ------------------------------------------------------------------
def build_empty_model(config: InstructBlipConfig) -> InstructBlipForConditionalGeneration:
    """Parameters on the meta device (no memory, no init); buffers real (rotary tables, ids)."""
    with init_empty_weights(include_buffers=False):
        return InstructBlipForConditionalGeneration(config)


def load_weights(model, files: list[Path], dtype: torch.dtype, device: torch.device, llm_dtype: torch.dtype | None = None) -> None:
    # remove_duplicate=False: a weight the LLM ties at construction (T5's lm_head) may still be
    # stored separately in the checkpoint (Flan-T5 unties it), and must be accepted then.
    expected = dict(model.named_parameters(remove_duplicate=False))
    expected.update({n: b for n, b in model.named_buffers() if n in model.state_dict()})
    # A quantised LLM computes in fp16 even when the rest is fp32: its dtype decides what stays fp32.
    keep = name_matcher(keep_in_fp32_patterns(model, llm_dtype or dtype))
    unexpected, loaded = [], set()
    for name, tensor in iter_tensors(files):
        if name not in expected:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(expected[name].shape)}")
        target = tensor_dtype(name, keep, dtype, llm_dtype or dtype)
        value = tensor.to(target) if tensor.is_floating_point() else tensor
        set_module_tensor_to_device(model, name, device, value=value, dtype=value.dtype)
        loaded.add(name)
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} key(s) this model does not: {unexpected[:10]}")
    # Weights the LLM ties (e.g. OPT's lm_head = embed_tokens) are saved once: tie the missing
    # ones to what was loaded; weights the checkpoint holds separately stay separate.
    prefix = "language_model."
    lm_missing = {n[len(prefix):] for n, p in model.named_parameters(remove_duplicate=False)
                  if p.device.type == "meta" and n.startswith(prefix)}
    if lm_missing:
        model.language_model.tie_weights(missing_keys=lm_missing)
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} weight(s) of the model: {missing[:10]}")


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    quantize_fp32_modules: bool = False,
    revision: str | None = None,
):
    """Load an InstructBLIP or BLIP-2 checkpoint (hub id or folder) with its processor.

    dtype: float dtype of the weights (default fp32 on CPU, bf16/fp16 on GPU). With 8-bit or
    4-bit, the LLM's linear layers are quantised by bitsandbytes and the rest of the LLM computes
    in 16 bits (`dtype` if it is fp16/bf16, else fp16); the vision encoder and Q-Former stay in `dtype`.
    quantize_fp32_modules: with 4-bit, quantise the LLM layers that transformers keeps in fp32 and
    out of quantisation as well (T5's feed-forward output `wo`, a third of Flan-T5's LLM). The
    LLM gets smaller, but its numbers are no longer those of transformers' 4-bit load. It needs
    dtype=bfloat16 and 4-bit: T5 keeps `wo` in fp32 because its outputs overflow fp16, and
    bitsandbytes' 8-bit matmul computes in fp16 whatever the dtype.
    Returns an `InstructBlip` (model + processor) in eval mode.
    """
    from .pipeline import InstructBlip

    if load_in_8bit and load_in_4bit:
        raise ValueError("choose load_in_8bit or load_in_4bit, not both")
    device = torch.device(device)
    if device.type == "cpu":  # "cpu:0" (accelerate's name in multi-process runs) is the same memory
        device = torch.device("cpu")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    dtype = dtype or default_dtype(device)
    folder = resolve_checkpoint(name_or_path, revision)
    config = InstructBlipConfig.from_json_file(folder / "config.json")
    model = build_empty_model(config)
    bits = 8 if load_in_8bit else 4 if load_in_4bit else None
    llm_dtype = quantized_llm_dtype(dtype) if bits else dtype
    if quantize_fp32_modules:
        check_quantize_fp32_modules(model, bits, llm_dtype)
    # bitsandbytes quantises when a CPU tensor moves to the target device, so the LLM waits on the CPU.
    load_weights(model, weight_files(folder), dtype, torch.device("cpu") if bits else device, llm_dtype)
    if bits:
        skip = name_matcher(keep_in_fp32_patterns(model, None, quantize_fp32_modules=quantize_fp32_modules))
        quantize_linear_layers(model.language_model, bits, llm_dtype, device, skip=skip, prefix="language_model.")
    # The buffers built with the model (Q-Former position ids, rotary tables) are not in the
    # checkpoint and were made on the CPU: they follow the weights to the device.
    model.to(device)
    model.eval()
    processor = Processor.from_folder(
        folder,
        num_query_tokens=config.num_query_tokens,
        is_encoder_decoder=config.is_encoder_decoder,
        instruction_aware=config.qformer_config.use_text_input,
        qformer_positions=config.qformer_config.max_position_embeddings,
    )
    return InstructBlip(model, processor, source=str(name_or_path))


# ---- saving ------------------------------------------------------------------------------
def unique_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (safetensors stores each storage once)."""
    seen, out = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.device.type != "meta" and key in seen:
            continue
        seen[key] = name
        out[name] = tensor.detach().contiguous().cpu()
    return out


def save_weights(model, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    if is_quantized(model.language_model):
        raise CheckpointError("cannot save a model with an 8-bit/4-bit LLM; load it in float to export it")
    state = unique_state_dict(model)
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_pretrained(model, processor: Processor | None, folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(folder / "config.json")
    save_weights(model, folder)
    gen_config = getattr(model.language_model, "generation_config", None)
    if gen_config is not None:
        gen_config.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder
