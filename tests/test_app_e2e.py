"""End to end: the real app.py on localhost, driven by gradio_client like any API user.

The conversation is checked against what a ChatSession in this process answers for the same
image, questions and greedy settings: so the app answers about the right image with the right
history. It runs on the shipped small model in assets/ (without it, on a tiny random
checkpoint, whose answers are gibberish but deterministic, so the tests of right answers fail
there). The answers must also be right for the picture: the conversation and the examples
gallery ask what that model answers reliably (`python -m finetune.nano.competence`; README,
"The shipped small model").
"""

import json
import time

import pytest
from PIL import Image

from app import DEFAULT_MODEL, ENV_VARS, AppSettings, load_model, main, parse_args, quantization
from app_helpers import (APP_MODEL_SIZES, EXAMPLES, GREEDY, SHIPPED_MODEL, answers, app_for, ask, cpu_seconds,
                         direct_answers, notices, pictures, questions, stopped)
from instructblip_core import load_pretrained

CIRCLE = EXAMPLES / "red_circle.png"  # one large red circle
CIRCLE_AND_SQUARE = EXAMPLES / "red_circle_blue_square.png"
STARS = EXAMPLES / "three_yellow_stars.png"
# (question, image or None for the sticky one, words of which one is right). The shipped model
# answers the colour and size of a lone object, and counts one to three objects, about every
# time; since the eighth build (grounding) it also names one object's colour among two or three
# in 87-97% of fresh scenes (README), so the conversation asks that once too. Size comes first:
# asked after the colour, the eleventh and twelfth builds call this circle "small" (in 3 of 60
# fresh one-object scenes the eleventh misses a turn of size, colour, number of objects; the
# tenth build in 6).
CONVERSATION = [
    ("What size is the circle?", CIRCLE, ["large"]),
    ("What colour is the circle?", None, ["red"]),
    ("How many objects are there?", None, ["1", "one"]),
    ("What colour is the square?", CIRCLE_AND_SQUARE, ["blue"]),  # the one object named, beside a red circle
    ("How many objects are there?", STARS, ["3", "three"]),  # the same question, now about the stars
]


def is_right(answer: str, right_words: list[str]) -> bool:
    """Any right word among the answer's words (case and a final full stop ignored)."""
    return any(word in answer.lower().rstrip(".").split() for word in right_words)


@pytest.fixture(scope="module")
def app_and_model(tiny_checkpoints):
    """(server, model) on the shipped model when it exists (started as plain `python app.py`), else tiny."""
    if SHIPPED_MODEL.is_dir():
        return app_for(None), load_pretrained(SHIPPED_MODEL)
    folder = tiny_checkpoints("instructblip-llama", **APP_MODEL_SIZES)
    return app_for(folder), load_pretrained(folder)


@pytest.fixture(scope="module")
def slow_app_and_model(tiny_checkpoints):
    """(server, model) on a tiny model with a long context that decodes for seconds: Stop and a
    leaving client need an answer still running when they act. The shipped nano model's context
    (256 tokens) ends any answer within about a second."""
    folder = tiny_checkpoints("instructblip-llama", **APP_MODEL_SIZES)
    return app_for(folder), load_pretrained(folder)


def test_three_turns_about_an_image_then_new_images(app_and_model):
    server, model = app_and_model
    client = server.client()
    expected = direct_answers(model, [(q, image) for q, image, _ in CONVERSATION])

    replies, current = [], None
    for question, image, _ in CONVERSATION:
        current = image or current
        conversation, _, look, status = ask(client, question, image)
        replies.append(answers(conversation)[-1])
        assert status.startswith("Answered after"), status
        with Image.open(look["value"]) as heat:  # the "where did it look?" picture, as PNG
            assert heat.format == "PNG" and heat.size == Image.open(current).size
        assert question in look["label"]

    assert replies == expected
    assert questions(conversation) == [q for q, _, _ in CONVERSATION]
    assert pictures(conversation) == [CIRCLE.name, CIRCLE_AND_SQUARE.name, STARS.name]
    # the earlier turns are not used for a new picture
    assert notices(conversation) == ["Note: New image", "Note: New image"]
    wrong = [(q, reply) for (q, _, right), reply in zip(CONVERSATION, replies) if not is_right(reply, right)]
    assert not wrong, f"wrong for the picture (on {model.source}): {wrong}"


def test_every_gallery_example_is_answered_right(app_and_model):
    """A user who clicks an example gets a right answer: the gallery shows what the model can do."""
    server, _ = app_and_model
    client = server.client()
    examples = json.loads((EXAMPLES / "examples.json").read_text(encoding="utf-8"))
    assert len(examples) >= 6
    replies = [answers(ask(client, e["question"], EXAMPLES / e["image"])[0])[-1] for e in examples]
    wrong = [(e["image"], e["question"], r) for e, r in zip(examples, replies) if not is_right(r, e["expect"])]
    assert not wrong, f"gallery examples answered wrong: {wrong}"


def test_stop_ends_the_generation_compute_not_just_the_stream(slow_app_and_model):
    server, model = slow_app_and_model
    client = server.client()
    ask(client, "What colour is the circle?", CIRCLE_AND_SQUARE)
    longest = dict(max_new_tokens=450, min_new_tokens=450)  # ~7 s of decoding on 2 cores if not stopped
    job = client.submit({"text": "Describe the image in detail.", "files": []}, api_name="/chat",
                        **{**GREEDY, **longest})
    wait_for_streamed_text(job, turns=2)
    pressed = time.monotonic()
    assert client.predict(api_name="/stop") == "Stopping…"
    conversation, _, _, status = job.result(timeout=30)
    ended = time.monotonic() - pressed
    before = cpu_seconds(server.pid)
    time.sleep(1.0)
    busy = cpu_seconds(server.pid) - before

    assert status.startswith("Stopped after"), status
    assert stopped(conversation) == [False, True]
    assert ended < 4.0, f"the answer went on for {ended:.1f} s after Stop (unstopped it would take ~7 s)"
    assert busy < 0.3, f"the server used {busy:.2f} s of CPU in the second after Stop: decoding went on"
    shown_tokens = len(model.processor.tokenizer(answers(conversation)[-1]).input_ids)
    assert shown_tokens < longest["max_new_tokens"] // 2

    # The stopped answer stays on screen but is not history for the next question.
    conversation, _, _, _ = ask(client, "What colour is the square?")
    assert answers(conversation)[-1] == direct_answers(
        model, [("What colour is the circle?", CIRCLE_AND_SQUARE), ("What colour is the square?", None)])[-1]


def test_a_client_that_leaves_mid_answer_does_not_keep_the_machine_busy(slow_app_and_model):
    """A closed tab cancels its event; the decoding loop must end with it (the peers' demos kept generating)."""
    server, _ = slow_app_and_model
    client = server.client()
    ask(client, "What colour is the circle?", CIRCLE_AND_SQUARE)
    job = client.submit({"text": "Describe the image in detail.", "files": []}, api_name="/chat",
                        **{**GREEDY, "max_new_tokens": 450, "min_new_tokens": 450})
    wait_for_streamed_text(job, turns=2)
    job.cancel()
    time.sleep(0.5)
    before = cpu_seconds(server.pid)
    time.sleep(1.0)
    busy = cpu_seconds(server.pid) - before
    assert busy < 0.3, f"the server used {busy:.2f} s of CPU in the second after the client left: decoding went on"
    conversation, _, _, _ = ask(client, "What colour is the square?")  # the session is free again
    assert stopped(conversation)[-2:] == [True, False]


def wait_for_streamed_text(job, turns: int, timeout: float = 60) -> None:
    """Until the answer of turn `turns` has shown some text (it is still being written)."""
    deadline = time.monotonic() + timeout
    while not any(len(answers(out[0])) == turns and answers(out[0])[-1] for out in job.outputs()):
        assert time.monotonic() < deadline and not job.done(), "no streamed text arrived"
        time.sleep(0.02)


def test_retry_undo_edit_and_clear(app_and_model):
    server, model = app_and_model
    client = server.client()
    first, second = "What colour is the circle?", "How many shapes are there?"
    expected = direct_answers(model, [(first, CIRCLE_AND_SQUARE), (second, None)])
    ask(client, first, CIRCLE_AND_SQUARE)
    ask(client, second)

    conversation, _, _, status = client.predict(api_name="/retry", **GREEDY)
    assert answers(conversation) == expected and status.startswith("Answered")

    conversation, _ = client.predict(api_name="/undo")
    assert questions(conversation) == [first] and answers(conversation) == expected[:1]

    conversation, box = client.predict(api_name="/edit")
    assert questions(conversation) == [] and box["text"] == first
    assert pictures(conversation) == [CIRCLE_AND_SQUARE.name]  # the image stays for the edited question

    conversation, _, _, _ = ask(client, box["text"])
    assert answers(conversation) == expected[:1]

    conversation, _, _, status = client.predict(api_name="/clear")
    assert conversation == [] and status == ""
    with pytest.raises(Exception, match="There is no image yet"):
        ask(client, first)


def test_a_missing_model_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match=r"cannot load model .*missing"):
        load_model(AppSettings(model=str(tmp_path / "missing")))
    if not DEFAULT_MODEL.is_dir():  # plain `python app.py` in a checkout without the shipped model
        with pytest.raises(SystemExit, match="no model at assets/nano-instructblip; pass --model"):
            main([])


def test_quantizing_fp32_modules_in_8bit_is_a_one_line_error():
    with pytest.raises(SystemExit, match="quantize_fp32_modules needs load_in_4bit"):
        load_model(AppSettings(load_in_8bit=True, quantize_fp32_modules=True))
    # The page header and the start-up log say which layers are quantised.
    assert quantization(AppSettings(load_in_4bit=True, quantize_fp32_modules=True)) == "4-bit (fp32-kept layers too)"
    assert (quantization(AppSettings(load_in_8bit=True)), quantization(AppSettings())) == ("8-bit", "")


def test_settings_come_from_flags_or_environment(monkeypatch):
    monkeypatch.setenv(ENV_VARS["model"], "Salesforce/instructblip-flan-t5-xl")
    monkeypatch.setenv(ENV_VARS["load_in_8bit"], "1")
    monkeypatch.setenv(ENV_VARS["port"], "7999")
    monkeypatch.setenv(ENV_VARS["concurrency_limit"], "4")
    monkeypatch.setenv(ENV_VARS["quantize_fp32_modules"], "1")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")  # what Spaces sets
    settings = parse_args([])
    assert (settings.model, settings.load_in_8bit, settings.port, settings.concurrency_limit, settings.host) == (
        "Salesforce/instructblip-flan-t5-xl", True, 7999, 4, "0.0.0.0")
    assert settings.quantize_fp32_modules
    flags = parse_args(["--model", "x/y", "--port", "8001", "--dtype", "bfloat16", "--host", "127.0.0.1"])
    assert (flags.model, flags.port, flags.dtype, flags.host) == ("x/y", 8001, "bfloat16", "127.0.0.1")
    with pytest.raises(SystemExit):
        parse_args(["--load-in-8bit", "--load-in-4bit"])
    monkeypatch.setenv(ENV_VARS["dtype"], "float64")
    with pytest.raises(SystemExit):
        parse_args([])
