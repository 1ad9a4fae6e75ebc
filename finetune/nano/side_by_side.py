"""The LLM's pretraining in a second process, beside the image encoder's, on the CPU.

The two pretrainings need nothing from each other, and on small models two threads are far
from twice one: on the 2-core build machine a step of the ViT or of the LLM runs only 1.5-1.6x
as fast on two threads as on one. So the image encoder trains on half the cores while the LLM
trains on the other half, in its own process; once the encoder is done, the LLM's process
takes every core for the rest of its steps. What that saves depends on the hour: 15% of the
two pretrainings in a slow one, nothing measurable in a fast one, when each process also runs
slower beside the other (finetune/README.md has the measurements).

When that happens depends on the machine's speed, but not what the LLM learns: its arithmetic
is the same on any number of threads (tests/test_nano_recipe.py checks it on this machine).
The image encoder's is not (LayerNorm's weight gradient is summed per thread), so it always
trains on the same share of the cores, with the LLM beside it or not, and a seed builds one
model on a given machine.
"""

from __future__ import annotations

import multiprocessing
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from . import build_model
from .logbook import log_to
from .pretrain_text import pretrained_llm


def encoder_threads() -> int:
    """The image encoder's share of the CPU threads: half, rounded down, and at least one."""
    return max(1, torch.get_num_threads() // 2)


@contextmanager
def encoder_share_of_the_cpu(device: str):
    """Torch's threads cut to `encoder_threads()` for the image encoder's training on the CPU."""
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(encoder_threads())
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pretrain_llm_process(folder: Path, tokenizer_dir: Path, lines: list[str], steps: int, threads: int,
                          all_threads: int, encoder_done, log_path: Path) -> None:
    torch.set_num_threads(threads)

    recipe = multiprocessing.parent_process()

    def before_step(step: int) -> None:
        # A recipe killed outright (SIGKILL, out of memory) cannot stop its daemon; a rerun would
        # then find this process still writing the LLM's folder.
        if not recipe.is_alive():
            raise SystemExit("the recipe that started this LLM pretraining is gone")
        if encoder_done.is_set() and torch.get_num_threads() != all_threads:
            torch.set_num_threads(all_threads)  # the encoder is done: take every core

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pretrained_llm(folder, build_model.llm_config(tokenizer), tokenizer, lines, steps=steps, log=log_to(log_path),
                   before_step=before_step)


class LLMPretrainingBeside:
    """Starts the LLM's pretraining in a process of its own; `result()` waits for it and loads it.

    The process is a daemon: if the recipe stops with an error, it is stopped too rather than
    going on alone.
    """

    def __init__(self, folder: Path, tokenizer_dir: Path, lines: list[str], steps: int, log_path: Path):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
        self.folder = folder
        self.encoder_done = context.Event()
        all_threads = torch.get_num_threads()
        self.threads = all_threads - encoder_threads()
        self.process = context.Process(
            target=_pretrain_llm_process, name="llm-pretraining", daemon=True,
            args=(folder, tokenizer_dir, lines, steps, self.threads, all_threads, self.encoder_done, log_path),
        )
        self.process.start()

    def result(self) -> LlamaForCausalLM:
        self.encoder_done.set()
        self.process.join()
        if self.process.exitcode != 0 or not (self.folder / "config.json").exists():
            raise RuntimeError(f"LLM pretraining failed in its own process (exit code {self.process.exitcode}); "
                               f"its error is printed above")
        return LlamaForCausalLM.from_pretrained(self.folder)
