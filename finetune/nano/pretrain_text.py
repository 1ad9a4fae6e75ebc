"""Pretraining the small model's LLM on the world's text, after which it is frozen (like Vicuna).

A LLaMA-architecture decoder (transformers' `LlamaForCausalLM`, so the checkpoint is an
ordinary LLaMA) learns the world's corpus (`splits.text_corpus`): sentences, and mostly
scene descriptions followed by held-in instructions and their answers. A frozen LLM must
already speak the language the Q-Former's soft prompt will steer it to answer in, and must
already read its answers back from its context.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from instructblip_core.checkpointing import replace_folder

from .pretrain_steps import PretrainOptimizer


@dataclass
class TextPretrainResult:
    model: LlamaForCausalLM
    eval_loss: float  # mean token loss on held-back lines
    seconds: float


def encode_lines(tokenizer: PreTrainedTokenizerBase, lines: list[str], max_len: int) -> list[list[int]]:
    """BOS + line + EOS, cut to max_len."""
    return [ids[: max_len - 1] + [tokenizer.eos_token_id] for ids in tokenizer(lines).input_ids]


def length_bucketed_batches(rows: list[list[int]], batch_size: int, rng: random.Random, pool: int = 16):
    """Endless batches of rows of similar length: draw `pool` batches' worth at random, sort them
    by length, cut into batches, and hand those out in random order.

    The documents run from a few tokens to about 180 (median 67), so random batches padded to
    their longest row were half padding; bucketed ones are about 93% text, which halves the
    cost of a step on the CPU without changing what a step sees on average.
    """
    batch_size = min(batch_size, len(rows))
    while True:
        drawn = sorted(rng.sample(rows, min(batch_size * pool, len(rows))), key=len)
        batches = [drawn[i : i + batch_size] for i in range(0, len(drawn) - batch_size + 1, batch_size)]
        rng.shuffle(batches)
        yield from batches


def _batch(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # (B, T)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def lm_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    labels = ids.masked_fill(mask == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def pretrain_text(
    config: LlamaConfig,
    tokenizer: PreTrainedTokenizerBase,
    lines: list[str],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log=print,
    before_step: Callable[[int], None] | None = None,
) -> TextPretrainResult:
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    rows = encode_lines(tokenizer, lines, config.max_position_embeddings)
    n_eval = max(1, len(rows) // 50)
    train, held = rows[:-n_eval], rows[-n_eval:]
    model = LlamaForCausalLM(config).to(device)
    optimizer = PretrainOptimizer(model.parameters(), lr=lr, steps=steps, betas=(0.9, 0.95))
    model.train()
    batches = length_bucketed_batches(train, batch_size, rng)
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        ids, mask = _batch(next(batches), tokenizer.pad_token_id)
        loss = lm_loss(model, ids.to(device), mask.to(device))
        optimizer.step(loss)
        if step % 100 == 0 or step == steps - 1:
            log(f"text step {step}/{steps} loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        losses = [lm_loss(model, *(t.to(device) for t in _batch(held[i : i + 64], tokenizer.pad_token_id))).item()
                  for i in range(0, len(held), 64)]
    return TextPretrainResult(model.cpu(), sum(losses) / len(losses), time.perf_counter() - started)


def pretrained_llm(folder: Path, config: LlamaConfig, tokenizer: PreTrainedTokenizerBase, lines: list[str], *,
                   steps: int, device: str | torch.device = "cpu", log=print,
                   before_step: Callable[[int], None] | None = None) -> LlamaForCausalLM:
    """The recipe's LLM stage: the model saved in `folder`, pretrained and saved there first if it is not.

    Saved under a temporary name and renamed, so a `folder` that exists is always complete (the
    recipe reuses it on a rerun, and may train it in another process).
    """
    if (folder / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(folder)
    result = pretrain_text(config, tokenizer, lines, steps=steps, batch_size=32, device=device, log=log,
                           before_step=before_step)
    log(f"LLM pretraining: {result.seconds:.0f} s, held-back loss {result.eval_loss:.3f}")
    replace_folder(folder, result.model.save_pretrained)
    return result.model
