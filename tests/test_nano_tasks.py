"""Nano datasets: every answer re-derived from the scene, unique referents, balance, splits, files.

The answers are checked by an independent reading of the questions: `Reader` parses each
question with its own grammar and computes the answer from the Scene's objects, without
the generators' code.
"""

import collections
import json
import random
import re
from pathlib import Path

import pytest

from finetune.nano.splits import (
    DATASETS, DEFAULT_SIZES, HELD_IN, HELD_OUT, QUICK_SIZES, build_dataset, build_splits, load_manifest,
    resolve_sizes, scene_key, text_corpus,
)
from finetune.nano.tasks import (
    attribute_qa, box, caption_record, compositional_anchor, compositional_qa, counting_qa, dialogue_turns, main_object, multiple_choice_qa,
    ocr_by_place_qa, ocr_qa, qa_record, spatial_qa, video_qa, yes_no_qa,
)
from finetune.nano.evaluate import answer_sources, one_object_turns
from finetune.nano.phrases import caption, counted_caption, refer
from finetune.nano.world import COLOURS, DIGITS, SHAPES, SceneStats, make_clip, make_scene
from instructblip_core.augment import EvalTransform
from instructblip_core.data import InstructionDataset, load_records
from instructblip_core.images import ImageProcessor
from instructblip_core.templates import TASK_TYPES

N = 300
CLUTTERED = SceneStats(min_objects=3)
TEXTED = SceneStats(min_objects=2, text_probability=0.5, min_texts=1)

# ----------------------------------------------------------------------------- an independent reader of questions

PLACE_OF_PHRASE = {
    "at the top left": (0, 0), "at the top right": (0, 2), "at the top": (0, 1),
    "on the left": (1, 0), "in the centre": (1, 1), "on the right": (1, 2),
    "at the bottom left": (2, 0), "at the bottom right": (2, 2), "at the bottom": (2, 1),
}
PLACE_NAMES = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "centre",
               (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}
PLURAL = {s + ("es" if s.endswith("s") else "s"): s for s in SHAPES}
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_C, _S = "|".join(COLOURS), "|".join(SHAPES)
_PLACE = "|".join(re.escape(p) for p in PLACE_OF_PHRASE)
REF = rf"the (?:(?:small|large) )?(?:(?:{_C}) )?(?:{_S}|object)(?: (?:{_PLACE}))?"
_REF_PARTS = re.compile(
    rf"the (?:(?P<size>small|large) )?(?:(?P<colour>{_C}) )?(?P<shape>{_S}|object)(?: (?P<place>{_PLACE}))?"
)
REL = r"to the left of|to the right of|above|below"


def resolve(scene, ref):
    """The one object a referring expression names; fails the test if it names none or several."""
    m = _REF_PARTS.fullmatch(ref)
    assert m, f"not a referring expression: {ref!r}"
    found = [
        o for o in scene.objects
        if (m["size"] is None or o.size == m["size"]) and (m["colour"] is None or o.colour == m["colour"])
        and (m["shape"] == "object" or o.shape == m["shape"])
        and (m["place"] is None or (o.row, o.col) == PLACE_OF_PHRASE[m["place"]])
    ]
    assert len(found) == 1, f"{ref!r} names {len(found)} objects in {scene}"
    return found[0]


def holds(a, relation, b):
    return {"to the left of": a.col < b.col, "to the right of": a.col > b.col,
            "above": a.row < b.row, "below": a.row > b.row}[relation]


def name(o):
    return f"{o.colour} {o.shape}"


def count(scene, what):
    words = what.split()
    keep = lambda o: all(  # noqa: E731
        w == "objects" or o.colour == w or o.size == w or PLURAL.get(w) == o.shape for w in words
    )
    return sum(keep(o) for o in scene.objects)


def read(scene, question):
    """The answer to `question` about `scene`, worked out from the objects alone."""
    patterns = [
        (rf"What (colour|shape|size) is the object ({REL}) ({REF})\?", lambda a, r, ref: getattr(
            _only([o for o in scene.objects if holds(o, r, resolve(scene, ref))]), a)),
        (rf"What (colour|shape|size) is ({REF})\?", lambda a, ref: getattr(resolve(scene, ref), a)),
        (r"How many (.+) are there\?", lambda what: str(count(scene, what))),
        (rf"Where is ({REF})\?", lambda ref: PLACE_NAMES[resolve(scene, ref).cell]),
        (rf"What is ({REL}) ({REF})\?", lambda r, ref: name(
            _only([o for o in scene.objects if holds(o, r, resolve(scene, ref))]))),
        (rf"Is ({REF}) to the left or to the right of ({REF})\?", lambda a, b: (
            "left" if resolve(scene, a).col < resolve(scene, b).col else "right")),
        (rf"Is ({REF}) above or below ({REF})\?", lambda a, b: (
            "above" if resolve(scene, a).row < resolve(scene, b).row else "below")),
        (rf"What is written on the object ({_PLACE})\?", lambda p: scene.at(PLACE_OF_PHRASE[p]).text),
        (rf"What does the text ({_PLACE}) say\?", lambda p: scene.at(PLACE_OF_PHRASE[p]).text),
        (rf"What is written on ({REF})\?", lambda ref: _text(resolve(scene, ref))),
        (rf"What (number|word) is on ({REF})\?", lambda kind, ref: _typed_text(resolve(scene, ref), kind)),
        (r"Which object has the (number|word) (\w+) on it\?", lambda kind, t: name(
            _only([o for o in scene.objects if o.text == t and (t in DIGITS) == (kind == "number")]))),
        (rf"Is there an? ({_C}) ({_S})\?", lambda c, s: _yes(any(o.colour == c and o.shape == s for o in scene.objects))),
        (rf"Is there an? ({_S})\?", lambda s: _yes(any(o.shape == s for o in scene.objects))),
        (rf"Is there exactly one ({_S})\?", lambda s: _yes(sum(o.shape == s for o in scene.objects) == 1)),
        (r"Are there exactly (\w+) (\w+)\?", lambda n, plural: _yes(
            sum(o.shape == PLURAL[plural] for o in scene.objects) == NUMBERS[n])),
        (rf"Is ({REF}) ({REL}) ({REF})\?", lambda a, r, b: _yes(holds(resolve(scene, a), r, resolve(scene, b)))),
        (rf"Is ({REF}) an? ({_S})\?", lambda ref, s: _yes(resolve(scene, ref).shape == s)),
        (rf"Is ({REF}) ({_C}|small|large)\?", lambda ref, v: _yes(v in (resolve(scene, ref).colour, resolve(scene, ref).size))),
    ]
    for pattern, answer in patterns:
        m = re.fullmatch(pattern, question)
        if m:
            return answer(*m.groups())
    raise AssertionError(f"the reader does not understand {question!r}")


def _only(objects):
    assert len(objects) == 1, f"the question's relation picks {len(objects)} objects"
    return objects[0]


def _text(o):
    assert o.text is not None, f"{o} has no text"
    return o.text


def _typed_text(o, kind):
    assert (_text(o) in DIGITS) == (kind == "number"), f"asked for a {kind}, the object shows {o.text}"
    return o.text


def _yes(truth):
    return "yes" if truth else "no"


def scenes(stats=SceneStats(), n=N, prefix="tasks"):
    return [(make_scene(f"{prefix}/{i}", stats), random.Random(f"{prefix}/{i}/q")) for i in range(n)]


# ----------------------------------------------------------------------------- answers re-derived


@pytest.mark.parametrize("generator, stats", [
    (attribute_qa, CLUTTERED), (attribute_qa, SceneStats()), (counting_qa, SceneStats()), (spatial_qa, CLUTTERED),
    (spatial_qa, SceneStats()), (ocr_qa, TEXTED), (ocr_by_place_qa, TEXTED), (compositional_qa, CLUTTERED),
    (multiple_choice_qa, SceneStats()),
], ids=lambda v: getattr(v, "__name__", ""))
def test_every_answer_follows_from_the_scene(generator, stats):
    made, kinds = 0, collections.Counter()
    for scene, rng in scenes(stats, prefix=generator.__name__):
        qa = generator(scene, rng)
        if qa is None:
            continue
        made += 1
        kinds[qa.kind] += 1
        assert read(scene, qa.question) == qa.answer, (scene, qa)
        if qa.options is not None:
            assert qa.answer in qa.options and len(set(qa.options)) == len(qa.options) >= 2
    assert made >= 0.8 * N, f"{generator.__name__} fits too few scenes: {made}/{N}"
    assert len(kinds) >= 2, kinds


def test_yes_no_answers_follow_from_the_scene_and_are_balanced_per_kind():
    by_kind = collections.defaultdict(collections.Counter)
    for k, (scene, rng) in enumerate(scenes(n=600, prefix="yes_no")):
        qa = yes_no_qa(scene, rng, answer=k % 2 == 0)
        if qa is None:
            continue
        assert qa.answer == ("yes" if k % 2 == 0 else "no")
        assert read(scene, qa.question) == qa.answer, (scene, qa)
        by_kind[qa.kind][qa.answer] += 1
    assert set(by_kind) == {"exists", "has_attribute", "relation", "exact_count"}
    for kind, answers in by_kind.items():
        share = answers["yes"] / sum(answers.values())
        assert 0.35 <= share <= 0.65, f"{kind}: the kind of question alone would give the answer away ({answers})"


def test_multiple_choice_distractors_are_wrong_answers_of_the_same_kind():
    for scene, rng in scenes(prefix="mc"):
        qa = multiple_choice_qa(scene, rng)
        assert len(qa.options) == 4 and qa.options.count(qa.answer) == 1
        if qa.kind == "mc_colour":
            assert set(qa.options) <= set(COLOURS)
        if qa.kind.startswith("mc_count"):
            assert all(o.isdigit() for o in qa.options)


def test_counting_answers_are_not_dominated_by_one_count():
    answers = collections.Counter(counting_qa(s, r).answer for s, r in scenes(n=600, prefix="count"))
    assert set(answers) >= {"0", "1", "2", "3", "4"}
    assert max(answers.values()) < 0.4 * sum(answers.values()), answers


def test_classification_label_is_the_one_large_object():
    for scene, _ in scenes(SceneStats(min_objects=2, max_objects=4, single_large=True), prefix="cls"):
        assert main_object(scene) == next(o.shape for o in scene.objects if o.size == "large")
    with pytest.raises(ValueError, match="exactly one large object"):
        main_object(make_scene("two-large", SceneStats(min_objects=5, sizes=("large",))))


def test_dialogue_answers_follow_from_the_scene_and_earlier_turns():
    patterns = collections.Counter()
    for scene, rng in scenes(SceneStats(min_objects=2), prefix="dialogue"):
        turns = dialogue_turns(scene, rng)
        assert turns and 2 <= len(turns) <= 3
        it = None  # what "it" / "them" / "the ... one" refer to, from earlier turns
        for question, answer in turns:
            if question == "What colour is it?":
                assert answer == it.colour
            elif question == "Where is it?":
                assert answer == PLACE_NAMES[it.cell]
            elif m := re.fullmatch(r"How many of them are (\w+)\?", question):
                assert answer == str(sum(o.colour == m[1] for o in scene.objects))
            elif m := re.fullmatch(r"What shape is the (\w+) one\?", question):
                assert answer == _only([o for o in scene.objects if o.colour == m[1]]).shape
            elif m := re.fullmatch(rf"And ({REF})\?", question):
                assert answer == resolve(scene, m[1]).colour
            else:
                assert read(scene, question) == answer
                if m := re.fullmatch(rf"Is there an? ({_S})\?", question):
                    if answer == "yes":
                        it = _only([o for o in scene.objects if o.shape == m[1]])
            patterns[question.split()[0]] += 1
    assert set(patterns) >= {"Is", "How", "What", "And"}


def test_video_answers_follow_from_the_frames():
    kinds = collections.Counter()
    for i in range(N):
        clip = make_clip(f"vqa/{i}")
        qa = video_qa(clip, random.Random(i))
        kinds[qa.kind] += 1
        first, last = clip.frames[0].objects, clip.frames[-1].objects
        if m := re.fullmatch(rf"Which way does the ({_S}) move\?", qa.question):
            (a,) = [o for o in first if o.shape == m[1]]
            (b,) = [o for o in last if o.shape == m[1]]
            dx, dy = b.x - a.x, b.y - a.y
            assert qa.answer == (("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up"))
        elif qa.question in ("Which object moves?", "What colour is the moving object?"):
            (mover,) = [b for a in first for b in last if a.ident == b.ident and (a.x, a.y) != (b.x, b.y)]
            assert qa.answer == (name(mover) if "Which" in qa.question else mover.colour)
        elif m := re.fullmatch(rf"What colour does the ({_S}) turn\?", qa.question):
            assert qa.answer == next(o.colour for o in last if o.shape == m[1]) != next(o.colour for o in first if o.shape == m[1])
        elif m := re.fullmatch(rf"What colour is the ({_S}) at the start\?", qa.question):
            assert qa.answer == next(o.colour for o in first if o.shape == m[1])
        elif m := re.fullmatch(r"(?:Which object|What shape) (appears|disappears)\?", qa.question):
            before, after = (first, last) if m[1] == "appears" else (last, first)
            (new,) = [o for o in after if o.ident not in {b.ident for b in before}]
            assert qa.answer == (name(new) if qa.question.startswith("Which") else new.shape)
        else:
            raise AssertionError(f"unexpected video question {qa.question!r}")
    assert len(kinds) >= 8, kinds


def test_captions_name_every_object_its_place_and_the_background():
    for scene, _ in scenes(SceneStats(text_probability=0.5), n=100, prefix="cap"):
        text, counted = caption(scene), counted_caption(scene)
        assert text.endswith(f"on a {scene.background} background")
        for o in scene.objects:
            phrase = f"{o.size} {o.colour} {o.shape}"
            assert phrase in text and phrase in counted
            assert o.text is None or o.text in text
        place_words = re.findall(rf"({_PLACE})", text)
        assert sorted(PLACE_OF_PHRASE[p] for p in place_words) == sorted(o.cell for o in scene.objects)
        n = len(scene.objects)
        assert counted.startswith(("", "one", "two", "three", "four", "five")[n] + " object")


# ----------------------------------------------------------------------------- splits and files


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("nano")
    return build_splits(root, seed=3, sizes=QUICK_SIZES)


def every_file(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(built, tmp_path):
    again = build_splits(tmp_path / "again", seed=3, sizes=QUICK_SIZES, workers=2)
    assert every_file(built.root) == every_file(again.root)
    other = build_splits(tmp_path / "other", seed=4, sizes=QUICK_SIZES)
    a, b = every_file(built.root), every_file(other.root)
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a if k.endswith(".png")) > 0.9 * sum(k.endswith(".png") for k in a)


def test_every_part_loads_with_the_trainers_loader(built):
    transform = EvalTransform(ImageProcessor(size=(64, 64)))
    for entry in built.entries:
        assert entry.task in TASK_TYPES
        result = load_records(built.root / entry.path, entry.task, verify_images=True)
        assert not result.skipped
        lines = (built.root / entry.path).read_text().splitlines()
        assert len(lines) == entry.count
        if entry.task == "dialogue":
            assert len(result.records) == sum(len(json.loads(l)["conversations"]) // 2 for l in lines)
        elif entry.task != "caption" or entry.part == "train":
            assert len(result.records) == entry.count
        dataset = InstructionDataset(result.records, name=entry.name, task=entry.task, image_transform=transform)
        item = dataset[len(dataset) - 1]
        assert item["prompt"] and item["answer"]
        frames = 8 if entry.name == "video_qa" else None
        assert tuple(item["pixel_values"].shape) == ((frames, 3, 64, 64) if frames else (3, 64, 64))


def test_written_records_carry_answers_that_follow_from_their_scenes(built):
    for entry in built.entries:
        if entry.task not in ("short_vqa", "counting", "spatial", "ocr", "yes_no", "multiple_choice"):
            continue
        stats = next(p.stats for p in DATASETS if p.name == entry.name)
        for line in (built.root / entry.path).read_text().splitlines():
            record = json.loads(line)
            scene = make_scene(record["seed"], stats)
            assert read(scene, record["question"]) == record["answer"]
            assert record["n_objects"] == len(scene.objects)


def test_compositional_anchor_is_the_object_the_question_names():
    found = 0
    for scene, rng in scenes(CLUTTERED, prefix="anchor"):
        qa = compositional_qa(scene, rng)
        if qa is None:
            continue
        anchor = compositional_anchor(scene, qa.question)
        assert anchor is not None, qa.question
        assert qa.question.lower().endswith(refer(scene, anchor, avoid={"place"}).lower() + "?")
        found += 1
        # The same scene asked about something else names no neighbour relation.
        assert compositional_anchor(scene, "What colour is the object?") is None
    assert found >= 0.8 * N


def test_compositional_answers_are_sorted_into_right_named_object_and_other(built):
    entry = next(e for e in built.entries if e.name == "vqa_compositional" and e.part == "test")
    lines = [json.loads(line) for line in (built.root / entry.path).read_text().splitlines()]
    stats = next(p.stats for p in DATASETS if p.name == entry.name)
    expected = collections.Counter()
    rows = []
    for k, line in enumerate(lines):
        scene = make_scene(line["seed"], stats)
        named = getattr(compositional_anchor(scene, line["question"]), line["kind"].removeprefix("relational_"))
        if k % 3 == 0:
            rows.append({"prediction": line["answer"].capitalize() + "."})  # case and full stop do not matter
            expected["right"] += 1
        elif k % 3 == 1 and named != line["answer"]:
            rows.append({"prediction": named})
            expected["named_object"] += 1
        else:
            rows.append({"prediction": "banana"})
            expected["other"] += 1
    assert expected["named_object"] >= 1
    assert answer_sources(rows, lines) == {"right": expected["right"], "named_object": expected["named_object"],
                                           "other": expected["other"]}


def test_dialogue_turns_about_one_object_are_scored_by_scene_size(built):
    entry = next(e for e in built.entries if e.name == "dialogue" and e.part == "test")
    lines = [json.loads(line) for line in (built.root / entry.path).read_text().splitlines()]
    turns = [(c["value"], line["n_objects"]) for line in lines for c in line["conversations"] if c["from"] == "gpt"]
    rows = [{"answer": answer, "prediction": answer if k % 2 == 0 else "banana"} for k, (answer, _) in enumerate(turns)]
    one_object = set(COLOURS) | set(SHAPES) | {"small", "large"}  # one object's colour, shape or size
    expected = {"1-2 objects": [], "3-5 objects": []}
    for k, (answer, n) in enumerate(turns):
        if answer in one_object:
            expected["1-2 objects" if n <= 2 else "3-5 objects"].append(float(k % 2 == 0))
    scored = one_object_turns(rows, lines)
    assert sum(len(v) for v in expected.values()) >= 1
    for group, values in expected.items():
        assert scored[group]["n"] == len(values)
        assert scored[group]["value"] == pytest.approx(sum(values) / len(values) if values else 0.0)
    # A capped evaluation (the recipe's --quick) scores its first turns only.
    first = one_object_turns(rows[:3], lines)
    assert sum(group["n"] for group in first.values()) == sum(answer in one_object for answer, _ in turns[:3])
    with pytest.raises(ValueError, match="dialogue turns"):
        one_object_turns(rows + rows[:1], lines)


def test_held_in_and_held_out_like_the_paper(built):
    held_out = {e.name for e in built.entries if e.split == HELD_OUT}
    held_in = {e.name for e in built.entries if e.split == HELD_IN}
    assert not held_out & held_in
    assert {"video_qa", "classification", "dialogue"} <= held_out
    training_tasks = {e.task for e in built.training()}
    assert not training_tasks & {"video_qa", "classification", "dialogue"}, "whole categories held out"
    assert len(training_tasks) >= 7
    same_category = {e.name for e in built.evaluation(HELD_OUT) if e.task in training_tasks}
    assert len(same_category) >= 2, "held-out datasets of held-in categories (other style / statistics)"
    assert all(e.part == "test" for e in built.entries if e.split == HELD_OUT)
    assert {e.name for e in built.evaluation(HELD_IN)} == {e.name for e in built.training()}
    with pytest.raises(ValueError, match="held out"):
        build_dataset(built.root, "video_qa", seed=3, part="train", count=2)


def test_training_and_evaluation_seeds_never_meet(built, tmp_path):
    def seeds(entries):
        out = set()
        for e in entries:
            out |= {json.loads(l)["seed"] for l in (built.root / e.path).read_text().splitlines()}
        return out

    train = seeds([e for e in built.entries if e.part == "train"])
    evaluation = seeds(built.evaluation())
    assert train and evaluation and not train & evaluation
    assert all(s.startswith("nano/3/train/") for s in train)
    assert all(s.startswith("nano/3/test/") for s in evaluation)
    fresh = build_dataset(tmp_path, "vqa_attributes", seed=3, part="fresh", count=6)
    fresh_seeds = {json.loads(l)["seed"] for l in (tmp_path / fresh.path).read_text().splitlines()}
    assert not fresh_seeds & (train | evaluation)
    # Keys of different streams differ for every seed and index: the stream is a fixed path segment.
    assert scene_key(1, "train", "x", 12) != scene_key(1, "test", "x", 12) != scene_key(11, "train", "x", 2)


def test_pretraining_captions_cover_held_in_training_images_only(built):
    lines = (built.root / "pretrain_captions.jsonl").read_text().splitlines()
    records = [json.loads(l) for l in lines]
    train_images = set()
    for e in built.training():
        folder = Path(e.path).parent
        train_images |= {(folder / json.loads(l)["image"]).as_posix() for l in (built.root / e.path).read_text().splitlines()}
    assert {r["image"] for r in records} == train_images
    for r in records[:20]:
        scene = make_scene(r["seed"], next(p.stats for p in DATASETS if f"/{p.name}/" in r["seed"]))
        assert r["caption"] == caption(scene)
        assert [(o["shape"], o["colour"], o["size"], o["text"]) for o in r["scene"]["objects"]] == \
               [(o.shape, o.colour, o.size, o.text) for o in scene.objects]


def test_yes_no_dataset_is_exactly_balanced(built, tmp_path):
    entry = build_dataset(tmp_path, "yes_no", seed=5, part="train", count=101)
    answers = collections.Counter(json.loads(l)["answer"] for l in (tmp_path / entry.path).read_text().splitlines())
    assert abs(answers["yes"] - answers["no"]) <= 1


def test_several_questions_on_one_image_differ(tmp_path):
    entry = build_dataset(tmp_path, "vqa_attributes", seed=0, part="train", count=60)
    by_image = collections.defaultdict(list)
    for line in (tmp_path / entry.path).read_text().splitlines():
        record = json.loads(line)
        by_image[record["image"]].append(record["question"])
    assert entry.images == 30 and all(len(q) == 2 for q in by_image.values())
    assert sum(len(set(q)) == 2 for q in by_image.values()) >= 28


def test_manifest_round_trips_and_lists_every_part(built):
    loaded = load_manifest(built.root)
    assert loaded.entries == built.entries and loaded.seed == 3 and loaded.image_size == 64
    keys = {e.key for e in loaded.entries}
    assert keys >= {k for k, v in QUICK_SIZES.items() if k != "corpus" and v}
    assert loaded.entry("video_qa/test").images == 8 * loaded.entry("video_qa/test").count
    with pytest.raises(KeyError, match="no dataset part"):
        loaded.entry("video_qa/train")


def test_a_used_folder_is_refused_or_cleanly_replaced(tmp_path):
    small = {key: 0 for key in QUICK_SIZES} | {"counting/train": 4, "counting/test": 2, "corpus": 5}
    build_splits(tmp_path / "a", seed=0, sizes=QUICK_SIZES)
    with pytest.raises(FileExistsError, match="not empty"):
        build_splits(tmp_path / "a", seed=0, sizes=small)
    manifest = build_splits(tmp_path / "a", seed=0, sizes=small, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["corpus.txt", "counting", "manifest.json", "pretrain_captions.jsonl"]
    assert sorted(p.name for p in (tmp_path / "a" / "counting" / "images").iterdir()) == \
        ["test_000000.png", "test_000001.png", "train_000000.png", "train_000001.png"]
    assert [e.key for e in manifest.entries] == ["counting/train", "counting/test", "pretrain_captions/train"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no manifest.json"):
        build_splits(tmp_path / "b", seed=0, sizes=small, overwrite=True)
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="unknown size key 'video_qa/train'"):
        resolve_sizes({"video_qa/train": 5})
    with pytest.raises(ValueError, match="non-negative"):
        resolve_sizes({"caption/train": -1})
    assert resolve_sizes({"caption/train": 0})["caption/train"] == 0
    assert resolve_sizes(None) == DEFAULT_SIZES


# ----------------------------------------------------------------------------- the text corpus


def test_text_corpus_is_deterministic_and_speaks_the_datasets_language(built):
    corpus = text_corpus(3, 3000)
    assert corpus == text_corpus(3, 3000) and corpus != text_corpus(4, 3000)
    assert (built.root / "corpus.txt").read_text().splitlines() == text_corpus(3, QUICK_SIZES["corpus"])
    vocabulary = {w for line in corpus for w in re.findall(r"\w+", line.lower())}
    missing = collections.Counter()
    for entry in built.entries:
        for line in (built.root / entry.path).read_text().splitlines():
            record = json.loads(line)
            texts = [record.get("question", ""), record.get("answer", "")] + list(record.get("options") or [])
            texts += [record["caption"]] if isinstance(record.get("caption"), str) else record.get("caption") or []
            texts += [m["value"].replace("<image>", "") for m in record.get("conversations", [])]
            missing.update(w for t in texts for w in re.findall(r"\w+", t.lower()) if w not in vocabulary)
    assert not missing, f"words of the datasets the language model never reads: {missing}"


def test_text_corpus_asks_some_questions_in_plain_text_as_well_as_in_instruction_templates():
    """The LLM must also have read a bare question followed by its answer: one that only ever saw
    a template's tail after a question writes that tail when asked a bare one (held-out dialogue)."""
    corpus = text_corpus(5, 3000)
    answer = r"(yes|no|\d+|" + "|".join([*SHAPES, *COLOURS]) + r")\b"
    questions = sum(line.count("?") for line in corpus)
    bare = sum(len(re.findall(r"\? " + answer, line)) for line in corpus)
    plain_format = sum(len(re.findall(r"Question: [^?]+\? Answer: " + answer, line)) for line in corpus)
    assert 0.1 < bare / questions < 0.35, (bare, questions)
    assert 0.1 < plain_format / questions < 0.35, (plain_format, questions)
    assert bare + plain_format < 0.5 * questions  # the held-in instruction templates are still the most common form


# ----------------------------------------------------------------------------- grounding regions


def test_regions_are_the_boxes_of_the_objects_the_answer_depends_on():
    """The grounding loss pulls the Q-Former's attention to these boxes, so they must be the right objects."""
    counted = whole = 0
    for scene, rng in scenes(CLUTTERED, prefix="regions"):
        for o in scene.objects:
            x0, y0, x1, y1 = box(o)
            assert 0 <= x0 < o.x < x1 <= 1 and 0 <= y0 < o.y < y1 <= 1
        assert caption_record(caption(scene), scene)["regions"] == [box(o) for o in scene.objects]
        qa = attribute_qa(scene, rng)
        if qa is not None:
            asked = re.fullmatch(rf"What (?:colour|shape|size) is ({REF})\?", qa.question).group(1)
            assert qa_record(qa, "short_vqa")["regions"] == [box(resolve(scene, asked))]
            assert "regions" not in qa_record(qa, "question_generation")  # its Q-Former reads the answer, not the question
        qa = counting_qa(scene, rng)
        regions = qa_record(qa, "counting").get("regions", [])
        boxes = [r for r in regions if r != "cls"]
        assert len(boxes) == int(qa.answer)  # the counted objects, none when there are none
        # "How many objects are there?" also reads the CLS token, which knows the number; no other question does.
        assert regions.count("cls") == (qa.kind == "count_all")
        counted += int(qa.answer) > 0
        whole += qa.kind == "count_all"
        qa = spatial_qa(scene, rng)
        if qa is not None and qa.kind in ("left_right", "above_below"):
            a, b = re.fullmatch(rf"Is ({REF}) (?:to the left or to the right of|above or below) ({REF})\?", qa.question).groups()
            assert qa_record(qa, "spatial")["regions"] == [box(resolve(scene, a)), box(resolve(scene, b))]
    assert counted > N / 2 and whole > 0
