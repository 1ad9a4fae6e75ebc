"""Streaming decode with a stop that stops the compute, not just the iterator.

transformers' `generate` runs in a worker thread and hands each new token to a queue; the
caller's generator turns tokens into text pieces. A stop signal is checked by a stopping
criterion after every token, so the decoding loop itself ends within one token of the signal.
Closing the generator early (a client that went away) sets the same signal, so an abandoned
stream never keeps the machine busy.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

_DONE = object()


class StopOnEvent(StoppingCriteria):
    """Ends generation for every row once any of the events is set."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class TokenQueue(BaseStreamer):
    """Receives tokens from `generate`; the first call carries the prompt and is skipped."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(_DONE)


class IncrementalText:
    """Turns a growing token list into text pieces whose concatenation is the final text.

    The newest token is held back until the next one arrives: it can still change how the end
    of the text decodes (a multi-byte character split over tokens, punctuation merging with a
    space). Trailing white space waits too, since the final answer is stripped.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        settled = self.decode(self.ids[:-1]).strip()
        return "" if settled.endswith("\ufffd") else self._advance(settled)

    def finish(self) -> str:
        return self._advance(self.decode(self.ids).strip())

    def _advance(self, ready: str) -> str:
        if len(ready) <= len(self.emitted) or not ready.startswith(self.emitted):
            return ""
        piece, self.emitted = ready[len(self.emitted):], ready
        return piece


def stream_generate(
    run_generate: Callable[..., torch.Tensor],
    decode: Callable[[list[int]], str],
    stop: threading.Event | None = None,
) -> Iterator[str]:
    """Run `run_generate(streamer=..., stopping_criteria=...)` in a thread and yield text pieces.

    `stop`: set it (from any thread) to end the decoding loop within one token.
    """
    abandoned = threading.Event()
    streamer = TokenQueue()
    criteria = StoppingCriteriaList([StopOnEvent(*(e for e in (stop, abandoned) if e is not None))])
    failure: list[BaseException] = []

    def work():
        try:
            run_generate(streamer=streamer, stopping_criteria=criteria)
        except BaseException as e:  # handed to the consumer, re-raised there
            failure.append(e)
        finally:
            streamer.end()

    worker = threading.Thread(target=work, name="instructblip-generate", daemon=True)
    worker.start()
    text = IncrementalText(decode)
    try:
        while (item := streamer.queue.get()) is not _DONE:
            if piece := text.add(item):
                yield piece
        if failure:
            raise failure[0]
        if piece := text.finish():
            yield piece
    finally:
        abandoned.set()  # no-op after a normal end; stops the loop if the consumer left early
        worker.join()
