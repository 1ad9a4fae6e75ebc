"""Evaluating the small model on every held-in and held-out test set, and the results table.

Held-out sets are zero-shot: their datasets, and for video QA, classification and dialogue
their whole task category, were never trained on; the instruction templates of those
categories are therefore new to the model too (as in the paper).
"""

from __future__ import annotations

import json
from pathlib import Path

from instructblip_core.augment import EvalTransform
from instructblip_core.data import InstructionDataset, load_records
from instructblip_core.evaluation import EvalSet, Evaluator
from instructblip_core.generation import GenerationOptions
from instructblip_core.loading import load_pretrained
from instructblip_core.metrics import normalize_answer, vqa_accuracy

from .splits import HELD_IN, PLANS
from .tasks import compositional_anchor
from .world import COLOURS, SHAPES, SIZES, make_scene

EVAL_PROMPT_SEED = 1234  # which template each test record is asked with: the same in every evaluation


def evaluate_all(
    model_folder: Path,
    manifest,
    *,
    quick: bool = False,
    held_in_style: str = "instruction",
    qformer_instruction: bool = True,
    max_examples: int | None = None,
) -> dict:
    """name -> {split, task, metric, value, n, examples}. `held_in_style`: how held-in prompts are
    written ("task_tag" for the multitask ablation); held-out prompts are always instructions."""
    blip = load_pretrained(model_folder)
    transform = EvalTransform(blip.processor.image_processor)
    results = {}
    for entry in manifest.evaluation():
        records = load_records(manifest.root / entry.path, entry.task).records
        if entry.task == "classification":  # closed set: vocabulary ranking over the class names, as the paper does
            for record in records:
                record.options = list(SHAPES)
        style = held_in_style if entry.split == HELD_IN else "instruction"
        dataset = InstructionDataset(records, name=entry.name, task=entry.task, prompt_style=style,
                                     image_transform=transform, seed=EVAL_PROMPT_SEED, qformer_instruction=qformer_instruction)
        eval_set = EvalSet(entry.name, dataset, max_examples=4 if quick else max_examples)
        evaluator = Evaluator(blip.processor, [eval_set], batch_size=32,
                              generation=GenerationOptions(max_new_tokens=40, min_new_tokens=1))
        report = evaluator.run(blip.model)
        value = next(iter(report.metrics.values()))
        rows = report.predictions[entry.name]
        results[entry.name] = {"split": entry.split, "task": entry.task, "metric": eval_set.metric, "value": value,
                               "n": len(rows), "mirrors": entry.mirrors, "examples": rows[:3]}
        lines = [json.loads(line) for line in (manifest.root / entry.path).read_text().splitlines() if line]
        if eval_set.metric == "vqa_accuracy":
            kinds = [line.get("kind") for line in lines]
            if any(kinds):
                results[entry.name]["by_kind"] = accuracy_by_kind(rows, kinds)
        if entry.name == "vqa_compositional":
            results[entry.name]["answer_sources"] = answer_sources(rows, lines)
        if entry.task == "dialogue":
            results[entry.name]["one_object_turns"] = one_object_turns(rows, lines)
    return results


def accuracy_by_kind(rows: list[dict], kinds: list[str | None]) -> dict[str, dict]:
    """The set's question kinds (colour / shape / size, count_shape, where, ...) scored apart:
    kind -> {value, n}. rows are the evaluator's predictions, in record order."""
    scores: dict[str, list[float]] = {}
    for row, kind in zip(rows, kinds):
        if kind:
            scores.setdefault(kind, []).append(vqa_accuracy(row["prediction"], [row["answer"]]))
    return {kind: {"value": sum(v) / len(v), "n": len(v)} for kind, v in sorted(scores.items())}


def answer_sources(rows: list[dict], lines: list[dict]) -> dict[str, int]:
    """vqa_compositional asks about the neighbour of a named object ("What colour is the object to
    the left of the blue square?"). Counts the answers that are right, that give the named object's
    own attribute instead (the model looked at the object the question names), and the others.
    rows: the evaluator's predictions; lines: the test records (with their scene seeds), in order."""
    counts = {"right": 0, "named_object": 0, "other": 0}
    stats = PLANS["vqa_compositional"].stats
    for row, line in zip(rows, lines):
        answer = normalize_answer(row["prediction"])  # as the set's metric compares it
        anchor = compositional_anchor(make_scene(line["seed"], stats), line["question"])
        attribute = line["kind"].removeprefix("relational_")
        if answer == normalize_answer(line["answer"]):
            counts["right"] += 1
        elif anchor is not None and answer == normalize_answer(getattr(anchor, attribute)):
            counts["named_object"] += 1
        else:
            counts["other"] += 1
    return counts


ONE_OBJECT_ANSWERS = frozenset(COLOURS) | frozenset(SHAPES) | frozenset(SIZES)


def one_object_turns(rows: list[dict], lines: list[dict]) -> dict[str, dict]:
    """Held-out dialogue turns that ask one object's colour, shape or size ("What colour is the
    square at the top right?", "And the square at the top?", "What shape is the yellow one?"),
    scored apart for scenes of 1-2 and of 3-5 objects: where the question must pick one object
    out of clutter. rows: the evaluator's predictions, one per turn, in order (the first turns
    only when the evaluation was capped); lines: the dialogue records.
    -> {"1-2 objects": {value, n}, "3-5 objects": {value, n}}"""
    objects = [line["n_objects"] for line in lines for _ in range(len(line["conversations"]) // 2)]
    if len(rows) > len(objects):
        raise ValueError(f"{len(rows)} predictions for {len(objects)} dialogue turns")
    scores: dict[str, list[float]] = {"1-2 objects": [], "3-5 objects": []}
    for row, n in zip(rows, objects):
        if row["answer"] in ONE_OBJECT_ANSWERS:
            scores["1-2 objects" if n <= 2 else "3-5 objects"].append(vqa_accuracy(row["prediction"], [row["answer"]]))
    return {group: {"value": sum(v) / len(v) if v else 0.0, "n": len(v)} for group, v in scores.items()}


def held_out_average(results: dict, exclude_metric: str = "cider") -> float:
    values = [r["value"] for r in results.values() if r["split"] != HELD_IN and r["metric"] != exclude_metric]
    return sum(values) / max(len(values), 1)


def results_table(columns: dict[str, dict]) -> str:
    """Markdown: one row per test set, one column per model variant."""
    names = list(next(iter(columns.values())))
    header = "| dataset | split | task | metric | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (4 + len(columns))]
    for name in names:
        first = next(iter(columns.values()))[name]
        cells = [f"{c[name]['value'] * 100:.1f}" for c in columns.values()]  # CIDEr x 100 too, as papers print it
        lines.append(f"| {name} | {first['split']} | {first['task']} | {first['metric']} | " + " | ".join(cells) + " |")
    averages = [f"{held_out_average(c) * 100:.1f}" for c in columns.values()]
    lines.append("| **held-out average** (accuracy sets) | held-out | | | " + " | ".join(averages) + " |")
    return "\n".join(lines)


def write_results(results: dict, work: Path, title: str, filename: str = "results") -> None:
    (work / f"{filename}.json").write_text(json.dumps(results, indent=1))
    (work / f"{filename}.md").write_text(f"### {title}\n\n{results_table({title: results})}\n")
