"""Bad input against the real app: each gives its own message, and the next normal request works.

The messages are what the UI shows (gr.Error); gradio_client raises them as AppError. Out of
memory is real too: the server's address-space limit is lowered (prlimit) so that a long beam
search cannot allocate its cache, then restored.
"""

import re
import resource
from pathlib import Path

import httpx
import pytest
import torch
from gradio_client.exceptions import AppError
from PIL import Image

from app import UserSession, conversation, is_out_of_memory
from app_helpers import app_and_model, model  # noqa: F401  (pytest fixtures)
from app_helpers import EXAMPLES, TEST_MAX_FILE_SIZE, answers, ask, direct_answers
from instructblip_core import ImageError, Turn

PICTURE = EXAMPLES / "red_circle_blue_square.png"
QUESTION = "What colour is the circle?"


@pytest.fixture(scope="module")
def normal_answer(app_and_model):
    return direct_answers(app_and_model[1], [(QUESTION, PICTURE)])[0]


def refused_then_fine(client, message: str, normal_answer: str, *bad_call, **bad_settings) -> None:
    """`ask(client, *bad_call, **bad_settings)` fails with `message`; then a normal question is answered."""
    with pytest.raises(AppError, match=re.escape(message)):
        ask(client, *bad_call, **bad_settings)
    transcript, _, _, status = ask(client, QUESTION, PICTURE)
    assert answers(transcript)[-1] == normal_answer and status.startswith("Answered")


def test_a_file_that_is_not_an_image(app_and_model, normal_answer, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("shopping list: milk, eggs")
    refused_then_fine(app_and_model[0].client(), "notes.png is not an image file (cannot identify image format).",
                      normal_answer, QUESTION, notes)


def test_a_truncated_and_an_empty_image(app_and_model, normal_answer, tmp_path):
    cut, empty = tmp_path / "cut.png", tmp_path / "empty.png"
    cut.write_bytes(PICTURE.read_bytes()[:200])
    empty.write_bytes(b"")
    client = app_and_model[0].client()
    refused_then_fine(client, "cut.png is truncated or corrupt", normal_answer, QUESTION, cut)
    refused_then_fine(client, "empty.png is empty (0 bytes).", normal_answer, QUESTION, empty)


def test_an_image_over_the_pixel_limit(app_and_model, normal_answer, tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("RGB", (7000, 6000), (200, 30, 30)).save(huge)  # 42 M pixels, a 130 KB file
    refused_then_fine(app_and_model[0].client(), "huge.png is 7000x6000 = 42,000,000 pixels, over the limit of 40,000,000 (please use a smaller image).",
                      normal_answer, QUESTION, huge)


def test_an_upload_over_the_file_size_limit_is_refused_by_the_server(app_and_model, normal_answer, tmp_path):
    server = app_and_model[0]
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(TEST_MAX_FILE_SIZE + 1))
    response = httpx.post(f"{server.url}gradio_api/upload", files={"files": ("big.png", big.read_bytes(), "image/png")})
    assert response.status_code == 413 and "size" in response.text.lower(), response.text
    transcript, _, _, _ = ask(server.client(), QUESTION, PICTURE)
    assert answers(transcript)[-1] == normal_answer


def test_an_empty_message_and_one_over_the_length_limit(app_and_model, normal_answer):
    client = app_and_model[0].client()
    refused_then_fine(client, "The message is empty: type a question to go with the image.", normal_answer, "  ", PICTURE)
    refused_then_fine(client, "The message is empty: type a question about the image.", normal_answer, "")
    refused_then_fine(client, "The message is 1,001 characters long; the limit is 1,000. Please shorten it.",
                      normal_answer, "x" * 1001, PICTURE)


def test_a_question_too_long_for_the_context_and_bad_settings(app_and_model, normal_answer):
    client = app_and_model[0].client()
    long_question = " ".join(["What colour is the circle next to the square?"] * 20)  # ~900 characters
    refused_then_fine(client, "image tokens and 450 answer tokens the model's context of 512 leaves", normal_answer,
                      long_question, PICTURE, max_new_tokens=450)
    refused_then_fine(client, "Settings: min_new_tokens must be between 0 and max_new_tokens", normal_answer,
                      QUESTION, PICTURE, max_new_tokens=5, min_new_tokens=10)


def test_out_of_memory_while_answering(app_and_model, normal_answer):
    server = app_and_model[0]
    client = server.client()
    ask(client, QUESTION, PICTURE)
    soft, hard = resource.prlimit(server.pid, resource.RLIMIT_AS)
    # Room for the request's own thread and buffers, not for ten beams' growing key/value cache.
    resource.prlimit(server.pid, resource.RLIMIT_AS, (address_space(server.pid) + 16 * 2**20, hard))
    try:
        with pytest.raises(AppError, match=r"Out of memory on cpu while answering\. Try a smaller image, fewer beams"):
            ask(client, "Describe the image in detail.", mode="Beam search", beams=10, max_new_tokens=450,
                min_new_tokens=450, show_look=False)
    finally:
        resource.prlimit(server.pid, resource.RLIMIT_AS, (soft, hard))
    transcript, _, _, status = ask(client, QUESTION, PICTURE)
    assert answers(transcript)[-1] == normal_answer and status.startswith("Answered")
    assert "out of memory: " in server.log() and "DefaultCPUAllocator: can't allocate memory" in server.log()


def address_space(pid: int) -> int:
    """The process's virtual memory size in bytes (VmSize), what RLIMIT_AS limits."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmSize:\s+(\d+) kB", status).group(1)) * 1024


def test_model_text_is_shown_as_text_never_as_html(model):
    session = UserSession(model)
    hostile = ('<script>alert(1)</script><img src=x onerror="alert(2)"> [click](javascript:alert(3)) '
               "![pixel](http://tracker.example/p.png)")
    session.chat.turns.append(Turn("Is <b>this</b> bold?", hostile, segment=0))
    shown = [m["content"] for m in conversation(session)]
    assert shown[0] == "Is &lt;b&gt;this&lt;/b&gt; bold?"
    assert shown[1] == ('&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror="alert(2)"&gt; '
                        "\\[click\\](javascript:alert(3)) !\\[pixel\\](http://tracker.example/p.png)")
    assert "<" not in "".join(shown)


def test_out_of_memory_is_recognised_in_all_its_forms():
    with pytest.raises(RuntimeError) as cpu:  # the real CPU allocator error, not a hand-made one
        torch.empty(2**62, dtype=torch.uint8)
    assert is_out_of_memory(cpu.value)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    try:  # an image decoder that ran out of memory, as the engine reports it
        try:
            raise MemoryError()
        except MemoryError as e:
            raise ImageError("photo.png is truncated or corrupt: MemoryError") from e
    except ImageError as wrapped:
        assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(ValueError("temperature must be > 0"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
