"""Draws the app's example pictures and examples.json, in the shipped small model's world.

    python assets/examples/make_examples.py

The shipped model knows scenes of shapes (circle, square, triangle, diamond, star) in six
colours and two sizes, one object per cell of a 3x3 grid, on a plain background, some with a
short word (finetune/nano/world.py). The pictures are those scenes drawn by the world's own
renderer (finetune/nano/render.py), so they are exactly what the model was trained on, and its
answers can be checked. Deterministic: the same files every run. Each entry of examples.json
is {"image", "question", "expect"}; `expect` lists right answers (any one of them,
case-insensitive, inside the answer), used by the app's end-to-end test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, for finetune.nano

from finetune.nano.render import render_scene  # noqa: E402
from finetune.nano.world import GRID, Scene, SceneObject  # noqa: E402

SIZE = 192  # three times the model's 64 px input: what a user would upload, not a thumbnail


def scene(background: str, *objects: tuple) -> Scene:
    """Objects as (shape, colour, size, row, col[, text]), each centred in its grid cell."""
    placed = tuple(
        SceneObject(shape, colour, size, x=(col + 0.5) / GRID, y=(row + 0.5) / GRID, text=rest[0] if rest else None, ident=i)
        for i, (shape, colour, size, row, col, *rest) in enumerate(objects)
    )
    return Scene(background, "plain", placed)


# What the shipped model answers reliably (python -m finetune.nano.competence; README, "The
# shipped small model"): colour and size of the object in a one-object scene, and how many
# objects a scene holds. Questions about one object among several it answers near chance, so
# the gallery does not pretend otherwise; the app's end-to-end test checks every answer here.
EXAMPLES = [  # file, background, objects (shape, colour, size, row, col[, text]), question, right answers
    ("red_circle.png", "white", [("circle", "red", "large", 1, 1)], "What colour is the circle?", ["red"]),
    ("red_circle_blue_square.png", "white",
     [("circle", "red", "large", 1, 0), ("square", "blue", "large", 1, 2)], "How many objects are there?", ["2", "two"]),
    ("three_yellow_stars.png", "grey",
     [("star", "yellow", "large", 0, 0), ("star", "yellow", "small", 0, 2), ("star", "yellow", "large", 2, 1)],
     "How many objects are there?", ["3", "three"]),
    ("large_purple_square.png", "white", [("square", "purple", "large", 1, 1)], "What size is the square?", ["large"]),
    ("small_blue_star.png", "black", [("star", "blue", "small", 2, 0)], "What colour is the star?", ["blue"]),
    ("green_triangle.png", "beige", [("triangle", "green", "small", 0, 2)], "What size is the triangle?", ["small"]),
]


def main() -> None:
    entries = []
    for name, background, objects, question, expect in EXAMPLES:
        render_scene(scene(background, *objects), SIZE).save(HERE / name, optimize=True)
        entries.append({"image": name, "question": question, "expect": expect})
    (HERE / "examples.json").write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
