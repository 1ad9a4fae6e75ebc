"""How well the frozen LLM answers when told the scene in words, with no picture.

    python -m finetune.nano.ceiling [MODEL] [--data runs/nano/data] [--max-examples 300]

The LLM stays frozen through every Q-Former stage. A soft prompt that tells it about the
whole scene can get no more out of it than the best description there is: the scene's own
caption (every object's size, colour, shape, text and place). This puts that caption in
front of each held-in test question, worded exactly as the evaluation words it, and lets
the model's own LLM answer greedily, with no image. A test set scored near its ceiling is
limited by the LLM's reading, not by the image encoder; only a soft prompt that passes on
less (the object the question names, as the instruction-aware Q-Former is meant to) can
go past it, and the by-number-of-objects columns show how far (one object: the LLM reads it)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from instructblip_core import load_pretrained
from instructblip_core.data import InstructionDataset, load_records
from instructblip_core.metrics import vqa_accuracy
from instructblip_core.pipeline import InstructBlip

from . import INSTALL_DIR, REPO
from .evaluate import EVAL_PROMPT_SEED
from .phrases import capitalise, caption
from .splits import HELD_IN, PLANS, load_manifest
from .world import make_scene

# The held-in sets with one short right answer per question (captions, multiple choice and
# question generation are scored otherwise).
CEILING_TASKS = ("short_vqa", "counting", "spatial", "ocr", "yes_no")


def cut_answer(generated: str) -> str:
    """The answer part of what the LLM wrote after a question.

    It learned from documents that ask several questions in a row, so after its answer it
    goes on with the next question. No answer in this world has a capitalised word ("red",
    "top left", "yellow triangle", "UP", "3", "yes"), while every question and template
    starts with one ("Question:", "What", "Is", "Look"): the answer ends there.
    """
    words = []
    for word in generated.split():
        if word[:1].isupper() and word[1:2].islower():
            break
        words.append(word)
    return " ".join(words)


def described_prompts(path: Path, name: str, task: str, max_examples: int | None) -> tuple[list[str], list[dict]]:
    """(caption + evaluation prompt per record, the raw records) of dataset `name`'s JSONL file `path`."""
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line][:max_examples]
    records = load_records(path, task).records[: len(raw)]
    dataset = InstructionDataset(records, name=name, task=task, image_transform=None, seed=EVAL_PROMPT_SEED)
    prompts = []
    for i, record in enumerate(raw):
        scene = make_scene(record["seed"], PLANS[name].stats)  # the record's scene, drawn again from its key
        prompts.append(f"{capitalise(caption(scene))}. {dataset.texts(i)['prompt']}")
    return prompts, raw


@torch.no_grad()
def answer_from_text(model: InstructBlip, prompts: Sequence[str], *, batch_size: int = 64, max_new_tokens: int = 8) -> list[str]:
    """The model's LLM alone, greedy, on text prompts (left-padded batches)."""
    tokenizer, llm = model.processor.tokenizer, model.model.language_model
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        answers = []
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
            out = llm.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # (B, T + new)
            answers += [cut_answer(t) for t in tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)]
        return answers
    finally:
        tokenizer.padding_side = side


def ceiling(model: InstructBlip, manifest, *, max_examples: int | None = None) -> dict[str, dict]:
    """name -> {value, n, by_objects: {n_objects: value}} for every held-in short-answer test set."""
    results = {}
    for entry in manifest.evaluation(HELD_IN):
        if entry.task not in CEILING_TASKS:
            continue
        prompts, raw = described_prompts(manifest.root / entry.path, entry.name, entry.task, max_examples)
        scores = [vqa_accuracy(a, [r["answer"]]) for a, r in zip(answer_from_text(model, prompts), raw)]
        by_objects: dict[int, list[float]] = {}
        for score, record in zip(scores, raw):
            by_objects.setdefault(record["n_objects"], []).append(score)
        results[entry.name] = {"value": sum(scores) / len(scores), "n": len(scores),
                               "by_objects": {n: sum(v) / len(v) for n, v in sorted(by_objects.items())}}
    return results


def table(results: dict[str, dict], evaluated: dict[str, dict] | None = None) -> str:
    """Markdown: per test set the ceiling (and the model's own score, when given), then by number of objects."""
    objects = sorted({n for r in results.values() for n in r["by_objects"]})
    model_column = evaluated is not None
    lines = ["| test set | " + ("model (image) | " if model_column else "") + "LLM told the caption | "
             + " | ".join(f"{n} object{'s' * (n > 1)}" for n in objects) + " |",
             "|---|" + "---|" * (1 + model_column + len(objects))]
    for name, r in results.items():
        cells = [f"{100 * r['by_objects'][n]:.0f}" if n in r["by_objects"] else "-" for n in objects]
        own = [f"{100 * evaluated[name]['value']:.1f}"] if model_column else []
        lines.append(f"| {name} | " + " | ".join([*own, f"{100 * r['value']:.1f}", *cells]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.nano.ceiling", description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", type=Path, default=INSTALL_DIR, help="model folder (default: the shipped one)")
    p.add_argument("--data", type=Path, default=REPO / "runs" / "nano" / "data", help="the recipe's data folder")
    p.add_argument("--max-examples", type=int, default=None, help="per test set (default: all)")
    p.add_argument("--results", type=Path, help="the recipe's results.json, to show the model's own scores beside")
    args = p.parse_args(argv)
    evaluated = json.loads(args.results.read_text()) if args.results else None
    print(table(ceiling(load_pretrained(args.model), load_manifest(args.data), max_examples=args.max_examples), evaluated))
    return 0


if __name__ == "__main__":
    sys.exit(main())
