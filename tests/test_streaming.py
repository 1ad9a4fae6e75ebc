"""Streaming: pieces add up to the answer, and Stop ends the decoding loop itself."""

import threading
import time

import pytest

from engine_helpers import coloured, count_calls
from instructblip_core import load_pretrained

LONG = dict(max_new_tokens=200, min_new_tokens=200)  # no early EOS: only Stop can end it early


@pytest.fixture(scope="module", params=["instructblip-llama", "instructblip-t5", "blip2-opt"])
def model(request, tiny_checkpoints):
    return load_pretrained(tiny_checkpoints(request.param, llm_hidden=128, llm_intermediate=256))


def test_stream_concatenates_to_generate(model):
    image = coloured("red")
    for prompt in ["what is in the picture?", "describe the shape in detail."]:
        expected = model.generate(image, prompt, max_new_tokens=40, min_new_tokens=40)[0]
        pieces = list(model.stream(image, prompt, max_new_tokens=40, min_new_tokens=40))
        assert len(pieces) > 1  # it really streamed
        assert "".join(pieces) == expected


def test_stop_ends_the_decoding_loop_within_a_token(model):
    stop = threading.Event()
    pieces, after_stop = [], []
    decoder = model.model.language_model
    with count_calls(decoder) as calls:
        def consume():
            for piece in model.stream(coloured("blue"), "tell me a long story about it.", stop=stop, **LONG):
                pieces.append(piece)
                if len(pieces) == 2:
                    stop.set()
                    after_stop.append(calls[0])

        worker = threading.Thread(target=consume)
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive()
        total = calls[0]
    # The loop checks the signal after every token: at most a couple more forward passes ran.
    assert total - after_stop[0] <= 2, (after_stop, total)
    assert total < LONG["max_new_tokens"] // 2
    # The model is free at once for the next question.
    started = time.perf_counter()
    assert model.generate(coloured("red"), "and now?", max_new_tokens=3)[0] is not None
    assert time.perf_counter() - started < 30


def test_abandoned_stream_stops_the_compute(model):
    decoder = model.model.language_model
    with count_calls(decoder) as calls:
        stream = model.stream(coloured("green"), "go on and on.", **LONG)
        next(stream)
        next(stream)
        stream.close()  # a client that went away
        at_close = calls[0]
        time.sleep(0.3)
        assert calls[0] - at_close <= 1
    assert threading.active_count() < 50
    assert all(t.name != "instructblip-generate" for t in threading.enumerate())


def test_beam_search_yields_the_final_answer_once(model):
    image = coloured("yellow")
    pieces = list(model.stream(image, "what is it?", num_beams=3, max_new_tokens=12))
    assert pieces == model.generate(image, "what is it?", num_beams=3, max_new_tokens=12)


def test_errors_in_the_decoding_thread_reach_the_caller(model):
    with pytest.raises(ValueError, match="num_beams"):
        list(model.stream(coloured("red"), "q", num_beams=0))


def test_stop_also_ends_plain_generate(model):
    stop = threading.Event()
    stop.set()
    with count_calls(model.model.language_model) as calls:
        model.generate(coloured("red"), "q", stop=stop, **LONG)
    assert calls[0] <= 2


def test_static_cache_decoding_gives_the_same_answers(model):
    """`static_cache` (compiled CUDA-graph decoding on a GPU) must not change a single token, in
    generate and in streaming, for a first and a longer later prompt (a new cache size)."""
    image = coloured("green")
    prompts = ["what is in the picture?", "question: what colour is it? answer: green. question: and its shape?"]
    expected = [model.generate(image, p, max_new_tokens=24, min_new_tokens=24)[0] for p in prompts]
    model.static_cache = True
    try:
        kwargs = model.generation_kwargs(model_options(max_new_tokens=24))
        assert kwargs["cache_implementation"] == "static"
        assert "cache_implementation" not in model.generation_kwargs(model_options(num_beams=2))  # beams: dynamic
        assert [model.generate(image, p, max_new_tokens=24, min_new_tokens=24)[0] for p in prompts] == expected
        assert "".join(model.stream(image, prompts[1], max_new_tokens=24, min_new_tokens=24)) == expected[1]
    finally:
        model.static_cache = False


def model_options(**kwargs):
    from instructblip_core import GenerationOptions

    return GenerationOptions.from_kwargs(**kwargs)
