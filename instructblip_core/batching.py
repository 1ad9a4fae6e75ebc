"""Global batches from one index stream, split into each process' micro-batches.

Every process walks the same index stream (a `sampling.BalancedSampler` with num_replicas=1,
endless). Optimizer step s takes the next G = micro_batch_size x num_processes x
accumulation_steps indices, cut into chunks of micro_batch_size; process r's a-th micro-batch
is chunk a x num_processes + r. So the samples of a step, and which of them share a
micro-batch, depend on G and the chunking only: one process accumulating 2 micro-batches
and two processes with one each train on exactly the same chunks. Each process loads only
its own chunks (indices are cheap, images are not).

The data position is the number of optimizer steps done: the stream is a function of the
seed and its position, so resuming at step s restarts the stream at s x G and continues with
the very samples the uninterrupted run would have seen, whatever a DataLoader prefetched.

A "pass" is ceil(total examples / G) steps; datasets that have `set_epoch` (template and crop
choice in `data.InstructionDataset`) get the pass number, so repeated passes see other templates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from .sampling import BalancedSampler


class _ProcessChunks:
    """Batch sampler for a DataLoader: this process' index chunks for steps [first, last)."""

    def __init__(self, sampler: BalancedSampler, layout: "StepBatches", first: int, last: int):
        self.sampler, self.layout, self.first, self.last = sampler, layout, first, last

    def __iter__(self) -> Iterator[list[int]]:
        G, B = self.layout.global_batch_size, self.layout.micro_batch_size
        self.layout.seek(self.first)
        stream = iter(self.sampler)
        for _ in range(self.first, self.last):
            indices = [next(stream) for _ in range(G)]
            for chunk in self.layout.chunks_of_this_process():
                yield indices[chunk * B : (chunk + 1) * B]

    def __len__(self) -> int:
        return (self.last - self.first) * self.layout.accumulation_steps


class StepBatches:
    def __init__(
        self,
        datasets: Sequence[Dataset],
        sampler: BalancedSampler,
        collate_fn: Callable[[list], dict],
        *,
        micro_batch_size: int,
        accumulation_steps: int = 1,
        num_processes: int = 1,
        process_index: int = 0,
        num_workers: int = 0,
    ):
        if sampler.num_replicas != 1 or sampler.num_samples is not None:
            raise ValueError("StepBatches needs the whole endless stream: BalancedSampler(num_replicas=1, num_samples=None)")
        sizes = [len(d) for d in datasets]
        if sizes != sampler.sizes:
            raise ValueError(f"the sampler was built for dataset sizes {sampler.sizes}, the datasets have {sizes}")
        if micro_batch_size < 1 or accumulation_steps < 1:
            raise ValueError("micro_batch_size and accumulation_steps must be >= 1")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is not in [0, {num_processes})")
        self.datasets = list(datasets)
        self.dataset = ConcatDataset(self.datasets)  # the sampler's index space
        self.sampler = sampler
        self.collate_fn = collate_fn
        self.micro_batch_size = micro_batch_size
        self.accumulation_steps = accumulation_steps
        self.num_processes = num_processes
        self.process_index = process_index
        self.num_workers = num_workers

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_processes * self.accumulation_steps

    @property
    def steps_per_pass(self) -> int:
        return max(1, math.ceil(len(self.dataset) / self.global_batch_size))

    def chunks_of_this_process(self) -> list[int]:
        P, r = self.num_processes, self.process_index
        return [a * P + r for a in range(self.accumulation_steps)]

    def seek(self, step: int) -> None:
        """Put the index stream where optimizer step `step` begins."""
        self.sampler.load_state_dict(self.sampler.state_dict(samples_consumed=step * self.global_batch_size))

    def _loader(self, first: int, last: int) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_sampler=_ProcessChunks(self.sampler, self, first, last),
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            # A private generator: creating the loader must not draw from the global torch RNG,
            # or a resumed run (which creates it at another moment) would diverge.
            generator=torch.Generator(),
        )

    def steps(self, start_step: int = 0) -> Iterator[list[dict]]:
        """Endless: for each optimizer step from `start_step`, this process' micro-batches."""
        step = start_step
        while True:
            epoch, _ = divmod(step, self.steps_per_pass)
            end = (epoch + 1) * self.steps_per_pass
            for dataset in self.datasets:
                if hasattr(dataset, "set_epoch"):
                    dataset.set_epoch(epoch)
            micro = []
            for batch in self._loader(step, end):
                micro.append(batch)
                if len(micro) == self.accumulation_steps:
                    yield micro
                    micro = []
            step = end

    def state_dict(self, steps_done: int) -> dict:
        """The data position after `steps_done` optimizer steps, with what checks it on resume."""
        return {
            "steps_done": steps_done,
            "global_batch_size": self.global_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "sampler": self.sampler.state_dict(samples_consumed=steps_done * self.global_batch_size),
        }

    def check_resumable(self, state: dict) -> int:
        """Raises ValueError if `state` came from another batch layout or mixture; returns steps_done."""
        for key in ("global_batch_size", "micro_batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume exactly: the checkpoint used {key}={state[key]}, this run {getattr(self, key)}"
                )
        self.sampler.load_state_dict(state["sampler"])  # checks seed, sizes and mixture
        return int(state["steps_done"])
