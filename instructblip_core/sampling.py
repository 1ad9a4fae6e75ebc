"""Mixing several training datasets: InstructBLIP's square-root balanced sampling.

InstructBLIP (Dai et al. 2023, section 2.4) draws dataset d with probability

    p_d = sqrt(S_d) / sum_i sqrt(S_i)        (S_d = number of examples in d)

so that big datasets do not drown small ones (proportional sampling) and small ones are not
repeated until memorised (uniform sampling). "proportional" (p_d = S_d / sum S_i) is kept for
the paper's ablation. Weights override single datasets; see `mixture_probabilities`.

`BalancedSampler` turns the probabilities into one deterministic stream of indices into the
datasets concatenated in order (the index space of `torch.utils.data.ConcatDataset`): step t
picks a dataset, then takes the next index of that dataset's shuffled order (a fresh shuffle
on each pass through it). Everything is a function of the seed and the stream position, so
resuming needs only the position; processes take every num_replicas-th element of the same
stream, so a multi-process run sees exactly the single-process stream, split.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import Sampler

SAMPLING_METHODS = ("sqrt", "proportional")
_BLOCK = 4096  # dataset choices are drawn in blocks of this many stream steps


def mixture_probabilities(
    sizes: Mapping[str, int], weights: Mapping[str, float] | None = None, method: str = "sqrt"
) -> dict[str, float]:
    """Probability of drawing each dataset.

    method "sqrt": score_d = sqrt(S_d); "proportional": score_d = S_d. A dataset listed in
    `weights` has its score REPLACED by its weight (same units as the scores, i.e. sqrt of
    a size for "sqrt"); then p_d = score_d / sum of scores. Example: sizes {a: 100, b: 10000},
    weights {a: 100} -> scores 100 and 100 -> a and b are drawn equally often. A weight of 0
    leaves a dataset out of the mixture.
    """
    if method not in SAMPLING_METHODS:
        raise ValueError(f"unknown sampling method {method!r}; expected one of {', '.join(SAMPLING_METHODS)}")
    if not sizes:
        raise ValueError("no datasets to mix")
    for name, size in sizes.items():
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"dataset {name!r} has size {size!r}; every dataset needs at least one example")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(sizes))
    if unknown:
        raise ValueError(f"weights given for unknown datasets {unknown}; datasets are {list(sizes)}")
    for name, weight in weights.items():
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight of dataset {name!r} must be a finite number >= 0, got {weight!r}")
    scores = {
        name: float(weights[name]) if name in weights else (math.sqrt(size) if method == "sqrt" else float(size))
        for name, size in sizes.items()
    }
    total = sum(scores.values())
    if total <= 0:
        raise ValueError("every dataset has weight 0: nothing to sample")
    return {name: score / total for name, score in scores.items()}


def format_mixture(sizes: Mapping[str, int], probabilities: Mapping[str, float]) -> str:
    """A small table: dataset, size, probability, expected examples per 1000 drawn."""
    width = max(len("dataset"), *(len(name) for name in sizes))
    lines = [f"{'dataset':<{width}}  {'size':>10}  {'probability':>11}  {'per 1000':>8}"]
    for name, size in sizes.items():
        p = probabilities[name]
        lines.append(f"{name:<{width}}  {size:>10,}  {p:>11.4f}  {1000 * p:>8.1f}")
    total_p = sum(probabilities[name] for name in sizes)
    lines.append(f"{'total':<{width}}  {sum(sizes.values()):>10,}  {total_p:>11.4f}  {1000 * total_p:>8.1f}")
    return "\n".join(lines)


def _seed_of(*parts) -> int:
    """A 63-bit seed from any parts, stable across processes and Python runs."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class BalancedSampler(Sampler[int]):
    """Indices into the concatenation of datasets (in the order of `sizes`), mixed by `probabilities`.

    num_samples: how many indices one `iter()` yields on this process (None: endless). Each
    `iter()` continues the stream where the last one stopped. num_replicas / rank: this process
    takes stream elements rank, rank + num_replicas, ... (disjoint shares of one stream).
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        probabilities: Mapping[str, float],
        *,
        seed: int = 0,
        num_samples: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if set(probabilities) != set(sizes):
            raise ValueError(f"probabilities are for {sorted(probabilities)} but the datasets are {sorted(sizes)}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        if num_samples is not None and num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.names = list(sizes)
        self.sizes = [int(sizes[n]) for n in self.names]
        self.probabilities = [float(probabilities[n]) for n in self.names]
        if any(s <= 0 for s in self.sizes) or any(p < 0 for p in self.probabilities) or sum(self.probabilities) <= 0:
            raise ValueError("every dataset needs a positive size, and probabilities must be >= 0 with a positive sum")
        self.offsets = [sum(self.sizes[:d]) for d in range(len(self.sizes))]
        self.seed = seed
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.position = 0  # global stream step where the next iter() starts; a multiple of num_replicas
        self._weights = torch.tensor(self.probabilities, dtype=torch.float64)

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("an endless BalancedSampler (num_samples=None) has no length")
        return self.num_samples

    # ---- the stream -----------------------------------------------------------------------
    def _choices(self, block: int) -> torch.Tensor:
        """Dataset drawn at each step of block `block` (steps block*_BLOCK ...), (_BLOCK,) long."""
        generator = torch.Generator().manual_seed(_seed_of(self.seed, "choices", block))
        return torch.multinomial(self._weights, _BLOCK, replacement=True, generator=generator)

    def _order(self, dataset: int, epoch: int) -> np.ndarray:
        """The shuffled order of one dataset's indices on its `epoch`-th pass."""
        generator = torch.Generator().manual_seed(_seed_of(self.seed, "order", dataset, epoch))
        # numpy, not a list: a million-item dataset stays one compact array
        return torch.randperm(self.sizes[dataset], generator=generator).numpy()

    def _counts_at(self, position: int) -> list[int]:
        """How often each dataset was drawn in the first `position` steps of the stream."""
        counts = torch.zeros(len(self.sizes), dtype=torch.long)
        full, rest = divmod(position, _BLOCK)
        for block in range(full):
            counts += torch.bincount(self._choices(block), minlength=len(self.sizes))
        if rest:
            counts += torch.bincount(self._choices(full)[:rest], minlength=len(self.sizes))
        return counts.tolist()

    def __iter__(self) -> Iterator[int]:
        start = self.position
        counts = self._counts_at(start)
        orders: dict[int, tuple[int, np.ndarray]] = {}  # dataset -> (epoch, order) in use
        step, yielded = start, 0
        choices, block = None, -1
        while self.num_samples is None or yielded < self.num_samples:
            if step // _BLOCK != block:
                block = step // _BLOCK
                choices = self._choices(block).tolist()
            d = choices[step % _BLOCK]
            epoch, within = divmod(counts[d], self.sizes[d])
            counts[d] += 1
            if step % self.num_replicas == self.rank:
                if orders.get(d, (None,))[0] != epoch:
                    orders[d] = (epoch, self._order(d, epoch))
                yielded += 1
                # Counted before handing it out: once yielded, the element is consumed.
                self.position = start + yielded * self.num_replicas
                yield self.offsets[d] + int(orders[d][1][within])
            step += 1

    # ---- resume ---------------------------------------------------------------------------
    def state_dict(self, samples_consumed: int | None = None) -> dict:
        """What resuming needs. A DataLoader fetches ahead of training, so pass the number of
        samples this process has actually trained on (since the stream began) when it differs
        from what was drawn from this sampler."""
        position = self.position if samples_consumed is None else samples_consumed * self.num_replicas
        return {
            "position": position,
            "seed": self.seed,
            "sizes": dict(zip(self.names, self.sizes)),
            "probabilities": dict(zip(self.names, self.probabilities)),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue the stream at `state["position"]`; the mixture must be the one saved."""
        mine = self.state_dict()
        for key in ("seed", "sizes", "probabilities"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"cannot resume: the sampler's {key} changed (saved {state[key]!r}, now {mine[key]!r}); "
                    "resuming with another mixture would not continue the same data stream"
                )
        position = int(state["position"])
        if position < 0 or position % self.num_replicas:
            raise ValueError(f"position {position} is not a multiple of num_replicas={self.num_replicas}")
        self.position = position
