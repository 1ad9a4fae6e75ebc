"""Natural-language instruction templates, one list per task type.

InstructBLIP (Dai et al. 2023, section 2.2 and appendix) turns every training example into an
instruction by filling a template picked at random from 10-15 hand-written ones for its task;
short-answer tasks get templates that ask for a short answer, otherwise the LLM learns to
answer "yes" to everything long-windedly or to ramble on VQA. The wording below is ours.

Placeholders a template may use (each task's templates all use the same ones, so a record
that fills one template fills them all):
    {question}  the record's question
    {options}   the answer choices, formatted by `format_options` as "(a) x (b) y"
    {answer}    question_generation only: the answer the generated question must have

`PLAIN_TASK_TAGS` serve the paper's ablation "multitask training without instructions": the
model sees the raw input behind a task tag ("[short_vqa] what colour is the ball?") instead
of a sentence telling it what to do.
"""

from __future__ import annotations

import random
import string

CAPTION = "caption"
SHORT_VQA = "short_vqa"
LONG_VQA = "long_vqa"
YES_NO = "yes_no"
MULTIPLE_CHOICE = "multiple_choice"
CLASSIFICATION = "classification"
OCR = "ocr"
QUESTION_GENERATION = "question_generation"
DIALOGUE = "dialogue"
# Kinds of short-answer VQA with their own phrasing (the answer format is the same).
VIDEO_QA = "video_qa"
COUNTING = "counting"
SPATIAL = "spatial"

_CAPTION = [
    "A short image caption:",
    "Write a short caption for this image.",
    "Describe the image in one sentence.",
    "Give a brief description of what is shown in this picture.",
    "What does this image show? Answer with a single sentence.",
    "Summarise the content of the image in a short sentence.",
    "Write one sentence that tells someone who cannot see it what this image contains.",
    "Caption this photo briefly.",
    "In a few words, what is going on in this picture?",
    "Provide a concise one-sentence description of the scene.",
    "Look at the image and write a caption for it.",
    "Briefly describe this image.",
]

# The short-answer lists open with the bare question and "Question: .. Answer:": that is how
# chat users and the held-out dialogues ask, and a model that never saw a bare question during
# tuning rambles when asked one (measured on the dialogues: 3.7 words per answer, 1.6 with them).
_SHORT_VQA = [
    "{question}",
    "Question: {question} Answer:",
    "Question: {question} Short answer:",
    "{question} Answer the question with a single word or a short phrase.",
    "Answer this question about the image in a few words: {question}",
    "Based on the image, give a short answer to the question: {question}",
    "{question} Reply with a short answer.",
    "Look at the picture and answer briefly. Question: {question} Answer:",
    "Using one word or a short phrase, answer: {question}",
    "Give a brief answer to the following question about the image. {question}",
    "Q: {question} A short answer to the question is",
    "Here is a question about the image: {question} Keep your answer short.",
    "{question} Please answer in one or two words.",
    "Respond with a short answer only. {question}",
]

_LONG_VQA = [
    "{question}",
    "Answer the following question about the image in detail: {question}",
    "{question} Explain your answer using what you can see in the image.",
    "Look carefully at the image and give a thorough answer. {question}",
    "Question: {question} Give a complete answer in full sentences.",
    "Based on the picture, answer this question with a detailed explanation: {question}",
    "{question} Describe the relevant parts of the image in your answer.",
    "Here is a question about the image: {question} Please answer it fully.",
    "Study the image and respond to the question below in a few sentences.\n{question}",
    "Write a helpful, detailed answer to this question about the picture: {question}",
    "{question} Walk through your reasoning step by step before giving the answer.",
]

_YES_NO = [
    "{question}",
    "Question: {question} Answer:",
    "Question: {question} Answer yes or no:",
    "{question} Please answer with yes or no.",
    "Answer with a single word, yes or no: {question}",
    "Look at the image and decide: {question} Reply yes or no.",
    "{question} Give a short answer: yes or no.",
    "Based on the picture, is the answer yes or no? {question}",
    "Respond with just 'yes' or 'no'. {question}",
    "Q: {question} A (one word, yes or no):",
    "Here is a yes/no question about the image: {question} Short answer:",
    "{question} Answer briefly with yes or no only.",
    "Check the image and answer in one word (yes or no): {question}",
]

_MULTIPLE_CHOICE = [
    "Question: {question} Options: {options}. Short answer:",
    "{question} Choose one of the following options: {options}. Short answer:",
    "Answer the question by picking one option, in a few words. Question: {question} Options: {options}",
    "Based on the image, which option is correct? {question} {options}. Answer with the option only.",
    "{question} Pick the best answer from {options}. Reply briefly.",
    "Look at the picture and select the right answer to '{question}' from these choices: {options}. Short answer:",
    "Question about the image: {question} Possible answers: {options}. Give only the correct one.",
    "{question}\nOptions: {options}\nAnswer with the letter and text of one option, nothing more.",
    "Choose the correct option. {question} Choices: {options}. Answer in a few words:",
    "Which of {options} answers the question '{question}'? Reply with that option only.",
    "Read the question and the options, then answer briefly. Question: {question} Options: {options}. Answer:",
]

_CLASSIFICATION = [
    "What is the main object in this image? Answer with a single word or a short phrase.",
    "Which category does this image belong to? Short answer:",
    "Classify the image. Reply with its category in one or two words.",
    "What kind of thing is shown in the picture? Answer briefly.",
    "Name the object in the image in a few words.",
    "What is this a picture of? Give a short answer.",
    "Give the category of the image only, in one word if you can.",
    "Look at the image and name its class. Short answer:",
    "Identify what this image shows, using a short label.",
    "What would you label this image as? Answer with a single word or a short phrase.",
    "Which class best describes the image? Keep the answer short.",
]

_OCR = [
    "Question: {question} Read the text in the image and give a short answer:",
    "{question} Answer using the words written in the image, as briefly as possible.",
    "Read the text in the picture and answer in a few words: {question}",
    "Based on the text visible in the image, give a short answer. {question}",
    "{question} The answer is written somewhere in the image; reply briefly with just that text.",
    "Look at the writing in the image. {question} Short answer:",
    "Use the text in the image to answer briefly: {question}",
    "Q: {question} Answer with the short text you read in the image:",
    "{question} Copy the relevant words from the image as a short answer.",
    "The image contains text. Answer this question about it in one or two words: {question}",
    "Read carefully and answer with a short phrase: {question}",
]

_QUESTION_GENERATION = [
    "Write a question about the image whose answer is: {answer}",
    "Given the image, ask a question that can be answered with '{answer}'. Question:",
    "Generate a question about this picture. The answer to your question should be {answer}.",
    "Here is an answer: {answer}. What question about the image does it answer?",
    "Look at the image and write one question for which the correct answer is '{answer}'.",
    "Create a question about the image. Its answer must be: {answer}",
    "Think of a question about this photo that has the answer {answer}. Write the question.",
    "The answer is '{answer}'. Write a matching question about the image.",
    "Based on the image, compose a question whose answer would be {answer}.",
    "Ask something about the picture so that the reply is '{answer}'. Question:",
    "Write a natural question about what you see; the answer should be {answer}.",
]

_DIALOGUE = [
    "{question}",
    "Continue the conversation about the image. {question}",
    "{question} Answer as a helpful assistant who can see the image.",
    "We are talking about this picture. {question}",
    "Reply to the next message in our conversation about the image: {question}",
    "{question} Answer in a friendly, natural way, using what is in the image.",
    "Keep chatting about the image. Next message: {question}",
    "As part of a dialogue about this photo, respond to: {question}",
    "{question} Respond conversationally, based on the image.",
    "You are discussing the image with a user. The user says: {question} Your reply:",
    "Answer the user's message about the picture: {question}",
]

_VIDEO_QA = [
    "Question: {question} Short answer:",
    "{question} Answer the question about the video with a single word or a short phrase.",
    "Watch the frames of the video and answer briefly: {question}",
    "Based on the video, give a short answer to: {question}",
    "{question} Reply with a short answer about what happens in the video.",
    "Look at these video frames. Question: {question} Answer in a few words:",
    "Using one word or a short phrase, answer this question about the clip: {question}",
    "Give a brief answer about the video. {question}",
    "Q: {question} A short answer based on the video:",
    "{question} Keep your answer about the video short.",
    "Here are frames from a video. {question} Short answer:",
]

_COUNTING = [
    "{question}",
    "Question: {question} Answer:",
    "Count the things the question asks about. {question} Answer with a number only.",
    "{question} Reply with a single number.",
    "Count carefully and give a short answer: {question}",
    "Question: {question} Short answer (one number):",
    "{question} Give the count as one word or digit.",
    "Look at the image and count. {question} Short answer:",
    "Answer with just the number. {question}",
    "Q: {question} A (a single number):",
    "Count the objects asked about and reply briefly: {question}",
    "{question} Answer with a short number, nothing else.",
    "Based on the picture, give the count in one word: {question}",
]

_SPATIAL = [
    "{question}",
    "Question: {question} Answer:",
    "Question: {question} Short answer:",
    "{question} Answer about the positions in the image with a short phrase.",
    "Look at where things are in the image and answer briefly: {question}",
    "Based on the layout of the picture, give a short answer: {question}",
    "{question} Reply in a few words, e.g. left, right, top or bottom.",
    "Think about the positions of the objects. {question} Short answer:",
    "Using one word or a short phrase, answer this question about the arrangement: {question}",
    "Q: {question} A short answer about the location:",
    "Give a brief answer about the spatial relation asked here. {question}",
    "{question} Keep your answer about the positions short.",
    "Examine the image and answer in a word or two: {question}",
]

_TEMPLATES: dict[str, list[str]] = {
    CAPTION: _CAPTION,
    SHORT_VQA: _SHORT_VQA,
    LONG_VQA: _LONG_VQA,
    YES_NO: _YES_NO,
    MULTIPLE_CHOICE: _MULTIPLE_CHOICE,
    CLASSIFICATION: _CLASSIFICATION,
    OCR: _OCR,
    QUESTION_GENERATION: _QUESTION_GENERATION,
    DIALOGUE: _DIALOGUE,
    VIDEO_QA: _VIDEO_QA,
    COUNTING: _COUNTING,
    SPATIAL: _SPATIAL,
}

TASK_TYPES: tuple[str, ...] = tuple(_TEMPLATES)
# Tasks scored on short answers (exact match / VQA accuracy): their templates ask for brevity.
SHORT_ANSWER_TASKS = frozenset({SHORT_VQA, YES_NO, MULTIPLE_CHOICE, CLASSIFICATION, OCR, VIDEO_QA, COUNTING, SPATIAL})

# The ablation without instructions: the raw input behind a tag naming the task.
PLAIN_TASK_TAGS: dict[str, str] = {task: f"[{task}]" for task in TASK_TYPES}

_OPTION_LETTERS = string.ascii_lowercase


def _check_task(task: str) -> None:
    if task not in _TEMPLATES:
        raise ValueError(f"unknown task type {task!r}; known task types: {', '.join(TASK_TYPES)}")


def templates_for(task: str) -> list[str]:
    """The instruction templates of `task` (a copy; editing it changes nothing here)."""
    _check_task(task)
    return list(_TEMPLATES[task])


def template_fields(task: str) -> frozenset[str]:
    """Placeholders every template of `task` needs, e.g. {"question", "options"}."""
    _check_task(task)
    return _placeholders(_TEMPLATES[task][0])


def _placeholders(template: str) -> frozenset[str]:
    return frozenset(name for _, name, _, _ in string.Formatter().parse(template) if name)


def format_options(options: list[str]) -> str:
    """["red", "blue"] -> "(a) red (b) blue", the paper's multiple-choice layout."""
    if not options:
        raise ValueError("a multiple-choice question needs at least one option")
    if len(options) > len(_OPTION_LETTERS):
        raise ValueError(f"{len(options)} options is more than the {len(_OPTION_LETTERS)} letters a-z can label")
    return " ".join(f"({letter}) {option}" for letter, option in zip(_OPTION_LETTERS, options))


def _fill(task: str, template: str, fields: dict) -> str:
    needed = _placeholders(template)
    missing = sorted(name for name in needed if fields.get(name) is None)
    if missing:
        raise ValueError(f"task {task!r} needs {', '.join(repr(m) for m in missing)} to fill its template {template!r}")
    values = {name: _field_text(name, fields[name]) for name in needed}
    return template.format(**values)


def _field_text(name: str, value) -> str:
    if name == "options" and not isinstance(value, str):
        return format_options(list(value))
    return str(value).strip()


def render_instruction(task: str, rng: random.Random, *, instruction: str | None = None, **fields) -> str:
    """One instruction for an example of `task`: a template picked by `rng`, filled with `fields`.

    A record's own `instruction` wins when given (it is returned as is, with no formatting,
    so braces in it are safe). `options` may be a list (formatted with `format_options`) or
    an already formatted string.
    """
    _check_task(task)
    if instruction is not None:
        return instruction
    templates = _TEMPLATES[task]
    template = templates[rng.randrange(len(templates))]
    return _fill(task, template, fields)


def render_task_tag(task: str, **fields) -> str:
    """The ablation's input: "[short_vqa] what colour is the ball?" (no natural-language instruction).

    The raw input is what the task's templates would have been filled with (question,
    options as "(a) x (b) y", the given answer for question_generation), in that order.
    """
    _check_task(task)
    needed = template_fields(task)
    parts = [PLAIN_TASK_TAGS[task]]
    for name in ("question", "options", "answer"):
        if name in needed and fields.get(name) is not None:
            parts.append(_field_text(name, fields[name]))
    return " ".join(parts)
