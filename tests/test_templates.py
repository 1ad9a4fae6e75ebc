"""Instruction templates: coverage per task, short-answer wording, rendering, task tags."""

import random
import re
import string

import pytest

from instructblip_core.templates import (
    PLAIN_TASK_TAGS,
    SHORT_ANSWER_TASKS,
    TASK_TYPES,
    format_options,
    render_instruction,
    render_task_tag,
    template_fields,
    templates_for,
)

REQUIRED_TASKS = [
    "caption", "short_vqa", "long_vqa", "yes_no", "multiple_choice", "classification", "ocr",
    "question_generation", "dialogue",
]
SHORT_TASKS_REQUIRED = {"short_vqa", "yes_no", "multiple_choice", "classification", "ocr", "counting"}
# Wording that asks for a short answer; every short-answer template must contain one of these.
BREVITY = re.compile(
    r"short|brief|single word|one word|a word or two|one or two words|few words|single number|"
    r"number only|just the number|yes or no|option only|only the correct one|nothing more|nothing else|"
    r"just 'yes' or 'no'|yes/no|that option only",
    re.IGNORECASE,
)
FILLS = {"question": "what colour is the ball?", "options": ["red", "blue", "green"], "answer": "red"}


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


@pytest.mark.parametrize("task", REQUIRED_TASKS + ["video_qa", "counting", "spatial"])
def test_every_task_has_ten_distinct_templates(task):
    assert task in TASK_TYPES
    templates = templates_for(task)
    assert len(templates) >= 10
    assert len(set(templates)) == len(templates)
    assert all(t.strip() == t and t for t in templates)


@pytest.mark.parametrize("task", TASK_TYPES)
def test_templates_of_a_task_share_their_placeholders(task):
    sets = {frozenset(_placeholders(t)) for t in templates_for(task)}
    assert len(sets) == 1, f"{task}: templates use different placeholders {sets}"
    (fields,) = sets
    assert fields == template_fields(task)
    assert fields <= {"question", "options", "answer"}


def test_placeholders_match_what_each_task_needs():
    assert template_fields("caption") == frozenset()
    assert template_fields("classification") == frozenset()
    assert template_fields("short_vqa") == {"question"}
    assert template_fields("multiple_choice") == {"question", "options"}
    assert template_fields("question_generation") == {"answer"}


# How chat users and the held-out dialogues ask; the paper's VQA templates begin with the bare
# question too. A model tuned without them rambles when asked so (README, the tenth build).
BARE_QUESTIONS = ["{question}", "Question: {question} Answer:"]
ASKED_BARE = {"short_vqa", "yes_no", "counting", "spatial"}


def test_short_answer_tasks_ask_for_short_answers():
    assert SHORT_TASKS_REQUIRED <= SHORT_ANSWER_TASKS
    for task in SHORT_ANSWER_TASKS:
        asking = [t for t in templates_for(task) if t not in BARE_QUESTIONS]
        assert len(asking) >= 10, task
        for template in asking:
            assert BREVITY.search(template), f"{task} template does not ask for a short answer: {template!r}"


def test_question_answering_tasks_also_see_the_bare_question():
    assert ASKED_BARE <= SHORT_ANSWER_TASKS
    for task in ASKED_BARE:
        assert set(BARE_QUESTIONS) <= set(templates_for(task)), task


def test_long_answer_templates_do_not_ask_for_short_answers():
    for template in templates_for("long_vqa"):
        assert not re.search(r"short|brief|single word|one word", template, re.IGNORECASE), template


@pytest.mark.parametrize("task", TASK_TYPES)
def test_every_template_renders(task):
    fields = {name: FILLS[name] for name in template_fields(task)}
    seen = set()
    for seed in range(300):
        text = render_instruction(task, random.Random(seed), **fields)
        assert "{" not in text and "}" not in text
        for name, value in fields.items():
            expected = format_options(value) if name == "options" else value
            assert expected in text
        seen.add(text)
    assert len(seen) == len(templates_for(task)), "the rng should reach every template"


def test_rendering_depends_only_on_the_rng():
    a = [render_instruction("short_vqa", random.Random(7), question="q?") for _ in range(3)]
    assert len(set(a)) == 1
    b = {render_instruction("short_vqa", random.Random(s), question="q?") for s in range(50)}
    assert len(b) > 5


def test_a_records_own_instruction_wins_and_is_not_formatted():
    text = render_instruction("short_vqa", random.Random(0), instruction="Use {braces} as is.", question="ignored?")
    assert text == "Use {braces} as is."


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task type 'vqa'.*short_vqa.*dialogue"):
        templates_for("vqa")
    with pytest.raises(ValueError, match="known task types"):
        render_instruction("nope", random.Random(0), question="q")


def test_missing_field_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'multiple_choice' needs 'options'"):
        render_instruction("multiple_choice", random.Random(0), question="which?")


def test_format_options_like_the_paper():
    assert format_options(["red", "blue"]) == "(a) red (b) blue"
    assert format_options(["x", "y", "z"]) == "(a) x (b) y (c) z"
    with pytest.raises(ValueError):
        format_options([])
    with pytest.raises(ValueError, match="26"):
        format_options([str(i) for i in range(27)])


def test_templates_for_returns_a_copy():
    templates_for("caption").clear()
    assert len(templates_for("caption")) >= 10


def test_task_tags_keep_the_raw_input_without_instruction():
    assert set(PLAIN_TASK_TAGS) == set(TASK_TYPES)
    assert render_task_tag("short_vqa", question="what colour is the ball?") == "[short_vqa] what colour is the ball?"
    assert render_task_tag("caption") == "[caption]"
    assert render_task_tag("multiple_choice", question="which?", options=["a cat", "a dog"]) == (
        "[multiple_choice] which? (a) a cat (b) a dog"
    )
    assert render_task_tag("question_generation", answer="red") == "[question_generation] red"
    # nothing of the natural-language templates leaks into the tag form
    tagged = render_task_tag("yes_no", question="is it red?")
    assert "yes or no" not in tagged.lower()
