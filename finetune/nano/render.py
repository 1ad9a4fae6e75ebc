"""Drawing scenes and clips with PIL: anti-aliased, legible at 64-96 px, byte-identical for a seed.

Shapes are drawn at SUPERSAMPLE times the output size and reduced by averaging each
SUPERSAMPLE x SUPERSAMPLE block (`Image.reduce`), which gives smooth edges without any
font or filter that could differ between machines. Text uses our own 3x5 block glyphs
(no font files: FreeType versions render differently), drawn in black or white, whichever
contrasts more with the object's colour.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import PIL.Image
import PIL.ImageDraw

from .world import BACKGROUNDS, COLOURS, Clip, Scene, SceneObject

SUPERSAMPLE = 4
GRAIN = 14  # +- amplitude of the noise backdrop's grain, in 0-255 levels
GRADIENT_SHIFT = 60  # how much darker (light colours) or lighter (dark ones) a gradient ends
SQUARE_SIDE = 0.82  # square side / diameter: a square as heavy as the circle beside it looks right
STAR_INNER = 0.45  # inner / outer radius of the star's points
TEXT_UNIT = 0.105  # one glyph pixel, as a fraction of the object's diameter: two glyphs fit in a circle

# 3 columns x 5 rows per glyph, "#" is ink.
GLYPHS: dict[str, tuple[str, ...]] = {
    "2": ("###", "..#", "###", "#..", "###"),
    "3": ("###", "..#", ".##", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"),
    "5": ("###", "#..", "###", "..#", "##."),
    "6": ("##.", "#..", "###", "#.#", "###"),
    "7": ("###", "..#", ".#.", ".#.", ".#."),
    "8": ("###", "#.#", "###", "#.#", "###"),
    "9": ("###", "#.#", "###", "..#", "##."),
    "U": ("#.#", "#.#", "#.#", "#.#", "###"),
    "P": ("##.", "#.#", "##.", "#..", "#.."),
    "N": ("#.#", "###", "###", "#.#", "#.#"),
    "O": (".#.", "#.#", "#.#", "#.#", ".#."),
    "H": ("#.#", "#.#", "###", "#.#", "#.#"),
    "I": ("###", ".#.", ".#.", ".#.", "###"),
    "K": ("#.#", "##.", "#..", "##.", "#.#"),
    "A": (".#.", "#.#", "###", "#.#", "#.#"),
    "T": ("###", ".#.", ".#.", ".#.", ".#."),
}
GLYPH_W, GLYPH_H, GLYPH_GAP = 3, 5, 1


def render_scene(scene: Scene, size: int = 64) -> PIL.Image.Image:
    """The scene as a size x size RGB image."""
    if size < 16:
        raise ValueError(f"image size {size} is too small to show the scene; use at least 16 px (64-96 recommended)")
    big = size * SUPERSAMPLE
    canvas = _backdrop(scene, big)
    draw = PIL.ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw_object(draw, obj, big)
    image = canvas.reduce(SUPERSAMPLE)
    if scene.backdrop == "noise":
        image = _add_grain(image, scene.grain_seed)
    return image


def render_clip(clip: Clip, size: int = 64) -> list[PIL.Image.Image]:
    return [render_scene(frame, size) for frame in clip.frames]


def object_mask(obj: SceneObject, size: int = 64) -> np.ndarray:
    """(size, size) float in [0, 1]: how much of each pixel `obj` covers, text included."""
    big = size * SUPERSAMPLE
    canvas = PIL.Image.new("L", (big, big), 0)
    draw = PIL.ImageDraw.Draw(canvas)
    for xy, kind in _outline(obj, big):
        getattr(draw, kind)(xy, fill=255)
    return np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


def text_colour(colour: str) -> tuple[int, int, int]:
    """Black on light objects, white on dark ones (Rec. 601 luma)."""
    r, g, b = COLOURS[colour]
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def text_cells(obj: SceneObject, size: int) -> list[tuple[float, float, float, float]]:
    """Boxes (x0, y0, x1, y1) in pixels of an image of `size` that the object's glyphs ink."""
    if obj.text is None:
        return []
    unit = TEXT_UNIT * obj.diameter * size
    width = len(obj.text) * GLYPH_W + (len(obj.text) - 1) * GLYPH_GAP
    left = obj.x * size - width * unit / 2
    top = obj.y * size - GLYPH_H * unit / 2
    boxes = []
    for k, char in enumerate(obj.text):
        x0 = left + k * (GLYPH_W + GLYPH_GAP) * unit
        for row, line in enumerate(GLYPHS[char]):
            for col, ink in enumerate(line):
                if ink == "#":
                    bx, by = x0 + col * unit, top + row * unit
                    boxes.append((bx, by, bx + unit, by + unit))
    return boxes


def _backdrop(scene: Scene, big: int) -> PIL.Image.Image:
    colour = BACKGROUNDS[scene.background]
    plain = PIL.Image.new("RGB", (big, big), colour)
    if scene.backdrop != "gradient":
        return plain
    # Light backgrounds fade darker, the black one lighter; the fade runs top to bottom.
    sign = -1 if sum(colour) > 3 * 100 else 1
    end = tuple(max(0, min(255, c + sign * GRADIENT_SHIFT)) for c in colour)
    return PIL.Image.composite(PIL.Image.new("RGB", (big, big), end), plain, _ramp(big))


@functools.lru_cache(maxsize=4)
def _ramp(big: int) -> PIL.Image.Image:
    """(big, big) "L" mask going from 0 at the top to 255 at the bottom (shared: never drawn on)."""
    return PIL.Image.linear_gradient("L").resize((big, big), PIL.Image.Resampling.BILINEAR)


def _add_grain(image: PIL.Image.Image, seed: int) -> PIL.Image.Image:
    rng = np.random.Generator(np.random.PCG64(seed))  # its own stream, seeded by the scene
    pixels = np.asarray(image, dtype=np.int16)  # (H, W, 3)
    grain = rng.integers(-GRAIN, GRAIN + 1, size=pixels.shape[:2] + (1,), dtype=np.int16)  # grey grain, (H, W, 1)
    return PIL.Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8), "RGB")


def _draw_object(draw: PIL.ImageDraw.ImageDraw, obj: SceneObject, big: int) -> None:
    for xy, kind in _outline(obj, big):
        getattr(draw, kind)(xy, fill=COLOURS[obj.colour])
    ink = text_colour(obj.colour)
    for box in text_cells(obj, big):
        draw.rectangle(box, fill=ink)


def _outline(obj: SceneObject, big: int) -> list[tuple[list, str]]:
    """The object's filled outline at canvas size `big`: [(coordinates, ImageDraw method)]."""
    cx, cy, r = obj.x * big, obj.y * big, obj.diameter * big / 2
    if obj.shape == "circle":
        return [([cx - r, cy - r, cx + r, cy + r], "ellipse")]
    if obj.shape == "square":
        h = r * SQUARE_SIDE
        return [([cx - h, cy - h, cx + h, cy + h], "rectangle")]
    if obj.shape == "diamond":
        return [([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], "polygon")]
    if obj.shape == "triangle":
        # Pointing up; the centroid sits at the centre, so it looks centred in its cell.
        return [([(cx, cy - r), (cx + r * math.sqrt(3) / 2, cy + r / 2), (cx - r * math.sqrt(3) / 2, cy + r / 2)], "polygon")]
    if obj.shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * STAR_INNER
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return [(points, "polygon")]
    raise ValueError(f"no drawing for shape {obj.shape!r}")

