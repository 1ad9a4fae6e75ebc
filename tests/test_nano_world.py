"""The nano world: scenes and clips are pure functions of a seed, facts are visible in the pixels."""

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from finetune.nano.render import GLYPHS, object_mask, render_clip, render_scene, text_cells, text_colour
from finetune.nano.world import (
    BACKGROUNDS, COLOURS, GRID, SHAPES, TEXTS, Clip, Scene, SceneObject, SceneStats, make_clip, make_scene,
)
from finetune.nano.write import png_bytes

N_SCENES = 300
CLUTTERED = SceneStats(min_objects=4, text_probability=0.6, backdrops=("plain", "gradient", "noise"))
MAX_OVERLAP = 0.02  # share of the smaller object's area another object may cover (anti-aliased edges)


def scenes(n=N_SCENES, stats=CLUTTERED, prefix="world-test"):
    return [make_scene(f"{prefix}/{i}", stats) for i in range(n)]


def solid_region(obj, size):
    """Pixels fully inside the object and off its text: where its own colour must show."""
    inside = object_mask(obj, size) > 0.999
    for x0, y0, x1, y1 in text_cells(obj, size):
        # Blank the glyph cell and the pixel around it, which the reduction blends.
        inside[max(0, int(y0) - 1): int(np.ceil(y1)) + 1, max(0, int(x0) - 1): int(np.ceil(x1)) + 1] = False
    return inside


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_scene_and_bytes_other_seed_other_scene():
    a, b = make_scene("nano/7/train/x/3", CLUTTERED), make_scene("nano/7/train/x/3", CLUTTERED)
    assert a == b
    assert png_bytes(a, 64) == png_bytes(b, 64)
    assert len({make_scene(f"k/{i}", CLUTTERED) for i in range(50)}) == 50
    assert make_clip("c/1") == make_clip("c/1")
    assert [np.asarray(f).tobytes() for f in render_clip(make_clip("c/1"))] == \
           [np.asarray(f).tobytes() for f in render_clip(make_clip("c/1"))]


def test_png_bytes_identical_in_a_fresh_process_with_another_hash_seed():
    """String seeds must not depend on PYTHONHASHSEED (random hashes str with SHA-512)."""
    code = (
        "import hashlib;from finetune.nano.world import make_scene, make_clip, SceneStats;"
        "from finetune.nano.write import png_bytes;"
        "s=SceneStats(min_objects=4, text_probability=0.6, backdrops=('plain','gradient','noise'));"
        "h=hashlib.sha256();[h.update(png_bytes(make_scene(f'p/{i}', s), 64)) for i in range(20)];"
        "[h.update(png_bytes(f, 64)) for f in make_clip('p/c').frames];print(h.hexdigest())"
    )
    here = hashlib.sha256()
    for i in range(20):
        here.update(png_bytes(make_scene(f"p/{i}", CLUTTERED), 64))
    for frame in make_clip("p/c").frames:
        here.update(png_bytes(frame, 64))
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here.hexdigest()


# ----------------------------------------------------------------------------- layout


def test_objects_have_own_cells_stay_inside_them_and_do_not_overlap():
    size = 64
    for scene in scenes(150):
        cells = [o.cell for o in scene.objects]
        assert len(set(cells)) == len(cells)
        assert cells == sorted(cells), "objects are in reading order"
        assert [o.ident for o in scene.objects] == list(range(len(scene.objects)))
        for o in scene.objects:
            r = o.diameter / 2
            row, col = o.cell
            assert col / GRID <= o.x - r and o.x + r <= (col + 1) / GRID
            assert row / GRID <= o.y - r and o.y + r <= (row + 1) / GRID
        masks = [object_mask(o, size) for o in scene.objects]
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                shared = np.minimum(masks[i], masks[j]).sum()
                assert shared <= MAX_OVERLAP * min(masks[i].sum(), masks[j].sum()), (scene, i, j)


def test_scene_stats_are_respected():
    single = SceneStats(min_objects=2, max_objects=4, single_large=True)
    for scene in scenes(200, single, "single"):
        assert 2 <= len(scene.objects) <= 4
        assert sum(o.size == "large" for o in scene.objects) == 1
    texted = SceneStats(min_objects=2, text_probability=0.0, min_texts=1)
    for scene in scenes(200, texted, "texted"):
        assert len(scene.texts) == 1
    for scene in scenes(200, SceneStats(backdrops=("noise",)), "noise"):
        assert scene.backdrop == "noise"
    seen = scenes(400, SceneStats(), "stats")
    assert {s.backdrop for s in seen} == {"plain", "gradient"}, "held-in scenes never have the held-out grain"
    assert {len(s.objects) for s in seen} == {1, 2, 3, 4, 5}
    assert {o.shape for s in seen for o in s.objects} == set(SHAPES)
    assert {o.colour for s in seen for o in s.objects} == set(COLOURS)
    assert {s.background for s in seen} == set(BACKGROUNDS)


def test_texts_only_on_large_circles_and_squares_and_distinct_within_a_scene():
    for scene in scenes(300):
        texts = [o.text for o in scene.texts]
        assert len(texts) == len(set(texts))
        for o in scene.texts:
            assert o.size == "large" and o.shape in ("circle", "square") and o.text in TEXTS


@pytest.mark.parametrize("bad", [
    dict(min_objects=0), dict(min_objects=4, max_objects=3), dict(max_objects=10), dict(backdrops=("fog",)),
    dict(sizes=()), dict(min_texts=1, sizes=("small",)), dict(single_large=True, min_texts=2),
])
def test_impossible_scene_stats_are_refused(bad):
    with pytest.raises(ValueError):
        SceneStats(**bad)


def test_invalid_objects_and_scenes_are_refused():
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        SceneObject("hexagon", "red", "small", 0.5, 0.5)
    with pytest.raises(ValueError, match="outside the image"):
        SceneObject("circle", "red", "small", 1.5, 0.5)
    with pytest.raises(ValueError, match="unknown text"):
        SceneObject("circle", "red", "large", 0.5, 0.5, text="ZZ")
    with pytest.raises(ValueError, match="unknown background"):
        Scene("pink", "plain", ())
    with pytest.raises(ValueError, match="unknown clip event"):
        make_clip(1, event="explode")


# ----------------------------------------------------------------------------- what the pixels show


@pytest.mark.parametrize("size", [64, 96])
def test_each_object_shows_its_colour_where_it_is(size):
    for scene in scenes(120, prefix=f"colour{size}"):
        pixels = np.asarray(render_scene(scene, size), dtype=np.float32)  # (H, W, 3)
        for o in scene.objects:
            region = solid_region(o, size)
            assert region.sum() >= 6, (o, "too few solid pixels to see the object")
            mean = pixels[region].mean(axis=0)
            assert np.abs(mean - COLOURS[o.colour]).max() < 12, (scene, o, mean)
            nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - mean).sum())
            assert nearest == o.colour


def test_background_shows_where_no_object_is():
    for scene in scenes(60, SceneStats(backdrops=("plain",)), "background"):
        pixels = np.asarray(render_scene(scene, 64), dtype=np.float32)
        covered = sum(object_mask(o, 64) for o in scene.objects) if scene.objects else 0
        free = np.asarray(covered == 0)
        assert np.abs(pixels[free] - BACKGROUNDS[scene.background]).max() == 0


def test_text_ink_is_present_on_its_object(size=64):
    found = 0
    for scene in scenes(300, prefix="ink"):
        pixels = np.asarray(render_scene(scene, size), dtype=np.float32)
        for o in scene.texts:
            found += 1
            ink = np.array(text_colour(o.colour), dtype=np.float32)
            inked = 0
            for x0, y0, x1, y1 in text_cells(o, size):
                cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
                inked += np.abs(pixels[cy, cx] - ink).max() < 110  # the glyph cell's centre is mostly ink
            assert inked >= 0.8 * len(text_cells(o, size)), (o, inked)
    assert found > 50


def test_every_text_looks_different_from_every_other_at_64px():
    """Render each text on the same large square; any two must differ clearly in their pixels."""
    base = make_scene("glyphs", SceneStats(min_objects=1, max_objects=1))
    def look(text):
        obj = SceneObject("square", "blue", "large", 0.5, 0.5, text)
        return np.asarray(render_scene(dataclasses.replace(base, objects=(obj,), backdrop="plain"), 64), np.float32)
    images = {t: look(t) for t in TEXTS}
    for i, a in enumerate(TEXTS):
        for b in TEXTS[i + 1:]:
            strongly_different = (np.abs(images[a] - images[b]).max(axis=2) > 100).sum()
            assert strongly_different >= 3, (a, b, strongly_different)
    assert set("".join(TEXTS)) <= set(GLYPHS)


def luma(rgb):
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def test_text_contrasts_with_every_object_colour():
    for colour, rgb in COLOURS.items():
        assert abs(luma(text_colour(colour)) - luma(rgb)) >= 90, colour


def test_glyphs_are_all_distinct_patterns():
    patterns = list(GLYPHS.values())
    assert len(set(patterns)) == len(patterns)
    assert all(len(p) == 5 and all(len(row) == 3 for row in p) for p in patterns)


def test_render_refuses_tiny_images():
    with pytest.raises(ValueError, match="too small"):
        render_scene(make_scene(1), 8)


# ----------------------------------------------------------------------------- clips


def positions(clip: Clip, ident: int):
    return [(o.x, o.y) for f in clip.frames for o in f.objects if o.ident == ident]


def test_clip_ground_truth_matches_its_frames():
    events = set()
    for i in range(200):
        clip = make_clip(f"clip/{i}")
        events.add(clip.event)
        assert len(clip.frames) == 8
        shapes = [o.shape for o in clip.objects()]
        assert len(shapes) == len(set(shapes)), "a clip's objects have different shapes"
        visible = [any(o.ident == clip.subject for o in f.objects) for f in clip.frames]
        colours = [o.colour for f in clip.frames for o in f.objects if o.ident == clip.subject]
        track = positions(clip, clip.subject)
        if clip.event == "move":
            (x0, y0), (x1, y1) = track[0], track[-1]
            derived = ("right" if x1 > x0 else "left") if abs(x1 - x0) > abs(y1 - y0) else ("down" if y1 > y0 else "up")
            assert derived == clip.direction and max(abs(x1 - x0), abs(y1 - y0)) > 0.5
            steps = [b[0] - a[0] + b[1] - a[1] for a, b in zip(track, track[1:])]
            assert all(s > 0 for s in steps) or all(s < 0 for s in steps), "moves the same way every frame"
            for other in clip.objects():
                if other.ident != clip.subject:
                    assert len(set(positions(clip, other.ident))) == 1, "only the subject moves"
        else:
            assert len(set(track)) == 1
        if clip.event == "colour":
            assert colours[0] == clip.before != clip.after == colours[-1]
            assert len([k for k in range(1, len(colours)) if colours[k] != colours[k - 1]]) == 1
        else:
            assert len(set(colours)) == 1
        if clip.event == "appear":
            assert not visible[0] and visible[-1] and visible == sorted(visible)
        elif clip.event == "disappear":
            assert visible[0] and not visible[-1] and visible == sorted(visible, reverse=True)
        else:
            assert all(visible)
        for frame in clip.frames:
            masks = [object_mask(o, 64) for o in frame.objects]
            if len(masks) == 2:
                assert np.minimum(*masks).sum() == 0, "a mover never meets the other object"
    assert events == {"move", "colour", "appear", "disappear"}


def test_clip_frames_render_at_the_subjects_position():
    clip = make_clip("clip-pixels", event="move")
    subject = clip.subject_object()
    for frame, image in zip(clip.frames, render_clip(clip, 64)):
        o = next(o for o in frame.objects if o.ident == clip.subject)
        pixels = np.asarray(image, dtype=np.float32)
        assert np.abs(pixels[solid_region(o, 64)].mean(axis=0) - COLOURS[subject.colour]).max() < 12


def test_vision_pretraining_reports_accuracy_on_object_patches_apart_from_background():
    """A ViT that calls every patch background scores high overall (most patches are empty) and
    0 on the patches that show an object: the report must say so, not hide it in the mean."""
    import torch

    from finetune.nano.pretrain_vision import GLOBAL_HEADS, HEADS, PretrainHeads

    heads = PretrainHeads(width=4)
    with torch.no_grad():
        for head in heads.patch.values():
            head.weight.zero_()
            head.bias.zero_()
            head.bias[0] = 1.0  # always "nothing here"
    targets = {name: torch.zeros(2, 64, dtype=torch.long) for name in HEADS}
    targets["shape"][:, :8] = 3  # 8 of 64 patches show a shape
    targets.update({name: torch.zeros(2, dtype=torch.long) for name in GLOBAL_HEADS})
    _, accuracy = heads(torch.randn(2, 65, 4), targets)
    assert accuracy["shape"] == 56 / 64 and accuracy["shape_on_objects"] == 0.0
    assert accuracy["colour"] == 1.0 and "colour_on_objects" not in accuracy  # no coloured patch in these targets


def test_vision_pretraining_object_targets_average_each_objects_own_patches():
    """The per-object target reads the mean of exactly the patches the patch targets give that
    object, and names that object's shape, colour, size and place; a batch keeps only its own objects."""
    import torch
    import torch.nn.functional as F

    from finetune.nano.pretrain_vision import (
        OBJECT_CLASSES, OBJECT_HEADS, PretrainHeads, object_targets, objects_in, patch_targets,
    )

    PLACE_NAMES = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
    from finetune.nano.splits import scene_facts

    facts = [scene_facts(s) for s in scenes(12, CLUTTERED, "objtarget")]
    rows = object_targets(facts, 64, 8)
    assert rows["weights"].shape == (len(rows["image"]), 64)
    assert torch.allclose(rows["weights"].sum(1), torch.ones(len(rows["image"])))
    counted = 0
    for i, scene in enumerate(facts):
        mine = (rows["image"] == i).nonzero().flatten().tolist()
        # an object too small to cover a quarter of any 8x8 patch has no token about it
        seen = [o for k, o in enumerate(scene["objects"]) if (object_mask(
            SceneObject(o["shape"], o["colour"], o["size"], o["x"], o["y"], o["text"], k), 64
        ).reshape(8, 8, 8, 8).mean(axis=(1, 3)) >= 0.25).any()]
        assert len(mine) == len(seen) >= len(scene["objects"]) - 1
        shapes = patch_targets(scene, 64, 8)["shape"].reshape(-1)
        for k, o in zip(mine, seen):
            assert SHAPES[rows["shape"][k]] == o["shape"] and list(COLOURS)[rows["colour"][k]] == o["colour"]
            # the place: the 3 x 3 cell of the object's centre, read in rows from the top left
            row, col = min(int(o["y"] * 3), 2), min(int(o["x"] * 3), 2)
            assert OBJECT_CLASSES["place"][rows["place"][k]] == PLACE_NAMES[3 * row + col]
            on = rows["weights"][k] > 0
            # patch targets paint objects in order, so a later object may own a shared patch
            assert (shapes[on.numpy()] > 0).all()
        counted += len(mine)
    assert counted == len(rows["image"])

    batch = [7, 2]
    picked = objects_in(rows, batch)
    assert sorted(picked["image"].unique().tolist()) == [0, 1]
    assert len(picked["image"]) == int((rows["image"] == 7).sum() + (rows["image"] == 2).sum())
    assert torch.equal(picked["shape"][picked["image"] == 0], rows["shape"][rows["image"] == 7])

    heads = PretrainHeads(width=5)
    tokens = torch.randn(2, 65, 5)
    empty = {name: torch.zeros(2, 64, dtype=torch.long) for name in heads.patch} | {
        name: torch.zeros(2, dtype=torch.long) for name in heads.cls}
    without, _ = heads(tokens, empty)
    with_objects, accuracy = heads(tokens, empty, picked)
    expected = 0.0
    for name in OBJECT_HEADS:
        means = torch.stack([tokens[j, 1:][picked["weights"][k] > 0].mean(0) for k, j in enumerate(picked["image"].tolist())])
        expected = expected + F.cross_entropy(heads.object[name](means), picked[name])
        assert 0.0 <= accuracy[f"object_{name}"] <= 1.0
    assert torch.allclose(with_objects - without, expected, atol=1e-5)
