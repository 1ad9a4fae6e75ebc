"""Data layer: record formats, bad data naming file:line, datasets, augmentation, feature cache."""

import dataclasses
import json
import os

import PIL.Image
import pytest
import torch

from instructblip_core.augment import EvalTransform, TrainTransform
from instructblip_core.collate import stack_pixels
from instructblip_core.data import (
    DataError,
    DatasetSpec,
    DeferredImage,
    ImageFeatureCache,
    InstructionDataset,
    Record,
    load_records,
)
from instructblip_core.images import ImageProcessor
from instructblip_core.prompts import PromptTemplate
from instructblip_core.templates import format_options, templates_for

SIZE = 28
PROCESSOR = ImageProcessor(size=(SIZE, SIZE))


# ----------------------------------------------------------------------------- helpers


def make_png(path, color=(200, 30, 30), size=(40, 30)):
    """An RGB PNG with a coloured left half and a white right half (left/right tell apart)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = PIL.Image.new("RGB", size, (255, 255, 255))
    image.paste(PIL.Image.new("RGB", (size[0] // 2, size[1]), color), (0, 0))
    image.save(path)
    return path


def write_lines(path, rows):
    """rows: dicts (written as JSON) or raw strings (written as they are), one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "data"
    make_png(data / "img" / "a.png", (200, 30, 30))
    make_png(data / "img" / "b.png", (30, 200, 30))
    for i in range(4):
        make_png(data / "clip" / f"{i}.png", (60 * i, 0, 255 - 60 * i))
    return data


def dataset(records, **kwargs):
    kwargs.setdefault("name", "ds")
    kwargs.setdefault("task", records[0].task)
    kwargs.setdefault("image_transform", EvalTransform(PROCESSOR))
    return InstructionDataset(records, **kwargs)


def load_error(path, task="short_vqa", **kwargs):
    with pytest.raises(DataError) as info:
        load_records(path, task, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------- formats


def test_instruction_records_both_spellings(folder):
    path = write_lines(folder / "train.jsonl", [
        {"image": "img/a.png", "instruction": "Describe it.", "answer": "a red half"},
        "",
        {"image": "img/b.png", "text_input": "What colour?", "text_output": "green"},
    ])
    result = load_records(path, "long_vqa")
    assert result.skipped == []
    first, second = result.records
    assert first.image == (folder / "img" / "a.png").resolve()
    assert first.instruction == "Describe it." and first.answer == "a red half" and first.task == "long_vqa"
    assert first.source == f"{path}:1"
    assert second.instruction == "What colour?" and second.answer == "green"
    assert second.source == f"{path}:3"  # the blank line 2 still counts


def test_question_and_options_records(folder):
    path = write_lines(folder / "mc.jsonl", [
        {"image": "img/a.png", "question": "Which colour?", "options": ["red", "green"], "answer": "red"},
    ])
    (record,) = load_records(path, "multiple_choice").records
    assert record.question == "Which colour?" and record.options == ["red", "green"] and record.instruction is None
    texts = dataset([record]).texts(0)
    assert "Which colour?" in texts["prompt"] and format_options(["red", "green"]) in texts["prompt"]


def test_llava_conversations_become_one_record_per_answer(folder):
    path = write_lines(folder / "llava.jsonl", [{
        "image": "img/a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is on the left?"},
            {"from": "gpt", "value": "A red area."},
            {"from": "human", "value": "And on the right?"},
            {"from": "gpt", "value": "White."},
            {"from": "human", "value": "Describe the picture.\n<image>"},
            {"from": "gpt", "value": "Half red, half white."},
        ],
    }])
    records = load_records(path, "dialogue").records
    assert [r.answer for r in records] == ["A red area.", "White.", "Half red, half white."]
    assert records[0].instruction == "What is on the left?" and records[0].history == []
    assert records[2].instruction == "Describe the picture."
    assert records[2].history == [("What is on the left?", "A red area."), ("And on the right?", "White.")]
    assert records[1].source == f"{path}:1 (turn 2 of 3)"
    # Prompts come from the shared prompt builder: first turn raw, later turns with the history.
    ds = dataset(records)
    assert ds.texts(0)["prompt"] == "What is on the left?"
    assert ds.texts(1)["prompt"] == "Question: What is on the left? Answer: A red area. Question: And on the right? Answer:"
    assert ds.texts(1)["qformer_text"] == "And on the right?"
    assert all("<image>" not in ds.texts(i)["prompt"] for i in range(3))


def test_caption_records_string_and_list(folder):
    path = write_lines(folder / "captions.jsonl", [
        {"image": "img/a.png", "caption": "a red and white picture"},
        {"image": "img/b.png", "text": ["green left", "white right"]},
    ])
    records = load_records(path, "caption").records
    assert [r.answer for r in records] == ["a red and white picture", "green left", "white right"]
    assert records[2].source == f"{path}:2 (caption 2 of 2)"
    caption_templates = templates_for("caption")
    assert dataset(records).texts(0)["prompt"] in caption_templates
    none = dataset(records, prompt_style="none").texts(0)
    assert none["prompt"] == "" and none["answer"] == "a red and white picture"


def test_caption_records_carry_their_negative_captions(folder):
    """Stage 1's extra ITM negatives: texts known not to describe the image, one picked per item."""
    path = write_lines(folder / "captions.jsonl", [
        {"image": "img/a.png", "caption": ["a red left", "red and white"], "negative_captions": ["a white left", "a green left"]},
        {"image": "img/b.png", "caption": "green left"},
    ])
    records = load_records(path, "caption").records
    assert [r.negatives for r in records] == [["a white left", "a green left"]] * 2 + [[]]
    ds = dataset(records, prompt_style="none")
    picked = {ds.texts(0)["negative"] for _ in range(3)}
    assert len(picked) == 1 and picked <= {"a white left", "a green left"}  # the same per item, run after run
    assert {dataset(records, prompt_style="none", seed=s).texts(0)["negative"] for s in range(20)} == {"a white left", "a green left"}
    assert ds.texts(2)["negative"] is None

    bad = write_lines(folder / "bad.jsonl", [
        {"image": "img/a.png", "caption": "x", "negative_captions": "a white left"},
        {"image": "img/a.png", "caption": "x", "negative_captions": ["fine", ""]},
        {"image": "img/a.png", "question": "q?", "answer": "a", "negative_captions": ["no"]},
        {"image": "img/a.png", "caption": "the only good line"},
    ])
    result = load_records(bad, "caption", skip_bad=True)
    assert [r.answer for r in result.records] == ["the only good line"]
    assert result.skipped == [
        f"{bad}:1: field 'negative_captions' must be a list of strings, got string",
        f"{bad}:2: field 'negative_captions[1]' is empty",
        f"{bad}:3: field 'negative_captions' belongs to caption records (with 'caption' or 'text')",
    ]


def test_json_list_file_reports_element_lines(folder):
    path = folder / "list.json"
    path.write_text(
        '[\n  {"image": "img/a.png", "question": "q1?", "answer": "x"},\n\n'
        '  {"image": "img/b.png",\n   "question": "q2?",\n   "answer": "y"},\n'
        '  {"image": "img/b.png", "question": "q3?"}\n]\n'
    )
    assert str(load_error(path)) == f"{path}:7: missing field 'answer' (or 'text_output'; 'conversations' for LLaVA data, 'caption' for captions)"
    result = load_records(path, "short_vqa", skip_bad=True)
    assert [r.source for r in result.records] == [f"{path}:2", f"{path}:4"]
    assert result.skipped == [f"{path}:7: missing field 'answer' (or 'text_output'; 'conversations' for LLaVA data, 'caption' for captions)"]


def test_question_generation_turns_a_vqa_pair_around(folder):
    path = write_lines(folder / "qg.jsonl", [{"image": "img/a.png", "question": "What colour is the left?", "answer": "red"}])
    (record,) = load_records(path, "question_generation").records
    assert record.answer == "What colour is the left?" and record.extra == {"answer": "red"}
    prompt = dataset([record]).texts(0)["prompt"]
    assert "red" in prompt and "What colour is the left?" not in prompt


def test_video_frames_give_a_stack(folder):
    path = write_lines(folder / "video.jsonl", [
        {"images": [f"clip/{i}.png" for i in range(4)], "question": "What changes?", "answer": "the colour"},
    ])
    (record,) = load_records(path, "video_qa").records
    assert record.image is None and len(record.images) == 4
    item = dataset([record])[0]
    assert item["pixel_values"].shape == (4, 3, SIZE, SIZE)
    expected = PROCESSOR.pixel_values(PIL.Image.open(folder / "clip" / "2.png").convert("RGB"))
    torch.testing.assert_close(item["pixel_values"][2], expected, rtol=0, atol=0)


def test_dataset_spec_defaults():
    spec = DatasetSpec(path="some/dir/vqa_train.jsonl", task="short_vqa")
    assert spec.name == "vqa_train" and spec.weight is None and spec.skip_bad is False
    with pytest.raises(ValueError, match="unknown task type 'vqa'"):
        DatasetSpec(path="x.jsonl", task="vqa")


# ----------------------------------------------------------------------------- bad data


BAD_LINES = {
    "malformed JSON": ('{"image": "img/a.png", "question": "q?", "answer": "x"', "malformed JSON: Expecting ',' delimiter (column 55)"),
    "missing answer": ({"image": "img/a.png", "question": "q?"}, "missing field 'answer' (or 'text_output'"),
    "missing image": ({"question": "q?", "answer": "x"}, "missing field 'image' (or 'images' for video frames)"),
    "missing question": ({"image": "img/a.png", "answer": "x"}, "missing field 'question' (the short_vqa templates need it"),
    "answer not a string": ({"image": "img/a.png", "question": "q?", "answer": 3}, "wrong type: field 'answer' must be a string, got number 3"),
    "record not an object": ('["img/a.png", "q?", "x"]', "wrong type: expected a JSON object, got list"),
    "options not a list": ({"image": "img/a.png", "question": "q?", "options": "a, b", "answer": "a"}, "wrong type: field 'options' must be a list"),
    "image file missing": ({"image": "img/nope.png", "question": "q?", "answer": "x"}, "image file 'img/nope.png' does not exist"),
    "absolute image path": ({"image": "/etc/passwd", "question": "q?", "answer": "x"}, "image path '/etc/passwd' is absolute"),
    "path escaping the folder": ({"image": "../outside.png", "question": "q?", "answer": "x"}, "image path '../outside.png' leads outside the data file's folder"),
    "empty answer": ({"image": "img/a.png", "question": "q?", "answer": "  "}, "field 'answer' is empty"),
    "unused options": ({"image": "img/a.png", "question": "q?", "options": ["a", "b"], "answer": "a"}, "field 'options' is not used by the short_vqa templates"),
    "conversation not alternating": (
        {"image": "img/a.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "human", "value": "hi"}]},
        "conversations[1] is from 'human'; messages must alternate",
    ),
    "conversation without final answer": (
        {"image": "img/a.png", "conversations": [{"from": "human", "value": "hi"}]},
        "conversations[0] is a human message with no gpt answer after it",
    ),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_line_names_file_and_line(folder, case):
    make_png(folder.parent / "outside.png")
    bad, reason = BAD_LINES[case]
    good = {"image": "img/a.png", "question": "What colour?", "answer": "red"}
    path = write_lines(folder / "train.jsonl", [good, good, bad, good])
    message = load_error(path)
    assert message.startswith(f"{path}:3: {reason}"), message
    # skip_bad: the line is counted with its reason, the others survive
    result = load_records(path, "short_vqa", skip_bad=True)
    assert len(result.records) == 3
    assert len(result.skipped) == 1 and result.skipped[0].startswith(f"{path}:3: {reason}")


def test_symlink_leading_outside_is_refused(folder):
    outside = make_png(folder.parent / "secret.png")
    os.symlink(outside, folder / "img" / "link.png")
    os.symlink(folder / "img" / "a.png", folder / "img" / "inside_link.png")
    path = write_lines(folder / "train.jsonl", [
        {"image": "img/inside_link.png", "question": "q?", "answer": "x"},
        {"image": "img/link.png", "question": "q?", "answer": "x"},
    ])
    assert load_error(path).startswith(f"{path}:2: image path 'img/link.png' leads outside the data file's folder")


def test_invalid_utf8_line(folder):
    path = folder / "train.jsonl"
    good = json.dumps({"image": "img/a.png", "question": "q?", "answer": "x"}).encode()
    path.write_bytes(good + b"\n" + b'{"image": "img/a.png", "question": "caf\xe9?", "answer": "x"}\n')
    assert load_error(path).startswith(f"{path}:2: line is not valid UTF-8 (byte 0xe9")


def test_answer_longer_than_the_limit(folder):
    words = lambda text: len(text.split())  # noqa: E731
    path = write_lines(folder / "train.jsonl", [
        {"image": "img/a.png", "question": "q?", "answer": "one two three"},
        {"image": "img/a.png", "question": "q?", "answer": "one two three four five"},
    ])
    assert load_error(path, count_tokens=words, max_answer_tokens=4) == (
        f"{path}:2: answer is 5 tokens, over the limit of 4 (max_answer_tokens)"
    )
    result = load_records(path, "short_vqa", count_tokens=words, max_answer_tokens=4, skip_bad=True)
    assert len(result.records) == 1 and len(result.skipped) == 1
    conversation = write_lines(folder / "chat.jsonl", [{"image": "img/a.png", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"},
        {"from": "human", "value": "more"}, {"from": "gpt", "value": "a b c d e f"},
    ]}])
    assert load_error(conversation, "dialogue", count_tokens=words, max_answer_tokens=4) == (
        f"{conversation}:1: answer of turn 2 is 6 tokens, over the limit of 4 (max_answer_tokens)"
    )


def test_empty_dataset_is_an_error_even_when_skipping(folder):
    empty = folder / "empty.jsonl"
    empty.write_text("\n\n")
    assert load_error(empty) == f"{empty}: no usable records (empty dataset)"
    assert load_error(empty, skip_bad=True) == f"{empty}: no usable records (empty dataset)"
    all_bad = write_lines(folder / "bad.jsonl", ["{oops", {"image": "img/a.png"}])
    message = load_error(all_bad, skip_bad=True)
    assert message.startswith(f"{all_bad}: no usable records (empty dataset); all 2 entries were skipped")
    assert f"{all_bad}:1: malformed JSON" in message


def test_missing_data_file_and_unknown_type(folder):
    assert load_error(folder / "nope.jsonl") == f"{folder / 'nope.jsonl'}: data file does not exist"
    csv = folder / "train.csv"
    csv.write_text("image,answer\n")
    assert "unsupported data file type '.csv'" in load_error(csv)
    with pytest.raises(ValueError, match="unknown task type"):
        load_records(csv, "vqa")


def test_malformed_json_file_cannot_be_skipped(folder):
    path = folder / "broken.json"
    path.write_text('[\n {"image": "img/a.png", "question": "q?", "answer": "x"},\n {"image": \n]\n')
    assert load_error(path, skip_bad=True).startswith(f"{path}:4: malformed JSON")


def with_broken_image(folder):
    """A data file whose line 1 names a good image and line 2 a corrupt PNG."""
    (folder / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return write_lines(folder / "train.jsonl", [
        {"image": "img/a.png", "question": "q?", "answer": "x"},
        {"image": "img/broken.png", "question": "q?", "answer": "x"},
    ])


def test_unreadable_image_names_file_and_line(folder):
    path = with_broken_image(folder)
    # Existence is checked at load; pixels when the item is first used, still naming file:line.
    records = load_records(path, "short_vqa").records
    ds = dataset(records)
    assert ds[0]["pixel_values"].shape == (3, SIZE, SIZE)
    with pytest.raises(DataError, match=rf"^{path}:2: unreadable image: .*broken.png is truncated or corrupt"):
        ds[1]
    # verify_images=True finds it at load, where it can be skipped.
    assert load_error(path, verify_images=True).startswith(f"{path}:2: unreadable image 'img/broken.png'")
    result = load_records(path, "short_vqa", verify_images=True, skip_bad=True)
    assert len(result.records) == 1 and result.skipped[0].startswith(f"{path}:2: unreadable image")


# ----------------------------------------------------------------------------- datasets


def _vqa_records(folder, n=20):
    return [
        Record(image=folder / "img" / ("a.png" if i % 2 else "b.png"), question=f"what is item {i}?", answer=f"answer {i}",
               task="short_vqa", source=f"mem:{i}")
        for i in range(n)
    ]


def test_items_are_reproducible_and_order_independent(folder):
    records = _vqa_records(folder)
    transform = TrainTransform(PROCESSOR)
    a = dataset(records, image_transform=transform, seed=3)
    b = dataset(records, image_transform=transform, seed=3)
    forward = [a[i] for i in range(len(records))]
    backward = [b[i] for i in reversed(range(len(records)))][::-1]
    for x, y in zip(forward, backward):
        assert x["prompt"] == y["prompt"] and x["qformer_text"] == y["qformer_text"]
        assert torch.equal(x["pixel_values"], y["pixel_values"])
    assert len({x["prompt"].replace(r.question, "{q}") for x, r in zip(forward, records)}) > 5  # several templates
    assert all(x["qformer_text"] == x["prompt"] for x in forward)  # single turn: both read the instruction
    c = dataset(records, image_transform=transform, seed=4)
    assert [c.texts(i)["prompt"] for i in range(20)] != [x["prompt"] for x in forward]


def test_set_epoch_redraws_templates_and_crops(folder):
    records = _vqa_records(folder)
    ds = dataset(records, image_transform=TrainTransform(PROCESSOR))
    first = [ds[i] for i in range(len(records))]
    ds.set_epoch(1)
    second = [ds[i] for i in range(len(records))]
    assert [x["prompt"] for x in first] != [x["prompt"] for x in second]
    assert not all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(first, second))
    ds.set_epoch(0)
    assert all(torch.equal(x["pixel_values"], ds[i]["pixel_values"]) for i, x in enumerate(first))


def test_item_contents_and_eval_pixels(folder):
    records = _vqa_records(folder, 2)
    item = dataset(records)[1]
    assert set(item) == {"pixel_values", "prompt", "qformer_text", "answer", "negative", "regions", "source"}
    assert item["negative"] is None  # a VQA record has no negative captions
    assert item["answer"] == "answer 1" and item["source"] == "mem:1"
    expected = PROCESSOR.pixel_values(PIL.Image.open(folder / "img" / "a.png").convert("RGB"))
    assert torch.equal(item["pixel_values"], expected)


def test_prompt_styles(folder):
    records = _vqa_records(folder, 3)
    tagged = dataset(records, prompt_style="task_tag").texts(2)
    assert tagged["prompt"] == "[short_vqa] what is item 2?" and tagged["qformer_text"] == tagged["prompt"]
    raw = dataset(records, prompt_style="none").texts(2)
    assert raw["prompt"] == "what is item 2?"
    with pytest.raises(ValueError, match="unknown prompt_style"):
        dataset(records, prompt_style="plain")


def test_instruction_blind_qformer_text(folder):
    records = _vqa_records(folder, 3)
    aware, blind = dataset(records).texts(2), dataset(records, qformer_instruction=False).texts(2)
    assert aware["qformer_text"] == aware["prompt"] and blind["qformer_text"] == ""
    assert blind["prompt"] == aware["prompt"]  # the LLM still reads the instruction


def test_history_is_trimmed_to_the_prompt_budget(folder):
    record = Record(image=folder / "img" / "a.png", instruction="last?", question="last?", answer="x", task="dialogue",
                    history=[("first question here", "first answer"), ("second?", "yes")], source="mem:0")
    words = lambda text: len(text.split())  # noqa: E731
    texts = dataset([record], count_tokens=words, max_prompt_tokens=8).texts(0)
    assert texts["prompt"] == "Question: second? Answer: yes Question: last? Answer:"
    custom = PromptTemplate(turn="USER: {question} BOT: {answer}", current="USER: {question} BOT:")
    assert dataset([record], template=custom).texts(0)["prompt"].startswith("USER: first question here BOT: first answer")


# ----------------------------------------------------------------------------- augmentation


def test_train_transform_is_deterministic_given_a_generator(folder):
    image = PIL.Image.open(folder / "img" / "a.png").convert("RGB")
    transform = TrainTransform(PROCESSOR)
    x = transform(image, torch.Generator().manual_seed(5))
    y = transform(image, torch.Generator().manual_seed(5))
    z = transform(image, torch.Generator().manual_seed(6))
    assert x.shape == (3, SIZE, SIZE) and torch.equal(x, y) and not torch.equal(x, z)


def test_crop_boxes_respect_scale_and_ratio():
    transform = TrainTransform(PROCESSOR)
    generator = torch.Generator().manual_seed(0)
    areas = []
    for _ in range(500):
        left, top, right, bottom = transform.crop_box(400, 300, generator)
        w, h = right - left, bottom - top
        assert 0 <= left and 0 <= top and right <= 400 and bottom <= 300
        areas.append(w * h / (400 * 300))
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    assert 0.5 - 0.01 <= min(areas) and max(areas) <= 1.0
    assert max(areas) - min(areas) > 0.3  # the whole range is used
    # An extreme panorama cannot fit the ratio range: the centred fallback keeps the ratio bound.
    left, top, right, bottom = transform.crop_box(1000, 10, torch.Generator().manual_seed(0))
    assert (right - left, bottom - top) == (13, 10) and left == (1000 - 13) // 2


def test_flip_is_off_by_default_and_works_when_on(folder):
    image = PIL.Image.open(folder / "img" / "a.png").convert("RGB")  # 40 x 30, aspect 4/3
    full = {"scale": (1.0, 1.0), "ratio": (4 / 3, 4 / 3)}  # the crop is the whole image
    plain = PROCESSOR.pixel_values(image)
    mirrored = PROCESSOR.pixel_values(image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT))
    no_flip = TrainTransform(PROCESSOR, **full)
    assert not no_flip.horizontal_flip
    assert all(torch.equal(no_flip(image, torch.Generator().manual_seed(s)), plain) for s in range(20))
    flip = TrainTransform(PROCESSOR, horizontal_flip=True, **full)
    outputs = [flip(image, torch.Generator().manual_seed(s)) for s in range(20)]
    assert any(torch.equal(o, mirrored) for o in outputs) and any(torch.equal(o, plain) for o in outputs)


def test_eval_transform_is_the_processor():
    image = PIL.Image.new("RGB", (50, 20), (10, 120, 240))
    assert EvalTransform(PROCESSOR).deterministic and not TrainTransform(PROCESSOR).deterministic
    assert torch.equal(EvalTransform(PROCESSOR)(image), PROCESSOR.pixel_values(image))


# ----------------------------------------------------------------------------- feature cache


class CountingEncoder(torch.nn.Module):
    """A real (small) conv encoder that counts how many images it encoded."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=7, stride=7)
        self.encoded = 0

    def forward(self, pixel_values):  # (B, 3, 28, 28) -> (B, 16, 8)
        self.encoded += pixel_values.shape[0]
        return self.conv(pixel_values).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("on_disk", [False, True])
def test_feature_cache_returns_the_encoder_output(tmp_path, on_disk):
    torch.manual_seed(0)
    encoder = CountingEncoder()
    pixels = torch.randn(3, 3, SIZE, SIZE)
    cache = ImageFeatureCache(tmp_path / "cache" if on_disk else None, namespace="tiny")
    first = cache.get_or_compute(pixels, encoder)
    torch.testing.assert_close(first, encoder(pixels), rtol=0, atol=0)
    encoder.encoded = 0
    batch = torch.stack([pixels[2], torch.randn(3, SIZE, SIZE), pixels[0]])
    second = cache.get_or_compute(batch, encoder)
    assert encoder.encoded == 1 and (cache.hits, cache.misses) == (2, 4) and len(cache) == 4
    torch.testing.assert_close(second, encoder(batch), rtol=0, atol=0)
    if on_disk:  # a later run reads the same files
        again = ImageFeatureCache(tmp_path / "cache", namespace="tiny")
        encoder.encoded = 0
        torch.testing.assert_close(again.get_or_compute(pixels, encoder), first, rtol=0, atol=0)
        assert encoder.encoded == 0
        assert not list((tmp_path / "cache").rglob("*.tmp"))
        other_model = ImageFeatureCache(tmp_path / "cache", namespace="other")
        other_model.get_or_compute(pixels, encoder)
        assert encoder.encoded == 3  # another namespace never reuses entries


@dataclasses.dataclass
class CountingTransform(EvalTransform):
    """The evaluation transform, counting the images it made (left out of repr, hence of cache keys)."""

    made: list = dataclasses.field(default_factory=list, repr=False, compare=False)

    def __call__(self, image, generator=None):
        self.made.append(image.size)
        return super().__call__(image, generator)


def test_deferred_images_are_decoded_only_when_their_features_are_not_cached(folder, tmp_path):
    records = _vqa_records(folder, 4)  # b, a, b, a
    transform = CountingTransform(PROCESSOR)
    deferred = dataset(records, image_transform=transform, defer_images=True)
    plain = dataset(records, image_transform=EvalTransform(PROCESSOR))
    items = [deferred[i] for i in range(4)]
    assert all(isinstance(it["pixel_values"], DeferredImage) for it in items) and transform.made == []
    assert items[0]["pixel_values"].key == items[2]["pixel_values"].key != items[1]["pixel_values"].key
    torch.testing.assert_close(items[1]["pixel_values"].pixel_values(), plain[1]["pixel_values"], rtol=0, atol=0)
    transform.made.clear()

    torch.manual_seed(0)
    encoder = CountingEncoder()
    pixels = torch.stack([plain[i]["pixel_values"] for i in range(4)])
    cache = ImageFeatureCache(tmp_path / "cache", namespace="tiny")
    embeds = cache.get_or_compute(stack_pixels(items), encoder)
    torch.testing.assert_close(embeds, encoder(pixels), rtol=0, atol=0)
    assert len(transform.made) == 2 and (cache.misses, cache.hits) == (2, 2)  # each distinct image decoded once
    again = ImageFeatureCache(tmp_path / "cache", namespace="tiny")  # a later stage, same folder
    torch.testing.assert_close(again.get_or_compute(stack_pixels(items), encoder), embeds, rtol=0, atol=0)
    assert len(transform.made) == 2 and again.misses == 0

    # The key follows the file's bytes: a changed picture is a miss with its own features.
    make_png(folder / "img" / "a.png", (10, 10, 250))
    changed = deferred[1]["pixel_values"]
    assert changed.key != items[1]["pixel_values"].key
    fresh = again.get_or_compute([changed], encoder)
    assert len(transform.made) == 3
    torch.testing.assert_close(fresh[0], encoder(plain[1]["pixel_values"][None])[0], rtol=0, atol=0)
    # ... and so do the transform's settings.
    other_size = dataset(records, image_transform=EvalTransform(ImageProcessor(size=(14, 14))), defer_images=True)
    assert other_size[1]["pixel_values"].key != changed.key


def test_deferred_images_keep_the_errors_of_decoded_ones(folder):
    path = with_broken_image(folder)
    records = load_records(path, "short_vqa").records
    ds = dataset(records, defer_images=True)
    with pytest.raises(DataError, match=rf"^{path}:2: unreadable image: .*broken.png is truncated or corrupt"):
        ds[1]["pixel_values"].pixel_values()
    (folder / "img" / "a.png").unlink()  # gone after loading
    with pytest.raises(DataError, match=rf"^{path}:1: unreadable image: .*a.png"):
        ds[0]
    with pytest.raises(ValueError, match="defer_images needs a deterministic image transform"):
        dataset(records, image_transform=TrainTransform(PROCESSOR), defer_images=True)
    with pytest.raises(ValueError, match="mixes decoded and deferred images"):
        stack_pixels([{"pixel_values": torch.zeros(3, SIZE, SIZE), "source": "x"},
                      {"pixel_values": ds[1]["pixel_values"], "source": "y"}])


def test_deferred_video_clips_stack_their_frames(folder, tmp_path):
    path = write_lines(folder / "video.jsonl", [
        {"images": [f"clip/{i}.png" for i in range(4)], "question": "What changes?", "answer": "the colour"},
    ])
    (record,) = load_records(path, "video_qa").records
    clip = dataset([record], defer_images=True)[0]["pixel_values"]
    assert clip.is_video and torch.equal(clip.pixel_values(), dataset([record])[0]["pixel_values"])  # (4, 3, S, S)
    cache = ImageFeatureCache()
    embeds = cache.get_or_compute([clip], lambda p: p.flatten(2))  # (1, 4, 3*S*S): all frames reach the encoder
    assert torch.equal(embeds, clip.pixel_values().flatten(1)[None])


def test_a_folder_cache_keeps_recent_entries_in_memory_within_its_bound(tmp_path):
    torch.manual_seed(0)
    encoder = CountingEncoder()
    pixels = torch.randn(4, 3, SIZE, SIZE)
    entry_bytes = 16 * 8 * 4  # one (16, 8) float32 entry
    cache = ImageFeatureCache(tmp_path / "cache", namespace="tiny", memory_bytes=2 * entry_bytes)
    first = cache.get_or_compute(pixels, encoder)
    assert len(cache._memory) == 2 and cache._memory_used == 2 * entry_bytes  # the two most recent
    for file in (tmp_path / "cache").rglob("*.safetensors"):
        file.unlink()  # what is in memory is still served; the rest has to be encoded again
    encoder.encoded = 0
    torch.testing.assert_close(cache.get_or_compute(pixels[2:], encoder), first[2:], rtol=0, atol=0)
    assert encoder.encoded == 0
    torch.testing.assert_close(cache.get_or_compute(pixels[:2], encoder), first[:2], rtol=0, atol=0)
    assert encoder.encoded == 2


def test_feature_cache_with_the_real_vision_encoder(tiny_checkpoints, folder):
    from instructblip_core import load_pretrained

    model = load_pretrained(tiny_checkpoints("instructblip-opt"))
    records = _vqa_records(folder, 4)
    ds = dataset(records, image_transform=EvalTransform(model.processor.image_processor))
    pixels = torch.stack([ds[i]["pixel_values"] for i in range(4)])  # two distinct images, twice each
    cache = ImageFeatureCache()
    with torch.no_grad():
        embeds = cache.get_or_compute(pixels, model.model.encode_images)
        torch.testing.assert_close(embeds, model.model.encode_images(pixels))
    assert len(cache) == 2 and cache.misses == 2 and cache.hits == 2

