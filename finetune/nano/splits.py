"""The nano world's datasets, split like the InstructBLIP paper: held-in for training, held-out for zero-shot.

InstructBLIP (Dai et al. 2023, section 2.1 and figure 2) trains on 13 held-in datasets and
evaluates zero-shot on held-out ones: whole held-out task categories (video QA, visual
reasoning, visual dialogue, image classification) and held-out datasets of held-in
categories with other question styles or image statistics (GQA, TextVQA, NoCaps, ...).
Here, in miniature:

  held-in  (train part + test part)  caption, vqa_attributes, counting, spatial, ocr, yes_no,
                                     multiple_choice, question_generation
  held-out (test part only)          classification, dialogue, video_qa   (whole categories)
                                     vqa_compositional (short VQA asked GQA-style, through a relation)
                                     ocr_by_place      (OCR asked TextVQA-style, by place)
                                     caption_novel     (captions of scenes on grainy backdrops,
                                                        a texture no training image has)

Seed scheme. Every scene (or clip) is drawn from a string key
    "nano/<seed>/<stream>/<dataset>/<index>"       (plus "/redraw<k>" when a scene had to be redrawn)
with stream "train" for everything a model is trained on (the held-in train parts, hence
the pretraining captions, which reuse those images), "test" for every evaluation part
(held-in test parts and all held-out datasets), "fresh" for samples made later (e.g. a test
of the shipped checkpoint), and "nano/<seed>/corpus/<index>" for the language model's text.
Keys of different streams never coincide, for any seed; a held-out dataset has no train
stream at all (asking for one is an error). `random.Random` hashes string keys with SHA-512,
so the scenes are the same on every machine and Python version. Each record carries its key
in "seed". (Very simple scenes, e.g. one object, can still come out identical from two keys:
the world is small. Cluttered scenes practically never repeat.)

Layout under root:
  manifest.json                    what was built (Manifest.save / load_manifest)
  corpus.txt                       text for the language model's pretraining, one sentence a line
  pretrain_captions.jsonl          a caption and the full scene for every held-in training image
                                   (Q-Former stages 1/2, image-encoder pretraining)
  <dataset>/<part>.jsonl           records (instructblip_core/data.py formats); part = train|test|fresh
  <dataset>/images/<part>_<i>.png  one image per scene; several records may share one
  video_qa/frames/<part>_<i>_<f>.png
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from instructblip_core import templates

from .phrases import capitalise, caption, clip_sentence, counted_caption, fact_sentence
from .tasks import (
    QA, first_possible, attribute_qa, caption_record, classification_record, compositional_qa, counting_qa,
    dialogue_record, dialogue_turns, multiple_choice_qa, ocr_by_place_qa, ocr_qa, qa_record, spatial_qa, video_qa,
    yes_no_qa,
)
from .world import HELD_IN_STATS, Clip, Scene, SceneStats, make_clip, make_scene
from .write import write_images, write_jsonl, write_text_lines

TRAIN, TEST, FRESH = "train", "test", "fresh"
STREAMS = (TRAIN, TEST, FRESH)
HELD_IN, HELD_OUT = "held_in", "held_out"
MAX_REDRAWS = 50  # scenes drawn before a dataset gives up on one index (normally 1-3 suffice)
DUPLICATE_RETRIES = 10  # tries for a question not yet asked about the same image

Maker = Callable[[Scene | Clip, random.Random, int, str], dict | None]


def scene_key(seed: int, stream: str, dataset: str, index: int) -> str:
    """The key a dataset's index-th scene is drawn from (module docstring: seed scheme)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; known: {', '.join(STREAMS)}")
    return f"nano/{seed}/{stream}/{dataset}/{index}"


def corpus_key(seed: int, index: int) -> str:
    return f"nano/{seed}/corpus/{index}"


# ----------------------------------------------------------------------------- what each dataset asks


def _asks(generator: Callable[[Scene, random.Random], QA | None], task: str) -> Maker:
    def make(scene: Scene, rng: random.Random, index: int, stream: str) -> dict | None:
        qa = generator(scene, rng)
        return qa_record(qa, task) if qa else None

    return make


def _captions(scene: Scene, rng: random.Random, index: int, stream: str) -> dict:
    # Training targets one canonical caption (learnable by a tiny model); evaluation scores
    # against two references, as CIDEr is meant to be used.
    return caption_record(caption(scene) if stream == TRAIN else [caption(scene), counted_caption(scene)], scene)


def _yes_no(scene: Scene, rng: random.Random, index: int, stream: str) -> dict | None:
    qa = yes_no_qa(scene, rng, answer=index % 2 == 0)  # alternating: exactly balanced, and per image
    return qa_record(qa, "yes_no") if qa else None


def _question_generation(scene: Scene, rng: random.Random, index: int, stream: str) -> dict | None:
    """A VQA pair; the trainer turns it around (instruction: the answer, target: the question)."""
    qa = first_possible(rng, {
        "attribute": lambda: attribute_qa(scene, rng),
        "count": lambda: counting_qa(scene, rng),
        "spatial": lambda: spatial_qa(scene, rng),
    })
    return qa_record(qa, "question_generation") if qa else None


def _classification(scene: Scene, rng: random.Random, index: int, stream: str) -> dict:
    return classification_record(scene)


def _dialogue(scene: Scene, rng: random.Random, index: int, stream: str) -> dict | None:
    turns = dialogue_turns(scene, rng)
    return dialogue_record(turns) if turns else None


def _video(clip: Clip, rng: random.Random, index: int, stream: str) -> dict:
    return qa_record(video_qa(clip, rng), "video_qa")


@dataclass(frozen=True)
class DatasetPlan:
    name: str
    task: str  # the trainer's task type (instructblip_core.templates.TASK_TYPES)
    split: str  # HELD_IN or HELD_OUT
    mirrors: str  # the paper's dataset(s) it stands for
    make: Maker = field(repr=False)
    stats: SceneStats | None = HELD_IN_STATS  # None: made of clips
    per_image: int = 1  # records per image in the train part (test parts: one, for independent samples)


CLUTTERED = SceneStats(min_objects=3)
WITH_TEXT = SceneStats(min_objects=2, text_probability=0.5, min_texts=1)

DATASETS: tuple[DatasetPlan, ...] = (
    DatasetPlan("caption", "caption", HELD_IN, "COCO Caption", _captions),
    DatasetPlan("vqa_attributes", "short_vqa", HELD_IN, "VQAv2", _asks(attribute_qa, "short_vqa"), per_image=2),
    DatasetPlan("counting", "counting", HELD_IN, "VQAv2 counting questions", _asks(counting_qa, "counting"), per_image=2),
    DatasetPlan("spatial", "spatial", HELD_IN, "Visual Genome QA (where/relations)", _asks(spatial_qa, "spatial"), per_image=2),
    DatasetPlan("ocr", "ocr", HELD_IN, "OCR-VQA", _asks(ocr_qa, "ocr"), WITH_TEXT, per_image=2),
    DatasetPlan("yes_no", "yes_no", HELD_IN, "VQAv2 yes/no questions", _yes_no, per_image=2),
    DatasetPlan("multiple_choice", "multiple_choice", HELD_IN, "A-OKVQA multiple choice",
                _asks(multiple_choice_qa, "multiple_choice"), per_image=2),
    DatasetPlan("question_generation", "question_generation", HELD_IN, "question generation from VQAv2/OKVQA",
                _question_generation),
    DatasetPlan("classification", "classification", HELD_OUT, "image classification (HatefulMemes' category)",
                _classification, SceneStats(min_objects=2, max_objects=4, single_large=True)),
    DatasetPlan("dialogue", "dialogue", HELD_OUT, "Visual Dialog", _dialogue, SceneStats(min_objects=2)),
    DatasetPlan("video_qa", "video_qa", HELD_OUT, "MSVD-QA / MSRVTT-QA", _video, None),
    DatasetPlan("vqa_compositional", "short_vqa", HELD_OUT, "GQA", _asks(compositional_qa, "short_vqa"), CLUTTERED),
    DatasetPlan("ocr_by_place", "ocr", HELD_OUT, "TextVQA", _asks(ocr_by_place_qa, "ocr"), WITH_TEXT),
    DatasetPlan("caption_novel", "caption", HELD_OUT, "NoCaps / Flickr30K", _captions,
                SceneStats(min_objects=3, backdrops=("noise",))),
)
PLANS: dict[str, DatasetPlan] = {plan.name: plan for plan in DATASETS}

# Records per part ("<dataset>/<part>"), and corpus lines. Held-in train parts come to
# ~22k records on ~13.5k images (several questions share an image, as in VQAv2).
DEFAULT_SIZES: dict[str, int] = {
    "caption/train": 3000, "vqa_attributes/train": 4000, "counting/train": 3000, "spatial/train": 3000,
    "ocr/train": 2400, "yes_no/train": 3000, "multiple_choice/train": 2400, "question_generation/train": 1600,
    **{f"{plan.name}/test": 300 for plan in DATASETS if plan.split == HELD_IN},
    "classification/test": 400, "dialogue/test": 300, "video_qa/test": 400,
    "vqa_compositional/test": 400, "ocr_by_place/test": 400, "caption_novel/test": 300,
    "corpus": 30000,
}
# Every part, a few records each: the recipe's --quick mode and tests.
QUICK_SIZES: dict[str, int] = {key: (200 if key == "corpus" else 8) for key in DEFAULT_SIZES}


# ----------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class ManifestEntry:
    """One written part of one dataset."""

    name: str
    part: str  # "train", "test" or "fresh"
    task: str
    split: str  # HELD_IN or HELD_OUT
    mirrors: str
    path: str  # the JSONL file, relative to the manifest's root
    count: int  # records (a dialogue counts once, though the trainer makes one item per answer)
    images: int  # image files written (video: frames)

    @property
    def key(self) -> str:
        return f"{self.name}/{self.part}"


@dataclass
class Manifest:
    root: Path
    seed: int
    image_size: int
    entries: list[ManifestEntry]
    corpus: str | None = None  # path of corpus.txt relative to root
    corpus_lines: int = 0

    def entry(self, key: str) -> ManifestEntry:
        found = [e for e in self.entries if e.key == key]
        if not found:
            raise KeyError(f"no dataset part {key!r} in the manifest of {self.root}; have: {', '.join(e.key for e in self.entries)}")
        return found[0]

    def training(self) -> list[ManifestEntry]:
        """The instruction-tuning mixture: held-in train parts (not the pretraining captions)."""
        return [e for e in self.entries if e.part == TRAIN and e.split == HELD_IN and e.name != PRETRAIN_CAPTIONS]

    def evaluation(self, split: str | None = None) -> list[ManifestEntry]:
        return [e for e in self.entries if e.part == TEST and (split is None or e.split == split)]

    def save(self) -> Path:
        path = self.root / "manifest.json"
        data = {"seed": self.seed, "image_size": self.image_size, "corpus": self.corpus, "corpus_lines": self.corpus_lines,
                "entries": [asdict(e) for e in self.entries]}
        path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        return path


def load_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; build the datasets with build_splits({str(root)!r}, seed=...)")
    data = json.loads(path.read_text(encoding="utf-8"))
    return Manifest(root, data["seed"], data["image_size"], [ManifestEntry(**e) for e in data["entries"]],
                    data["corpus"], data["corpus_lines"])


PRETRAIN_CAPTIONS = "pretrain_captions"


# ----------------------------------------------------------------------------- building


@dataclass
class _Part:
    """One dataset part, generated but not yet written."""

    entry: ManifestEntry
    records: list[dict]
    images: list[tuple[str, Scene]]  # (path relative to root, scene to render), frames included
    scenes: list[tuple[str, str, Scene]]  # (image path relative to root, key, scene) for still images


def build_dataset(
    root: str | Path, name: str, *, seed: int, part: str, count: int, image_size: int = 64, workers: int = 1,
) -> ManifestEntry:
    """Write `count` records of dataset `name` (a DATASETS name) for `part` under root/name/."""
    generated = _generate(_plan(name), seed=seed, part=part, count=count)
    _write(Path(root), [generated], image_size=image_size, workers=workers)
    return generated.entry


def _plan(name: str) -> DatasetPlan:
    if name not in PLANS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(PLANS)}")
    return PLANS[name]


def _write(root: Path, parts: list[_Part], *, image_size: int, workers: int) -> None:
    # All images in one go: one pool of workers for the whole build, not one per part.
    write_images(root, [image for p in parts for image in p.images], size=image_size, workers=workers)
    for p in parts:
        write_jsonl(root / p.entry.path, p.records)


def _generate(plan: DatasetPlan, *, seed: int, part: str, count: int) -> _Part:
    if part not in STREAMS:
        raise ValueError(f"unknown part {part!r}; known: {', '.join(STREAMS)}")
    if part == TRAIN and plan.split == HELD_OUT:
        raise ValueError(f"dataset {plan.name!r} is held out: it has no train part (held-out data is never trained on)")
    if count < 1:
        raise ValueError(f"dataset {plan.name!r}: count must be at least 1, got {count}")
    per_image = plan.per_image if part == TRAIN else 1
    records: list[dict] = []
    images: list[tuple[str, Scene]] = []
    scenes: list[tuple[str, str, Scene]] = []
    for i in range(math.ceil(count / per_image)):
        want = min(per_image, count - i * per_image)
        key, source, made = _draw(plan, scene_key(seed, part, plan.name, i), i * per_image, want, part)
        stem = f"{part}_{i:06d}"
        if isinstance(source, Clip):
            frames = [f"frames/{stem}_{f}.png" for f in range(len(source.frames))]
            images += [(f"{plan.name}/{path}", frame) for path, frame in zip(frames, source.frames)]
            head = {"images": frames}
        else:
            path = f"images/{stem}.png"
            images.append((f"{plan.name}/{path}", source))
            scenes.append((f"{plan.name}/{path}", key, source))
            head = {"image": path}
        n_objects = len(source.objects()) if isinstance(source, Clip) else len(source.objects)
        records += [head | record | {"n_objects": n_objects, "seed": key} for record in made]
    path = f"{plan.name}/{part}.jsonl"
    entry = ManifestEntry(plan.name, part, plan.task, plan.split, plan.mirrors, path, len(records), len(images))
    return _Part(entry, records, images, scenes)


def _draw(plan: DatasetPlan, base_key: str, first: int, want: int, part: str) -> tuple[str, Scene | Clip, list[dict]]:
    """The first scene from base_key (then its redraws) that supports `want` records."""
    for attempt in range(MAX_REDRAWS):
        key = base_key if attempt == 0 else f"{base_key}/redraw{attempt}"
        source = make_clip(key) if plan.stats is None else make_scene(key, plan.stats)
        made = _records_for(plan, source, random.Random(f"{key}/questions"), first, want, part)
        if made is not None:
            return key, source, made
    raise RuntimeError(
        f"dataset {plan.name!r}: none of {MAX_REDRAWS} scenes drawn from {base_key!r} supports its questions; "
        f"its scene statistics do not fit its task"
    )


def _records_for(plan: DatasetPlan, source, rng: random.Random, first: int, want: int, part: str) -> list[dict] | None:
    made: list[dict] = []
    asked: set[str] = set()
    for index in range(first, first + want):
        for _ in range(DUPLICATE_RETRIES):
            record = plan.make(source, rng, index, part)
            if record is None:
                return None
            if record.get("question") not in asked:
                break
        made.append(record)
        asked.add(record.get("question"))
    return made


def _pretrain_captions(root: Path, built: list[_Part]) -> ManifestEntry:
    """Caption + full scene for every held-in training image: stage 1/2 and image-encoder pretraining."""
    records = [
        {"image": path, "caption": caption(scene), "scene": scene_facts(scene), "seed": key}
        for b in built for path, key, scene in b.scenes
    ]
    write_jsonl(root / f"{PRETRAIN_CAPTIONS}.jsonl", records)
    return ManifestEntry(PRETRAIN_CAPTIONS, TRAIN, "caption", HELD_IN, "BLIP-2 pretraining image-text pairs",
                         f"{PRETRAIN_CAPTIONS}.jsonl", len(records), 0)


def scene_facts(scene: Scene) -> dict:
    """The scene's ground truth as JSON: background and every object (for supervised pretraining)."""
    return {
        "background": scene.background,
        "backdrop": scene.backdrop,
        "objects": [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "place": o.place, "row": o.row, "col": o.col,
             "x": round(o.x, 4), "y": round(o.y, 4), "text": o.text}
            for o in scene.objects
        ],
    }


def resolve_sizes(sizes: Mapping[str, int] | None) -> dict[str, int]:
    """DEFAULT_SIZES with `sizes` laid over it; unknown keys and negative counts are errors (0 skips a part)."""
    resolved = dict(DEFAULT_SIZES)
    for key, value in (sizes or {}).items():
        if key not in DEFAULT_SIZES:
            raise ValueError(f"unknown size key {key!r}; known: {', '.join(DEFAULT_SIZES)}")
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"size of {key!r} must be a non-negative int, got {value!r}")
        resolved[key] = value
    return resolved


def build_splits(
    root: str | Path, *, seed: int, sizes: Mapping[str, int] | None = None, image_size: int = 64, workers: int = 1,
    overwrite: bool = False,
) -> Manifest:
    """Write every dataset part, the pretraining captions and the text corpus under root; save and return the manifest.

    sizes: records per "<dataset>/<part>" and lines of "corpus", over DEFAULT_SIZES (QUICK_SIZES
    for a smoke run); a count of 0 leaves that part out.
    root must be empty or missing; overwrite=True first removes an earlier build there (one
    with a manifest.json), so no file of it outlives the new build.
    """
    root = Path(root)
    counts = resolve_sizes(sizes)
    _prepare_root(root, overwrite)
    built = [
        _generate(plan, seed=seed, part=part, count=counts[f"{plan.name}/{part}"])
        for plan in DATASETS for part in (TRAIN, TEST)
        if counts.get(f"{plan.name}/{part}", 0) > 0
    ]
    _write(root, built, image_size=image_size, workers=workers)
    entries = [b.entry for b in built]
    train_built = [b for b in built if b.entry.part == TRAIN]
    if any(b.scenes for b in train_built):
        entries.append(_pretrain_captions(root, train_built))
    manifest = Manifest(root, seed, image_size, entries)
    if counts["corpus"]:
        manifest.corpus = "corpus.txt"
        manifest.corpus_lines = write_text_lines(root / "corpus.txt", text_corpus(seed, counts["corpus"]))
    manifest.save()
    return manifest


def _prepare_root(root: Path, overwrite: bool) -> None:
    if not root.exists() or not any(root.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{root} is not empty; build into a new folder, or pass overwrite=True to replace an earlier build")
    if not (root / "manifest.json").is_file():
        raise FileExistsError(
            f"{root} is not empty and has no manifest.json, so it is not a finished nano build; "
            f"refusing to delete files there (remove the folder yourself if it is a broken build)"
        )
    for name in PLANS:
        if (root / name).is_dir():
            shutil.rmtree(root / name)
    for name in (f"{PRETRAIN_CAPTIONS}.jsonl", "corpus.txt", "manifest.json"):  # the manifest last: the folder stays recognisable
        (root / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- text for the language model


def text_corpus(seed: int, n: int) -> list[str]:
    """n lines of this world's language, for pretraining the small LLM (and its tokenizer).

    Captions, true statements ("The red circle is to the left of the square."), narrations of
    clips ("The circle turns from red to blue.") and, most of all, grounded documents: a
    description of a scene followed by held-in instructions about it and their answers
    ("a large red circle on the left ... What colour is the circle? Short answer: red"), some
    asked in plain text instead ("... Is the circle red? yes").
    A real LLM has read a great deal of text that answers from what came before; a frozen
    LLM that only ever saw lone sentences has no reason to look back at its context, and
    then the Q-Former's soft prompt in front of the question has nothing to steer. The
    documents teach that reading habit with the instruction wording the model will be tuned
    on; no held-out task (video QA, classification, dialogue) or its templates appear here.
    """
    lines = []
    for i in range(n):
        key = corpus_key(seed, i)
        rng = random.Random(key)
        kind = rng.choices(("caption", "counted", "fact", "document", "clip"), weights=(2, 1, 2, 50, 1))[0]
        if kind == "clip":
            lines.append(clip_sentence(make_clip(key), rng))
            continue
        # Documents mostly describe small scenes (1-3 objects) and ask 2-5 questions each: short
        # texts dense in answers are what made the habit of reading back appear within the
        # budget (a 4-layer LLM on longer, sparser documents still ignored colours after 4x the steps).
        small = kind == "document" and rng.random() < 0.85
        stats = SceneStats(text_probability=0.4, max_objects=rng.randint(1, 3) if small else 5)
        scene = make_scene(key, stats)
        if kind == "caption":
            lines.append(caption(scene))
        elif kind == "counted":
            lines.append(counted_caption(scene))
        elif kind == "fact":
            lines.append(fact_sentence(scene, rng))
        else:
            lines.append(grounded_document(scene, rng, questions=(2, 5)))
    return lines


def _description(scene: Scene, rng: random.Random) -> str:
    """The scene in words: a caption, a counted caption, or a few true statements."""
    form = rng.choice(("caption", "counted", "facts"))
    if form == "caption":
        return capitalise(caption(scene)) + "."
    if form == "counted":
        return capitalise(counted_caption(scene)) + "."
    facts = dict.fromkeys(fact_sentence(scene, rng) for _ in range(rng.randint(3, 6)))  # distinct, in order
    return " ".join(f.rstrip(".") + "." for f in facts)


# Share of a document's questions written as plain text, without an instruction template. Real
# LLMs have read far more bare questions and "Question: ... Answer: ..." text than instructions;
# an LLM that only ever saw a question followed by a template's tail ("Reply with a short
# answer.") writes that tail before its answer when asked a bare question (the held-out
# dialogue's first turn, measured: 6.3 against 30.5 for the task-tag model in the third build).
PLAIN_QUESTION_SHARE = 0.4


def _asked(task: str, qa, rng: random.Random) -> str:
    """How a document asks `qa`: mostly a held-in instruction template, sometimes plain text."""
    if qa.options is None and rng.random() < PLAIN_QUESTION_SHARE:
        return qa.question if rng.random() < 0.5 else f"Question: {qa.question} Answer:"
    return templates.render_instruction(task, rng, question=qa.question, options=list(qa.options) if qa.options else None)


def grounded_document(scene: Scene, rng: random.Random, questions: tuple[int, int] = (1, 3)) -> str:
    """A description of the scene, then `questions` (a range) held-in instructions about it, each with its answer."""
    makers = {
        templates.SHORT_VQA: lambda: attribute_qa(scene, rng),
        templates.COUNTING: lambda: counting_qa(scene, rng),
        templates.SPATIAL: lambda: spatial_qa(scene, rng),
        templates.OCR: lambda: ocr_qa(scene, rng),
        templates.YES_NO: lambda: yes_no_qa(scene, rng, rng.random() < 0.5),
        templates.MULTIPLE_CHOICE: lambda: multiple_choice_qa(scene, rng),
    }
    parts = [_description(scene, rng)]
    for _ in range(rng.randint(*questions)):
        task = rng.choice(sorted(makers))
        qa = makers[task]()
        if qa is None:
            continue
        parts.append(f"{_asked(task, qa, rng)} {qa.answer}")
    if len(parts) == 1:  # nothing to ask of this scene: caption it instead
        parts.append(f"{templates.render_instruction(templates.CAPTION, rng)} {caption(scene)}")
    return " ".join(parts).replace("\n", " ")  # one document, one line
