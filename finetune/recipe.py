"""Building blocks of the recipes: model set-up per stage, datasets, evaluation sets, export.

Shared by `finetune.train` and `finetune.evaluate`. What is trained, per stage:
  instruct  Q-Former (+ queries, its word embeddings) + projection; the instruction goes to the
            Q-Former (InstructBLIP). Options: + LoRA on the LLM, + the ViT, + the grounding loss
            (`grounding_weight`) on records with "regions".
  stage2    the same parameters with BLIP-2's inputs: no instruction template, raw prompts
            (captions: an empty prompt, so an InstructBLIP Q-Former reads only [CLS] [SEP] and a
            BLIP-2 one no text at all); decoder-only LLMs get the LM loss, encoder-decoder ones
            the prefix-LM loss (prompt to the encoder, answer as the target).
  grounding the Q-Former and its queries on the grounding loss alone (instructblip_core/grounding.py):
            their cross-attention toward the "regions" of the records that have them; no LLM pass
  stage1    a `stage1.QFormerPretrainer` (ITC + ITM + ITG; Q-Former and queries from the base
            model or random, `stage1_init`) on the frozen ViT's outputs; the export puts its
            Q-Former and queries into the base model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from instructblip_core.augment import EvalTransform, TrainTransform
from instructblip_core.checkpointing import replace_folder
from instructblip_core.collate import InstructionCollator, answer_token_counter, pad_rows, stack_pixels
from instructblip_core.data import DeferredImage, ImageFeatureCache, InstructionDataset, load_records
from instructblip_core.evaluation import EvalSet, Evaluator
from instructblip_core.features import weights_fingerprint
from instructblip_core.generation import GenerationOptions
from instructblip_core.grounding import GroundedInstructionModel, GroundingModel
from instructblip_core.loading import load_pretrained
from instructblip_core.lora import LoraSettings, add_lora, merge_lora
from instructblip_core.pipeline import InstructBlip
from instructblip_core.processing import Processor
from instructblip_core.prompts import QFORMER_INSTRUCTION_KEY, TEMPLATE_KEY, PromptTemplate
from instructblip_core.qformer import QFormerMultiHeadAttention
from instructblip_core.stage1 import QFormerPretrainer
from instructblip_core.wrapper import LossOnly, ModelWrapper, unwrap

from .config import ConfigError, TrainConfig


# ---- model ------------------------------------------------------------------------------------
def load_base(config: TrainConfig, device: torch.device | str = "cpu") -> InstructBlip:
    return load_pretrained(
        config.model, device=device, dtype=config.dtype, load_in_8bit=config.load_in_8bit, load_in_4bit=config.load_in_4bit
    )


def set_qformer_dropout(qformer: nn.Module, p: float) -> None:
    for module in qformer.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(module, QFormerMultiHeadAttention):
            module.dropout = p


def lora_settings(config: TrainConfig) -> LoraSettings:
    targets = tuple(config.lora_target_modules) if config.lora_target_modules else None
    return LoraSettings(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout, target_modules=targets)


def _trainable_in_float32(model: nn.Module) -> None:
    """Trainable weights in float32 (AdamW master weights), whatever dtype the frozen ones have."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def prepare_for_tuning(model: nn.Module, config: TrainConfig) -> None:
    """Freeze as the paper does (+ options), trainable weights in float32 (AdamW master weights)."""
    model.freeze_for_instruction_tuning(train_vision=config.train_vision)
    if config.lora:
        add_lora(model, lora_settings(config))
    if config.qformer_dropout is not None:
        set_qformer_dropout(model.qformer, config.qformer_dropout)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    _trainable_in_float32(model)


class WithCachedImageFeatures(ModelWrapper):
    """`model(**batch)` with the frozen image encoder's outputs looked up instead of recomputed."""

    def __init__(self, model: nn.Module, cache: ImageFeatureCache):
        super().__init__(model)
        self.cache = cache

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() == 5:  # video clips (B, F, 3, H, W) -> (B, F, N, Cv)
            return self.model.encode_images(pixel_values.flatten(0, 1)).unflatten(0, pixel_values.shape[:2])
        return self.model.encode_images(pixel_values)  # (B, N, Cv)

    def forward(self, pixel_values: torch.Tensor | list[DeferredImage], **batch):
        image_embeds = self.cache.get_or_compute(pixel_values, self._encode, device=next(self.model.parameters()).device)
        return self.model(image_embeds=image_embeds, **batch)


class Stage1Model(nn.Module):
    """Frozen image encoder (outputs optionally cached) -> QFormerPretrainer's three losses."""

    def __init__(self, vision_model: nn.Module, pretrainer: QFormerPretrainer, cache: ImageFeatureCache | None):
        super().__init__()
        self.vision_model = vision_model
        self.pretrainer = pretrainer
        self.cache = cache

    def forward(self, pixel_values: torch.Tensor | list[DeferredImage], text_input_ids: torch.Tensor,
                text_attention_mask: torch.Tensor, **negatives):
        with torch.no_grad():
            if self.cache is not None:
                image_embeds = self.cache.get_or_compute(pixel_values, self.vision_model, device=text_input_ids.device)
            else:
                image_embeds = self.vision_model(pixel_values)  # (B, N, Cv)
        return self.pretrainer(image_embeds, text_input_ids, text_attention_mask, **negatives)


def feature_cache(config: TrainConfig, vision_model: nn.Module) -> ImageFeatureCache | None:
    if not config.cache_image_features:
        return None
    if config.feature_cache_dir is None:
        return ImageFeatureCache()
    # On disk the entries are keyed by the frozen encoder's weights, not by the checkpoint's path:
    # the stages of a recipe (each starting from the previous export, with the same encoder)
    # share them, and another encoder, even one saved over the same folder, never reads them.
    return ImageFeatureCache(config.feature_cache_dir, namespace=weights_fingerprint(vision_model))


def build_stage1(blip: InstructBlip, config: TrainConfig) -> Stage1Model:
    tokenizer = blip.processor.qformer_tokenizer
    if tokenizer is None or tokenizer.bos_token_id is None:
        raise ConfigError(
            "stage1 needs the Q-Former's BERT tokenizer with [DEC]; the base model has none "
            "(use an InstructBLIP checkpoint, whose folder has qformer_tokenizer/)"
        )
    model = blip.model
    for p in model.parameters():
        p.requires_grad_(False)
    pretrainer = QFormerPretrainer(
        model.config.qformer_config, bos_token_id=tokenizer.bos_token_id, num_query_tokens=model.config.num_query_tokens
    ).to(blip.device)
    if config.stage1_init == "base":
        # Continue from the checkpoint's Q-Former and queries; the ITC/ITM/ITG heads start fresh.
        with torch.no_grad():
            pretrainer.qformer.load_state_dict(model.qformer.state_dict())
            pretrainer.query_tokens.copy_(model.query_tokens)
    if config.qformer_dropout is not None:
        set_qformer_dropout(pretrainer.qformer, config.qformer_dropout)
    if config.gradient_checkpointing:
        pretrainer.gradient_checkpointing_enable()
    return Stage1Model(model.vision_model, pretrainer, feature_cache(config, model.vision_model))


def prepare_for_grounding(model: nn.Module) -> None:
    """The grounding stage trains what decides where the queries look: the Q-Former and the queries."""
    if not model.is_instruction_aware:
        raise ConfigError("stage grounding: this checkpoint's Q-Former reads no instruction (BLIP-2), so it cannot learn where one points")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.qformer.parameters():
        p.requires_grad_(True)
    model.query_tokens.requires_grad_(True)
    _trainable_in_float32(model)


def training_module(blip: InstructBlip, config: TrainConfig) -> nn.Module:
    """The nn.Module the trainer calls with batches: what `model(**batch) -> loss` means per stage."""
    if config.stage == "stage1":
        return build_stage1(blip, config)
    if config.stage == "grounding":
        prepare_for_grounding(blip.model)
        module = GroundingModel(blip.model)
    else:
        prepare_for_tuning(blip.model, config)
        module = GroundedInstructionModel(blip.model, config.grounding_weight) if config.grounds else LossOnly(blip.model)
    cache = feature_cache(config, blip.model.vision_model)
    return WithCachedImageFeatures(module, cache) if cache is not None else module


# ---- data ---------------------------------------------------------------------------------------
class Stage1Collator:
    """Caption items -> pixel values and [CLS]-first, right-padded Q-Former tokens.

    Items with a negative caption (`item["negative"]`) add `negative_input_ids` /
    `negative_attention_mask` and `has_negative` (B,): ITM's extra hard negatives. Items
    without one get a bare [CLS] [SEP] row there, marked False.
    """

    def __init__(self, processor: Processor, max_tokens: int):
        self.tokenizer = processor.qformer_tokenizer
        self.max_tokens = min(max_tokens, processor.qformer_max_length)

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text).input_ids  # [CLS] ... [SEP]
        if len(ids) > self.max_tokens:  # keep the caption's start, end with [SEP]
            ids = ids[: self.max_tokens - 1] + ids[-1:]
        return ids

    def _padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids (B, T) and their attention mask (B, T)."""
        return pad_rows(rows, self.tokenizer.pad_token_id), pad_rows([[1] * len(r) for r in rows], 0)

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = self._padded([self._ids(item["answer"]) for item in items])
        batch = {"pixel_values": stack_pixels(items), "text_input_ids": ids, "text_attention_mask": mask}
        negatives = [item.get("negative") for item in items]
        if any(negatives):
            batch["negative_input_ids"], batch["negative_attention_mask"] = self._padded([self._ids(n or "") for n in negatives])
            batch["has_negative"] = torch.tensor([n is not None for n in negatives])  # (B,)
        return batch


def collator(processor: Processor, config: TrainConfig, patch_grid: int | None = None):
    """patch_grid: the image encoder's patches per side, needed when the run grounds (regions -> patch masks)."""
    if config.stage == "stage1":
        return Stage1Collator(processor, config.max_answer_tokens)
    if config.grounds and patch_grid is None:
        raise ValueError("a grounding run needs the image encoder's patch grid to turn regions into patch masks")
    return InstructionCollator(processor, max_prompt_tokens=config.max_prompt_tokens, max_answer_tokens=config.max_answer_tokens,
                               region_grid=patch_grid if config.grounds else None, llm_inputs=config.stage != "grounding")


@dataclass(frozen=True)
class DataOptions:
    """How data files become datasets (the TrainConfig fields that matter, or evaluate's flags)."""

    prompt_style: str = "instruction"
    seed: int = 42
    max_answer_tokens: int = 256
    max_prompt_tokens: int = 512
    verify_images: bool = False
    augment: bool = False
    horizontal_flip: bool = False
    qformer_instruction: bool = True

    @classmethod
    def of(cls, config: TrainConfig) -> "DataOptions":
        return cls(
            prompt_style=config.resolved_prompt_style, seed=config.seed, max_answer_tokens=config.max_answer_tokens,
            max_prompt_tokens=config.max_prompt_tokens, verify_images=config.verify_images, augment=config.augment,
            horizontal_flip=config.horizontal_flip, qformer_instruction=config.qformer_instruction,
        )  # fmt: skip


def image_transform(processor: Processor, options: DataOptions, *, train: bool):
    if train and options.augment:
        return TrainTransform(processor.image_processor, horizontal_flip=options.horizontal_flip)
    return EvalTransform(processor.image_processor)


def load_dataset(spec, processor: Processor, options: DataOptions, *, train: bool, report,
                 defer_images: bool = False) -> tuple[InstructionDataset, list[str]]:
    """One data file (a DataConfig / EvalDataConfig) -> (dataset, skipped lines); skips are announced via `report`.

    defer_images: items carry undecoded images for a run with cached image features."""
    name = spec.name or Path(spec.path).stem
    result = load_records(
        spec.path,
        spec.task,
        skip_bad=getattr(spec, "skip_bad", False),
        count_tokens=answer_token_counter(processor),
        max_answer_tokens=options.max_answer_tokens,
        verify_images=options.verify_images,
    )
    if result.skipped:
        report(f"{name}: skipped {len(result.skipped)} bad line(s) of {spec.path}, e.g. {result.skipped[0]}")
    dataset = InstructionDataset(
        result.records,
        name=name,
        task=spec.task,
        prompt_style=options.prompt_style,
        image_transform=image_transform(processor, options, train=train),
        seed=options.seed,
        count_tokens=lambda text: len(processor.encode_prompt(text)),
        max_prompt_tokens=options.max_prompt_tokens,
        qformer_instruction=options.qformer_instruction,
        defer_images=defer_images,
    )
    return dataset, result.skipped


def load_training_data(processor: Processor, config: TrainConfig, report) -> tuple[list[InstructionDataset], list[str]]:
    datasets, skipped = [], []
    for spec in config.train_data:
        dataset, bad = load_dataset(spec, processor, DataOptions.of(config), train=True, report=report,
                                    defer_images=config.cache_image_features)
        datasets.append(dataset)
        skipped.extend(bad)
    names = [d.name for d in datasets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"train_data: dataset names {duplicates} are used twice; give each a distinct name:")
    if config.stage == "stage1":
        bad = [d.name for d in datasets if d.task != "caption"]
        if bad:
            raise ConfigError(f"train_data: stage1 trains on captions; datasets {bad} have another task")
    if config.stage == "grounding":
        datasets = _with_regions_only(datasets, report)
    return datasets, skipped


def _with_regions_only(datasets: list[InstructionDataset], report) -> list[InstructionDataset]:
    """The grounding stage learns from records that name their regions; the others have nothing to teach it."""
    kept = []
    for d in datasets:
        grounded = [r for r in d.records if r.regions]
        if grounded:
            if len(grounded) < len(d.records):
                report(f"{d.name}: grounding on the {len(grounded)} of {len(d.records)} records that have 'regions'")
            d.records = grounded
            kept.append(d)
        else:
            report(f"{d.name}: no record has 'regions'; the grounding stage leaves it out")
    if not kept:
        raise ConfigError("train_data: stage grounding needs records with 'regions' ([x0, y0, x1, y1] boxes); none has any")
    return kept


def build_evaluator(
    processor: Processor, specs, options: DataOptions, *, batch_size: int, generation: GenerationOptions, report
) -> Evaluator:
    sets = []
    for spec in specs:
        dataset, _ = load_dataset(spec, processor, options, train=False, report=report)
        sets.append(EvalSet(dataset.name, dataset, metric=spec.metric, max_examples=spec.max_examples))
    return Evaluator(processor, sets, batch_size=batch_size, generation=generation)


def training_evaluator(processor: Processor, config: TrainConfig, report) -> Evaluator | None:
    """The evaluator of a training run's eval_data (None without eval sets)."""
    if not config.eval_data:
        return None
    if config.stage == "stage1":
        raise ConfigError("eval_data: stage1 has no generation to evaluate; leave eval_data empty")
    generation = GenerationOptions(max_new_tokens=config.eval_max_new_tokens, num_beams=config.eval_num_beams)
    return build_evaluator(
        processor, config.eval_data, DataOptions.of(config), batch_size=config.eval_batch_size, generation=generation, report=report
    )


# ---- export -------------------------------------------------------------------------------------
def export(config: TrainConfig, trained: nn.Module, out: str | os.PathLike) -> Path:
    """A full Hugging Face checkpoint: the base model reloaded in float with the trained weights.

    Reloading makes one path for every option: an 8/4-bit LLM cannot be saved, LoRA has to be
    merged, and the stage-1 Q-Former has to move into the model. Written to a temporary folder
    and renamed, so a folder named `out` is always a complete checkpoint.
    """
    out = Path(out)
    dtype = getattr(torch, config.export_dtype)
    base = load_pretrained(config.model, dtype=dtype)
    if isinstance(trained, Stage1Model):
        trained.pretrainer.export_to(base.model)
    else:
        _copy_trainable(trained, base.model, config)
    base.model.config.extra[TEMPLATE_KEY] = PromptTemplate().to_dict()
    if not config.qformer_instruction:
        base.model.config.extra[QFORMER_INSTRUCTION_KEY] = False
    return replace_folder(out, base.save_pretrained)


def _copy_trainable(trained: nn.Module, target: nn.Module, config: TrainConfig) -> None:
    trained = unwrap(trained)
    if config.lora:
        add_lora(target, lora_settings(config))
    params = dict(target.named_parameters())
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if not p.requires_grad:
                continue
            if name not in params:
                raise ValueError(f"export: trained weight {name} has no place in the reloaded base model")
            params[name].copy_(p.detach().to(params[name].dtype))
    merge_lora(target)
