"""Helpers shared by the trainer / finetune tests: real data files, configs, CLI subprocesses.

The data are 16 solid-colour PNG images, each with its own one-token answer word, so that a
tiny model can memorise them in a few hundred steps on the CPU. The tiny checkpoint used for
training has a 1-layer, 256-wide LLM: wide enough that 4 soft-prompt vectors steer it quickly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TRAIN_SIZES = dict(llm_layers=1, llm_hidden=256, llm_intermediate=512)
COLOURS = [
    (255, 0, 0), (0, 160, 0), (0, 0, 255), (255, 255, 0), (255, 128, 0), (128, 0, 128), (255, 150, 200), (120, 70, 20),
    (0, 0, 0), (255, 255, 255), (128, 128, 128), (0, 255, 255), (0, 0, 100), (110, 110, 0), (0, 120, 120), (220, 180, 0),
]  # fmt: skip
# One LLM token each in the tiny tokenizers (plus EOS): memorising them is quick.
WORDS = ["red", "purple", "black", "circle", "square", "star", "triangle", "dog",
         "animal", "picture", "one", "two", "big", "image", "colour", "question"]  # fmt: skip
INSTRUCTION = "What is the word for this picture? Short answer:"


@pytest.fixture
def one_thread():
    """One torch thread, as the subprocesses (OMP_NUM_THREADS=1): the same arithmetic in runs we
    compare, and fast on 2 busy cores. A fresh accelerate state too: one process may only ever
    create Accelerators of one mixed-precision setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(threads)


def write_images(folder: Path, n: int = 16) -> list[str]:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img/{i}.png"
        Image.new("RGB", (32, 32), COLOURS[i % len(COLOURS)]).save(folder / name)
        names.append(name)
    return names


def write_word_dataset(folder: Path, n: int = 16, *, own_instruction: bool = True, name: str = "train.jsonl") -> Path:
    """n records {image, instruction|question, answer}; returns the .jsonl path."""
    images = write_images(folder, n)
    path = folder / name
    with open(path, "w") as f:
        for i, image in enumerate(images):
            text = {"instruction": INSTRUCTION} if own_instruction else {"question": "what is the word for this picture?"}
            f.write(json.dumps({"image": image, **text, "answer": WORDS[i % len(WORDS)]}) + "\n")
    return path


def write_caption_dataset(folder: Path, n: int = 8, name: str = "captions.jsonl", negatives: bool = False) -> Path:
    """n caption records; with `negatives`, every even one also has a false caption (stage 1's ITM)."""
    images = write_images(folder, n)
    path = folder / name
    with open(path, "w") as f:
        for i, image in enumerate(images):
            record = {"image": image, "caption": f"a {WORDS[i]} on a plain {WORDS[(i + 5) % 16]}"}
            if negatives and i % 2 == 0:
                record["negative_captions"] = [f"a {WORDS[(i + 5) % 16]} on a plain {WORDS[i]}"]
            f.write(json.dumps(record) + "\n")
    return path


def write_config(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def subprocess_env() -> dict:
    """One thread per process: the same arithmetic in every run we compare, and no oversubscription."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def train_command(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "finetune.train", str(config), *overrides]


def run_train(config: Path, *overrides: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_command(config, *overrides), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of a run's newest checkpoint."""
    steps = sorted((output_dir / "checkpoints").glob("step-*"))
    assert steps, f"no checkpoint in {output_dir}"
    return load_file(steps[-1] / "trainable.safetensors")


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(output_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(output_dir) if "train/loss" in m}
