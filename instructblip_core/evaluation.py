"""Evaluation during and after training: generated answers or ranked candidates, scored.

Metrics (definitions in metrics.py):
  vqa_accuracy      generate a short answer; VQA consensus accuracy against the references
                    (with one reference per record, as our record format has, it is exact
                    match after the official answer normalisation)
  exact_match       generate; normalised exact match
  ranking_accuracy  InstructBLIP's vocabulary ranking for closed-set tasks: every option of a
                    record is scored by the LLM's log-likelihood given image + prompt, and the
                    best must be the answer (records need `options`)
  cider             generate a caption per image; CIDEr-D against all captions of that image

Prompts are the ones training uses (the dataset's templates, drawn deterministically per
item), so an evaluation measures the model on the instructions it learnt from; held-out
templates or tasks are simply other data files.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .data import DataError, InstructionDataset
from .generation import GenerationOptions
from .metrics import cider, mean_exact_match, mean_vqa_accuracy, ranking_accuracy
from .model import InstructBlipForConditionalGeneration
from .processing import Processor
from .ranking import score_candidates
from .templates import CAPTION, CLASSIFICATION, MULTIPLE_CHOICE

METRICS = ("vqa_accuracy", "exact_match", "ranking_accuracy", "cider")
AUTO = "auto"


def default_metric(task: str, has_options: bool) -> str:
    """caption -> cider; multiple choice / classification with options -> ranking; else VQA accuracy."""
    if task == CAPTION:
        return "cider"
    if task in (MULTIPLE_CHOICE, CLASSIFICATION) and has_options:
        return "ranking_accuracy"
    return "vqa_accuracy"


@dataclass
class EvalSet:
    name: str
    dataset: InstructionDataset  # with a deterministic image transform
    metric: str = AUTO
    max_examples: int | None = None  # the first N records only (quick checks during training)

    def __post_init__(self):
        records = self.dataset.records
        if self.metric == AUTO:
            self.metric = default_metric(self.dataset.task, all(r.options for r in records))
        if self.metric not in METRICS:
            raise ValueError(f"eval set {self.name!r}: unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")
        if self.metric == "ranking_accuracy":
            bad = [r.source for r in records if not r.options or r.answer not in r.options]
            if bad:
                raise DataError(
                    f"{bad[0]}: eval set {self.name!r} is scored by ranking_accuracy, which needs records with "
                    f"'options' that contain the answer ({len(bad)} record(s) without)"
                )

    @property
    def indices(self) -> range:
        n = len(self.dataset)
        return range(n if self.max_examples is None else min(n, self.max_examples))


@dataclass
class EvalReport:
    metrics: dict[str, float]  # "eval/<set>/<metric>" -> value
    predictions: dict[str, list[dict]] = field(default_factory=dict)  # set -> [{source, prompt, prediction, answer}]


class Evaluator:
    def __init__(
        self,
        processor: Processor,
        sets: list[EvalSet],
        *,
        batch_size: int = 8,
        generation: GenerationOptions = GenerationOptions(max_new_tokens=30),
    ):
        names = [s.name for s in sets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval set names must be unique, got {names}")
        self.processor = processor
        self.sets = sets
        self.batch_size = batch_size
        self.generation = generation

    def __call__(self, model: InstructBlipForConditionalGeneration) -> dict[str, float]:
        return self.run(model).metrics

    @torch.no_grad()
    def run(self, model: InstructBlipForConditionalGeneration) -> EvalReport:
        report = EvalReport(metrics={})
        for eval_set in self.sets:
            if eval_set.metric == "ranking_accuracy":
                value, rows = self._ranking(model, eval_set)
            else:
                value, rows = self._generated(model, eval_set)
            report.metrics[f"eval/{eval_set.name}/{eval_set.metric}"] = value
            report.predictions[eval_set.name] = rows
        return report

    # ---- generation ----------------------------------------------------------------------------
    def _device(self, model) -> torch.device:
        return model.query_tokens.device

    def _prompt_batch(self, model, items: list[dict]) -> dict[str, torch.Tensor]:
        device = self._device(model)
        batch = dict(self.processor.tokenize_prompts([it["prompt"] for it in items]))
        batch.update(self.processor.tokenize_instructions([it["qformer_text"] for it in items]))
        batch = {k: v.to(device) for k, v in batch.items()}
        pixel_dtype = model.vision_model.embeddings.patch_embedding.weight.dtype
        batch["pixel_values"] = torch.stack([it["pixel_values"] for it in items]).to(device, pixel_dtype)
        return batch

    def generate(self, model, items: list[dict]) -> list[str]:
        kwargs = self.generation.generate_kwargs_for(model.language_model, self.processor.tokenizer)
        ids = model.generate_ids(**self._prompt_batch(model, items), **kwargs)  # (B, T_new)
        return self.processor.decode(ids)

    def _generated(self, model, eval_set: EvalSet) -> tuple[float, list[dict]]:
        rows = []
        indices = list(eval_set.indices)
        for start in range(0, len(indices), self.batch_size):
            items = [eval_set.dataset[i] for i in indices[start : start + self.batch_size]]
            for item, prediction in zip(items, self.generate(model, items)):
                rows.append({"source": item["source"], "prompt": item["prompt"], "prediction": prediction, "answer": item["answer"]})
        predictions = [r["prediction"] for r in rows]
        if eval_set.metric == "cider":
            return _corpus_cider(eval_set, indices, rows), rows
        if eval_set.metric == "exact_match":
            return mean_exact_match(predictions, [r["answer"] for r in rows]), rows
        return mean_vqa_accuracy(predictions, [[r["answer"]] for r in rows]), rows

    # ---- ranking -----------------------------------------------------------------------------
    def _ranking(self, model, eval_set: EvalSet) -> tuple[float, list[dict]]:
        scores, correct, rows = [], [], []
        pad = self.processor.tokenizer.pad_token_id
        for i in eval_set.indices:
            record, item = eval_set.dataset.records[i], eval_set.dataset[i]
            batch = self._prompt_batch(model, [item])
            visual = model.visual_prompt(
                batch["pixel_values"], batch.get("qformer_input_ids"), batch.get("qformer_attention_mask")
            )  # (1, Q, C_llm)
            candidates = [self.processor.encode_answer(item["prompt"], option) for option in record.options]
            prompt_ids = self.processor.encode_prompt(item["prompt"])
            result = score_candidates(model, visual, prompt_ids, candidates, pad)
            scores.append(result.sum)
            correct.append(record.options.index(record.answer))
            best = record.options[result.best("sum")]
            rows.append({"source": item["source"], "prompt": item["prompt"], "prediction": best, "answer": item["answer"]})
        return ranking_accuracy(scores, correct), rows


def _corpus_cider(eval_set: EvalSet, indices: list[int], rows: list[dict]) -> float:
    """One prediction per image (its first record's), scored against every caption of the image."""
    records = eval_set.dataset.records
    references: dict[str, list[str]] = defaultdict(list)
    predictions: dict[str, str] = {}
    for i, row in zip(indices, rows):
        key = str(records[i].image or records[i].images)
        references[key].append(records[i].answer)
        predictions.setdefault(key, row["prediction"])
    if len(references) < 2:
        # CIDEr's IDF is undefined for one image; say so instead of reporting a meaningless 0.
        raise DataError(f"eval set {eval_set.name!r}: CIDEr needs captions of at least 2 images, got {len(references)}")
    return cider(predictions, dict(references))


__all__ = ["EvalReport", "EvalSet", "Evaluator", "METRICS", "default_metric"]
