"""Draws the app's example pictures and examples.json, in the shipped small model's world.

    python assets/examples/make_examples.py

The shipped model knows scenes of shapes (circle, square, triangle, diamond, star) in six
colours and two sizes, one object per cell of a 3x3 grid, on a plain background, some with a
short word in 3x5 block letters (finetune/nano/world.py). These pictures follow those rules,
so its answers can be checked. Deterministic: the same files every run. Each entry of
examples.json is {"image", "question", "expect"}; `expect` lists right answers (any one of
them, case-insensitive, inside the answer), used by the app's end-to-end test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 192  # a 3x3 grid of 64 px cells
SUPERSAMPLE = 4  # drawn this much larger, then averaged down: smooth edges without fonts or filters
COLOURS = {"red": (220, 40, 40), "green": (40, 165, 60), "blue": (45, 90, 230), "yellow": (240, 210, 30),
           "purple": (150, 60, 200), "orange": (250, 140, 20), "white": (255, 255, 255)}
BACKGROUNDS = {"white": (245, 245, 245), "grey": (165, 165, 165), "beige": (232, 218, 186), "black": (28, 28, 28)}
DIAMETER = {"small": 0.17, "large": 0.30}  # fraction of the image side
LETTERS = {  # 3 x 5 block letters, "#" is ink
    "H": ("#.#", "#.#", "###", "#.#", "#.#"),
    "I": ("###", ".#.", ".#.", ".#.", "###"),
}


def outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Corner points of a polygon shape around (cx, cy) with outer radius r."""
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    raise ValueError(f"unknown polygon shape {shape}")


def draw_object(draw: ImageDraw.ImageDraw, shape: str, colour: str, size: str, row: int, col: int,
                text: str | None = None) -> None:
    side = SIZE * SUPERSAMPLE
    cx, cy = (col + 0.5) * side / 3, (row + 0.5) * side / 3
    r = DIAMETER[size] * side / 2
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        half = 0.82 * r  # a square as heavy as a circle of the same size
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:
        draw.polygon(outline(shape, cx, cy, r), fill=fill)
    if text:
        write(draw, text, cx, cy, unit=0.105 * 2 * r)


def write(draw: ImageDraw.ImageDraw, text: str, cx: float, cy: float, unit: float) -> None:
    """Block letters centred on (cx, cy), one letter pixel = `unit` pixels, white."""
    width = len(text) * 4 - 1  # 3 columns per letter and a 1-column gap
    left, top = cx - width * unit / 2, cy - 2.5 * unit
    for i, letter in enumerate(text):
        for y, line in enumerate(LETTERS[letter]):
            for x, ink in enumerate(line):
                if ink == "#":
                    x0, y0 = left + (i * 4 + x) * unit, top + y * unit
                    draw.rectangle((x0, y0, x0 + unit - 1, y0 + unit - 1), fill=COLOURS["white"])


def scene(background: str, *objects: tuple) -> Image.Image:
    canvas = Image.new("RGB", (SIZE * SUPERSAMPLE,) * 2, BACKGROUNDS[background])
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        draw_object(draw, *obj)
    return canvas.reduce(SUPERSAMPLE)


EXAMPLES = [  # file, background, objects (shape, colour, size, row, col[, text]), question, right answers
    ("red_circle_blue_square.png", "white",
     [("circle", "red", "large", 1, 0), ("square", "blue", "large", 1, 2)], "What colour is the circle?", ["red"]),
    ("three_yellow_stars.png", "grey",
     [("star", "yellow", "large", 0, 0), ("star", "yellow", "small", 0, 2), ("star", "yellow", "large", 2, 1)],
     "How many stars are there?", ["3", "three"]),
    ("green_triangle_orange_diamond.png", "beige",
     [("triangle", "green", "large", 1, 0), ("diamond", "orange", "large", 1, 2)], "Where is the triangle?", ["left"]),
    ("large_purple_square.png", "white",
     [("square", "purple", "large", 1, 1), ("circle", "orange", "small", 2, 2)], "What size is the square?", ["large"]),
    ("word_hi.png", "beige", [("square", "blue", "large", 1, 1, "HI")], "What is written on the square?", ["hi"]),
    ("two_blue_circles.png", "black",
     [("circle", "blue", "large", 0, 0), ("circle", "blue", "small", 2, 2)], "How many circles are there?", ["2", "two"]),
]


def main() -> None:
    entries = []
    for name, background, objects, question, expect in EXAMPLES:
        scene(background, *objects).save(HERE / name, optimize=True)
        entries.append({"image": name, "question": question, "expect": expect})
    (HERE / "examples.json").write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
