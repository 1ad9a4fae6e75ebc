"""Multi-turn visual chat state; knows nothing of any UI.

One `ChatSession` per user: its own turns and its own image, never shared (the model and
its image-feature cache are shared, the cache holding nothing but pixels' features).

Behaviour:
- The image is sticky: a follow-up without an image is about the last image.
- A new image starts a new segment: earlier turns about the old image are kept in the
  transcript but are not shown to the model when it answers about the new one.
- The Q-Former reads the current question; the LLM reads the segment's earlier turns plus the
  question (`prompts.build_prompt`), oldest turns dropped to fit the LLM's context minus the
  visual tokens and `max_new_tokens`, with a notice saying so.
- A stopped answer is kept in the transcript as the user saw it, but not shown to the model
  later (a cut-off answer is a poor example to continue from).
- undo, retry, edit_last and reset act on the transcript.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from .generation import GenerationOptions
from .images import load_image
from .pipeline import InstructBlip
from .prompts import Prompt, PromptTemplate, build_prompt

NEW_IMAGE_NOTICE = "New image: the earlier turns were about the previous image and are not used for this one."


class ChatError(ValueError):
    """Something the user can fix: no image yet, empty or overlong message, nothing to undo."""


@dataclass
class Turn:
    question: str
    answer: str
    segment: int  # which image the turn is about
    dropped_turns: int = 0  # earlier turns left out of the prompt to fit the context
    stopped: bool = False  # the user stopped the answer part-way


DISPLAY_MAX_SIDE = 1024  # pixels per side of the copy kept for showing (heat maps are drawn on it)


def _each(fn, image):
    """`fn` of a picture, or the list of `fn` of each frame when `image` is a video (a list of frames)."""
    return [fn(frame) for frame in image] if isinstance(image, (list, tuple)) else fn(image)


def _for_display(image: Image.Image) -> Image.Image:
    shown = image.copy()
    shown.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE))  # keeps the aspect ratio; never enlarges
    return shown


class ChatSession:
    def __init__(self, model: InstructBlip, template: PromptTemplate | None = None):
        self.model = model
        self.template = template or PromptTemplate.from_config(model.config)
        self.turns: list[Turn] = []
        # What the model reads: the picture (or video frames) already resized to the model's
        # input size, not the upload itself (a 40 MP photo is 120 MB of RGB per session).
        self.image: Image.Image | list[Image.Image] | None = None
        self.picture: Image.Image | list[Image.Image] | None = None  # the same for showing: at most DISPLAY_MAX_SIDE
        self.segment = 0
        self.notices: list[str] = []  # about the latest answer, for the UI to show

    # ---- state --------------------------------------------------------------------------
    def set_image(self, image) -> None:
        """Use this image (path, bytes, PIL, array; a list of frames for a video) from now on."""
        loaded = _each(load_image, image)
        if self.image is not None and self.turns and self.turns[-1].segment == self.segment:
            self.segment += 1
            self.notices.append(NEW_IMAGE_NOTICE)
        self.image = _each(self.model.processor.image_processor.model_sized, loaded)
        self.picture = _each(_for_display, loaded)

    def reset(self) -> None:
        self.turns.clear()
        self.image = None
        self.picture = None
        self.segment = 0
        self.notices = []

    def undo(self) -> Turn:
        """Remove and return the latest turn (its image stays the current one)."""
        if not self.turns:
            raise ChatError("nothing to undo")
        return self.turns.pop()

    def history(self) -> list[tuple[str, str]]:
        """Completed (question, answer) pairs about the current image, oldest first."""
        return [(t.question, t.answer) for t in self.turns if t.segment == self.segment and not t.stopped]

    # ---- asking -------------------------------------------------------------------------
    def prompt_for(self, question: str, max_new_tokens: int) -> Prompt:
        frames = len(self.image) if isinstance(self.image, list) else 1
        visual_tokens = self.model.config.num_query_tokens * frames
        budget = self.model.context_length - visual_tokens - max_new_tokens
        count = lambda text: len(self.model.processor.encode_prompt(text))  # noqa: E731
        prompt = build_prompt(question, self.history(), self.template, count_tokens=count, max_prompt_tokens=budget)
        if count(prompt.llm) > budget:
            raise ChatError(
                f"the message is {count(prompt.llm)} tokens; with {visual_tokens} image tokens and "
                f"{max_new_tokens} answer tokens the model's context of {self.model.context_length} leaves {budget}"
            )
        return prompt

    def stream(self, text: str, image=None, *, stop: threading.Event | None = None, **options) -> Iterator[str]:
        """Answer `text` (about `image`, or the current image) in pieces; the turn is recorded
        when the answer ends, is stopped, or the consumer stops reading."""
        self.notices = []
        question = (text or "").strip()
        if not question:
            raise ChatError("the message is empty")
        if image is not None:
            self.set_image(image)
        if self.image is None:
            raise ChatError("there is no image yet: add an image first")
        opts = GenerationOptions.from_kwargs(**options)
        prompt = self.prompt_for(question, opts.max_new_tokens)
        if prompt.dropped_turns:
            self.notices.append(f"{prompt.dropped_turns} earlier turn(s) left out to fit the model's context.")
        pieces: list[str] = []
        turn = Turn(question, "", self.segment, prompt.dropped_turns)
        try:
            for piece in self.model.stream(self.image, prompt.llm, instruction=prompt.qformer, stop=stop, **options):
                pieces.append(piece)
                yield piece
        except GeneratorExit:  # the reader went away: keep what it saw
            self._record(turn, pieces, stopped=True)
            raise
        self._record(turn, pieces, stopped=stop is not None and stop.is_set())

    def _record(self, turn: Turn, pieces: list[str], stopped: bool) -> None:
        turn.answer = "".join(pieces)
        turn.stopped = stopped
        self.turns.append(turn)

    def ask(self, text: str, image=None, **options) -> str:
        return "".join(self.stream(text, image, **options))

    def retry(self, **options) -> str:
        """Answer the latest question again (e.g. with other settings), replacing its answer."""
        return "".join(self.retry_stream(**options))

    def retry_stream(self, *, stop: threading.Event | None = None, **options) -> Iterator[str]:
        if self.turns and self.turns[-1].segment != self.segment:
            raise ChatError("the latest question was about the previous image; ask it again about this one")
        last = self.undo()
        return self._instead_of(last, last.question, stop, options)

    def edit_last(self, text: str, **options) -> str:
        """Replace the latest question with `text` and answer it."""
        last = self.undo()
        return "".join(self._instead_of(last, text, None, options))

    def _instead_of(self, old: Turn, question: str, stop: threading.Event | None, options: dict) -> Iterator[str]:
        """Answer `question` in place of the turn `old`, already taken off the transcript.

        If the new answer fails before it is recorded (out of memory, a message that no longer
        fits, a bad setting), `old` goes back: a failed retry must not cost the user the turn.
        """
        try:
            yield from self.stream(question, stop=stop, **options)
        except GeneratorExit:  # the reader left: stream() has recorded what it saw
            raise
        except BaseException:
            self.turns.append(old)
            raise
