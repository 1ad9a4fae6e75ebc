"""Words for the world: referring expressions, object descriptions, captions, sentences.

Referring expressions are chosen so that they pick out exactly one object: "the circle"
only when the scene has one circle, else "the red circle", then "the large red circle",
then the place ("the red circle at the top left"; each cell holds one object, so a place
always settles it). A question never names the attribute it asks about ("what colour is
the red circle?" would give the answer away), so `refer` takes the attributes to avoid.
"""

from __future__ import annotations

import random

from .world import DIGITS, Clip, Scene, SceneObject

PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "star": "stars"}
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RELATION_PHRASES = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}

# Attribute sets tried in order, shortest description first.
_REFERENCE_ORDER: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("colour", "shape"),
    ("size", "shape"),
    ("size", "colour", "shape"),
    ("colour",),
    ("size",),
    ("size", "colour"),
    ("shape", "place"),
    ("colour", "shape", "place"),
    ("colour", "place"),
    ("place",),
)


def place_phrase(obj: SceneObject) -> str:
    """Where the object is, as a caption says it: "at the top left", "on the left", "in the centre"."""
    name = obj.place
    if name == "centre":
        return "in the centre"
    if name in ("left", "right"):
        return f"on the {name}"
    return f"at the {name}"


def describe(obj: SceneObject) -> str:
    """The short answer naming an object: "red circle" (colour and shape, no article)."""
    return f"{obj.colour} {obj.shape}"


def text_phrase(text: str) -> str:
    """"the number 7" or "the word UP"."""
    return f"the number {text}" if text in DIGITS else f"the word {text}"


def _matches(other: SceneObject, obj: SceneObject, attrs: tuple[str, ...]) -> bool:
    return all(
        (other.cell == obj.cell) if a == "place" else getattr(other, a) == getattr(obj, a) for a in attrs
    )


def _phrase(obj: SceneObject, attrs: tuple[str, ...]) -> str:
    words = ["the"]
    words += [obj.size] if "size" in attrs else []
    words += [obj.colour] if "colour" in attrs else []
    words.append(obj.shape if "shape" in attrs else "object")
    if "place" in attrs:
        words.append(place_phrase(obj))
    return " ".join(words)


def refer(scene: Scene, obj: SceneObject, *, avoid: frozenset[str] | set[str] = frozenset()) -> str | None:
    """The shortest phrase that names `obj` alone in `scene` without the attributes in `avoid`.

    avoid: any of "shape", "colour", "size", "place". None when no allowed description is
    unique (two identical objects and "place" avoided).
    """
    for attrs in _REFERENCE_ORDER:
        if any(a in avoid for a in attrs):
            continue
        if sum(_matches(other, obj, attrs) for other in scene.objects) == 1:
            return _phrase(obj, attrs)
    return None


def object_phrase(obj: SceneObject) -> str:
    """A caption's words for one object: "a large red square with the word UP at the top left"."""
    words = f"a {obj.size} {obj.colour} {obj.shape}"
    if obj.text is not None:
        words += f" with {text_phrase(obj.text)}"
    return f"{words} {place_phrase(obj)}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    """The canonical caption: every object in reading order, then the background.

    "a large red circle on the left and a small blue square at the top right on a grey background"
    """
    objects = sorted(scene.objects, key=lambda o: o.cell)
    if not objects:
        return f"an empty {scene.background} background"
    return f"{_join([object_phrase(o) for o in objects])} on a {scene.background} background"


def counted_caption(scene: Scene) -> str:
    """A second reference caption: "three objects on a grey background: a large red circle on the left, ..."."""
    objects = sorted(scene.objects, key=lambda o: o.cell)
    n = len(objects)
    head = f"{NUMBER_WORDS[n]} object{'s' if n != 1 else ''} on a {scene.background} background"
    return head if not objects else f"{head}: {_join([object_phrase(o) for o in objects])}"


def relation_sentence(a_ref: str, relation: str, b_ref: str) -> str:
    return f"{a_ref} is {RELATION_PHRASES[relation]} {b_ref}"


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def article(word: str) -> str:
    """"an" before a vowel sound ("an orange circle"), else "a"."""
    return "an" if word[:1] in "aeiou" else "a"



# ----------------------------------------------------------------------------- sentences for the language model


def fact_sentence(scene: Scene, rng: random.Random) -> str:
    """One true statement about the scene: a relation, a count, an attribute, a place or a text."""
    obj = rng.choice(scene.objects)
    ref = refer(scene, obj) or describe(obj)
    makers = {
        "count": lambda: _count_sentence(scene, rng),
        "colour": lambda: _claim(refer(scene, obj, avoid={"colour"}), obj.colour),
        "size": lambda: _claim(refer(scene, obj, avoid={"size"}), obj.size),
        "place": lambda: _claim(refer(scene, obj, avoid={"place"}), place_phrase(obj)),
        "relation": lambda: _relation_sentence(scene, rng),
        "text": lambda: _text_sentence(obj, ref, rng) if obj.text else None,
        "share": lambda: _share_sentence(scene, obj),
    }
    for kind in rng.sample(sorted(makers), len(makers)):
        sentence = makers[kind]()
        if sentence:
            return capitalise(sentence) + "."
    raise AssertionError("unreachable: a count sentence always exists")


def _text_sentence(obj: SceneObject, ref: str, rng: random.Random) -> str:
    return rng.choice((
        f"{text_phrase(obj.text)} is written on {ref}",
        f"the text on {ref} says {obj.text}",
        f"if you read the text on {ref} out loud, you say {obj.text}",
    ))


def _share_sentence(scene: Scene, obj: SceneObject) -> str:
    n, k = len(scene.objects), scene.count(colour=obj.colour)
    them = "all of them are" if k == n else f"{NUMBER_WORDS[k]} of them {'is' if k == 1 else 'are'}"
    return f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} object{'s' if n != 1 else ''} and {them} {obj.colour}"


def _claim(ref: str | None, value: str) -> str | None:
    return f"{ref} is {value}" if ref else None


def _count_sentence(scene: Scene, rng: random.Random) -> str:
    shape = rng.choice(list(PLURALS))
    n = scene.count(shape=shape)
    if n == 1:
        return f"there is one {shape}"
    return f"there are {NUMBER_WORDS[n]} {PLURALS[shape]}"


def _relation_sentence(scene: Scene, rng: random.Random) -> str | None:
    pairs = [(a, rel, b) for b in scene.objects for rel in RELATION_PHRASES for a in scene.related(rel, b)]
    if not pairs:
        return None
    a, rel, b = rng.choice(pairs)
    ref_a, ref_b = refer(scene, a, avoid={"place"}), refer(scene, b, avoid={"place"})
    return relation_sentence(ref_a, rel, ref_b) if ref_a and ref_b else None


def clip_sentence(clip: Clip, rng: random.Random) -> str:
    """What happens in a clip, in one of a few wordings: "The red circle is moving left." """
    obj = clip.subject_object()
    if clip.event == "move":
        where = f"{clip.direction} all the way across" if rng.random() < 0.3 else clip.direction
        verb = rng.choice(("moves", "is moving"))
        still = [o for o in clip.objects() if o.ident != obj.ident]
        rest = f" The {still[0].shape} does not move." if still else ""
        return f"The {obj.colour} {obj.shape} {verb} {where}.{rest}"
    if clip.event == "colour":
        return rng.choice((
            f"The {obj.shape} turns from {clip.before} to {clip.after}.",
            f"Watch the {obj.shape} turn from {clip.before} to {clip.after}.",
            f"At the start the {obj.shape} is {clip.before}, then it turns {clip.after}.",
        ))
    thing = f"{article(obj.colour)} {obj.colour} {obj.shape}"
    if rng.random() < 0.5:
        return capitalise(f"{thing} {clip.event}s.")
    if clip.event == "appear":
        return f"At the start there is no {obj.shape}, and at the end there is {thing}."
    return f"At the start there is {thing}, and at the end there is no {obj.shape}."
