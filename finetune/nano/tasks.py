"""Questions and answers about scenes and clips, one generator per kind of task.

Each generator reads the ground truth of a `Scene` (or `Clip`) and returns a `QA` whose
answer follows from it alone, or None when the scene cannot support that kind of question
(no text to read, no unique referent); the dataset builder then draws another scene.
Questions pick out one object with `phrases.refer`, so they are unambiguous, and in a
cluttered scene they are about ONE object: a model has to read the question to know where
to look, which is what InstructBLIP's instruction-aware Q-Former is for (Dai et al. 2023,
section 2.3).

Answers are short and canonical (lower case words, digits for counts, texts as written) so
that exact-match scoring is fair. Categories mirror the paper's (section 2.1): captioning,
short-answer VQA, counting, spatial relations, text reading (OCR-VQA), yes/no,
multiple choice, classification, question generation, visual dialogue, video QA.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, TypeVar

from instructblip_core.grounding import CLS

from .phrases import (
    NUMBER_WORDS, PLURALS, RELATION_PHRASES, article, capitalise, describe, place_phrase, refer, text_phrase,
)
from .world import COLOURS, DIGITS, PLACES, SHAPES, SIZES, Clip, Scene, SceneObject

RELATIONS = tuple(RELATION_PHRASES)
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
MAX_COUNT_ANSWER = 5  # counting distractors stay in 0..5 (held-in scenes hold <= 5 objects)
ABSENT_COUNT_RATE = 0.15  # share of counting questions about something that is not there

T = TypeVar("T")


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str  # which generator branch made it, e.g. "colour", "count_shape", "neighbour"
    options: tuple[str, ...] | None = None  # multiple choice only; the answer is one of them
    about: tuple[SceneObject, ...] = ()  # the objects the answer depends on: the record's grounding regions


def _pick(rng: random.Random, choices: list[T]) -> T | None:
    return rng.choice(choices) if choices else None


def first_possible(rng: random.Random, makers: dict[str, Callable[[], QA | None]]) -> QA | None:
    """Try the kinds in a random order; the first that fits the scene wins (uniform over kinds that fit)."""
    for kind in rng.sample(sorted(makers), len(makers)):
        qa = makers[kind]()
        if qa is not None:
            return qa
    return None


def _question(text: str) -> str:
    return capitalise(text) + "?"


# ----------------------------------------------------------------------------- attributes (short-answer VQA)


def attribute_qa(scene: Scene, rng: random.Random, attribute: str | None = None) -> QA | None:
    """"What colour is the circle?" -> "red"; also shape ("what shape is the red object?") and size."""
    attributes = (attribute,) if attribute else ("colour", "shape", "size")
    return first_possible(rng, {a: (lambda a=a: _attribute_of(scene, rng, a)) for a in attributes})


def _attribute_of(scene: Scene, rng: random.Random, attribute: str) -> QA | None:
    picked = _pick(rng, [(o, r) for o in scene.objects if (r := refer(scene, o, avoid={attribute}))])
    if picked is None:
        return None
    obj, ref = picked
    return QA(_question(f"what {attribute} is {ref}"), getattr(obj, attribute), attribute, about=(obj,))


# ----------------------------------------------------------------------------- counting


def counting_qa(scene: Scene, rng: random.Random) -> QA:
    """"How many squares are there?" -> "2" (digits; absent things count 0).

    The count is drawn first, uniformly over the counts some question about this scene has
    (0 only now and then), and a question with that count second: otherwise "1" would be
    the answer to most questions, as most things in a small scene are there once.
    """
    by_count: dict[int, list[tuple[str, str]]] = {}
    for kind, text, counted in _counting_questions(scene):
        by_count.setdefault(len(counted), []).append((kind, text, counted))
    present = sorted(n for n in by_count if n > 0)
    n = 0 if 0 in by_count and rng.random() < ABSENT_COUNT_RATE else rng.choice(present)
    kind, text, counted = rng.choice(by_count[n])
    return QA(_question(text), str(n), kind, about=counted)


def _counting_questions(scene: Scene) -> list[tuple[str, str, tuple[SceneObject, ...]]]:
    """Every counting question about the scene: (kind, text, the objects it counts)."""
    questions = [("count_all", "how many objects are there", scene.matching())]
    questions += [("count_shape", f"how many {PLURALS[s]} are there", scene.matching(shape=s)) for s in SHAPES]
    questions += [("count_colour", f"how many {c} objects are there", scene.matching(colour=c)) for c in COLOURS]
    questions += [("count_size", f"how many {z} objects are there", scene.matching(size=z)) for z in SIZES]
    questions += [
        ("count_colour_shape", f"how many {c} {PLURALS[s]} are there", scene.matching(colour=c, shape=s))
        for c in COLOURS for s in SHAPES
    ]
    return questions


# ----------------------------------------------------------------------------- spatial relations


def spatial_qa(scene: Scene, rng: random.Random) -> QA | None:
    """"Where is the circle?" -> "top left"; "what is to the left of the red circle?" -> "blue square";
    "is the circle to the left or to the right of the square?" -> "left". Referents never use the place."""
    return first_possible(rng, {
        "where": lambda: where_qa(scene, rng),
        "neighbour": lambda: _neighbour(scene, rng),
        "left_right": lambda: _compare(scene, rng, "col", ("left", "right"), "to the left or to the right of"),
        "above_below": lambda: _compare(scene, rng, "row", ("above", "below"), "above or below"),
    })


def where_qa(scene: Scene, rng: random.Random) -> QA | None:
    picked = _pick(rng, [(o, r) for o in scene.objects if (r := refer(scene, o, avoid={"place"}))])
    if picked is None:
        return None
    obj, ref = picked
    return QA(_question(f"where is {ref}"), obj.place, "where", about=(obj,))


def _unique_neighbours(scene: Scene) -> list[tuple[SceneObject, str, SceneObject, str]]:
    """(anchor, relation, the one object in that relation, anchor's referring phrase)."""
    found = []
    for anchor in scene.objects:
        ref = refer(scene, anchor, avoid={"place"})
        if ref is None:
            continue
        for relation in RELATIONS:
            others = scene.related(relation, anchor)
            if len(others) == 1:
                found.append((anchor, relation, others[0], ref))
    return found


def _neighbour(scene: Scene, rng: random.Random) -> QA | None:
    picked = _pick(rng, _unique_neighbours(scene))
    if picked is None:
        return None
    anchor, relation, other, ref = picked
    return QA(_question(f"what is {RELATION_PHRASES[relation]} {ref}"), describe(other), "neighbour", about=(anchor, other))


def _compare(scene: Scene, rng: random.Random, axis: str, words: tuple[str, str], phrase: str) -> QA | None:
    pairs = [
        (a, b) for a in scene.objects for b in scene.objects
        if getattr(a, axis) != getattr(b, axis) and refer(scene, a, avoid={"place"}) and refer(scene, b, avoid={"place"})
    ]
    picked = _pick(rng, pairs)
    if picked is None:
        return None
    a, b = picked
    answer = words[0] if getattr(a, axis) < getattr(b, axis) else words[1]
    ref_a, ref_b = refer(scene, a, avoid={"place"}), refer(scene, b, avoid={"place"})
    return QA(_question(f"is {ref_a} {phrase} {ref_b}"), answer, "left_right" if axis == "col" else "above_below", about=(a, b))


# ----------------------------------------------------------------------------- text reading


def ocr_qa(scene: Scene, rng: random.Random) -> QA | None:
    """"What is written on the square?" -> "UP"; "which object has the number 7 on it?" -> "red circle"."""
    readable = [(o, r) for o in scene.texts if (r := refer(scene, o))]
    picked = _pick(rng, readable)
    if picked is None:
        return None
    obj, ref = picked
    typed = "number" if obj.text in DIGITS else "word"
    kinds = {
        "read": (_question(f"what is written on {ref}"), obj.text),
        "read_typed": (_question(f"what {typed} is on {ref}"), obj.text),
        "find_text": (_question(f"which object has {text_phrase(obj.text)} on it"), describe(obj)),
    }
    kind = rng.choice(sorted(kinds))
    return QA(*kinds[kind], kind, about=(obj,))


def ocr_by_place_qa(scene: Scene, rng: random.Random) -> QA | None:
    """Held-out style: the text is found by its place, not its object. "What does the text at the top left say?" """
    obj = _pick(rng, scene.texts)
    if obj is None:
        return None
    kinds = {
        "read_place": _question(f"what is written on the object {place_phrase(obj)}"),
        "text_place": _question(f"what does the text {place_phrase(obj)} say"),
    }
    kind = rng.choice(sorted(kinds))
    return QA(kinds[kind], obj.text, kind)


# ----------------------------------------------------------------------------- yes / no


def yes_no_qa(scene: Scene, rng: random.Random, answer: bool) -> QA | None:
    """A question whose true answer is `answer` (the caller alternates, so a dataset is balanced)."""
    return first_possible(rng, {
        "exists": lambda: _exists(scene, rng, answer),
        "has_attribute": lambda: _has_attribute(scene, rng, answer),
        "relation": lambda: _relation(scene, rng, answer),
        "exact_count": lambda: _exact_count(scene, rng, answer),
    })


def _yes(answer: bool) -> str:
    return "yes" if answer else "no"


def _exists(scene: Scene, rng: random.Random, answer: bool) -> QA | None:
    if answer:
        obj = rng.choice(scene.objects)
        colour, shape = obj.colour, obj.shape
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if scene.count(colour=c, shape=s) == 0]
        # Half of the no's are near misses: the shape is there in another colour (or the colour on another shape).
        near = [(c, s) for c, s in absent if scene.count(shape=s) or scene.count(colour=c)]
        picked = _pick(rng, near if near and rng.random() < 0.5 else absent)
        if picked is None:
            return None
        colour, shape = picked
    return QA(_question(f"is there {article(colour)} {colour} {shape}"), _yes(answer), "exists",
              about=scene.matching(colour=colour, shape=shape))


def _has_attribute(scene: Scene, rng: random.Random, answer: bool) -> QA | None:
    attribute = rng.choice(("colour", "size", "shape"))
    picked = _pick(rng, [(o, r) for o in scene.objects if (r := refer(scene, o, avoid={attribute}))])
    if picked is None:
        return None
    obj, ref = picked
    values = {"colour": tuple(COLOURS), "size": tuple(SIZES), "shape": SHAPES}[attribute]
    actual = getattr(obj, attribute)
    value = actual if answer else rng.choice([v for v in values if v != actual])
    claim = f"{article(value)} {value}" if attribute == "shape" else value
    return QA(_question(f"is {ref} {claim}"), _yes(answer), "has_attribute", about=(obj,))


def _relation(scene: Scene, rng: random.Random, answer: bool) -> QA | None:
    """"Is the circle to the left of the square?": yes when it is, no when it is on the other side."""
    triples = []
    for b in scene.objects:
        for relation in RELATIONS:
            holds_in = relation if answer else OPPOSITE[relation]
            triples += [(a, relation, b) for a in scene.related(holds_in, b)]
    triples = [(a, rel, b, ra, rb) for a, rel, b in triples
               if (ra := refer(scene, a, avoid={"place"})) and (rb := refer(scene, b, avoid={"place"}))]
    picked = _pick(rng, triples)
    if picked is None:
        return None
    a, relation, b, ref_a, ref_b = picked
    return QA(_question(f"is {ref_a} {RELATION_PHRASES[relation]} {ref_b}"), _yes(answer), "relation", about=(a, b))


def _exact_count(scene: Scene, rng: random.Random, answer: bool) -> QA | None:
    shape = rng.choice(scene.objects).shape
    n = scene.count(shape=shape)
    if not answer:
        n = rng.choice([m for m in (n - 1, n + 1) if m >= 1])
    text = f"is there exactly one {shape}" if n == 1 else f"are there exactly {NUMBER_WORDS[n]} {PLURALS[shape]}"
    return QA(_question(text), _yes(answer), "exact_count", about=scene.matching(shape=shape))


# ----------------------------------------------------------------------------- multiple choice


def multiple_choice_qa(scene: Scene, rng: random.Random, n_options: int = 4) -> QA | None:
    """A question with `n_options` choices; the answer is the text of one of them.

    Distractors come from the same kind of answer (colours for a colour question) and, for
    "what is to the left of ...", from the scene's other objects first: plausible, wrong.
    """
    base = first_possible(rng, {
        "colour": lambda: attribute_qa(scene, rng, "colour"),
        "shape": lambda: attribute_qa(scene, rng, "shape"),
        "count": lambda: counting_qa(scene, rng),
        "where": lambda: where_qa(scene, rng),
        "neighbour": lambda: _neighbour(scene, rng),
    })
    if base is None:
        return None
    distractors = [d for d in _answer_space(scene, base, rng) if d != base.answer]
    options = [base.answer] + distractors[: n_options - 1]
    rng.shuffle(options)
    return QA(base.question, base.answer, f"mc_{base.kind}", tuple(options), about=base.about)


def _answer_space(scene: Scene, qa: QA, rng: random.Random) -> list[str]:
    """Candidate wrong answers for `qa`, best distractors first."""
    if qa.kind == "colour":
        space = list(COLOURS)
    elif qa.kind == "shape":
        space = list(SHAPES)
    elif qa.kind.startswith("count"):
        space = [str(n) for n in range(MAX_COUNT_ANSWER + 1)]
    elif qa.kind == "where":
        space = list(PLACES.values())
    else:  # an object description: the scene's other objects, then made-up ones
        in_scene = list(dict.fromkeys(describe(o) for o in scene.objects))
        made_up = [f"{c} {s}" for c in COLOURS for s in SHAPES]
        rng.shuffle(in_scene)
        rng.shuffle(made_up)
        return list(dict.fromkeys(in_scene + made_up))
    rng.shuffle(space)
    return space


# ----------------------------------------------------------------------------- held-out kinds


def main_object(scene: Scene) -> str:
    """Classification's label: the shape of the scene's one large object (its "main object")."""
    large = [o for o in scene.objects if o.size == "large"]
    if len(large) != 1:
        raise ValueError(f"classification needs exactly one large object, the scene has {len(large)}")
    return large[0].shape


def compositional_qa(scene: Scene, rng: random.Random) -> QA | None:
    """GQA-style, held out: find an object through a relation, then ask its attribute.

    "What colour is the object to the left of the blue square?" -> "green". Each part is a
    held-in skill (spatial relations, attributes); the combination is never trained.
    """
    picked = _pick(rng, _unique_neighbours(scene))
    if picked is None:
        return None
    _, relation, other, ref = picked
    attribute = rng.choice(("colour", "shape", "size"))
    question = _question(f"what {attribute} is the object {RELATION_PHRASES[relation]} {ref}")
    return QA(question, getattr(other, attribute), f"relational_{attribute}")


def compositional_anchor(scene: Scene, question: str) -> SceneObject | None:
    """The object a compositional question names ("... to the left of the blue square?" -> the
    blue square), found by wording every unique neighbour relation of the scene as the question
    does; None when none matches. Scores whether a model answers about the named object instead
    of its neighbour (evaluate.answer_sources)."""
    asked = question.lower()
    for anchor, relation, _, ref in _unique_neighbours(scene):
        if asked.endswith(f"the object {RELATION_PHRASES[relation]} {ref}?".lower()):
            return anchor
    return None


def dialogue_turns(scene: Scene, rng: random.Random) -> list[tuple[str, str]] | None:
    """2-3 turns of a conversation where later questions lean on earlier ones ("what colour is it?")."""
    patterns = [_coreference_dialogue, _counting_dialogue, _ellipsis_dialogue]
    for pattern in rng.sample(patterns, len(patterns)):
        turns = pattern(scene, rng)
        if turns:
            return turns
    return None


def _coreference_dialogue(scene: Scene, rng: random.Random) -> list[tuple[str, str]] | None:
    unique = [o for o in scene.objects if scene.count(shape=o.shape) == 1]
    obj = _pick(rng, unique)
    if obj is None:
        return None
    turns = []
    absent = [s for s in SHAPES if scene.count(shape=s) == 0]
    if absent and rng.random() < 0.5:  # first a "no", so "it" must be resolved to the later, present thing
        missing = rng.choice(absent)
        turns.append((_question(f"is there {article(missing)} {missing}"), "no"))
    turns.append((_question(f"is there {article(obj.shape)} {obj.shape}"), "yes"))
    turns.append(("What colour is it?", obj.colour))
    if len(turns) < 3:
        turns.append(("Where is it?", obj.place))
    return turns


def _counting_dialogue(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    colour = rng.choice(scene.objects).colour if rng.random() < 0.75 else rng.choice(tuple(COLOURS))
    k = scene.count(colour=colour)
    turns = [("How many objects are there?", str(len(scene.objects))), (f"How many of them are {colour}?", str(k))]
    if k == 1:
        turns.append((f"What shape is the {colour} one?", next(o.shape for o in scene.objects if o.colour == colour)))
    return turns


def _ellipsis_dialogue(scene: Scene, rng: random.Random) -> list[tuple[str, str]] | None:
    nameable = [(o, r) for o in scene.objects if (r := refer(scene, o, avoid={"colour"}))]
    if len(nameable) < 2:
        return None
    chosen = rng.sample(nameable, min(len(nameable), rng.randint(2, 3)))
    (first, first_ref), rest = chosen[0], chosen[1:]
    turns = [(_question(f"what colour is {first_ref}"), first.colour)]
    turns += [(_question(f"and {ref}"), obj.colour) for obj, ref in rest]
    return turns


def video_qa(clip: Clip, rng: random.Random) -> QA:
    """Questions about what happens: "Which way does the circle move?" -> "left"."""
    subject = clip.subject_object()
    shape = subject.shape  # the shapes of a clip differ, so "the circle" names one object
    if clip.event == "move":
        kinds = {"direction": (f"which way does the {shape} move", clip.direction),
                 "mover_colour": ("what colour is the moving object", subject.colour)}
        if len(clip.objects()) > 1:
            kinds["mover"] = ("which object moves", describe(subject))
    elif clip.event == "colour":
        kinds = {"colour_after": (f"what colour does the {shape} turn", clip.after),
                 "colour_before": (f"what colour is the {shape} at the start", clip.before)}
    else:
        verb = "appears" if clip.event == "appear" else "disappears"
        kinds = {f"{clip.event}_object": (f"which object {verb}", describe(subject)),
                 f"{clip.event}_shape": (f"what shape {verb}", shape)}
    kind = rng.choice(sorted(kinds))
    text, answer = kinds[kind]
    return QA(_question(text), answer, kind)


# ----------------------------------------------------------------------------- records (trainer's JSONL format)
# Each builder returns a record without its image: the dataset writer adds "image" (or
# "images" for a clip's frames) and "seed". Formats: instructblip_core/data.py's docstring.


def qa_record(qa: QA, task: str) -> dict:
    """{"question", "answer", "task", "kind"}, "options" for multiple choice, and "regions": the
    boxes of the objects the answer depends on (none for question generation, whose Q-Former
    reads the answer, not a question that points at something).

    "How many objects are there?" also grounds on the encoder's CLS token ("cls"), which the
    ViT's pretraining taught the number of objects (held back: 100%). Grounded on the objects
    alone, the instruction-tuned Q-Former gave it 0.8% of its attention on these questions and
    its outputs told the number in 77% (linear probe, 5-fold); with "cls", 12.9% and 90%, and
    chat counted one to three objects right in 93-100% of fresh scenes instead of 80-93% (README)."""
    record = {"question": qa.question, "answer": qa.answer}
    if qa.options is not None:
        record["options"] = list(qa.options)
    if qa.about and task != "question_generation":
        record["regions"] = [box(o) for o in qa.about] + ([CLS] if qa.kind == "count_all" else [])
    return record | {"task": task, "kind": qa.kind}


def caption_record(captions: list[str] | str, scene: Scene) -> dict:
    """A caption names every object, so every object is one of its regions."""
    return {"caption": captions, "task": "caption", "regions": [box(o) for o in scene.objects]}


def box(obj: SceneObject) -> list[float]:
    """The object's bounding box [x0, y0, x1, y1] in fractions of the image side (a shape fits its diameter)."""
    r = obj.diameter / 2
    return [round(max(0.0, obj.x - r), 4), round(max(0.0, obj.y - r), 4),
            round(min(1.0, obj.x + r), 4), round(min(1.0, obj.y + r), 4)]


def classification_record(scene: Scene) -> dict:
    """No question: the classification templates ask for "the main object" themselves."""
    return {"answer": main_object(scene), "task": "classification", "kind": "main_object"}


def dialogue_record(turns: list[tuple[str, str]]) -> dict:
    """LLaVA-style conversation; the first human message carries the <image> marker."""
    messages = []
    for k, (human, answer) in enumerate(turns):
        messages.append({"from": "human", "value": f"<image>\n{human}" if k == 0 else human})
        messages.append({"from": "gpt", "value": answer})
    return {"conversations": messages, "task": "dialogue", "kind": f"{len(turns)}_turns"}
