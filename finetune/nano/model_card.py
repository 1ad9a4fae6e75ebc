"""The model card written beside the shipped small checkpoint (assets/nano-instructblip/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

CARD = """---
license: apache-2.0
library_name: instructblip_core
tags: [instructblip, blip-2, vision-language, tiny, synthetic]
---

# nano-instructblip

A complete InstructBLIP (image encoder, instruction-aware Q-Former, projection, frozen LLM),
about {params:.1f}M parameters, trained **from scratch on two CPU cores** by this project's own
recipe (`python -m finetune.nano`) on a procedurally generated world. It is the offline
default of the studio's app, and the laboratory where the paper's experiment is repeated in
miniature. It loads with `instructblip_core.load_pretrained` and with transformers'
`InstructBlipForConditionalGeneration`.

## What it knows

Only its own world: 64 x 64 pictures of 1-5 shapes (circle, square, triangle, diamond, star)
in six colours (red, green, blue, yellow, purple, orange), small or large, placed on a 3 x 3
grid (top left ... bottom right) over a white, grey, beige or black background, some with a
digit or a two-letter word written on them, and short clips of one object moving, changing
colour, appearing or disappearing. It was trained to answer questions about colours,
shapes, sizes, places, counts, left/right/above/below relations and the written text, to
caption, to answer yes/no and multiple-choice questions and to write questions. How well it
does is in the table below.
{kinds}
Treat it as a working demonstration of the pipeline, not as a capable model.

## What to ask it in chat

Right answers through the app's route (the chat template, greedy) on fresh scenes with 1-5
objects and no text, the number of questions in brackets (`python -m finetune.nano.competence`).
Each question is about one object, named as the training questions name it ("the small square"):

{competence}

Trust it where a row is near 100%; the app's examples gallery asks only such questions.
Since its Q-Former was trained to look at the object a question names (grounding, below), it
answers about one object among several far better than before, though less well the more
objects there are. Places and counts of more than three objects are weak. Because it looks at
the object a question names, it answers a question about the object *next to* a named one
("What colour is the object to the left of the square?") mostly with the named object's own
colour, shape or size.

## Where it stands against its LLM

Per held-in test set, the first column is the model, which sees the picture; the others are
its frozen LLM alone when told the scene's caption instead, in all and by number of objects
in the scene (`python -m finetune.nano.ceiling`). Told about one object, the LLM answers
attribute, count and place questions right every time; told about several, it often gives
another object's colour or shape although the right one is written in front of it. So a soft
prompt that describes the whole scene can do no better than the caption. The model's
Q-Former instead passes on mostly the object the question names, and on attribute questions
the model is well above the caption-told LLM; on counts and places it is still below it.

{ceiling}

## What it does not know

Anything else. **Real photos need a real checkpoint** (`--model Salesforce/instructblip-vicuna-7b`
or `Salesforce/instructblip-flan-t5-xl`): on a photo this model describes coloured shapes that
are not there. Its language is the world's small vocabulary; long or unusual instructions
confuse it.

## Architecture

| part | size |
|---|---|
| image encoder | ViT, 64 px, patch 8 (64 patches + CLS), 4 layers x 128 |
| Q-Former | BERT-style, 4 layers x 128, cross-attention every 2nd layer, **16 query tokens** |
| LLM | LLaMA architecture, 4 layers x 192, BPE vocabulary of {vocab} |

## How it was trained

1. tokenizers (BPE for the LLM, WordPiece for the Q-Former) on the world's text;
2. the image encoder with dense per-patch ground truth and a per-object target (the mean of
   each object's patch tokens names its shape, colour, size and place), then frozen;
3. the LLM on the world's text, then frozen;
4. Q-Former stage 1 (ITC + ITM + ITG on captions), stage 2 (LM loss through the frozen LLM);
5. grounding: the Q-Former's cross-attention trained toward the objects each held-in question
   or caption is about (their boxes are in the training records);
6. instruction tuning on the held-in datasets with sqrt-balanced sampling, the grounding loss
   kept beside the LM loss.

## Results

{results}

Held-out sets were never trained on (for video QA, classification and dialogue, not even
their task category). Accuracy in %, CIDEr x 100. Details: the project's README.
"""


def kinds_sentence(results: dict) -> str:
    """What the model gets right by question kind, from the evaluation's `by_kind` figures."""
    from .world import COLOURS, SHAPES, SIZES

    kinds = results.get("vqa_attributes", {}).get("by_kind", {})
    chance = {"colour": len(COLOURS), "shape": len(SHAPES), "size": len(SIZES)}
    parts = [f"its {k} in {kinds[k]['value'] * 100:.0f}% (chance {100 / n:.0f}%)" for k, n in chance.items() if k in kinds]
    where = results.get("spatial", {}).get("by_kind", {}).get("where")
    if where:
        parts.append(f"its place in {where['value'] * 100:.0f}%")
    if not parts:
        return ""
    listed = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    return f"Asked about one object of a held-in test scene, it names {listed}."


def write_model_card(folder: Path, work: Path) -> None:
    from instructblip_core.loading import load_pretrained

    model = load_pretrained(folder)
    params = sum(p.numel() for p in model.model.parameters()) / 1e6
    results = (work / "results.md").read_text(encoding="utf-8") if (work / "results.md").exists() else "(not evaluated)"
    measured = json.loads((work / "results.json").read_text()) if (work / "results.json").exists() else {}
    chat = (work / "competence.md").read_text(encoding="utf-8").strip() if (work / "competence.md").exists() else "(not measured)"
    told = (work / "ceiling.md").read_text(encoding="utf-8").strip() if (work / "ceiling.md").exists() else "(not measured)"
    (folder / "README.md").write_text(
        CARD.format(params=params, vocab=len(model.processor.tokenizer), results=results, kinds=kinds_sentence(measured),
                    competence=chat, ceiling=told),
        encoding="utf-8",
    )
    if (work / "results.json").exists():
        (folder / "results.json").write_text((work / "results.json").read_text())
    json.loads((folder / "config.json").read_text())  # the card never replaces a valid config
