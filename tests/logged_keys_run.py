"""A Trainer run on numbers whose model reports `loss_sevens` only for micro-batches holding a multiple of 7.

Shared by tests/test_trainer_logging.py in this process and, as a script, under `accelerate
launch` (`python -m accelerate.commands.launch ... tests/logged_keys_run.py OUT_DIR`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from instructblip_core.batching import StepBatches
from instructblip_core.optim import OptimizerSettings
from instructblip_core.sampling import BalancedSampler
from instructblip_core.trainer import Trainer, TrainerSettings, make_accelerator

SIZES = {"a": 10, "b": 30}
MICRO_BATCH = 2
STEPS = 8
LOG_EVERY = 2


class Numbers(torch.utils.data.Dataset):
    def __init__(self, start: int, n: int):
        self.start, self.n = start, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return self.start + i


def collate(items: list[int]) -> dict[str, torch.Tensor]:
    return {"x": torch.tensor(items, dtype=torch.float32)}


def step_batches(num_processes: int = 1, process_index: int = 0) -> StepBatches:
    datasets = [Numbers(0, SIZES["a"]), Numbers(100, SIZES["b"])]
    sampler = BalancedSampler(SIZES, {"a": 0.5, "b": 0.5}, seed=3)
    return StepBatches(datasets, sampler, collate, micro_batch_size=MICRO_BATCH, num_processes=num_processes,
                       process_index=process_index)  # fmt: skip


def sevens_mean(x: torch.Tensor) -> float | None:
    """What the model reports as loss_sevens for a micro-batch x (B,): the mean of its multiples of 7, or nothing."""
    sevens = x[x % 7 == 0]
    return float(sevens.mean()) if len(sevens) else None


@dataclass
class Output:
    loss: torch.Tensor
    loss_sevens: torch.Tensor | None = None


class OddReporter(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> Output:
        loss = (self.w - 1) ** 2 + 0 * x.sum()
        reported = sevens_mean(x)
        return Output(loss, None if reported is None else torch.tensor(reported))


def train(output_dir: Path) -> None:
    accelerator = make_accelerator()
    trainer = Trainer(
        OddReporter(),
        step_batches(accelerator.num_processes, accelerator.process_index),
        TrainerSettings(output_dir, max_steps=STEPS, log_every=LOG_EVERY, save_every=0, progress_bar=False, tensorboard=False),
        OptimizerSettings(lr=0.1, weight_decay=0.0, warmup_steps=1, total_steps=STEPS),
        accelerator,
    )
    trainer.train()


if __name__ == "__main__":
    train(Path(sys.argv[1]))
