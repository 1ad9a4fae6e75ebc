"""The one training configuration: a typed dataclass read from YAML, with `--key=value` overrides.

    config = load_config("finetune/examples/instruct.yaml", ["--lr=3e-5", "--lora=true"])

Every field is documented where it is declared (and in finetune/README.md). Values are
checked against the field's type: a YAML or command-line mistake is an error naming the
file, line and key ("run.yaml:7: lr: expected a number, got 'fast'"), and an unknown key is
an error that suggests the closest known one. Override values are parsed as YAML scalars or
flow collections: `--lr=1e-4`, `--lora=true`, `--lora_target_modules=[q_proj,v_proj]`,
`--train_data=[{path: a.jsonl, task: caption}]`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

STAGES = ("instruct", "stage2", "stage1", "grounding")


class ConfigError(ValueError):
    """A configuration mistake; the message names the file:line (or the override) and the key."""


@dataclass
class DataConfig:
    """One training dataset of the mixture."""

    path: str  # .jsonl / .json file; image paths inside are relative to its folder
    task: str  # task type (templates and metrics follow it): caption, short_vqa, long_vqa, yes_no, multiple_choice, ...
    name: str = ""  # shown in logs and the mixture table; default: the file's stem
    weight: float | None = None  # replaces sqrt(size) (or size) of this dataset in the mixture
    skip_bad: bool = False  # skip (and count) bad lines instead of stopping at the first one


@dataclass
class EvalDataConfig:
    """One evaluation set."""

    path: str  # .jsonl / .json file, same formats as training data
    task: str  # task type: picks the prompt templates and the default metric
    name: str = ""  # metric names are eval/<name>/<metric>; default: the file's stem
    metric: Literal["auto", "vqa_accuracy", "exact_match", "ranking_accuracy", "cider"] = "auto"  # auto: cider for captions, ranking_accuracy for multiple_choice/classification with options, else vqa_accuracy
    max_examples: int | None = None  # evaluate the first N records only (quick checks during training)


@dataclass
class TrainConfig:
    # ---- what to train -----------------------------------------------------------------------
    model: str  # base checkpoint: a folder in Hugging Face layout or a hub id (Salesforce/instructblip-vicuna-7b)
    train_data: list[DataConfig]  # one or more datasets, mixed by `sampling`
    output_dir: str = "runs/finetune"  # checkpoints/, metrics.jsonl, tensorboard/, export/
    stage: Literal["instruct", "stage2", "stage1", "grounding"] = "instruct"  # instruct: InstructBLIP instruction tuning; stage2: BLIP-2 LM loss, no instruction in the Q-Former; stage1: Q-Former ITC+ITM+ITG on frozen image features; grounding: the Q-Former's cross-attention toward records' "regions" (no LLM pass)
    eval_data: list[EvalDataConfig] = field(default_factory=list)  # evaluated every eval_every steps and at the end

    # ---- data ----------------------------------------------------------------------------------
    sampling: Literal["sqrt", "proportional"] = "sqrt"  # dataset d drawn with p ~ sqrt(size_d) (InstructBLIP) or ~ size_d
    grounding_weight: float = 0.0  # instruct: add this x the grounding loss on records with "regions" (0: LM loss only)
    qformer_instruction: bool = True  # false: the Q-Former never reads the instruction (BLIP-2-style features; recorded in the export)
    prompt_style: Literal["auto", "instruction", "task_tag", "none"] = "auto"  # auto: instruction templates (instruct), raw text (stage2, stage1)
    max_answer_tokens: int = 256  # longer answers are an error naming file:line (or skipped with skip_bad)
    max_prompt_tokens: int = 512  # longer prompts lose their oldest turns / are cut from the left
    augment: bool = False  # RandomResizedCrop(0.5-1) on training images (the paper's recipe)
    horizontal_flip: bool = False  # with augment: also flip (breaks left/right questions and text)
    cache_image_features: bool = False  # cache frozen ViT outputs per image (needs augment: false, train_vision: false)
    feature_cache_dir: str | None = None  # keep that cache on disk here (reused by runs with the same image encoder); default: in memory
    num_workers: int = 0  # DataLoader worker processes per training process
    verify_images: bool = False  # decode every image at load, so unreadable ones are found (and skippable) before training

    # ---- model ---------------------------------------------------------------------------------
    train_vision: bool = False  # also train the ViT (frozen in the paper)
    lora: bool = False  # add LoRA adapters to the frozen LLM and train them too
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None  # LLM linear layers to adapt; default: the attention q/v projections found in the LLM
    load_in_8bit: bool = False  # LLM weights in 8-bit (bitsandbytes); export reloads the base in float
    load_in_4bit: bool = False  # LLM weights in 4-bit NF4
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype of the frozen weights; trainable ones are always float32
    qformer_dropout: float | None = None  # override the Q-Former's dropout probabilities (0 for exact multi-process comparisons)
    frozen_dropout: bool = False  # keep dropout on inside the frozen ViT/LLM (default: they run as fixed functions)
    stage1_init: Literal["base", "random"] = "base"  # stage1 Q-Former start: the base checkpoint's, or BERT-style random (BLIP-2 from scratch)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower

    # ---- optimisation -------------------------------------------------------------------------
    seed: int = 42
    max_steps: int = 1000  # optimizer steps
    per_device_batch_size: int = 8  # micro-batch size per process
    gradient_accumulation_steps: int = 1  # global batch = per_device_batch_size x processes x this
    lr: float = 1e-5  # peak learning rate (InstructBLIP: 1e-5; BLIP-2 stage 1: 1e-4)
    min_lr_ratio: float = 0.0  # the cosine ends at lr x this
    warmup_steps: int = 100  # linear warmup (InstructBLIP: 1000 of 60k steps)
    weight_decay: float = 0.05  # on matrices only; biases and norm weights are never decayed
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables it
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast compute dtype (bf16 also works on CPU)
    find_unused_parameters: bool = False  # DDP: set when some trainable parameters get no gradient in a step

    # ---- evaluation, logging, checkpoints -----------------------------------------------------
    eval_every: int = 0  # evaluate every N steps (0: only at the end)
    eval_batch_size: int = 8
    eval_max_new_tokens: int = 30  # generation length for vqa_accuracy / exact_match / cider
    eval_num_beams: int = 1  # the paper evaluates with 5 beams
    log_every: int = 10  # steps between metric lines (loss is averaged over them)
    save_every: int = 500  # steps between checkpoints (0: only at the end)
    keep_last: int = 3  # checkpoints kept on disk (older ones are deleted)
    resume: str = "auto"  # auto: continue from the newest checkpoint in output_dir; never; or a checkpoint folder
    tensorboard: bool = True  # also write TensorBoard scalars to output_dir/tensorboard
    progress_bar: bool = True
    export: bool = True  # write output_dir/export: a full Hugging Face checkpoint (LoRA merged)
    export_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self):
        checks = [
            (self.max_steps >= 1, "max_steps", "must be >= 1"),
            (self.per_device_batch_size >= 1, "per_device_batch_size", "must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1"),
            (self.lr > 0, "lr", "must be > 0"),
            (not (self.load_in_8bit and self.load_in_4bit), "load_in_4bit", "choose load_in_8bit or load_in_4bit, not both"),
            (not (self.cache_image_features and (self.augment or self.train_vision)), "cache_image_features",
             "needs augment: false and train_vision: false (cached features would be stale)"),
            (self.qformer_dropout is None or 0 <= self.qformer_dropout < 1, "qformer_dropout", "must be in [0, 1)"),
            (bool(self.train_data), "train_data", "needs at least one dataset"),
            (not (self.stage == "stage1" and self.lora), "lora", "stage1 trains the Q-Former only (no LLM)"),
            (self.grounding_weight >= 0, "grounding_weight", "must be >= 0"),
            (self.grounding_weight == 0 or self.stage == "instruct", "grounding_weight",
             "is an instruct-stage option (the grounding stage trains on that loss alone)"),
            (not (self.grounds and self.augment), "augment",
             "must be false with grounding: random crops would move the images away from their regions"),
            (not (self.grounds and not self.qformer_instruction), "qformer_instruction",
             "must be true with grounding: a Q-Former that reads no instruction cannot look where it points"),
            (not (self.stage == "grounding" and (self.lora or self.train_vision)), "stage",
             "grounding trains the Q-Former and its queries only (no lora, no train_vision)"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"{key}: {message}")

    @property
    def resolved_prompt_style(self) -> str:
        if self.prompt_style != "auto":
            return self.prompt_style
        return "instruction" if self.stage in ("instruct", "grounding") else "none"

    @property
    def grounds(self) -> bool:
        """Whether this run trains on the grounding loss (the grounding stage, or instruct with a weight)."""
        return self.stage == "grounding" or self.grounding_weight > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- loading ------------------------------------------------------------------------------------
def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """TrainConfig from a YAML file plus `--key=value` overrides (command-line order wins)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
        lines = _key_lines(text)
    except yaml.YAMLError as e:
        # The construct that went wrong starts at context_mark (e.g. an unclosed "["); the
        # parser noticed at problem_mark, possibly lines later.
        mark = getattr(e, "context_mark", None) or getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'context', None) or ''} {getattr(e, 'problem', e)}".replace(":  ", ": ")) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping of key: value, got {type(data).__name__}")
    where = {key: f"{path}:{line}" for key, line in lines.items()}
    for override in overrides:
        key, value = parse_override(override)
        data[key] = value
        where[key] = f"command-line override {override!r}"
    return build(TrainConfig, data, where, default_where=str(path))


def parse_override(text: str) -> tuple[str, Any]:
    if not text.startswith("--") or "=" not in text:
        raise ConfigError(f"override {text!r} must look like --key=value (e.g. --lr=1e-4)")
    key, raw = text[2:].split("=", 1)
    key = key.replace("-", "_")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from None
    return key, value


def _key_lines(text: str) -> dict[str, int]:
    """Top-level key -> line number (1-based), for error messages."""
    node = yaml.compose(text)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def build(cls, data: dict, where: dict[str, str], default_where: str):
    """Instantiate dataclass `cls` from `data`, checking keys and types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
        raise ConfigError(f"{where.get(key, default_where)}: unknown key {key!r}{hint}")
    missing = [name for name, f in fields.items() if name not in data and _required(f)]
    if missing:
        raise ConfigError(f"{default_where}: missing required key(s) {missing}")
    values = {k: coerce(v, hints[k], k, where.get(k, default_where)) for k, v in data.items()}
    try:
        return cls(**values)
    except ConfigError as e:
        key = str(e).split(":", 1)[0]
        raise ConfigError(f"{where.get(key, default_where)}: {e}") from None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def coerce(value: Any, annotation: Any, key: str, where: str) -> Any:
    """Check `value` against a type annotation; ints are accepted for floats."""

    def fail(expected: str):
        raise ConfigError(f"{where}: {key}: expected {expected}, got {value!r}")

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return coerce(value, options[0], key, where) if len(options) == 1 else value
    if origin is Literal:
        if value not in args:
            fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin is list:
        if not isinstance(value, list):
            fail("a list")
        return [coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            fail(f"a mapping with keys {[f.name for f in dataclasses.fields(annotation)]}")
        return build(annotation, value, {}, default_where=f"{where}: {key}")
    if annotation is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-4` (no dot) as a string; it is meant as a number.
            try:
                return float(value)
            except ValueError:
                fail("a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    return value
