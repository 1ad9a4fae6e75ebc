"""Prompt building, shared by the chat and by training on conversations.

InstructBLIP was trained on the raw instruction: no system prompt, no roles. For several
turns the authors advise giving the LLM the earlier turns concatenated, while the Q-Former
(cut at 128 tokens) reads only the current question, the most informative text for picking
visual features. So:

    Q-Former text: the current question
    LLM prompt:    the question alone on the first turn, else
                   "Question: q1 Answer: a1 Question: q2 Answer:" (the template's format)

The template comes from the checkpoint's config.json (`prompt_template`, written by our
finetune recipes), else the default below; never from the model's name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

TEMPLATE_KEY = "prompt_template"  # key in config.json
# key in config.json; false for a model trained with an empty Q-Former text (the ablation), so
# inference feeds it the same
QFORMER_INSTRUCTION_KEY = "qformer_instruction"


@dataclass(frozen=True)
class PromptTemplate:
    turn: str = "Question: {question} Answer: {answer}"  # an earlier, answered turn
    current: str = "Question: {question} Answer:"  # the turn being answered, after history
    separator: str = " "
    raw_first_turn: bool = True  # a lone question goes to the LLM as is, as in training

    @classmethod
    def from_config(cls, config) -> "PromptTemplate":
        """From `InstructBlipConfig.extra[prompt_template]` when the checkpoint has one."""
        data = getattr(config, "extra", {}).get(TEMPLATE_KEY)
        return cls(**data) if data else cls()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Prompt:
    llm: str  # what the LLM reads after the visual tokens
    qformer: str  # what the Q-Former reads beside its queries
    dropped_turns: int = 0  # earlier turns left out to fit the LLM's context


def build_prompt(
    question: str,
    history: list[tuple[str, str]] = (),
    template: PromptTemplate = PromptTemplate(),
    *,
    count_tokens: Callable[[str], int] | None = None,
    max_prompt_tokens: int | None = None,
) -> Prompt:
    """history: earlier (question, answer) pairs about the same image, oldest first.

    With `count_tokens` and `max_prompt_tokens`, the oldest turns are dropped until the
    LLM prompt fits; the current question itself is always kept.
    """
    history = list(history)
    dropped = 0
    while True:
        llm = _render(question, history, template)
        # Without earlier turns there is nothing to drop, so the prompt is not counted (that count
        # was a fifth of a training batch's text side).
        if not history or count_tokens is None or max_prompt_tokens is None or count_tokens(llm) <= max_prompt_tokens:
            return Prompt(llm=llm, qformer=question, dropped_turns=dropped)
        history.pop(0)
        dropped += 1


def _render(question: str, history: list[tuple[str, str]], template: PromptTemplate) -> str:
    if not history and template.raw_first_turn:
        return question
    turns = [template.turn.format(question=q, answer=a) for q, a in history]
    turns.append(template.current.format(question=question))
    return template.separator.join(turns)
