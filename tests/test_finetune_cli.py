"""The command lines: `python -m finetune.train` from YAML to an export that answers, config
errors with file:line, bad data with file:line (or counted skips), `finetune.evaluate`."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from finetune import evaluate, train
from finetune.config import TrainConfig, load_config
from finetune_fixtures import one_thread  # noqa: F401 (a fixture)
from finetune_fixtures import INSTRUCTION, REPO, TRAIN_SIZES, WORDS, write_config, write_word_dataset
from instructblip_core import load_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")


def base_fields(checkpoint, data, out, **extra) -> dict:
    fields = dict(
        model=str(checkpoint), output_dir=str(out), train_data=[{"path": str(data), "task": "short_vqa"}], max_steps=2,
        per_device_batch_size=4, save_every=0, progress_bar=False, tensorboard=False, export=False,
    )  # fmt: skip
    fields.update(extra)
    return fields


# ---- the whole path, as a user runs it ----------------------------------------------------------


def test_train_from_yaml_exports_a_model_that_answers(tiny_checkpoints, tmp_path, capsys):
    """`main(argv)` is what `python -m finetune.train` runs (test_resume runs it as a subprocess)."""
    data = write_word_dataset(tmp_path / "data")
    config = write_config(
        tmp_path / "run.yaml",
        **base_fields(tiny_checkpoints("instructblip-llama", **TRAIN_SIZES), data, tmp_path / "run", max_steps=100,
                      per_device_batch_size=16, lr=1e-2, warmup_steps=10, max_grad_norm=0.0, qformer_dropout=0.0,
                      log_every=20, save_every=50, export=True, tensorboard=True, progress_bar=True,
                      eval_data=[{"path": str(data), "task": "short_vqa", "name": "seen"}]),
    )  # fmt: skip
    assert train.main([str(config)]) == 0
    done = capsys.readouterr()
    assert re.search(r"\ntrain\s+16\s+1\.0000", done.out)  # the mixture table
    assert "train: 100%" in done.err  # tqdm
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))

    export = tmp_path / "run" / "export"
    model = load_pretrained(export)
    images = [Image.open(data.parent / f"img/{i}.png") for i in range(16)]
    answers = model.generate(images, [INSTRUCTION] * 16, max_new_tokens=5)
    right = sum(a == w for a, w in zip(answers, WORDS))
    print(f"exported model answers {right}/16 training questions right: {answers}")
    assert right >= 15
    assert json.loads((export / "config.json").read_text())["prompt_template"]["current"] == "Question: {question} Answer:"

    # The chat command line answers from the export too.
    from instructblip_core import cli

    assert cli.main(["--model", str(export), "--image", str(data.parent / "img/3.png"), INSTRUCTION]) == 0

    # finetune.evaluate on the same files, with a predictions file.
    predictions = tmp_path / "predictions.jsonl"
    code = evaluate.main(["--model", str(export), "--data", str(data), "--task", "short_vqa", "--name", "seen",
                          "--predictions", str(predictions)])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 16 and sum(r["prediction"] == r["answer"] for r in rows) >= 15
    # Vocabulary ranking among 3 of the learnt words picks the right one.
    choices = write_choices(data.parent, 16, lambda i: [WORDS[(i + 1) % 16], WORDS[i], WORDS[(i + 2) % 16]])
    assert evaluate.main(["--model", str(export), "--data", str(choices), "--task", "multiple_choice"]) == 0
    accuracy = float(re.search(r"eval/choices/ranking_accuracy = ([\d.]+)", capsys.readouterr().out).group(1))
    assert accuracy >= 15 / 16


def write_choices(folder: Path, n: int, options_of) -> Path:
    """Multiple-choice records with the training instruction: {image, instruction, options, answer}."""
    path = folder / "choices.jsonl"
    path.write_text("".join(
        json.dumps({"image": f"img/{i}.png", "instruction": INSTRUCTION, "options": options_of(i), "answer": options_of(i)[1]}) + "\n"
        for i in range(n)
    ))  # fmt: skip
    return path


def test_ranking_picks_the_option_the_lm_loss_likes_best(tiny_checkpoints, tmp_path):
    """Encoder-decoder ranking (encoder run once) against teacher-forced LM losses, option by option."""
    from instructblip_core.collate import InstructionCollator

    folder = tmp_path / "data"
    write_word_dataset(folder, 4)
    choices = write_choices(folder, 4, lambda i: ["red", "dog", "star"])
    predictions = tmp_path / "ranked.jsonl"
    checkpoint = tiny_checkpoints("instructblip-t5")
    assert evaluate.main(["--model", str(checkpoint), "--data", str(choices), "--task", "multiple_choice",
                          "--predictions", str(predictions)]) == 0  # fmt: skip
    model = load_pretrained(checkpoint)
    collate = InstructionCollator(model.processor)
    for i, row in enumerate(json.loads(line) for line in predictions.read_text().splitlines()):
        pixels = model.processor.image_processor.pixel_values(Image.open(folder / f"img/{i}.png").convert("RGB"))
        log_likelihoods = []
        for option in ["red", "dog", "star"]:
            batch = collate([{"pixel_values": pixels, "prompt": row["prompt"], "qformer_text": row["prompt"], "answer": option, "source": "t"}])
            tokens = (batch["labels"] != -100).sum().item()
            log_likelihoods.append(-model.model(**batch).loss.item() * tokens)
        assert row["prediction"] == ["red", "dog", "star"][max(range(3), key=log_likelihoods.__getitem__)]


def test_evaluate_captions_with_cider(tiny_checkpoints, tmp_path, capsys):
    folder = tmp_path / "data"
    write_word_dataset(folder, 3)
    captions = folder / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image": f"img/{i}.png", "caption": [f"a {WORDS[i]} picture", f"one {WORDS[i]}"]}) + "\n" for i in range(3)))
    predictions = tmp_path / "captions_out.jsonl"
    assert evaluate.main(["--model", str(tiny_checkpoints("instructblip-opt")), "--data", str(captions), "--task", "caption",
                          "--max-new-tokens", "5", "--predictions", str(predictions)]) == 0  # fmt: skip
    assert re.search(r"eval/captions/cider = \d+\.\d{4}\n", capsys.readouterr().out)
    assert len(predictions.read_text().splitlines()) == 6  # two caption records per image, one generation each


# ---- config mistakes ------------------------------------------------------------------------------


def train_error(argv, capsys) -> str:
    assert train.main(argv) == 2
    return capsys.readouterr().err


def test_unknown_key_names_line_and_suggests(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntrain_data: []\nlearning_rate: 1e-4\n")
    assert f"error: {path}:3: unknown key 'learning_rate'" in train_error([str(path)], capsys)
    path.write_text("model: m\ntrain_data: [{path: a.jsonl, task: caption}]\nlora_rank: 4\n")
    assert "did you mean 'lora_r'?" in train_error([str(path)], capsys)


def test_wrong_types_and_values_name_file_line_and_key(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntrain_data: [{path: a.jsonl, task: caption}]\n\nlr: fast\n")
    assert f"{path}:4: lr: expected a number, got 'fast'" in train_error([str(path)], capsys)
    path.write_text("model: m\ntrain_data: [{path: a.jsonl, task: caption}]\nstage: stage3\n")
    assert f"{path}:3: stage: expected one of 'instruct', 'stage2', 'stage1', 'grounding', got 'stage3'" in train_error([str(path)], capsys)
    path.write_text("model: m\ntrain_data: [{path: a.jsonl}]\n")
    assert f"{path}:2: train_data[0]: missing required key(s) ['task']" in train_error([str(path)], capsys)
    path.write_text("model: m\ntrain_data: [{path: a.jsonl, task: caption}]\nmax_steps: 0\n")
    assert f"{path}:3: max_steps: must be >= 1" in train_error([str(path)], capsys)
    path.write_text("model: m\ntrain_data: [{path: a.jsonl, task: caption}]\nlora: [1\n")
    assert f"{path}:3: not valid YAML" in train_error([str(path)], capsys)


def test_overrides_are_typed_and_win(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntrain_data: [{path: a.jsonl, task: caption}]\nlr: 1.0e-5\n")
    config = load_config(path, ["--lr=3e-4", "--lora=true", "--lora_target_modules=[q,v]", "--max-steps=7"])
    assert (config.lr, config.lora, config.lora_target_modules, config.max_steps) == (3e-4, True, ["q", "v"], 7)
    assert "override '--lora=yes please': lora: expected true or false" in train_error([str(path), "--lora=yes please"], capsys)
    assert "override 'lr=1' must look like --key=value" in train_error([str(path), "lr=1"], capsys)
    assert "command-line override '--lr_max=1': unknown key 'lr_max'" in train_error([str(path), "--lr_max=1"], capsys)


def test_every_option_is_documented_and_every_example_loads():
    readme = (REPO / "finetune" / "README.md").read_text()
    from dataclasses import fields

    from finetune.config import DataConfig, EvalDataConfig

    for cls in (TrainConfig, DataConfig, EvalDataConfig):
        undocumented = [f.name for f in fields(cls) if f"`{f.name}`" not in readme]
        assert not undocumented, f"{cls.__name__} fields missing from finetune/README.md: {undocumented}"
    examples = sorted((REPO / "finetune" / "examples").glob("*.yaml"))
    assert len(examples) >= 5
    for example in examples:
        load_config(example)


# ---- bad data through the command line --------------------------------------------------------------


@pytest.fixture(scope="module")
def small_checkpoint(tiny_checkpoints):
    return tiny_checkpoints("instructblip-opt")


def write_lines(folder: Path, lines: list) -> Path:
    """A data file with 3 good records around the given lines (dicts or raw strings), images included."""
    write_word_dataset(folder, 4)
    good = {"image": "img/0.png", "question": "what is it?", "answer": "red"}
    rows = [good, good, *lines, good]
    path = folder / "data.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


BAD_LINES = {
    "malformed JSON": ('{"image": "img/1.png", "question": "what?" "answer": "x"}', r"data.jsonl:3: malformed JSON"),
    "missing field": ({"image": "img/1.png", "question": "what?"}, r"data.jsonl:3: missing field 'answer'"),
    "missing image": ({"image": "img/99.png", "question": "what?", "answer": "x"}, r"data.jsonl:3: image file 'img/99.png' does not exist"),
    "answer too long": ({"image": "img/1.png", "question": "what?", "answer": "one two three four five six seven"},
                        r"data.jsonl:3: answer is \d+ tokens, over the limit of 4 \(max_answer_tokens\)"),
    "image outside the folder": ({"image": "../elsewhere.png", "question": "what?", "answer": "x"}, r"data.jsonl:3: image path '../elsewhere.png' leads outside"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_data_errors_name_file_and_line(case, small_checkpoint, tmp_path, capsys):
    line, expected = BAD_LINES[case]
    data = write_lines(tmp_path / "data", [line])
    config = write_config(tmp_path / "run.yaml", **base_fields(small_checkpoint, data, tmp_path / "run", max_answer_tokens=4))
    err = train_error([str(config)], capsys)
    assert re.search(r"error: .*" + expected, err), err
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training


def test_bad_lines_are_skipped_and_counted_when_asked(small_checkpoint, tmp_path, capsys):
    data = write_lines(tmp_path / "data", [line for line, _ in BAD_LINES.values()])
    fields = base_fields(small_checkpoint, data, tmp_path / "run", max_answer_tokens=4)
    fields["train_data"][0]["skip_bad"] = True
    assert train.main([str(write_config(tmp_path / "run.yaml", **fields))]) == 0
    out = capsys.readouterr().out
    assert f"data: skipped 5 bad line(s) of {data}, e.g. {data}:3: malformed JSON" in out
    assert re.search(r"\ndata\s+3\s+1\.0000", out)  # the mixture table: the 3 good records remain


def test_unreadable_image_is_an_error_at_load_or_at_first_use(small_checkpoint, tmp_path, capsys):
    data = write_lines(tmp_path / "data", [{"image": "img/broken.png", "question": "what?", "answer": "x"}])
    (data.parent / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # a truncated PNG
    checked = write_config(tmp_path / "a.yaml", **base_fields(small_checkpoint, data, tmp_path / "a", verify_images=True))
    assert re.search(r"data.jsonl:3: unreadable image 'img/broken.png'", train_error([str(checked)], capsys))
    # Without verify_images the image is decoded when first drawn: still file:line, never a silent drop.
    lazy = write_config(tmp_path / "b.yaml", **base_fields(small_checkpoint, data, tmp_path / "b", max_steps=20))
    assert re.search(r"data.jsonl:3: unreadable image", train_error([str(lazy)], capsys))


def test_empty_dataset_is_an_error(small_checkpoint, tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n")
    config = write_config(tmp_path / "run.yaml", **base_fields(small_checkpoint, data, tmp_path / "run"))
    assert f"error: {data}: no usable records (empty dataset)" in train_error([str(config)], capsys)


def test_help_and_missing_config(capsys, tmp_path):
    assert train.main(["--help"]) == 0 and "python -m finetune.train CONFIG.yaml" in capsys.readouterr().out
    assert f"{tmp_path}/nope.yaml: config file does not exist" in train_error([str(tmp_path / "nope.yaml")], capsys)
