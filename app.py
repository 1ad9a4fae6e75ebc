"""InstructBLIP studio: multi-turn visual chat in the browser (Gradio 6), locally or on Spaces.

    python app.py                                   # the shipped small model, offline
    python app.py --model Salesforce/instructblip-flan-t5-xl --device cuda --load-in-8bit

This file is UI only: the conversation (sticky image, new-image segments, history trimming,
undo/retry/edit) is `instructblip_core.ChatSession`, decoding and its stop switch are the
engine's. What lives here: one `UserSession` per browser tab (never shared: the peers' demos
leaked one user's history to another through a shared default list), the queue, errors a user
can act on, and model text shown as text (escaped, never run as HTML).

Settings come from flags or, for Hugging Face Spaces, from environment variables
(`ENV_VARS` below; flags win).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import html
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch

from instructblip_core import (
    ORIGINAL_RELEASE,
    ChatError,
    ChatSession,
    CheckpointError,
    GenerationOptions,
    ImageError,
    InstructBlip,
    load_image,
    load_pretrained,
)
from instructblip_core.attention_map import attention_overlay

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "assets" / "nano-instructblip"
EXAMPLES_DIR = ROOT / "assets" / "examples"
LOG = logging.getLogger("instructblip_studio")

ENV_VARS = {  # flag -> environment variable (Spaces has no command line)
    "model": "INSTRUCTBLIP_MODEL",
    "device": "INSTRUCTBLIP_DEVICE",
    "dtype": "INSTRUCTBLIP_DTYPE",
    "load_in_8bit": "INSTRUCTBLIP_LOAD_IN_8BIT",
    "load_in_4bit": "INSTRUCTBLIP_LOAD_IN_4BIT",
    "quantize_fp32_modules": "INSTRUCTBLIP_QUANTIZE_FP32_MODULES",
    "static_cache": "INSTRUCTBLIP_STATIC_CACHE",
    "host": "INSTRUCTBLIP_HOST",
    "port": "INSTRUCTBLIP_PORT",
    "share": "INSTRUCTBLIP_SHARE",
    "concurrency_limit": "INSTRUCTBLIP_CONCURRENCY",
    "max_queue": "INSTRUCTBLIP_MAX_QUEUE",
    "max_message_chars": "INSTRUCTBLIP_MAX_MESSAGE_CHARS",
    "max_file_size": "INSTRUCTBLIP_MAX_FILE_SIZE",
    "threads": "INSTRUCTBLIP_THREADS",
}

MODES = ("Greedy", "Beam search", "Sampling")
DTYPES = ("float32", "bfloat16", "float16")
STREAM_INTERVAL_S = 0.05  # at most ~20 screen updates a second; tokens can come faster than that
STOPPED_MARK = "\n\n*■ stopped*"
EMPTY_ANSWER = "*(no answer: the model ended without any text)*"
LARGE_LLM_PARAMETERS = 1_000_000_000  # above this the original release's settings fit; below, greedy
DEFAULT_MODEL_NOTE = (
    "A small InstructBLIP trained in this project on a synthetic world of shapes, colours, "
    "sizes, positions, counts and short words. It is reliable on the colour, shape and size of an "
    "object in a scene of up to three and on counting up to three objects, less so with more objects, "
    "and weak on places (its model card has the figures). It does not know real photos: for those, start "
    "the app with `--model Salesforce/instructblip-flan-t5-xl` (or another InstructBLIP / BLIP-2 checkpoint)."
)


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class AppSettings:
    model: str = str(DEFAULT_MODEL)  # hub id or checkpoint folder
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: the engine's default (fp32 on CPU, bf16/fp16 on GPU)
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    quantize_fp32_modules: bool = False  # 4-bit bf16 only: T5's wo quantised too
    static_cache: bool = False  # static KV cache: on CUDA, decoding compiled into CUDA graphs
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    concurrency_limit: int = 2  # answers computed at once; the rest wait in the queue
    max_queue: int = 32  # waiting requests beyond this are refused with "queue is full"
    max_message_chars: int = 1000  # longer messages are refused with their length
    max_file_size: str = "25mb"  # uploads above this are refused by the server
    threads: int = 0  # CPU threads per answer; 0: the cores shared out among concurrent answers
    examples_dir: Path = field(default=EXAMPLES_DIR)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env(key: str, *fallbacks: str, default: str | None = None) -> str | None:
    """The flag's environment variable, else Gradio's own (Spaces sets GRADIO_SERVER_NAME), else `default`."""
    for name in (ENV_VARS[key], *fallbacks):
        if os.environ.get(name):
            return os.environ[name]
    return default


def parse_args(argv: Sequence[str] | None = None) -> AppSettings:
    """Flags, each defaulting to its environment variable (named in --help), then to AppSettings'."""
    d = AppSettings()
    p = argparse.ArgumentParser(description="InstructBLIP studio: chat with InstructBLIP about your images.")

    def add(flag: str, key: str, help: str, **kwargs) -> None:
        p.add_argument(flag, help=f"{help} [env {ENV_VARS[key]}]", **kwargs)

    add("--model", "model", default=_env("model", default=d.model),
        help="hub id (e.g. Salesforce/instructblip-flan-t5-xl) or checkpoint folder (default: the shipped small model)")
    add("--device", "device", default=_env("device"), help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add("--dtype", "dtype", default=_env("dtype"), choices=DTYPES,
        help="weight dtype (default: float32 on CPU, bfloat16 or float16 on GPU)")
    add("--load-in-8bit", "load_in_8bit", action="store_true", default=_env_flag(ENV_VARS["load_in_8bit"]),
        help="quantise the LLM to 8 bits (bitsandbytes)")
    add("--load-in-4bit", "load_in_4bit", action="store_true", default=_env_flag(ENV_VARS["load_in_4bit"]),
        help="quantise the LLM to 4 bits, NF4 (bitsandbytes)")
    add("--quantize-fp32-modules", "quantize_fp32_modules", action="store_true",
        default=_env_flag(ENV_VARS["quantize_fp32_modules"]),
        help="with --load-in-4bit --dtype bfloat16: also quantise the layers the LLM keeps in fp32 (Flan-T5's wo, "
             "a third of its weights), which transformers leaves in fp32")
    add("--static-cache", "static_cache", action="store_true", default=_env_flag(ENV_VARS["static_cache"]),
        help="experimental: decode with a static KV cache; on CUDA transformers compiles the decode step into CUDA graphs "
             "(faster answers after the first ones, which wait while it compiles; not with 8/4-bit or beams)")
    add("--host", "host", default=_env("host", "GRADIO_SERVER_NAME", default=d.host),
        help="address to listen on, 0.0.0.0 for every interface (default 127.0.0.1; also GRADIO_SERVER_NAME)")
    add("--port", "port", type=int, default=_env("port", "GRADIO_SERVER_PORT", default=str(d.port)),
        help="port (default 7860; also GRADIO_SERVER_PORT)")
    add("--share", "share", action="store_true", default=_env_flag(ENV_VARS["share"]),
        help="also open a temporary public gradio.live link")
    add("--concurrency-limit", "concurrency_limit", type=int,
        default=_env("concurrency_limit", default=str(d.concurrency_limit)), help="answers computed at the same time (default 2)")
    add("--max-queue", "max_queue", type=int, default=_env("max_queue", default=str(d.max_queue)),
        help="requests that may wait in the queue; more are refused (default 32)")
    add("--max-message-chars", "max_message_chars", type=int,
        default=_env("max_message_chars", default=str(d.max_message_chars)),
        help="longest message accepted, in characters (default 1000)")
    add("--max-file-size", "max_file_size", default=_env("max_file_size", default=d.max_file_size),
        help="largest upload accepted, e.g. 25mb (default)")
    add("--threads", "threads", type=int, default=_env("threads", default=str(d.threads)),
        help="CPU threads for each answer (default 0: the cores divided by --concurrency-limit)")
    a = p.parse_args(argv)
    if a.dtype is not None and a.dtype not in DTYPES:  # from the environment, which argparse does not check
        p.error(f"{ENV_VARS['dtype']}={a.dtype!r}: choose one of {', '.join(DTYPES)}")
    if a.load_in_8bit and a.load_in_4bit:
        p.error("choose --load-in-8bit or --load-in-4bit, not both")
    if a.threads < 0:
        p.error("--threads must be 0 (automatic) or more")
    for name in ("concurrency_limit", "max_queue", "max_message_chars"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return AppSettings(**vars(a))


def share_cpu_threads(settings: AppSettings, device: torch.device) -> int:
    """Threads each answer computes with. On CPU, `concurrency_limit` answers at once share the
    cores: more busy threads than cores makes every answer crawl (OpenMP threads spin waiting
    for each other; measured 3-4x slower on 2 cores with 2 answers of 2 threads each)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    elif device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // settings.concurrency_limit))
    return torch.get_num_threads()


def load_model(settings: AppSettings) -> InstructBlip:
    """Load once at start; a missing or unloadable model is a one-line error, not a traceback."""
    if Path(settings.model).resolve() == DEFAULT_MODEL.resolve() and not DEFAULT_MODEL.is_dir():
        raise SystemExit(
            f"error: no model at {DEFAULT_MODEL.relative_to(ROOT)}; pass --model <hub id or folder> "
            f"(or set {ENV_VARS['model']})"
        )
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load_pretrained(settings.model, device=device, dtype=settings.dtype,
                                load_in_8bit=settings.load_in_8bit, load_in_4bit=settings.load_in_4bit,
                                quantize_fp32_modules=settings.quantize_fp32_modules)
    except (CheckpointError, OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load model {settings.model}: {e}") from e
    model.static_cache = settings.static_cache
    return model


# ----------------------------------------------------------------------------- per-model facts
def llm_parameters(model: InstructBlip) -> int:
    return sum(p.numel() for p in model.model.language_model.parameters())


def max_answer_tokens(model: InstructBlip) -> int:
    """Room for an answer: the LLM's context less the visual tokens and a short question."""
    return max(1, min(1024, model.context_length - model.config.num_query_tokens - 16))


def default_options(model: InstructBlip) -> GenerationOptions:
    """Billion-parameter LLMs get the original release's beam search; small ones greedy decoding,
    which streams and is what a small model trained on short answers does best."""
    cap = max_answer_tokens(model)
    if llm_parameters(model) >= LARGE_LLM_PARAMETERS:
        return dataclasses.replace(ORIGINAL_RELEASE, max_new_tokens=min(ORIGINAL_RELEASE.max_new_tokens, cap))
    return GenerationOptions(max_new_tokens=min(64, cap))


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def quantization(settings: AppSettings) -> str:
    """How the LLM's weights are stored, for the page header and the start-up log ("" = float)."""
    if settings.load_in_8bit:
        return "8-bit"
    if settings.load_in_4bit:
        return "4-bit (fp32-kept layers too)" if settings.quantize_fp32_modules else "4-bit"
    return ""


def describe_model(model: InstructBlip, settings: AppSettings) -> str:
    """One Markdown line about what is loaded, for the page header."""
    config = model.config
    kind = "InstructBLIP: the Q-Former reads your question" if config.qformer_config.use_text_input else "BLIP-2"
    bits = f", LLM in {q}" if (q := quantization(settings)) else ""
    name = Path(model.source).name if Path(model.source).is_dir() else model.source
    return (
        f"**{html.escape(name)}** · {kind} · {config.text_config.model_type} LLM · "
        f"{_count(total_parameters(model))} parameters · {config.vision_config.image_size} px images · "
        f"{str(model.dtype).replace('torch.', '')} on {model.device}{bits}"
    )


def total_parameters(model: InstructBlip) -> int:
    return sum(p.numel() for p in model.model.parameters())


def describe_kind(model: InstructBlip) -> str:
    """For the start-up log: InstructBLIP or BLIP-2, which LLM, how big."""
    kind = "InstructBLIP" if model.config.qformer_config.use_text_input else "BLIP-2"
    return f"{kind}, {model.config.text_config.model_type} LLM, {_count(total_parameters(model))} parameters"


# ----------------------------------------------------------------------------- text safety
def as_text(text: str) -> str:
    """Model or user text for the Chatbot's Markdown: HTML-escaped, so `<script>` or
    `<img onerror=...>` shows as those characters and never becomes an element; square
    brackets escaped too, so no Markdown link or image (`![](http://...)`, a tracking pixel)
    comes out of model text. Other Markdown (lists, emphasis, code) renders as the model wrote it."""
    return html.escape(text, quote=False).replace("[", "\\[").replace("]", "\\]")


# ----------------------------------------------------------------------------- errors
def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError,
    also when wrapped (an image decoder that ran out of memory raises ImageError from it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
            return True
        if isinstance(error, RuntimeError) and "can't allocate memory" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def out_of_memory_message(device: torch.device) -> str:
    return (
        f"Out of memory on {device} while answering. Try a smaller image, fewer beams or fewer max "
        "new tokens, or start the app with --load-in-8bit / --load-in-4bit. Other users are not affected."
    )


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- one user's chat
class UserSession:
    """One browser tab's conversation: its ChatSession, the pictures shown, its stop switch.

    gr.State keeps one per session. Gradio deep-copies a state's initial value for each new
    session, so `__deepcopy__` copies the conversation and shares the model (copying the model
    per visitor would exhaust memory; sharing the conversation is the peer bug we avoid).
    """

    def __init__(self, model: InstructBlip):
        self.chat = ChatSession(model)
        self.stop = threading.Event()  # set by the Stop button; ends the decoding loop itself
        self.busy = threading.Lock()  # one answer at a time per conversation
        self.pictures: dict[int, str] = {}  # segment -> file shown at the start of that segment

    def __deepcopy__(self, memo: dict) -> "UserSession":
        memo[id(self.chat.model)] = self.chat.model
        twin = UserSession(self.chat.model)
        twin.chat = copy.deepcopy(self.chat, memo)
        twin.pictures = dict(self.pictures)
        return twin

    def use_picture(self, path: str) -> None:
        """Load `path` (ImageError on a bad file, named by its own name) and make it the current image."""
        try:
            picture = load_image(path)
        except ImageError as e:  # name the file as the user knows it, not by its upload path
            advice = "please use a smaller image" if e.kind == "too_large" else None  # not our max_pixels setting
            raise e.reworded(Path(path).name, advice=advice) from e
        self.chat.set_image(picture)
        self.pictures[self.chat.segment] = path


@dataclass
class Pending:
    """The turn being answered, shown while it streams (the ChatSession records it at the end)."""

    question: str
    answer: str = ""


def conversation(session: UserSession, pending: Pending | None = None) -> list[dict]:
    """Chatbot messages for the whole transcript: each image where its segment starts, every
    question and answer as escaped text, and notices (a new image leaves the earlier turns
    unused; turns left out to fit the context) at the top of the answer they concern."""
    messages: list[dict] = []
    segment = None
    turns = [(t.question, t.answer, t.segment, t.dropped_turns, t.stopped) for t in session.chat.turns]
    if pending is not None:
        turns.append((pending.question, pending.answer, session.chat.segment, 0, False))
    for question, answer, turn_segment, dropped, stopped in turns:
        new_image = segment is not None and turn_segment != segment
        if turn_segment != segment and turn_segment in session.pictures:
            messages.append({"role": "user", "content": {"path": session.pictures[turn_segment]}})
        segment = turn_segment
        messages.append({"role": "user", "content": as_text(question)})
        if new_image:
            messages.append(_notice("New image", "The earlier turns were about the previous image and are not used for this one."))
        if dropped:
            messages.append(_notice("Context full", f"{dropped} earlier turn(s) left out to fit the model's context."))
        shown = as_text(answer) if answer or pending is not None else EMPTY_ANSWER
        messages.append({"role": "assistant", "content": shown + (STOPPED_MARK if stopped else "")})
    asked = {t.segment for t in session.chat.turns}
    if pending is None and session.chat.segment not in asked and session.chat.segment in session.pictures:
        messages.append({"role": "user", "content": {"path": session.pictures[session.chat.segment]}})  # not asked about yet
    return messages


def _notice(title: str, text: str) -> dict:
    return {"role": "assistant", "content": text, "metadata": {"title": f"Note: {title}", "status": "done"}}


def options_from_controls(mode: str, beams: float, temperature: float, top_p: float, max_new_tokens: float,
                          min_new_tokens: float, repetition_penalty: float, length_penalty: float,
                          seed: float | None) -> GenerationOptions:
    """The settings panel -> validated options (ValueError with the engine's message). Seed 0 or
    empty: a fresh random answer each time."""
    if mode not in MODES:
        raise ValueError(f"decoding mode must be one of {MODES}, got {mode!r}")
    kwargs = dict(max_new_tokens=int(max_new_tokens), min_new_tokens=int(min_new_tokens),
                  repetition_penalty=float(repetition_penalty))
    if mode == "Sampling":
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p),
                      seed=int(seed) if seed else None)
    elif mode == "Beam search":
        kwargs.update(num_beams=int(beams), length_penalty=float(length_penalty))
    return GenerationOptions(**kwargs)


def gpu_task(fn):
    """ZeroGPU on Spaces: `spaces.GPU` when the package is installed, the function itself otherwise."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


# ----------------------------------------------------------------------------- event handlers
class ChatApp:
    """The event handlers, bound to the one shared model; every call gets its tab's UserSession."""

    def __init__(self, model: InstructBlip, settings: AppSettings):
        self.model = model
        self.settings = settings

    # ---- asking ---------------------------------------------------------------------------
    def respond(self, session: UserSession, message: dict | None, show_look: bool, mode: str, beams: float,
                temperature: float, top_p: float, max_new_tokens: float, min_new_tokens: float,
                repetition_penalty: float, length_penalty: float, seed: float) -> Iterator[tuple]:
        """Answer the box's text (about its image, or the current one), streaming.

        Everything the user can fix is checked before the first update, so a refused message
        stays in the box to be corrected."""
        text = ((message or {}).get("text") or "").strip()
        files = list((message or {}).get("files") or [])
        self._check_message(text, files)
        options = self._options(mode, beams, temperature, top_p, max_new_tokens, min_new_tokens,
                                repetition_penalty, length_penalty, seed)
        with self._turn(session):
            if files:
                self._run_safely(lambda: session.use_picture(files[0]))
            if session.chat.image is None:
                raise gr.Error("There is no image yet: attach one (clip button, drag and drop, or paste) or pick an example.")
            self._run_safely(lambda: session.chat.prompt_for(text, options.max_new_tokens))
            stream = session.chat.stream(text, stop=session.stop, **options.__dict__)
            yield from self._stream_answer(session, stream, text, show_look, options)

    def retry(self, session: UserSession, show_look: bool, mode: str, beams: float, temperature: float,
              top_p: float, max_new_tokens: float, min_new_tokens: float, repetition_penalty: float,
              length_penalty: float, seed: float) -> Iterator[tuple]:
        """Answer the latest question again (with the current settings)."""
        options = self._options(mode, beams, temperature, top_p, max_new_tokens, min_new_tokens,
                                repetition_penalty, length_penalty, seed)
        with self._turn(session):
            if not session.chat.turns:
                raise gr.Error("There is nothing to retry yet: ask a question first.")
            question = session.chat.turns[-1].question
            stream = self._run_safely(lambda: session.chat.retry_stream(stop=session.stop, **options.__dict__))
            yield from self._stream_answer(session, stream, question, show_look, options)

    def _check_message(self, text: str, files: list[str]) -> None:
        if len(files) > 1:
            raise gr.Error(f"One image per message, please ({len(files)} were attached).")
        if not text:
            hint = "type a question to go with the image" if files else "type a question about the image"
            raise gr.Error(f"The message is empty: {hint}.")
        if len(text) > self.settings.max_message_chars:
            raise gr.Error(
                f"The message is {len(text):,} characters long; the limit is "
                f"{self.settings.max_message_chars:,}. Please shorten it."
            )

    def _options(self, *controls) -> GenerationOptions:
        try:
            return options_from_controls(*controls)
        except (TypeError, ValueError) as e:
            raise gr.Error(f"Settings: {e}") from e

    def _turn(self, session: UserSession):
        """Hold the conversation for one answer; a second request meanwhile is refused."""
        if not session.busy.acquire(blocking=False):
            raise gr.Error("This chat is still answering: wait for it or press Stop.")
        session.stop.clear()
        return _Release(session.busy)

    def _run_safely(self, step):
        """Run one step, turning what the user can act on into a specific message."""
        try:
            return step()
        except Exception as e:
            raise self._user_error(e) from e

    def _user_error(self, error: Exception) -> gr.Error:
        if isinstance(error, gr.Error):
            return error
        if is_out_of_memory(error):
            free_memory(self.model.device)
            LOG.warning("out of memory: %s", error)
            return gr.Error(out_of_memory_message(self.model.device))
        if isinstance(error, ImageError):  # starts with the file's name: keep its case
            return gr.Error(_sentence(str(error), capital=False))
        if isinstance(error, ChatError):
            return gr.Error(_sentence(str(error)))
        LOG.exception("unexpected error while answering")
        return gr.Error(f"Unexpected error: {type(error).__name__}: {error}")

    def _stream_answer(self, session: UserSession, stream: Iterator[str], question: str, show_look: bool,
                       options: GenerationOptions) -> Iterator[tuple]:
        pending = Pending(question)
        started = shown = time.perf_counter()
        yield conversation(session, pending), None, gr.skip(), _status_waiting(options)
        try:
            for piece in stream:
                pending.answer += piece
                if time.perf_counter() - shown >= STREAM_INTERVAL_S:
                    shown = time.perf_counter()
                    yield conversation(session, pending), gr.skip(), gr.skip(), gr.skip()
        except Exception as e:  # not recorded by the ChatSession: show the transcript without it
            error = self._user_error(e)
            yield conversation(session), {"text": question, "files": []}, gr.skip(), ""
            raise error from e
        finally:
            stream.close()  # a closed tab (GeneratorExit here) ends the decoding loop too
        turn = session.chat.turns[-1]  # its notices (new image, turns left out) are in the transcript
        look = self._look(session, question) if show_look else gr.skip()
        yield conversation(session), gr.skip(), look, self._status(turn, options, time.perf_counter() - started)

    def _look(self, session: UserSession, question: str):
        """The heat map for this question; a failure here must not cost the user the answer."""
        try:
            picture = attention_overlay(self.model, session.chat.image, question, display=session.chat.picture)
        except Exception as e:
            if is_out_of_memory(e):
                free_memory(self.model.device)
            LOG.warning("no attention map: %s: %s", type(e).__name__, e)
            gr.Warning(f"Could not draw where the model looked: {type(e).__name__}: {e}")
            return gr.skip()
        return gr.Image(value=picture, label=f"Where did it look? — “{question[:60]}”")

    @staticmethod
    def _status(turn, options: GenerationOptions, seconds: float) -> str:
        verb = "Stopped" if turn.stopped else "Answered"
        return f"{verb} after {seconds:.1f} s · {len(turn.answer)} characters · {options.mode}"

    # ---- the other buttons ------------------------------------------------------------------
    def stop(self, session: UserSession):
        """Ends the decoding loop of this tab's answer (within one token), not just its display."""
        if not session.busy.locked():
            return gr.skip()  # nothing is being answered
        session.stop.set()
        return "Stopping…"

    def undo(self, session: UserSession) -> tuple:
        with self._idle(session):
            if not session.chat.turns:
                gr.Warning("Nothing to undo.")
            else:
                session.chat.undo()
            return conversation(session), ""

    def edit(self, session: UserSession) -> tuple:
        """Take the latest question back into the box to change and send again."""
        with self._idle(session):
            if not session.chat.turns:
                gr.Warning("Nothing to edit yet.")
                return conversation(session), gr.skip()
            turn = session.chat.undo()
            return conversation(session), {"text": turn.question, "files": []}

    def clear(self, session: UserSession) -> tuple:
        session.stop.set()  # a running answer ends first
        with self._idle(session, wait=True):
            session.chat.reset()
            session.pictures.clear()
            return [], None, gr.Image(value=None, label="Where did it look?"), ""

    def _idle(self, session: UserSession, wait: bool = False):
        if not session.busy.acquire(timeout=10 if wait else 0.5):
            raise gr.Error("This chat is still answering: wait for it or press Stop.")
        return _Release(session.busy)


class _Release:
    """`with` block that releases an already acquired lock (also when a generator is closed)."""

    def __init__(self, lock: threading.Lock):
        self.lock = lock

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()


def _sentence(message: str, capital: bool = True) -> str:
    message = message.strip().rstrip(".")
    return (message[:1].upper() + message[1:] if capital else message) + "."


def _status_waiting(options: GenerationOptions) -> str:
    if options.num_beams > 1:
        return f"Searching with {options.num_beams} beams… (beam search shows the answer when it is done)"
    return "Answering…"


# ----------------------------------------------------------------------------- layout
CSS = """
.gradio-container {max-width: 1320px !important; margin: auto;}
#title h1 {margin-bottom: 0.1rem; font-size: 1.6rem;}
#title p {margin: 0; opacity: 0.8;}
#model-line, #model-note {font-size: 0.85rem; opacity: 0.85;}
#status {min-height: 1.4rem; font-size: 0.85rem; opacity: 0.8;}
#look img {object-fit: contain;}
#examples .caption-label {white-space: normal; overflow: visible; text-overflow: clip; font-size: 0.72rem;
                          line-height: 1.15; max-width: 95%;}
"""


@dataclass(frozen=True)
class Example:
    image: str  # path
    question: str


def read_examples(folder: Path) -> tuple[Example, ...]:
    """assets/examples/examples.json: [{"image": "file.png", "question": "..."}, ...] (absent: none)."""
    index = folder / "examples.json"
    if not index.is_file():
        return ()
    entries = json.loads(index.read_text(encoding="utf-8"))
    return tuple(Example(str(folder / e["image"]), e["question"]) for e in entries)


def build_demo(model: InstructBlip, settings: AppSettings) -> gr.Blocks:
    """The whole UI for one loaded model, queue included. Launch it with `launch_options(settings)`
    (Gradio 6 takes the theme and CSS at launch)."""
    app = ChatApp(model, settings)
    defaults = default_options(model)
    with gr.Blocks(title="InstructBLIP studio") as demo:
        # A function (copied as itself) rather than a bound method (whose deep copy copies the model).
        session = gr.State(lambda: UserSession(model))
        gr.Markdown("# InstructBLIP studio\nAsk about an image, follow up, and see where the model looked.",
                    elem_id="title")
        gr.Markdown(describe_model(model, settings), elem_id="model-line")
        if Path(model.source).resolve() == DEFAULT_MODEL.resolve():
            gr.Markdown(DEFAULT_MODEL_NOTE, elem_id="model-note")
        with gr.Row(equal_height=False):
            with gr.Column(scale=7):
                chatbot = gr.Chatbot(
                    label="Conversation", elem_id="chatbot", show_label=False, height=420, render_markdown=True, sanitize_html=True,
                    allow_tags=False, latex_delimiters=[], buttons=["copy"], feedback_options=None,
                    placeholder="**Add an image and ask about it.** Upload it with the clip button, drop it on the box "
                                "below or paste it, or pick one of the examples.",
                )
                box = gr.MultimodalTextbox(
                    label="Message", elem_id="chat-input", show_label=False, file_count="single", sources=["upload"],
                    placeholder="Ask about the image…  (Enter sends; attach an image with the clip or by dropping it here)",
                )
                with gr.Row(elem_id="buttons"):
                    small = dict(size="sm", min_width=60)
                    stop_btn = gr.Button("■ Stop", elem_id="stop-button", variant="stop", **small)
                    retry_btn = gr.Button("↻ Retry", elem_id="retry-button", **small)
                    edit_btn = gr.Button("✎ Edit last", elem_id="edit-button", **small)
                    undo_btn = gr.Button("↶ Undo", elem_id="undo-button", **small)
                    clear_btn = gr.Button("✕ Clear", elem_id="clear-button", **small)
                status = gr.Markdown("", elem_id="status", label="Status")
            with gr.Column(scale=5):
                look = gr.Image(label="Where did it look?", elem_id="look", type="pil", format="png", interactive=False,
                                height=220, buttons=["download"])
                show_look = gr.Checkbox(value=True, label="Show where the Q-Former looked for each question",
                                        elem_id="show-look")
                controls = _settings_panel(model, defaults)
                _examples_gallery(read_examples(settings.examples_dir), box)
        _wire(app, session, box, chatbot, look, status, show_look, controls,
              dict(stop=stop_btn, retry=retry_btn, edit=edit_btn, undo=undo_btn, clear=clear_btn))
    # Answers wait in one queue; `concurrency_limit` of them are computed at once, the rest wait
    # (up to `max_queue`, beyond which a request is refused with "queue is full").
    demo.queue(default_concurrency_limit=settings.concurrency_limit, max_size=settings.max_queue)
    return demo


def _examples_gallery(examples: tuple[Example, ...], box: gr.MultimodalTextbox) -> None:
    """Thumbnails with their questions; a click puts both into the message box, ready to send."""
    if not examples:
        return
    gallery = gr.Gallery(
        value=[(e.image, e.question) for e in examples], label="Examples: click one, then press Enter",
        elem_id="examples", columns=3, height=205, allow_preview=False, object_fit="contain", buttons=[],
    )

    def pick(evt: gr.SelectData) -> dict:
        chosen = examples[evt.index]
        return {"text": chosen.question, "files": [chosen.image]}

    gallery.select(pick, None, [box], api_visibility="private", show_progress="hidden")


def _settings_panel(model: InstructBlip, defaults: GenerationOptions) -> list:
    """The decoding controls, in `options_from_controls` order, two to a row to stay short;
    the ones the chosen decoding ignores are greyed out."""
    cap = max_answer_tokens(model)
    mode = {"greedy": "Greedy", "beam": "Beam search", "sample": "Sampling"}[defaults.mode]
    used = used_controls(mode)
    with gr.Accordion("Settings", open=False, elem_id="settings"):
        decoding = gr.Radio(list(MODES), value=mode, show_label=False, elem_id="mode",
                            info="Greedy is deterministic; beam search tries several answers; sampling varies.")
        with gr.Row():
            max_new = gr.Slider(1, cap, value=defaults.max_new_tokens, step=1, label="Max new tokens", elem_id="max-new-tokens")
            min_new = gr.Slider(0, cap, value=defaults.min_new_tokens, step=1, label="Min new tokens", elem_id="min-new-tokens")
        with gr.Row():
            beams = gr.Slider(1, 10, value=max(defaults.num_beams, 1), step=1, label="Beams", elem_id="beams",
                              interactive=used["beams"])
            length = gr.Slider(-1.0, 2.0, value=defaults.length_penalty, step=0.1, label="Length penalty",
                               elem_id="length-penalty", interactive=used["length"])
        with gr.Row():
            temperature = gr.Slider(0.1, 2.0, value=defaults.temperature, step=0.05, label="Temperature",
                                    elem_id="temperature", interactive=used["temperature"])
            top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p", elem_id="top-p",
                              interactive=used["top_p"])
        with gr.Row():
            repetition = gr.Slider(1.0, 2.0, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty",
                                   elem_id="repetition-penalty")
            seed = gr.Number(value=0, precision=0, label="Seed (0: random)", elem_id="seed", interactive=used["seed"])
    decoding.change(lambda m: [gr.update(interactive=on) for on in used_controls(m).values()], decoding,
                    [beams, length, temperature, top_p, seed], api_visibility="private", show_progress="hidden",
                    queue=False)
    return [decoding, beams, temperature, top_p, max_new, min_new, repetition, length, seed]


def used_controls(mode: str) -> dict[str, bool]:
    """Which mode-specific controls `mode` uses (the rest it ignores), in the panel's update order."""
    beam, sample = mode == "Beam search", mode == "Sampling"
    return {"beams": beam, "length": beam, "temperature": sample, "top_p": sample, "seed": sample}


def _wire(app: ChatApp, session, box, chatbot, look, status, show_look, controls, buttons) -> None:
    answer_outputs = [chatbot, box, look, status]
    inputs = [session, show_look, *controls]
    generate = dict(concurrency_id="generate", show_progress="hidden")
    box.submit(gpu_task(app.respond), [session, box, show_look, *controls], answer_outputs, api_name="chat", **generate)
    buttons["retry"].click(gpu_task(app.retry), inputs, answer_outputs, api_name="retry", **generate)
    # Not queued: a Stop must never wait behind the answers it is meant to stop.
    buttons["stop"].click(app.stop, [session], [status], api_name="stop", queue=False)
    quick = dict(concurrency_limit=None, show_progress="hidden")
    buttons["undo"].click(app.undo, [session], [chatbot, status], api_name="undo", **quick)
    buttons["edit"].click(app.edit, [session], [chatbot, box], api_name="edit", **quick)
    buttons["clear"].click(app.clear, [session], [chatbot, box, look, status], api_name="clear", **quick)
    # The Chatbot's own trash icon must forget the conversation too, not just the display.
    chatbot.clear(app.clear, [session], [chatbot, box, look, status], api_visibility="private", **quick)


def launch_options(settings: AppSettings) -> dict:
    return dict(
        server_name=settings.host, server_port=settings.port, share=settings.share,
        max_file_size=settings.max_file_size, allowed_paths=[str(settings.examples_dir)],
        theme=gr.themes.Soft(primary_hue="indigo"), css=CSS, footer_links=["api"],
    )


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up probes
    settings = parse_args(argv)
    started = time.perf_counter()
    model = load_model(settings)
    threads = share_cpu_threads(settings, model.device)
    LOG.info("InstructBLIP studio: model %s (%s), dtype %s, device %s%s, loaded in %.1f s; "
             "%d answer(s) at once, %d CPU thread(s) each",
             model.source, describe_kind(model), str(model.dtype).replace("torch.", ""), model.device,
             f", LLM {q}" if (q := quantization(settings)) else "",
             time.perf_counter() - started, settings.concurrency_limit, threads)
    demo = build_demo(model, settings)
    _, local_url, share_url = demo.launch(prevent_thread_lock=True, quiet=True, **launch_options(settings))
    LOG.info("InstructBLIP studio is running at %s%s", local_url, f" (public link: {share_url})" if share_url else "")
    demo.block_thread()


if __name__ == "__main__":
    main()
