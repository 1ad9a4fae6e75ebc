"""Training data: records read from JSONL/JSON files, and datasets that turn them into model text.

File formats (one JSON object per line in .jsonl; a list of objects in a .json file):
  (a) instruction records  {"image": "img/1.png", "instruction"|"text_input": "...", "answer"|"text_output": "..."}
      or with a question   {"image": ..., "question": "...", "options": ["x", "y"], "answer": "..."}
      and optional earlier turns "history": [["q1", "a1"], ...]
  (b) LLaVA conversations  {"image": ..., "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                             {"from": "gpt", "value": "..."}, ...]}
      trained turn by turn: one record per "gpt" answer, the turns before it as its history.
  (c) caption records      {"image": ..., "caption"|"text": "..." or ["...", ...]}  (stage 1/2, task "caption")
      and optional "negative_captions": ["...", ...], texts known NOT to describe the image
      (e.g. one object's colour swapped): stage 1 adds them to ITM as hard negatives.
Videos give their frames instead of one image: "images": ["clip/0.png", "clip/1.png", ...].
Instruction and caption records of one image may name the regions their answer depends on:
"regions": [[x0, y0, x1, y1], ...], boxes as fractions of the image's width and height (0 = left
or top edge), and "cls" for the image encoder's CLS token when the answer is about the whole
image (how many objects it holds); the grounding loss (grounding.py) then teaches the Q-Former
to look there.

question_generation turns a VQA pair around: a {"question", "answer"} record becomes "write a
question whose answer is <answer>" with the question as the target.

Image paths are relative to the data file's folder; absolute paths and paths that lead out of
the folder (`..`, symlinks) are refused, so a shared data file cannot make a run read
arbitrary files. Every problem is a `DataError` naming "file:line"; with `skip_bad=True` the
line is skipped and its reason kept in `LoadResult.skipped`, never dropped silently. Image
files are checked for existence at load; their pixels are decoded when an item is first used
(decoding every image up front costs minutes on large sets; `verify_images=True` does it).

Reference for the instruction-tuning data recipe: InstructBLIP (Dai et al. 2023), section 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import PIL.Image
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from .features import pixel_key
from .grounding import CLS, Region
from .images import ImageError, load_image
from .prompts import PromptTemplate, build_prompt
from .templates import QUESTION_GENERATION, TASK_TYPES, render_instruction, render_task_tag, template_fields

PROMPT_STYLES = ("instruction", "task_tag", "none")
_IMAGE_MARKER = re.compile(r"\s*<image>\s*")  # LLaVA's placeholder for where the image goes
_HUMAN_ROLES = ("human", "user")
_ANSWER_ROLES = ("gpt", "assistant")


class DataError(ValueError):
    """A problem with training data; the message starts with "file:line: "."""


@dataclass(kw_only=True)
class Record:
    """One training example before templates and images are applied."""

    image: Path | None  # resolved image file; None for a video (see `images`)
    images: list[Path] = field(default_factory=list)  # video frames, in order
    instruction: str | None = None  # the record's own instruction: used as is, no template
    question: str | None = None
    answer: str  # the target text
    task: str
    options: list[str] | None = None  # multiple-choice answers
    history: list[tuple[str, str]] = field(default_factory=list)  # earlier (question, answer) turns
    extra: dict[str, str] = field(default_factory=dict)  # other template fields, e.g. {"answer": ...} for question_generation
    negatives: list[str] = field(default_factory=list)  # captions that do NOT describe the image (stage-1 ITM)
    regions: list[Region] = field(default_factory=list)  # boxes (or "cls") the answer depends on (grounding.py)
    source: str  # "train.jsonl:17", where the record came from (errors name it)


@dataclass
class LoadResult:
    records: list[Record]
    skipped: list[str]  # "file:line: reason" for every line left out with skip_bad=True


@dataclass
class DatasetSpec:
    """One dataset of a training mixture."""

    path: Path
    task: str
    name: str = ""  # defaults to the file's stem
    weight: float | None = None  # replaces this dataset's sqrt(size) in the mixture (see sampling.py)
    skip_bad: bool = False

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.name:
            self.name = self.path.stem
        if self.task not in TASK_TYPES:
            raise ValueError(f"dataset {self.name!r}: unknown task type {self.task!r}; known: {', '.join(TASK_TYPES)}")


# ----------------------------------------------------------------------------- reading files


class _BadEntry(Exception):
    """One entry's problem; load_records adds the file:line and raises or skips."""


@dataclass
class _Context:
    path: Path
    folder: Path  # the data file's folder, resolved
    task: str
    count_tokens: Callable[[str], int] | None
    max_answer_tokens: int | None
    verify_images: bool


def load_records(
    path: str | os.PathLike,
    task: str,
    *,
    skip_bad: bool = False,
    count_tokens: Callable[[str], int] | None = None,
    max_answer_tokens: int | None = None,
    verify_images: bool = False,
) -> LoadResult:
    """Read a .jsonl / .json data file into Records (formats in the module docstring).

    count_tokens + max_answer_tokens: refuse answers longer than the limit (the paper trains
    with at most 256 answer tokens; `collate.answer_token_counter` counts as the collator does).
    verify_images: decode every image now, so unreadable ones are found (and skippable) at load.
    An empty result is always an error, skip_bad or not.
    """
    path = Path(path)
    if task not in TASK_TYPES:
        raise ValueError(f"unknown task type {task!r}; known task types: {', '.join(TASK_TYPES)}")
    if (max_answer_tokens is None) != (count_tokens is None):
        raise ValueError("max_answer_tokens and count_tokens go together: pass both or neither")
    if not path.is_file():
        raise DataError(f"{path}: data file does not exist")
    ctx = _Context(path, path.parent.resolve(), task, count_tokens, max_answer_tokens, verify_images)
    records: list[Record] = []
    skipped: list[str] = []
    for line, entry in _entries(path):
        try:
            if isinstance(entry, _BadEntry):
                raise entry
            records.extend(_records_from_entry(entry, f"{path}:{line}", ctx))
        except _BadEntry as e:
            message = f"{path}:{line}: {e}"
            if not skip_bad:
                raise DataError(message) from None
            skipped.append(message)
    if not records:
        detail = f"; all {len(skipped)} entries were skipped, the first because {skipped[0]}" if skipped else ""
        raise DataError(f"{path}: no usable records (empty dataset){detail}")
    return LoadResult(records, skipped)


def _entries(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or _BadEntry) for every record in the file."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".ndjson"):
        raise DataError(f"{path}: unsupported data file type {suffix or '(none)'!r}; use .jsonl (one JSON object per line) or .json")
    data = path.read_bytes()
    if suffix == ".json" and data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return _json_list_entries(path, data)
    return _jsonl_entries(data)


def _jsonl_entries(data: bytes) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark some editors write
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield number, _BadEntry(f"line is not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})")
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as e:
            yield number, _BadEntry(f"malformed JSON: {e.msg} (column {e.colno})")


def _json_list_entries(path: Path, data: bytes) -> Iterator[tuple[int, Any]]:
    """Elements of a JSON list, each with the line it starts on.

    A broken .json file cannot be skipped line by line (everything after the error is
    unparseable), so malformed JSON here is always an error.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: file is not valid UTF-8 (byte {data[e.start]:#04x})") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno}); a .json file must parse as a whole") from None
    decoder = json.JSONDecoder()
    separators = re.compile(r"[\s,]*")
    position = text.index("[") + 1
    line = text.count("\n", 0, position) + 1
    for _ in items:
        start = separators.match(text, position).end()
        line += text.count("\n", position, start)
        item, position = decoder.raw_decode(text, start)
        yield line, item
        line += text.count("\n", start, position)


# ----------------------------------------------------------------------------- one entry -> records


def _records_from_entry(entry: Any, source: str, ctx: _Context) -> list[Record]:
    if not isinstance(entry, dict):
        raise _BadEntry(f"wrong type: expected a JSON object, got {_json_type(entry)}")
    image, frames = _images(entry, ctx)
    if _present(entry, "negative_captions") and not any(_present(entry, key) for key in ("caption", "text")):
        raise _BadEntry("field 'negative_captions' belongs to caption records (with 'caption' or 'text')")
    if "conversations" in entry:
        if _present(entry, "regions"):
            raise _BadEntry("field 'regions' belongs to instruction and caption records, not to conversations")
        return _conversation_records(entry, image, frames, source, ctx)
    if any(_present(entry, key) for key in ("answer", "text_output")):
        return [_instruction_record(entry, image, frames, source, ctx)]
    if any(_present(entry, key) for key in ("caption", "text")):
        return _caption_records(entry, image, frames, source, ctx)
    raise _BadEntry("missing field 'answer' (or 'text_output'; 'conversations' for LLaVA data, 'caption' for captions)")


def _present(entry: dict, key: str) -> bool:
    return entry.get(key) is not None  # JSON null counts as absent, as exporters write it for "no value"


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _string(entry: dict, *names: str, required: bool) -> str | None:
    """The first of `names` present in `entry`, checked to be a non-empty string."""
    given = [n for n in names if _present(entry, n)]
    if not given:
        if required:
            others = f" (or {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else ""
            raise _BadEntry(f"missing field {names[0]!r}{others}")
        return None
    if len(given) > 1 and entry[given[0]] != entry[given[1]]:
        raise _BadEntry(f"fields {given[0]!r} and {given[1]!r} both given with different values; keep one")
    return _check_text(entry[given[0]], f"field {given[0]!r}")


def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _BadEntry(f"wrong type: {what} must be a string, got {_json_type(value)} {json.dumps(value)[:40]}")
    if not value.strip():
        raise _BadEntry(f"{what} is empty")
    return value.strip()


def _images(entry: dict, ctx: _Context) -> tuple[Path | None, list[Path]]:
    has_image, has_frames = _present(entry, "image"), _present(entry, "images")
    if has_image and has_frames:
        raise _BadEntry("give 'image' (one picture) or 'images' (video frames), not both")
    if has_image:
        return _image_path(entry["image"], ctx, "image"), []
    if not has_frames:
        raise _BadEntry("missing field 'image' (or 'images' for video frames)")
    frames = entry["images"]
    if not isinstance(frames, list) or not frames:
        raise _BadEntry(f"wrong type: field 'images' must be a non-empty list of paths, got {_json_type(frames)}")
    return None, [_image_path(value, ctx, f"images[{i}]") for i, value in enumerate(frames)]


def _image_path(value: Any, ctx: _Context, what: str) -> Path:
    value = _check_text(value, f"field {what!r}")
    relative = Path(value)
    if relative.is_absolute():
        raise _BadEntry(f"{what} path {value!r} is absolute; give it relative to the data file's folder {ctx.folder}")
    resolved = (ctx.folder / relative).resolve()
    if not resolved.is_relative_to(ctx.folder):
        raise _BadEntry(f"{what} path {value!r} leads outside the data file's folder {ctx.folder} (to {resolved})")
    if not resolved.is_file():
        raise _BadEntry(f"{what} file {value!r} does not exist (looked for {resolved})")
    if ctx.verify_images:
        try:
            load_image(resolved)
        except ImageError as e:
            raise _BadEntry(f"unreadable image {value!r}: {e}") from None
    return resolved


def _check_answer(answer: str, ctx: _Context, what: str = "answer") -> str:
    if ctx.max_answer_tokens is not None:
        n = ctx.count_tokens(answer)
        if n > ctx.max_answer_tokens:
            raise _BadEntry(f"{what} is {n} tokens, over the limit of {ctx.max_answer_tokens} (max_answer_tokens)")
    return answer


def _options(entry: dict) -> list[str] | None:
    if not _present(entry, "options"):
        return None
    options = entry["options"]
    if not isinstance(options, list):
        raise _BadEntry(f"wrong type: field 'options' must be a list of strings, got {_json_type(options)}")
    if len(options) < 2:
        raise _BadEntry(f"field 'options' needs at least 2 choices, got {len(options)}")
    return [_check_text(o, f"options[{i}]") for i, o in enumerate(options)]


def _history(entry: dict) -> list[tuple[str, str]]:
    turns = entry.get("history") or []
    if not isinstance(turns, list):
        raise _BadEntry(f"wrong type: field 'history' must be a list of [question, answer] pairs, got {_json_type(turns)}")
    pairs = []
    for i, turn in enumerate(turns):
        if not (isinstance(turn, list) and len(turn) == 2):
            raise _BadEntry(f"wrong type: history[{i}] must be a [question, answer] pair")
        pairs.append((_check_text(turn[0], f"history[{i}][0]"), _check_text(turn[1], f"history[{i}][1]")))
    return pairs


def _instruction_record(entry: dict, image, frames, source: str, ctx: _Context) -> Record:
    instruction = _string(entry, "instruction", "text_input", required=False)
    question = _string(entry, "question", required=False)
    answer = _check_answer(_string(entry, "answer", "text_output", required=True), ctx)
    options = _options(entry)
    extra: dict[str, str] = {}
    if ctx.task == QUESTION_GENERATION and question is not None:
        # A VQA pair turned around: given the answer, the target is the question.
        extra, answer, question = {"answer": answer}, _check_answer(question, ctx, "question (the target)"), None
    if instruction is None:
        _check_template_fields(ctx.task, {"question": question, "options": options, **extra})
    return Record(
        image=image, images=frames, instruction=instruction, question=question, answer=answer, task=ctx.task,
        options=options, history=_history(entry), extra=extra, regions=_regions(entry, frames), source=source,
    )


def _check_template_fields(task: str, given: dict[str, Any]) -> None:
    """Without its own instruction, a record must fill exactly the fields its task's templates use."""
    needed = template_fields(task)
    for name in sorted(needed):
        if given.get(name) is None:
            raise _BadEntry(f"missing field {name!r} (the {task} templates need it; or give the record its own 'instruction')")
    for name, value in sorted(given.items()):
        if value is not None and name not in needed:
            raise _BadEntry(
                f"field {name!r} is not used by the {task} templates; choose a task that uses it, "
                f"or give the record its own 'instruction'"
            )


def _caption_records(entry: dict, image, frames, source: str, ctx: _Context) -> list[Record]:
    key = "caption" if _present(entry, "caption") else "text"
    captions = entry[key] if isinstance(entry[key], list) else [entry[key]]
    if not captions:
        raise _BadEntry(f"field {key!r} is an empty list")
    _check_template_fields(ctx.task, {})
    negatives = _negative_captions(entry)
    regions = _regions(entry, frames)
    records = []
    for i, caption in enumerate(captions):
        what = f"{key}[{i}]" if len(captions) > 1 else key
        text = _check_answer(_check_text(caption, f"field {what!r}"), ctx, what)
        where = f"{source} (caption {i + 1} of {len(captions)})" if len(captions) > 1 else source
        records.append(Record(image=image, images=frames, answer=text, task=ctx.task, source=where, negatives=negatives,
                              regions=regions))
    return records


def _regions(entry: dict, frames: list[Path]) -> list[Region]:
    regions = entry.get("regions")
    if regions is None:
        return []
    if frames:
        raise _BadEntry("field 'regions' needs one 'image'; video frames have no regions")
    if not isinstance(regions, list):
        raise _BadEntry(f"wrong type: field 'regions' must be a list of [x0, y0, x1, y1] boxes, got {_json_type(regions)}")
    boxes: list[Region] = []
    for i, box in enumerate(regions):
        if box == CLS:
            boxes.append(CLS)
            continue
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise _BadEntry(f"wrong type: regions[{i}] must be 4 numbers [x0, y0, x1, y1] or \"{CLS}\", got {json.dumps(box)[:60]}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise _BadEntry(
                f"regions[{i}] = {json.dumps(box)} is not a box inside the image: need 0 <= x0 < x1 <= 1 and "
                "0 <= y0 < y1 <= 1 (fractions of the width and height)"
            )
        boxes.append((x0, y0, x1, y1))
    return boxes


def _negative_captions(entry: dict) -> list[str]:
    negatives = entry.get("negative_captions")
    if negatives is None:
        return []
    if not isinstance(negatives, list):
        raise _BadEntry(f"field 'negative_captions' must be a list of strings, got {_json_type(negatives)}")
    return [_check_text(text, f"field 'negative_captions[{i}]'") for i, text in enumerate(negatives)]


def _conversation_records(entry: dict, image, frames, source: str, ctx: _Context) -> list[Record]:
    turns = _conversation_turns(entry["conversations"])
    records = []
    history: list[tuple[str, str]] = []
    for k, (human, answer) in enumerate(turns):
        _check_answer(answer, ctx, f"answer of turn {k + 1}")
        where = f"{source} (turn {k + 1} of {len(turns)})" if len(turns) > 1 else source
        # The human message is the instruction itself: no template around what a person wrote.
        records.append(Record(
            image=image, images=frames, instruction=human, question=human, answer=answer, task=ctx.task,
            history=list(history), source=where,
        ))
        history.append((human, answer))
    return records


def _conversation_turns(conversations: Any) -> list[tuple[str, str]]:
    """LLaVA's alternating human/gpt messages -> (question, answer) pairs, <image> markers removed."""
    if not isinstance(conversations, list):
        raise _BadEntry(f"wrong type: field 'conversations' must be a list of messages, got {_json_type(conversations)}")
    if not conversations:
        raise _BadEntry("field 'conversations' is empty")
    messages = []
    for i, message in enumerate(conversations):
        if not isinstance(message, dict):
            raise _BadEntry(f"wrong type: conversations[{i}] must be an object with 'from' and 'value'")
        for key in ("from", "value"):
            if key not in message:
                raise _BadEntry(f"missing field {key!r} in conversations[{i}]")
        role = message["from"]
        expected = _HUMAN_ROLES if i % 2 == 0 else _ANSWER_ROLES
        if role not in expected:
            raise _BadEntry(f"conversations[{i}] is from {role!r}; messages must alternate human, gpt, human, gpt, ...")
        text = _IMAGE_MARKER.sub(" ", message["value"]) if isinstance(message["value"], str) else message["value"]
        messages.append(_check_text(text, f"conversations[{i}] value"))
    if len(messages) % 2:
        raise _BadEntry(f"conversations[{len(messages) - 1}] is a human message with no gpt answer after it")
    return list(zip(messages[0::2], messages[1::2]))


# ----------------------------------------------------------------------------- datasets


class InstructionDataset(Dataset):
    """Records -> model-ready items: {"pixel_values", "prompt", "qformer_text", "answer", "negative", "regions", "source"}.

    prompt_style:
      "instruction"  the record's own instruction, else a template of its task (the paper)
      "task_tag"     "[task] <raw question/options>", the ablation without instructions
      "none"         the raw question (or nothing: BLIP-2 stage-2 captioning has an empty prompt)
    Earlier turns go in front via `prompts.build_prompt`, the same prompt builder the chat uses;
    with `count_tokens` and `max_prompt_tokens` the oldest turns are dropped to fit. Templates
    follow each record's own `task` (load_records gives every record of a file the file's task);
    the dataset's `task` names the dataset's kind for logs.

    Randomness (template choice, augmentation) is drawn from a generator seeded with
    (seed, name, epoch, index), never from global state: an item is the same whichever worker
    loads it and in whatever order, so a resumed run sees exactly what the first run would
    have. The epoch is part of the key so that repeated passes see other templates and crops;
    the trainer calls `set_epoch` (e.g. once per pass over the mixture); an infinite sampler
    may leave it at 0, and each item then keeps one template for the whole run.
    """

    def __init__(
        self,
        records: list[Record],
        *,
        name: str,
        task: str,
        prompt_style: str = "instruction",
        template: PromptTemplate = PromptTemplate(),
        image_transform: Callable[[PIL.Image.Image, torch.Generator], torch.Tensor],
        seed: int = 0,
        count_tokens: Callable[[str], int] | None = None,
        max_prompt_tokens: int | None = None,
        qformer_instruction: bool = True,
        defer_images: bool = False,
    ):
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt_style {prompt_style!r}; expected one of {', '.join(PROMPT_STYLES)}")
        if task not in TASK_TYPES:
            raise ValueError(f"unknown task type {task!r}; known task types: {', '.join(TASK_TYPES)}")
        if not records:
            raise DataError(f"dataset {name!r} has no records")
        self.records = records
        self.name = name
        self.task = task
        self.prompt_style = prompt_style
        self.template = template
        self.image_transform = image_transform
        self.seed = seed
        self.epoch = 0
        self.count_tokens = count_tokens  # with max_prompt_tokens: oldest turns are dropped to fit
        self.max_prompt_tokens = max_prompt_tokens
        # False: the Q-Former reads no text (BLIP-2-style, instruction-blind features; an ablation).
        self.qformer_instruction = qformer_instruction
        # True: items carry a `DeferredImage` instead of pixels, for training with cached image
        # features, where most images are never decoded (their features are looked up by file).
        if defer_images and not getattr(image_transform, "deterministic", False):
            raise ValueError("defer_images needs a deterministic image transform (a random crop has no fixed features)")
        self.defer_images = defer_images

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, index: int, purpose: str) -> random.Random:
        # str seeds are hashed with SHA-512 by `random`, independent of PYTHONHASHSEED. One
        # stream per purpose, so a change to the template lists leaves the crops as they were.
        return random.Random(f"{self.seed}:{self.name}:{self.epoch}:{index}:{purpose}")

    def texts(self, index: int) -> dict[str, str | None]:
        """The text side of item `index` (no image decoding): prompt, qformer_text, answer, negative, source.

        `negative` is one of the record's negative captions (None without any), picked per item
        like the template."""
        record = self.records[index]
        current = self._current_text(record, self._rng(index, "template"))
        prompt = build_prompt(
            current, record.history, self.template, count_tokens=self.count_tokens, max_prompt_tokens=self.max_prompt_tokens
        )
        qformer_text = prompt.qformer if self.qformer_instruction else ""
        negative = self._rng(index, "negative").choice(record.negatives) if record.negatives else None
        return {"prompt": prompt.llm, "qformer_text": qformer_text, "answer": record.answer, "negative": negative,
                "regions": record.regions, "source": record.source}

    def _current_text(self, record: Record, rng: random.Random) -> str:
        fields = {"question": record.question, "options": record.options, **record.extra}
        if self.prompt_style == "instruction":
            return render_instruction(record.task, rng, instruction=record.instruction, **fields)
        if self.prompt_style == "task_tag":
            fields["question"] = record.question or record.instruction
            return render_task_tag(record.task, **fields)
        return record.question or record.instruction or ""

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for dataset {self.name!r} of {len(self.records)} items")
        item = self.texts(index)
        record = self.records[index]
        paths = (record.image,) if record.image is not None else tuple(record.images)
        if self.defer_images:
            item["pixel_values"] = DeferredImage.of(paths, record.image is None, self.image_transform, record.source)
        else:
            seed = self._rng(index, "image").getrandbits(63)
            item["pixel_values"] = decode_pixels(paths, record.image is None, self.image_transform, record.source, seed)
        return item


def decode_pixels(paths, is_video: bool, transform, source: str, seed: int = 0) -> torch.Tensor:
    """(3, H, W) for an image, (F, 3, H, W) for video frames (all frames get the same crop)."""
    try:
        frames = [transform(load_image(p), torch.Generator().manual_seed(seed)) for p in paths]
    except ImageError as e:
        raise DataError(f"{source}: unreadable image: {e}") from None
    return torch.stack(frames) if is_video else frames[0]  # (F, 3, H, W) / (3, H, W)


@dataclass(frozen=True)
class DeferredImage:
    """An item's image (or clip) before decoding, for training on cached frozen-encoder features.

    `key` hashes the transform's settings and the files' bytes, so it names the pixels the
    transform would make without making them: decoding and resizing took most of the data
    time of a training step whose features were all cached. Only deterministic transforms
    qualify (their pixels are a function of the bytes). `pixel_values()` decodes, on a miss.
    """

    paths: tuple[Path, ...]
    is_video: bool
    transform: Callable
    source: str
    key: str

    @classmethod
    def of(cls, paths, is_video: bool, transform, source: str) -> "DeferredImage":
        digest = hashlib.sha256(repr(transform).encode())
        for path in paths:
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise DataError(f"{source}: unreadable image: {path}: {e.strerror or e}") from None
            digest.update(len(data).to_bytes(8, "little") + data)
        return cls(tuple(paths), is_video, transform, source, "file:" + digest.hexdigest())

    def pixel_values(self) -> torch.Tensor:
        return decode_pixels(self.paths, self.is_video, self.transform, self.source)  # (3, H, W) / (F, 3, H, W)


# ----------------------------------------------------------------------------- feature cache


class ImageFeatureCache:
    """Frozen image-encoder outputs per preprocessed image, in memory or as .safetensors files.

    Valid only while the vision encoder is frozen and images are preprocessed
    deterministically (no augmentation): the key is a hash of the pixel values, so a random
    crop would never hit, and a trained encoder would make entries stale. `namespace`
    (the recipes use `features.weights_fingerprint` of the encoder) keeps caches of different
    encoders apart in one folder.
    The folder form lets later epochs and later runs skip the ViT entirely; it also keeps up to
    `memory_bytes` of entries in memory (least recently used dropped first), because reading an
    entry back from its file each time an image recurs cost as much as decoding the image.
    Batches of `DeferredImage`s (datasets with `defer_images=True`) are keyed by file content and
    decoded only for the images not cached.
    """

    def __init__(self, folder: str | os.PathLike | None = None, *, namespace: str = "", memory_bytes: int = 2 << 30):
        self.folder = Path(folder) if folder is not None else None
        self.namespace = namespace
        self.memory_bytes = memory_bytes  # the folder form's in-memory share; the memory-only form keeps all
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._memory_used = 0
        self.hits = 0
        self.misses = 0

    def key(self, pixel_values: torch.Tensor | DeferredImage) -> str:
        """pixel_values (3, H, W) or (F, 3, H, W), or a DeferredImage -> content key."""
        content = pixel_values.key if isinstance(pixel_values, DeferredImage) else pixel_key(pixel_values)
        return hashlib.sha256(f"{self.namespace}:{content}".encode()).hexdigest()

    def _file(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        if self.folder is None or not (file := self._file(key)).is_file():
            return None
        image_embeds = load_file(file)["image_embeds"]
        self._remember(key, image_embeds)
        return image_embeds

    def _remember(self, key: str, image_embeds: torch.Tensor) -> None:
        if key in self._memory:
            return
        self._memory[key] = image_embeds
        self._memory_used += image_embeds.nbytes
        while self.folder is not None and self._memory_used > self.memory_bytes and self._memory:
            self._memory_used -= self._memory.popitem(last=False)[1].nbytes

    def put(self, key: str, image_embeds: torch.Tensor) -> None:
        # A copy: a row of a batch's output would otherwise keep the whole batch's storage alive.
        image_embeds = image_embeds.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        self._remember(key, image_embeds)
        if self.folder is None:
            return
        file = self._file(key)
        file.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a run killed mid-write never leaves a truncated entry behind.
        handle, tmp = tempfile.mkstemp(dir=file.parent, suffix=".tmp")
        os.close(handle)
        try:
            save_file({"image_embeds": image_embeds}, tmp)
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def __len__(self) -> int:
        if self.folder is None:
            return len(self._memory)
        return sum(1 for _ in self.folder.glob("*/*.safetensors")) if self.folder.is_dir() else 0

    @torch.no_grad()
    def get_or_compute(self, pixel_values: torch.Tensor | list[DeferredImage], encode: Callable[[torch.Tensor], torch.Tensor],
                       device: torch.device | str | None = None) -> torch.Tensor:
        """pixel_values (B, 3, H, W), or B DeferredImages -> image_embeds (B, N, Cv) on `device`
        (default: the pixels' device), encoding only the uncached images.

        `encode` is e.g. `model.encode_images`; it runs once, on the distinct missing images
        (deferred ones decoded for it and moved to `device`). `misses` counts images encoded, `hits` the rest.
        """
        deferred = not torch.is_tensor(pixel_values)
        device = device if device is not None else ("cpu" if deferred else pixel_values.device)
        keys = [self.key(p) for p in pixel_values]
        found = {k: self.get(k) for k in dict.fromkeys(keys)}
        missing = [k for k, value in found.items() if value is None]
        rows = [keys.index(k) for k in missing]  # a repeated image is encoded once
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            if deferred:
                pixels = torch.stack([pixel_values[i].pixel_values() for i in rows]).to(device)  # (M, 3, H, W)
            else:
                pixels = pixel_values[rows]
            fresh = encode(pixels)  # (M, N, Cv)
            for k, embeds in zip(missing, fresh):
                self.put(k, embeds)
                found[k] = embeds.detach().to("cpu")
        return torch.stack([found[k] for k in keys]).to(device)  # (B, N, Cv)
