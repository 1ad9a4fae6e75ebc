"""What a nano model answers right in chat, by question kind and number of objects in the scene.

    python -m finetune.nano.competence [MODEL] [--scenes 60] [--objects 1 2 3 4 5] [--follow-up]

The evaluation (evaluate.py) scores each dataset as a whole; this asks the questions a user
of the app asks, through the app's route (`ChatSession`: the chat template `install` writes,
also for a stage's export, greedy), on fresh scenes of exactly n objects, so the table shows
where the model can be trusted and where it cannot. Scenes come from their own seed stream ("competence/n/i"), which no training,
test or fresh set draws from; they have no text on them (reading is scored by the evaluation).
Each question is about one object, named as the datasets name it ("the small square", "the
star at the top left"), and is scored by VQA accuracy against its one right answer.
`--follow-up` asks each one as the second turn of a chat, after a question of another kind
about the same image, so the table shows what later turns of a conversation can be trusted with.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from instructblip_core import ChatSession, load_pretrained
from instructblip_core.metrics import vqa_accuracy
from instructblip_core.pipeline import InstructBlip
from instructblip_core.prompts import TEMPLATE_KEY, PromptTemplate

from . import INSTALL_DIR
from .phrases import PLURALS
from .render import render_scene
from .tasks import QA, attribute_qa, where_qa
from .world import Scene, SceneStats, make_scene

DISPLAY_SIZE = 192  # what a user uploads: the examples' size, three times the model's input
COMPETENCE_OBJECTS = (1, 2, 3, 4, 5)  # the held-in scenes' range

# Instruction tuning put every question inside a held-in template, so the shipped model wraps
# chat questions in one of its short-answer templates: on 400 fresh chat questions (fourth
# build) this template got 187 right, "Question: {q} Answer:" 169 and the bare question 97.
CHAT_TEMPLATE = PromptTemplate(raw_first_turn=False, current="Question: {question} Short answer:")


def as_installed(model: Path):
    """The model loaded as users will chat with it: with the chat template that `install` writes."""
    loaded = load_pretrained(model)
    loaded.config.extra[TEMPLATE_KEY] = CHAT_TEMPLATE.to_dict()
    return loaded


def count_all_qa(scene: Scene, rng: random.Random) -> QA:
    return QA("How many objects are there?", str(scene.count()), "count_all")


def count_shape_qa(scene: Scene, rng: random.Random) -> QA:
    shape = rng.choice(scene.objects).shape  # one that is there: "none" is not the question here
    return QA(f"How many {PLURALS[shape]} are there?", str(scene.count(shape=shape)), "count_shape")


# kind -> question maker (None when the scene cannot support the question)
QUESTIONS: dict[str, Callable[[Scene, random.Random], QA | None]] = {
    "colour": lambda scene, rng: attribute_qa(scene, rng, "colour"),
    "shape": lambda scene, rng: attribute_qa(scene, rng, "shape"),
    "size": lambda scene, rng: attribute_qa(scene, rng, "size"),
    "where": where_qa,
    "count_all": count_all_qa,
    "count_shape": count_shape_qa,
}


# kind -> the question as the table's rows show it
LABELS = {
    "colour": "What colour is the X?", "shape": "What shape is the X?", "size": "What size is the X?",
    "where": "Where is the X?", "count_all": "How many objects are there?", "count_shape": "How many Xs are there?",
}


def competence(model: InstructBlip, *, scenes: int, objects: Sequence[int] = COMPETENCE_OBJECTS,
               max_new_tokens: int = 8, follow_up: bool = False) -> dict[str, dict[int, list[float]]]:
    """kind -> number of objects -> one score (0..1) per question asked.

    follow_up: each question is the second turn of its chat, after a question of another kind
    about the same image that the model answered itself (its answer stays in the history).
    """
    scores: dict[str, dict[int, list[float]]] = {kind: {n: [] for n in objects} for kind in QUESTIONS}
    options = dict(max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    for n in objects:
        stats = SceneStats(min_objects=n, max_objects=n, backdrops=("plain",), text_probability=0.0)
        for i in range(scenes):
            scene = make_scene(f"competence/{n}/{i}", stats)
            image = render_scene(scene, DISPLAY_SIZE)
            rng = random.Random(f"competence/{n}/{i}/questions")
            asked = {kind: make(scene, rng) for kind, make in QUESTIONS.items()}
            openers = random.Random(f"competence/{n}/{i}/openers")  # its own stream: first turns keep their questions
            for kind, qa in asked.items():
                if qa is None:
                    continue
                chat = ChatSession(model)
                if follow_up:
                    opener = asked[openers.choice([k for k, other in asked.items() if k != kind and other is not None])]
                    chat.ask(opener.question, image, **options)
                    answer = chat.ask(qa.question, None, **options)
                else:
                    answer = chat.ask(qa.question, image, **options)
                scores[kind][n].append(vqa_accuracy(answer, [qa.answer]))
    return scores


def table(scores: dict[str, dict[int, list[float]]]) -> str:
    """Markdown: a row per kind of question, a column per number of objects, cells "accuracy% (questions)"."""
    objects = sorted(next(iter(scores.values())))
    lines = ["| question | " + " | ".join(f"{n} object{'s' * (n > 1)}" for n in objects) + " |",
             "|---|" + "---|" * len(objects)]
    for kind, by_n in scores.items():
        cells = [f"{100 * sum(v) / len(v):.0f}% ({len(v)})" if v else "-" for v in (by_n[n] for n in objects)]
        lines.append(f"| {LABELS[kind]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.nano.competence", description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", type=Path, default=INSTALL_DIR, help="model folder (default: the shipped one)")
    p.add_argument("--scenes", type=int, default=60, help="scenes per number of objects")
    p.add_argument("--objects", type=int, nargs="+", default=list(COMPETENCE_OBJECTS), help="numbers of objects")
    p.add_argument("--follow-up", action="store_true",
                   help="ask each question as the second turn, after another question about the same image")
    args = p.parse_args(argv)
    # A stage's export still has its training template; chat users get the one `install` writes.
    model = as_installed(args.model)
    print(table(competence(model, scenes=args.scenes, objects=args.objects, follow_up=args.follow_up)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
