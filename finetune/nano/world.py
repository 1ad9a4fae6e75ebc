"""The procedural visual world of the small InstructBLIP: scenes of coloured shapes, and short clips.

A scene is 1-5 objects on a background. Each object has a shape, a colour, a size, a place
(one cell of a 3x3 grid, each cell holding at most one object) and maybe a short text
written on it. Objects sit inside their own cell, so they never overlap and every fact
about them is visible. A clip is a few frames of one or two objects where one thing
happens: an object moves, changes colour, appears or disappears.

Everything is a pure function of a seed: `make_scene(seed)` and `make_clip(seed)` draw from
their own `random.Random(seed)`, never from the global generator, so a seed names one scene
on every machine. Seeds may be ints or strings (`random` hashes strings with SHA-512,
independently of PYTHONHASHSEED); splits.py builds them as "nano/<seed>/<stream>/...".

Coordinates are fractions of the image side: x grows to the right, y downwards; an object's
(x, y) is its centre and its size is the diameter of the circle it fits in.

The world is deliberately small (5 shapes, 6 colours, 2 sizes, 9 places, 14 texts) so that a
model trained from scratch on two CPU cores can learn it; it mirrors the kinds of facts the
InstructBLIP paper's datasets ask about (Dai et al. 2023): attributes, counts, spatial
relations, text in the image, and motion in video.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 90, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
SIZES: dict[str, float] = {"small": 0.17, "large": 0.30}  # diameter, as a fraction of the image side
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "grey": (165, 165, 165),
    "beige": (232, 218, 186),
    "black": (28, 28, 28),
}
# plain: one colour; gradient: the colour fading darker or lighter across the image;
# noise: the plain colour with light per-pixel grain (reserved for held-out scene statistics).
BACKDROPS: tuple[str, ...] = ("plain", "gradient", "noise")
# Readable at 64 px as 3x5-pixel glyphs (render.py); no 0/O, 1/I, 5/S, 6/G look-alikes.
DIGITS: tuple[str, ...] = ("2", "3", "4", "5", "6", "7", "8", "9")
WORDS: tuple[str, ...] = ("UP", "NO", "ON", "HI", "OK", "AT")
TEXTS: tuple[str, ...] = DIGITS + WORDS
TEXT_SHAPES: tuple[str, ...] = ("circle", "square")  # only large ones have room for two glyphs

GRID = 3
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLUMNS: tuple[str, ...] = ("left", "centre", "right")
# Name of each grid cell (row, column), as answers use it: "where is the circle?" -> "top left".
PLACES: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "centre", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
CLIP_EVENTS: tuple[str, ...] = ("move", "colour", "appear", "disappear")


@dataclass(frozen=True)
class SceneObject:
    """One object. `ident` is its index in the scene, and stays the same across a clip's frames."""

    shape: str
    colour: str
    size: str
    x: float  # centre, 0 = left edge, 1 = right edge
    y: float  # centre, 0 = top edge, 1 = bottom edge
    text: str | None = None
    ident: int = 0

    def __post_init__(self) -> None:
        for value, known, what in (
            (self.shape, SHAPES, "shape"), (self.colour, COLOURS, "colour"), (self.size, SIZES, "size"),
        ):
            if value not in known:
                raise ValueError(f"unknown {what} {value!r}; known: {', '.join(known)}")
        if self.text is not None and self.text not in TEXTS:
            raise ValueError(f"unknown text {self.text!r}; known: {', '.join(TEXTS)}")
        if not (0.0 <= self.x <= 1.0 and 0.0 <= self.y <= 1.0):
            raise ValueError(f"object centre ({self.x}, {self.y}) is outside the image (coordinates are in [0, 1])")

    @property
    def row(self) -> int:
        return min(GRID - 1, int(self.y * GRID))

    @property
    def col(self) -> int:
        return min(GRID - 1, int(self.x * GRID))

    @property
    def cell(self) -> tuple[int, int]:
        return self.row, self.col

    @property
    def place(self) -> str:
        return PLACES[self.cell]

    @property
    def diameter(self) -> float:
        return SIZES[self.size]


@dataclass(frozen=True)
class Scene:
    background: str  # a BACKGROUNDS name
    backdrop: str  # a BACKDROPS style
    objects: tuple[SceneObject, ...]
    grain_seed: int = 0  # seeds the noise backdrop's grain (render.py)

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; known: {', '.join(BACKGROUNDS)}")
        if self.backdrop not in BACKDROPS:
            raise ValueError(f"unknown backdrop {self.backdrop!r}; known: {', '.join(BACKDROPS)}")

    def matching(self, *, shape: str | None = None, colour: str | None = None, size: str | None = None) -> tuple[SceneObject, ...]:
        """The objects matching every attribute given (none given: all objects), in scene order."""
        return tuple(
            o for o in self.objects
            if (shape is None or o.shape == shape) and (colour is None or o.colour == colour) and (size is None or o.size == size)
        )

    def count(self, *, shape: str | None = None, colour: str | None = None, size: str | None = None) -> int:
        return len(self.matching(shape=shape, colour=colour, size=size))

    def at(self, cell: tuple[int, int]) -> SceneObject | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def related(self, relation: str, anchor: SceneObject) -> list[SceneObject]:
        """Objects in `relation` ("left", "right", "above", "below") to `anchor`, by grid cell.

        "left" means in a column further left, whatever the row: the relation questions ask
        about use the same meaning.
        """
        tests = {
            "left": lambda o: o.col < anchor.col,
            "right": lambda o: o.col > anchor.col,
            "above": lambda o: o.row < anchor.row,
            "below": lambda o: o.row > anchor.row,
        }
        if relation not in tests:
            raise ValueError(f"unknown relation {relation!r}; known: {', '.join(tests)}")
        return [o for o in self.objects if o is not anchor and tests[relation](o)]

    @property
    def texts(self) -> list[SceneObject]:
        return [o for o in self.objects if o.text is not None]


@dataclass(frozen=True)
class SceneStats:
    """What kinds of scenes a dataset draws: the knobs that make "different scene statistics"."""

    min_objects: int = 1
    max_objects: int = 5
    backdrops: tuple[str, ...] = ("plain", "gradient")
    sizes: tuple[str, ...] = ("small", "large")
    text_probability: float = 0.25  # per large circle/square
    min_texts: int = 0  # at least this many objects carry text
    single_large: bool = False  # exactly one large object (the "main object" of classification)

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= GRID * GRID:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {GRID * GRID}, got {self.min_objects}..{self.max_objects}")
        if self.min_texts > self.max_objects:
            raise ValueError(f"min_texts {self.min_texts} is more than max_objects {self.max_objects}")
        unknown = [b for b in self.backdrops if b not in BACKDROPS] + [s for s in self.sizes if s not in SIZES]
        if unknown or not self.backdrops or not self.sizes:
            raise ValueError(f"backdrops and sizes must be non-empty and known; unknown: {unknown}")
        if self.single_large and self.min_texts > 1:
            raise ValueError("single_large allows one large object, and only large objects carry text: min_texts must be <= 1")
        if self.min_texts and "large" not in self.sizes:
            raise ValueError("text needs large objects: min_texts > 0 requires 'large' in sizes")


HELD_IN_STATS = SceneStats()


def make_scene(seed: int | str, stats: SceneStats = HELD_IN_STATS) -> Scene:
    """The scene named by `seed` under `stats`: same seed and stats, same scene, everywhere."""
    rng = random.Random(seed)
    n = rng.randint(stats.min_objects, stats.max_objects)
    cells = sorted(rng.sample(range(GRID * GRID), n))  # reading order: ident follows rows, then columns
    sizes = _sizes(rng, n, stats)
    forced_text = set(rng.sample(range(n), min(stats.min_texts, n)))
    if stats.single_large and forced_text:
        forced_text = {sizes.index("large")}  # text needs a large object, and there is only one
    texts = rng.sample(TEXTS, len(TEXTS))  # distinct texts in one scene, so "the word UP" names one object
    objects = []
    for ident, (cell, size) in enumerate(zip(cells, sizes)):
        if ident in forced_text:
            size, shape = "large", rng.choice(TEXT_SHAPES)
        else:
            shape = rng.choice(SHAPES)
        colour = rng.choice(tuple(COLOURS))
        x, y = _jittered_centre(rng, divmod(cell, GRID), size)
        carries_text = ident in forced_text or (
            size == "large" and shape in TEXT_SHAPES and rng.random() < stats.text_probability
        )
        text = texts.pop() if carries_text else None
        objects.append(SceneObject(shape, colour, size, x, y, text, ident))
    background = rng.choice(tuple(BACKGROUNDS))
    return Scene(background, rng.choice(stats.backdrops), tuple(objects), rng.getrandbits(32))


def _sizes(rng: random.Random, n: int, stats: SceneStats) -> list[str]:
    if not stats.single_large:
        return [rng.choice(stats.sizes) for _ in range(n)]
    sizes = ["small"] * n
    sizes[rng.randrange(n)] = "large"
    return sizes


def _jittered_centre(rng: random.Random, cell: tuple[int, int], size: str) -> tuple[float, float]:
    """A centre near the middle of `cell`, moved at most so far that the object stays in the cell."""
    row, col = cell
    slack = (1.0 / GRID - SIZES[size]) / 2  # room between the object's edge and the cell's edge
    # 0.6 of the slack: a small margin keeps neighbours' anti-aliased edges apart too.
    dx, dy = (rng.uniform(-0.6, 0.6) * slack for _ in range(2))
    return (col + 0.5) / GRID + dx, (row + 0.5) / GRID + dy


# ----------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class Clip:
    """A short video: frames (scenes whose objects keep their `ident`) and the one event in it.

    event "move": object `subject` moves in `direction` (the other object, if any, stays);
    "colour": `subject` changes from colour `before` to `after`;
    "appear" / "disappear": `subject` is absent in the first / last frames.
    The objects of a clip all have different shapes, so "the circle" always names one.
    """

    frames: tuple[Scene, ...]
    event: str
    subject: int
    direction: str | None = None
    before: str | None = None
    after: str | None = None

    def subject_object(self) -> SceneObject:
        """The subject as it looks in a frame where it is visible (the last such frame)."""
        return next(o for frame in reversed(self.frames) for o in frame.objects if o.ident == self.subject)

    def objects(self) -> list[SceneObject]:
        """Every object of the clip, once (last visible state), by ident."""
        seen: dict[int, SceneObject] = {}
        for frame in self.frames:
            seen.update({o.ident: o for o in frame.objects})
        return [seen[k] for k in sorted(seen)]


def make_clip(seed: int | str, *, frames: int = 8, event: str | None = None) -> Clip:
    """The clip named by `seed`: 1-2 objects, one event (`event` picks it; default random)."""
    if frames < 4:
        raise ValueError(f"a clip needs at least 4 frames to show an event, got {frames}")
    rng = random.Random(seed)
    event = event or rng.choice(CLIP_EVENTS)
    if event not in CLIP_EVENTS:
        raise ValueError(f"unknown clip event {event!r}; known: {', '.join(CLIP_EVENTS)}")
    n = rng.randint(1, 2)
    shapes = rng.sample(SHAPES, n)
    background, backdrop = rng.choice(tuple(BACKGROUNDS)), rng.choice(("plain", "gradient"))
    colours = [rng.choice(tuple(COLOURS)) for _ in range(n)]
    sizes = [rng.choice(tuple(SIZES)) for _ in range(n)]
    if event == "move":
        tracks, extra = _moving_tracks(rng, n, frames)
    else:
        cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
        tracks = [[_jittered_centre(rng, cell, size)] * frames for cell, size in zip(cells, sizes)]
        extra = {}
    colour_tracks = [[c] * frames for c in colours]
    visible = [[True] * frames for _ in range(n)]
    switch = rng.randint(2, frames - 2)  # the frame where the change shows; both sides have >= 2 frames
    if event == "colour":
        after = rng.choice([c for c in COLOURS if c != colours[0]])
        colour_tracks[0] = [colours[0]] * switch + [after] * (frames - switch)
        extra = {"before": colours[0], "after": after}
    elif event == "appear":
        visible[0] = [f >= switch for f in range(frames)]
    elif event == "disappear":
        visible[0] = [f < switch for f in range(frames)]
    scenes = []
    for f in range(frames):
        objects = tuple(
            SceneObject(shapes[k], colour_tracks[k][f], sizes[k], *tracks[k][f], ident=k)
            for k in range(n) if visible[k][f]
        )
        scenes.append(Scene(background, backdrop, objects))
    return Clip(tuple(scenes), event, 0, **extra)


def _moving_tracks(rng: random.Random, n: int, frames: int) -> tuple[list[list[tuple[float, float]]], dict]:
    """Object 0 crosses the image along one row or column; object 1 sits in another lane.

    The mover travels from the middle of the first cell to the middle of the last cell of
    its lane, evenly over the frames; the other object is in a different row (for left/right
    motion) or column (up/down), so the two never meet.
    """
    direction = rng.choice(DIRECTIONS)
    lane, other_lane = rng.sample(range(GRID), 2)
    start, end = 0.5 / GRID, 1 - 0.5 / GRID
    if direction in ("left", "up"):
        start, end = end, start
    along = [start + (end - start) * f / (frames - 1) for f in range(frames)]
    across = (lane + 0.5) / GRID
    horizontal = direction in ("left", "right")
    mover = [(a, across) if horizontal else (across, a) for a in along]
    tracks = [mover]
    if n == 2:
        spot = (rng.randrange(GRID) + 0.5) / GRID
        still = ((spot, (other_lane + 0.5) / GRID) if horizontal else ((other_lane + 0.5) / GRID, spot))
        tracks.append([still] * frames)
    return tracks, {"direction": direction}

