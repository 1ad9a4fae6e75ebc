"""Helpers for the app tests: the real `app.py` in a subprocess on a free localhost port, a
gradio_client to talk to it, and readers for the Chatbot's messages.

Starting the app costs ~15 s (gradio and transformers imports), so one server per model and
flags is started on first use and shared by the app test modules of a pytest run (each client
is its own browser-like session, so sharing the process is what production does too).
"""

from __future__ import annotations

import atexit
import inspect
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image, ImageDraw

from app import STOPPED_MARK, as_text
from instructblip_core import ChatSession, InstructBlip, load_pretrained

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = ROOT / "assets" / "nano-instructblip"
EXAMPLES = ROOT / "assets" / "examples"
# A tiny checkpoint wide enough to take ~15 ms a token on 2 cores: long answers last seconds,
# which leaves time to press Stop; short ones still take well under a second.
APP_MODEL_SIZES = dict(llm_layers=4, llm_hidden=384, llm_intermediate=1536)
GREEDY = dict(mode="Greedy", max_new_tokens=24, min_new_tokens=1, repetition_penalty=1.0)
STARTUP_TIMEOUT_S = 240
TEST_MAX_FILE_SIZE = 2 * 2**20  # the test server refuses uploads over 2 MB
# The server and this process compute with the same number of threads, so that greedy answers
# are the same to the last bit (a different split of a sum may flip a near-tie).
THREADS = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python app.py ...` on 127.0.0.1, started and waited for; `stop()` ends it."""

    def __init__(self, *flags: str):
        self.flags = flags
        self.workdir = Path(tempfile.mkdtemp(prefix="instructblip-app-"))
        self.port = free_port()
        self.lines: list[str] = []
        self.url = ""
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
                   GRADIO_TEMP_DIR=str(self.workdir / "gradio"), PYTHONUNBUFFERED="1")
        command = [sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(self.port), *flags]
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._wait_until_ready()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            found = re.search(r"is running at (http://\S+)", self.log())
            if found:
                self.url = found.group(1)
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.process.returncode} before serving:\n{self.log()}")
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"app.py did not start within {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def client(self) -> Client:
        """A new client: a new session of its own, like a new browser tab."""
        return Client(self.url, verbose=False, download_files=str(self.workdir / "downloads"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


_RUNNING: dict[tuple[str, ...], AppServer] = {}


def shared_app(*flags: str) -> AppServer:
    """The server for these flags, started on first use and stopped when the test run ends."""
    if flags not in _RUNNING or _RUNNING[flags].process.poll() is not None:
        server = AppServer(*flags)
        _RUNNING[flags] = server
        atexit.register(server.stop)
    return _RUNNING[flags]


def app_for(model_folder: Path | None) -> AppServer:
    """The app on this checkpoint; None: plain `python app.py`, i.e. the shipped model."""
    model = ("--model", str(model_folder)) if model_folder is not None else ()
    return shared_app(*model, "--max-file-size", f"{TEST_MAX_FILE_SIZE}b", "--threads", str(THREADS))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def model(tiny_checkpoints) -> InstructBlip:
    """The app tests' tiny checkpoint, loaded in this process (import the fixture to use it)."""
    return load_pretrained(tiny_checkpoints("instructblip-llama", **APP_MODEL_SIZES))


@pytest.fixture(scope="module")
def app_and_model(tiny_checkpoints, model) -> tuple[AppServer, InstructBlip]:
    """The running app on that checkpoint, and the same model here."""
    return app_for(tiny_checkpoints("instructblip-llama", **APP_MODEL_SIZES)), model


# ----------------------------------------------------------------------------- talking to it
def ask(client: Client, text: str, image: Path | str | None = None, **settings) -> tuple:
    """One /chat call (waits for the whole answer): (conversation, box, look, status)."""
    message = {"text": text, "files": [handle_file(str(image))] if image is not None else []}
    return client.predict(message, api_name="/chat", **{**GREEDY, **settings})


def answers(conversation: list[dict]) -> list[str]:
    """The model's answers as shown, without the stopped mark (notices left out)."""
    return [_text(m).removesuffix(STOPPED_MARK) for m in _replies(conversation)]


def stopped(conversation: list[dict]) -> list[bool]:
    return [_text(m).endswith(STOPPED_MARK) for m in _replies(conversation)]


def _replies(conversation: list[dict]) -> list[dict]:
    return [m for m in conversation if m["role"] == "assistant" and not m.get("metadata")]


def questions(conversation: list[dict]) -> list[str]:
    return [_text(m) for m in conversation if m["role"] == "user" and _text(m)]


def pictures(conversation: list[dict]) -> list[str]:
    """File names of the images shown in the conversation, in order."""
    return [Path(c["file"]).name for m in conversation for c in m["content"] if c.get("type") == "file"]


def notices(conversation: list[dict]) -> list[str]:
    return [m["metadata"]["title"] for m in conversation if m.get("metadata")]


def _text(message: dict) -> str:
    return "".join(c["text"] for c in message["content"] if c.get("type") == "text")


def as_shown(answer: str) -> str:
    """How the app shows an answer: HTML-escaped, then Gradio's Chatbot `inspect.cleandoc`."""
    return inspect.cleandoc(as_text(answer))


def direct_answers(model: InstructBlip, turns: list[tuple[str, Path | None]], **settings) -> list[str]:
    """The same conversation asked of a ChatSession in this process, with the app's greedy settings."""
    options = {**GREEDY, **settings}
    options.pop("mode")
    session = ChatSession(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return [as_shown(session.ask(text, image, **options)) for text, image in turns]
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- pictures
def draw_scene(path: Path, background: tuple, shape: str, colour: tuple, box: tuple) -> Path:
    """A small PNG with one shape, different per test client."""
    image = Image.new("RGB", (96, 96), background)
    draw = ImageDraw.Draw(image)
    getattr(draw, {"square": "rectangle", "circle": "ellipse"}[shape])(box, fill=colour)
    image.save(path)
    return path


def client_scenes(folder: Path, count: int) -> list[Path]:
    """`count` pictures that differ in background, shape, colour and place."""
    palette = [(220, 40, 40), (40, 70, 220), (40, 170, 70), (240, 205, 30), (140, 60, 190), (245, 140, 30),
               (20, 20, 20), (0, 170, 170)]
    scenes = []
    for i in range(count):
        x, y = (i * 23) % 60, (i * 37) % 60
        background = (255 - 25 * i, 235, 200 + 6 * i)
        shape = ("square", "circle")[i % 2]
        scenes.append(draw_scene(folder / f"client{i}.png", background, shape, palette[i % len(palette)],
                                 (x, y, x + 30, y + 30)))
    return scenes
