"""The LLM's pretraining in a second process, beside the image encoder's, on the CPU.

The two pretrainings need nothing from each other, and on small models two threads are far
from twice one: on the 2-core build machine a step of the ViT or of the LLM runs only 1.5-1.6x
as fast on two threads as on one. So the image encoder trains on half the cores while the LLM
trains on the other half, in its own process; from a fixed step on (below), with the encoder
done, the LLM's process takes every core for the rest of its steps. What that saves depends
on the hour: 15% of the two pretrainings in a slow one, nothing measurable in a fast one,
when each process also runs slower beside the other (finetune/README.md has the measurements).

The LLM's arithmetic depends on the number of threads at its real size on some machines (a
20-step run on one thread, on two, and switching at step 7 gave three different weights on
one 2-core build machine; on an earlier one they were equal). So the switch is tied
to a step, not to the moment the encoder finishes: the LLM trains its first
`SWITCH_SHARE` of steps on its share of the cores and the rest on all of them, beside the
encoder or alone (a rerun that finds the encoder done). Beside it, the LLM waits at that
step for the encoder to finish rather than crowd its core. The encoder always trains on its
share too (LayerNorm's weight gradient is summed per thread). So a seed builds one model on
a given machine, however fast each process runs.
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


# Where the LLM takes every core: the encoder's 3000 one-thread steps took as long as the LLM's
# first 1385-1390 of 3000 in two runs (46%); switching a little earlier makes the LLM wait a
# little rather than leave a core idle for long when the encoder runs late.
SWITCH_SHARE = 0.45


def switch_step(steps: int) -> int:
    """The first of the LLM's `steps` trained on every core."""
    return int(steps * SWITCH_SHARE)


def llm_thread_schedule(steps: int, all_threads: int, encoder_done=None, still_wanted=lambda: True):
    """`before_step` for the LLM's pretraining on the CPU: its share of the threads up to `switch_step`,
    every thread from there. With `encoder_done` (an Event), it first waits there for the encoder."""
    switch = switch_step(steps)

    def stop_if_the_recipe_is_gone() -> None:
        if not still_wanted():
            raise SystemExit("the recipe that started this LLM pretraining is gone")

    def before_step(step: int) -> None:
        stop_if_the_recipe_is_gone()
        if step == 0:
            torch.set_num_threads(llm_threads_of(all_threads))
        if step == switch:
            while encoder_done is not None and not encoder_done.wait(timeout=1.0):
                stop_if_the_recipe_is_gone()
            torch.set_num_threads(all_threads)

    return before_step


def encoder_threads_of(all_threads: int) -> int:
    return max(1, all_threads // 2)


def llm_threads_of(all_threads: int) -> int:
    """The LLM's share beside the encoder: the rest of the threads (the one thread on a 1-thread machine)."""
    return max(1, all_threads - encoder_threads_of(all_threads))


def encoder_threads() -> int:
    """The image encoder's share of the CPU threads: half, rounded down, and at least one."""
    return encoder_threads_of(torch.get_num_threads())


@contextmanager
def threads_restored():
    """Yields torch's thread count, and sets it back to that on leaving, whatever the body set."""
    threads = torch.get_num_threads()
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


@contextmanager
def encoder_share_of_the_cpu(device: str):
    """Torch's threads cut to `encoder_threads()` for the image encoder's training on the CPU."""
    with threads_restored():
        if device == "cpu":
            torch.set_num_threads(encoder_threads())
        yield


def _pretrain_llm_process(folder: Path, tokenizer_dir: Path, lines: list[str], steps: int, all_threads: int,
                          encoder_done, log_path: Path) -> None:
    recipe = multiprocessing.parent_process()
    # A recipe killed outright (SIGKILL, out of memory) cannot stop its daemon; a rerun would
    # then find this process still writing the LLM's folder.
    before_step = llm_thread_schedule(steps, all_threads, encoder_done, still_wanted=recipe.is_alive)
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
        self.threads = llm_threads_of(all_threads)
        self.process = context.Process(
            target=_pretrain_llm_process, name="llm-pretraining", daemon=True,
            args=(folder, tokenizer_dir, lines, steps, all_threads, self.encoder_done, log_path),
        )
        self.process.start()

    def result(self) -> LlamaForCausalLM:
        self.encoder_done.set()
        self.process.join()
        if self.process.exitcode != 0 or not (self.folder / "config.json").exists():
            raise RuntimeError(f"LLM pretraining failed in its own process (exit code {self.process.exitcode}); "
                               f"its error is printed above")
        return LlamaForCausalLM.from_pretrained(self.folder)
