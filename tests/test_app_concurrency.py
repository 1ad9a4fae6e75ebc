"""Eight users at once against the real app: each with its own image, three turns each.

Every answer must equal what a ChatSession of that user's own (image, questions) answers in
this process, and each transcript must hold only that user's image and questions: the
peers' demos shared one default history list between users, which this would catch.
"""

import copy
import threading
import time

import pytest

from app import UserSession
from app_helpers import app_and_model, model  # noqa: F401  (pytest fixtures)
from app_helpers import answers, ask, client_scenes, direct_answers, pictures, questions
from instructblip_core import Turn

USERS = 8
SHORT = dict(max_new_tokens=12, show_look=False)  # enough to tell the pictures apart (the heat map: e2e test)
QUESTIONS = ["What colour is the square?", "Where is the circle?", "How many shapes are there?",
             "Describe the image.", "Is there a circle in the picture?"]


def user_questions(user: int) -> list[str]:
    """Three questions, in an order of this user's own, so no two transcripts are alike."""
    return [QUESTIONS[(user + k * (1 + user % 2)) % len(QUESTIONS)] for k in range(3)]


def test_eight_users_at_once_each_get_answers_about_their_own_image(app_and_model, tmp_path):
    server, model = app_and_model
    scenes = client_scenes(tmp_path, USERS)
    expected = [direct_answers(model, list(zip(user_questions(u), [scenes[u], None, None])), max_new_tokens=12)
                for u in range(USERS)]
    assert len({tuple(e) for e in expected}) == USERS, "the pictures must give different answers to tell users apart"

    clients = [server.client() for _ in range(USERS)]
    results: dict[int, list] = {}
    failures: dict[int, BaseException] = {}
    start = threading.Barrier(USERS)

    def user(u: int) -> None:
        try:
            start.wait()
            turns = []
            for k, question in enumerate(user_questions(u)):
                turns.append(ask(clients[u], question, scenes[u] if k == 0 else None, **SHORT)[0])
            results[u] = turns
        except BaseException as e:  # reported below with the user's number
            failures[u] = e

    threads = [threading.Thread(target=user, args=(u,)) for u in range(USERS)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    print(f"{USERS} users x 3 turns in {time.monotonic() - began:.1f} s")

    assert not failures, failures
    for u in range(USERS):
        final = results[u][-1]
        assert answers(final) == expected[u], f"user {u} got answers that are not about their image"
        assert questions(final) == user_questions(u), f"user {u} sees questions that are not theirs"
        assert pictures(final) == [scenes[u].name], f"user {u} sees images that are not theirs"
        for k, turn in enumerate(results[u]):  # every intermediate transcript is theirs too
            assert questions(turn) == user_questions(u)[: k + 1]


def test_a_new_session_starts_empty_while_others_are_chatting(app_and_model, tmp_path):
    server, _ = app_and_model
    busy = server.client()
    ask(busy, "What colour is the square?", client_scenes(tmp_path, 1)[0])
    newcomer = server.client()
    with pytest.raises(Exception, match="There is no image yet"):
        ask(newcomer, "What colour is the square?")
    conversation, _ = newcomer.predict(api_name="/undo")
    assert conversation == []


def test_each_session_state_is_its_own_copy_sharing_only_the_model(model):
    """gr.State deep-copies each session's first value: the conversation must be copied, the model shared."""
    first = UserSession(model)
    first.chat.turns.append(Turn("What colour is the square?", "red", segment=0))
    first.pictures[0] = "a.png"
    second = copy.deepcopy(first)
    assert second.chat.model is model and second.chat.model.model is model.model
    assert second.chat is not first.chat and second.stop is not first.stop and second.busy is not first.busy
    second.chat.turns.append(Turn("And the circle?", "blue", segment=0))
    second.pictures[1] = "b.png"
    assert len(first.chat.turns) == 1 and first.pictures == {0: "a.png"}
