"""ChatSession: sticky image, segments, history trimming, feature cache, isolation, undo/retry."""

import threading

import pytest

from engine_helpers import coloured, count_calls
from instructblip_core import ChatError, ChatSession, load_pretrained
from instructblip_core.features import FeatureCache
from instructblip_core.prompts import build_prompt

GREEDY = dict(max_new_tokens=8, min_new_tokens=8)


@pytest.fixture(scope="module")
def folder(tiny_checkpoints):
    return tiny_checkpoints("instructblip-llama")


@pytest.fixture()
def model(folder):
    return load_pretrained(folder)


def test_second_turn_skips_the_image_encoder_and_matches_uncached(model, folder):
    chat = ChatSession(model)
    image = coloured("red")
    chat.ask("what colour is it?", image=image, **GREEDY)
    with count_calls(model.model.vision_model) as calls:
        cached_answer = chat.ask("and the shape?", **GREEDY)
        chat.retry(**GREEDY)
    assert calls[0] == 0
    # The same conversation on a model without cache gives the same answer.
    uncached = load_pretrained(folder)
    uncached.feature_cache = FeatureCache(max_entries=0)
    fresh = ChatSession(uncached)
    fresh.ask("what colour is it?", image=image, **GREEDY)
    with count_calls(uncached.model.vision_model) as calls:
        assert fresh.ask("and the shape?", **GREEDY) == cached_answer
    assert calls[0] == 1


def test_sticky_image_and_prompt_with_history(model):
    chat = ChatSession(model)
    image = coloured("blue")
    first = chat.ask("what is it?", image=image, **GREEDY)
    second = chat.ask("where is it?", **GREEDY)
    prompt = build_prompt("where is it?", [("what is it?", first)])
    assert prompt.llm == f"Question: what is it? Answer: {first} Question: where is it? Answer:"
    # The follow-up saw the first image and the history, the Q-Former only the question.
    assert second == model.generate(image, prompt.llm, instructions="where is it?", **GREEDY)[0]


def test_new_image_starts_a_new_segment(model):
    chat = ChatSession(model)
    chat.ask("what is it?", image=coloured("red"), **GREEDY)
    chat.ask("and its colour?", **GREEDY)
    answer = chat.ask("what is it?", image=coloured("green"), **GREEDY)
    assert chat.notices and "New image" in chat.notices[0]
    assert [t.segment for t in chat.turns] == [0, 0, 1]
    assert chat.history() == [("what is it?", answer)]
    # The answer about the new image is what a fresh conversation about it gives: nothing leaked.
    assert answer == ChatSession(model).ask("what is it?", image=coloured("green"), **GREEDY)


def test_long_conversation_is_trimmed_never_errors(model):
    chat = ChatSession(model)
    chat.ask("hello", image=coloured("yellow"), **GREEDY)
    long_question = " ".join(["what is the colour of the big square on the left side of the picture?"] * 4)
    for _ in range(12):
        chat.ask(long_question, **GREEDY)
    last = chat.turns[-1]
    assert last.dropped_turns > 0
    assert any("left out to fit" in n for n in chat.notices)
    prompt = chat.prompt_for(long_question, GREEDY["max_new_tokens"])
    used = len(model.processor.encode_prompt(prompt.llm)) + model.config.num_query_tokens + GREEDY["max_new_tokens"]
    assert used <= model.context_length


def test_a_message_alone_longer_than_the_context_is_a_clear_error(model):
    chat = ChatSession(model)
    with pytest.raises(ChatError, match="context"):
        chat.ask("square " * 2000, image=coloured("red"), **GREEDY)


def test_two_sessions_never_see_each_other(model, folder):
    a, b = ChatSession(model), ChatSession(model)
    a_answers = [a.ask("what is it?", image=coloured("red"), **GREEDY)]
    b_answers = [b.ask("what is it?", image=coloured("blue"), **GREEDY)]
    a_answers.append(a.ask("is it big?", **GREEDY))
    b_answers.append(b.ask("is it small?", **GREEDY))
    assert [t.question for t in a.turns] == ["what is it?", "is it big?"]
    assert [t.question for t in b.turns] == ["what is it?", "is it small?"]
    assert a.image is not b.image
    # Same answers as each conversation alone on its own model.
    alone = load_pretrained(folder)
    solo_a = ChatSession(alone)
    assert [solo_a.ask("what is it?", image=coloured("red"), **GREEDY), solo_a.ask("is it big?", **GREEDY)] == a_answers
    solo_b = ChatSession(alone)
    assert [solo_b.ask("what is it?", image=coloured("blue"), **GREEDY), solo_b.ask("is it small?", **GREEDY)] == b_answers


def test_undo_retry_edit_reset(model):
    chat = ChatSession(model)
    first = chat.ask("what is it?", image=coloured("red"), **GREEDY)
    chat.ask("is it round?", **GREEDY)
    assert chat.undo().question == "is it round?"
    assert chat.history() == [("what is it?", first)]
    assert chat.retry(**GREEDY) == first  # greedy: same answer again
    assert len(chat.turns) == 1
    chat.edit_last("what colour is it?", **GREEDY)
    assert [t.question for t in chat.turns] == ["what colour is it?"]
    chat.reset()
    assert chat.turns == [] and chat.image is None
    with pytest.raises(ChatError, match="nothing to undo"):
        chat.undo()


def test_failed_retry_or_edit_keeps_the_turn(model):
    """A retry or edit that fails before answering (here: settings that no longer fit the
    context, an empty edit) leaves the transcript as it was, answer included."""
    chat = ChatSession(model)
    first = chat.ask("what is it?", image=coloured("red"), **GREEDY)
    with pytest.raises(ChatError, match="context"):
        chat.retry(**{**GREEDY, "max_new_tokens": model.context_length})
    assert [(t.question, t.answer) for t in chat.turns] == [("what is it?", first)]
    with pytest.raises(ChatError, match="empty"):
        chat.edit_last("   ", **GREEDY)
    assert [(t.question, t.answer) for t in chat.turns] == [("what is it?", first)]
    assert chat.retry(**GREEDY) == first  # and the session still works


def test_user_errors(model):
    chat = ChatSession(model)
    with pytest.raises(ChatError, match="no image yet"):
        chat.ask("what is it?")
    with pytest.raises(ChatError, match="empty"):
        chat.ask("   ", image=coloured("red"))


def test_stopped_answer_is_kept_but_not_shown_to_the_model(model):
    chat = ChatSession(model)
    stop = threading.Event()
    pieces = []
    for piece in chat.stream("tell me everything", image=coloured("red"), stop=stop, max_new_tokens=100, min_new_tokens=100):
        pieces.append(piece)
        stop.set()
    assert chat.turns[-1].stopped and chat.turns[-1].answer == "".join(pieces)
    assert chat.history() == []


def test_video_frames_in_a_chat(model):
    frames = [coloured(c) for c in ("red", "blue", "green", "yellow")]
    chat = ChatSession(model)
    answer = chat.ask("what happens?", image=frames, **GREEDY)
    assert answer == model.generate([frames], "what happens?", **GREEDY)[0]


def test_feature_cache_is_bounded_lru():
    import torch

    cache = FeatureCache(max_entries=2)
    computed = []

    def encode(pixels):
        computed.append(len(pixels))
        return pixels.mean(dim=(2, 3))

    a, b, c = (torch.full((1, 3, 4, 4), float(v)) for v in (1, 2, 3))
    cache.get_or_compute(a, encode)
    cache.get_or_compute(b, encode)
    cache.get_or_compute(a, encode)  # hit: a becomes most recent
    cache.get_or_compute(c, encode)  # evicts b
    assert len(cache) == 2 and computed == [1, 1, 1]
    cache.get_or_compute(torch.cat([a, b]), encode)  # a hit, b recomputed alone
    assert computed == [1, 1, 1, 1]
    assert (cache.hits, cache.misses) == (2, 4)


def test_instruction_blind_checkpoint_gets_an_empty_qformer_text(model):
    """A model trained with `qformer_instruction: false` (the ablation) records it in its config;
    inference then feeds its Q-Former the same empty text it was trained with."""
    from instructblip_core.prompts import QFORMER_INSTRUCTION_KEY

    image = coloured("red")
    aware = model.visual_prompt(model.prepare(image, "what colour is it?"))
    model.config.extra[QFORMER_INSTRUCTION_KEY] = False
    try:
        batch = model.prepare(image, "what colour is it?")
        empty = model.processor.tokenize_instructions([""])["qformer_input_ids"]
        assert batch["qformer_input_ids"].tolist() == empty.tolist()
        blind = model.visual_prompt(batch)
        assert (blind - aware).abs().max().item() > 1e-4
        other = model.visual_prompt(model.prepare(image, "how many are there?"))
        assert (blind - other).abs().max().item() == 0  # the question no longer matters
    finally:
        del model.config.extra[QFORMER_INSTRUCTION_KEY]


def test_a_large_upload_is_kept_at_model_size_and_answered_as_the_original(model):
    """A session keeps the picture at the model's input size (plus a display copy of at most
    1024 px), not the upload: the answers are those of the full-size original all the same."""
    import numpy as np
    import torch
    from PIL import Image

    from instructblip_core.chat import DISPLAY_MAX_SIDE

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (2400, 3200, 3), dtype=np.uint8))  # 7.7 MP, 23 MB of RGB
    chat = ChatSession(model)
    answer = chat.ask("what is in the picture?", image=photo, **GREEDY)
    height, width = model.processor.image_processor.size
    assert chat.image.size == (width, height)
    assert chat.picture.size == (DISPLAY_MAX_SIDE, 768)  # aspect kept
    pixels = model.processor.image_processor.pixel_values
    assert torch.equal(pixels(chat.image), pixels(photo))
    model.feature_cache.clear()
    prompt = build_prompt("what is in the picture?", [], chat.template)
    assert model.generate(photo, prompt.llm, instructions=prompt.qformer, **GREEDY)[0] == answer
    chat.set_image(coloured("red"))  # a small upload: shown as it is
    assert chat.picture.size == coloured("red").size
