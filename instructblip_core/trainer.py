"""The training loop, on Hugging Face `accelerate`: one script for 1 CPU, N processes or N GPUs.

The trainer knows two things about the model: `model(**batch)` returns an object with a
scalar `.loss` (and maybe more `loss_*` scalars, logged as they are), and which parameters
require grad. Everything else (freezing, LoRA, 8-bit LLMs, stage 1 / 2) is set up before.

Per optimizer step (references: the InstructBLIP / BLIP-2 recipe, AdamW + warmup + cosine):
  1. this process' micro-batches of the global batch (`batching.StepBatches`);
  2. forward + backward on each, loss divided by the number of micro-batches; gradients are
     all-reduced once, on the last one (DDP `no_sync` before it);
  3. clip the gradient norm, AdamW step, schedule step;
  4. log (JSONL + TensorBoard + tqdm), evaluate every `eval_every`, checkpoint every `save_every`.

Checkpoints hold the trainable weights only, the optimizer, scheduler, data position and every
process' RNG states (`checkpointing.py`), so a killed run resumes to bit-identical weights on
the CPU. The global batch is micro_batch_size x processes x accumulation_steps; which samples
share a micro-batch depends on that split only, so 1 process x 2 accumulation steps and 2
processes x 1 step compute the same update (up to float summation order).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from torch import nn
from tqdm.auto import tqdm

from .batching import StepBatches
from .checkpointing import (
    OPTIMIZER,
    TRAINABLE,
    TRAINER_STATE,
    CheckpointFolder,
    ResumeError,
    capture_rng_state,
    object_to_bytes,
    read_object,
    read_tensors,
    restore_rng_state,
    rng_file,
    tensors_to_bytes,
    verify,
)
from .optim import OptimizerSettings, build_optimizer, build_scheduler

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"

Evaluate = Callable[[nn.Module], dict[str, float]]


@dataclass(frozen=True)
class TrainerSettings:
    output_dir: Path  # metrics.jsonl, tensorboard/, checkpoints/
    max_steps: int  # optimizer steps
    max_grad_norm: float = 1.0  # 0 disables clipping
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    save_every: int = 500  # 0: checkpoint only at the end
    keep_last: int = 3  # checkpoints kept on disk
    resume: str = "auto"  # "auto": newest checkpoint if any; "never"; or a checkpoint folder
    progress_bar: bool = True
    tensorboard: bool = True
    # Frozen sub-modules (ViT, LLM) run in eval mode, i.e. without dropout, unless this is True
    # (LAVIS leaves the frozen LLM's dropout on; a frozen ViT is always a fixed function there).
    frozen_dropout: bool = False

    def __post_init__(self):
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        for name in ("max_steps", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("eval_every", "save_every", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


def _has_accelerator_device() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, MPS, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def make_accelerator(mixed_precision: str = "no", *, find_unused_parameters: bool = False, cpu: bool = False) -> Accelerator:
    """The Accelerator the recipes use; under `accelerate launch` / `torchrun` it picks up the processes.

    Several processes on a machine without any GPU run on the CPU over gloo. accelerate only
    does that when told `cpu=True`, and its own `--cpu --num_processes N` starts ONE process
    unless MPI is set up; so a distributed launch (WORLD_SIZE > 1, e.g. `accelerate launch
    --multi_gpu --num_processes 2` or `torchrun --nproc_per_node 2`) without a device selects
    the CPU here.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator_device():
        cpu = True
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=[ddp])


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    resumed_from: int  # step the run resumed at (0: fresh start)
    last_loss: float | None
    checkpoint: Path | None  # the final checkpoint


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard scalars; main process only."""

    def __init__(self, output_dir: Path, *, resume_step: int, tensorboard: bool):
        self.path = output_dir / METRICS_FILE
        self._drop_after(resume_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

            # purge_step drops what a killed run logged after the checkpoint we resume from.
            self.writer = SummaryWriter(str(output_dir / TENSORBOARD), purge_step=resume_step + 1 if resume_step else None)

    def _drop_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their old lines (and a
        last line torn by a kill in mid-write)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["step"] <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, values: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        batches: StepBatches,
        settings: TrainerSettings,
        optimizer: OptimizerSettings,
        accelerator: Accelerator,
        *,
        evaluate: Evaluate | None = None,
        seed: int = 0,
    ):
        set_seed(seed)  # python, numpy, torch: the same in every process (dropout, hard negatives)
        self.settings = settings
        self.accelerator = accelerator
        self.batches = batches
        self.evaluate_fn = evaluate
        self.trainable_names = list(trainable_parameters(model))
        self._check_trainable(model)
        self.model, self.optimizer = accelerator.prepare(model, build_optimizer(model, optimizer))
        # Not prepared: accelerate would step it once per process; it follows optimizer steps.
        self.scheduler = build_scheduler(self.optimizer, optimizer)
        self.checkpoints = CheckpointFolder(settings.output_dir / CHECKPOINTS)
        self.step = 0

    def _check_trainable(self, model: nn.Module) -> None:
        params = trainable_parameters(model)
        if not params:
            raise ValueError("no parameter requires grad: nothing to train")
        low = [n for n, p in params.items() if p.dtype != torch.float32]
        if low:
            raise ValueError(
                f"trainable parameters must be float32 (mixed_precision handles 16-bit compute); {len(low)} are not, "
                f"e.g. {low[:3]}"
            )

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.unwrapped.named_parameters())
        return {name: params[name].detach() for name in self.trainable_names}

    # ---- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        acc, step = self.accelerator, self.step
        if acc.is_main_process:
            self.checkpoints.begin(step)
        acc.wait_for_everyone()
        self.checkpoints.write(step, rng_file(acc.process_index), object_to_bytes(capture_rng_state()))
        if acc.is_main_process:
            self.checkpoints.write(step, TRAINABLE, tensors_to_bytes(self.trainable_state()))
            self.checkpoints.write(step, OPTIMIZER, object_to_bytes(self.optimizer.state_dict()))
            state = {
                "step": step,
                "scheduler": self.scheduler.state_dict(),
                "data": self.batches.state_dict(step),
                "num_processes": acc.num_processes,
            }
            self.checkpoints.write(step, TRAINER_STATE, object_to_bytes(state))
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.checkpoints.commit(step)
            self.checkpoints.prune(self.settings.keep_last)
        acc.wait_for_everyone()
        return self.checkpoints.final(step)

    def _resume_folder(self) -> Path | None:
        resume = self.settings.resume
        if resume == "never":
            return None
        if resume == "auto":
            return self.checkpoints.latest()
        folder = Path(resume)
        if not folder.is_dir():
            raise ResumeError(f"resume: {folder} is not a checkpoint folder")
        return folder

    def load_checkpoint(self, folder: Path) -> None:
        verify(folder)
        state = read_object(folder, TRAINER_STATE)
        try:
            self.batches.check_resumable(state["data"])
        except ValueError as e:
            raise ResumeError(f"{folder}: {e}; start a new output_dir or set resume: never") from None
        weights = read_tensors(folder)
        if sorted(weights) != sorted(self.trainable_names):
            missing = sorted(set(self.trainable_names) - set(weights))
            extra = sorted(set(weights) - set(self.trainable_names))
            raise ResumeError(
                f"{folder / TRAINABLE} does not hold this run's trainable weights "
                f"(missing {missing[:5]}, unexpected {extra[:5]}); was it made with other options (lora, train_vision, stage)?"
            )
        params = dict(self.unwrapped.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(read_object(folder, OPTIMIZER))
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        rng = folder / rng_file(self.accelerator.process_index)
        if not rng.is_file():
            raise ResumeError(
                f"{folder} was saved by {state['num_processes']} process(es) and has no RNG state for process "
                f"{self.accelerator.process_index}; resume with the same number of processes"
            )
        restore_rng_state(read_object(folder, rng.name))

    def _train_mode(self) -> None:
        self.model.train()
        if self.settings.frozen_dropout:
            return
        for module in self.unwrapped.modules():
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()

    # ---- the loop ----------------------------------------------------------------------------
    def _micro_step(self, batch: dict, is_last: bool, scale: float) -> dict[str, float]:
        batch = {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        sync = contextlib.nullcontext() if is_last else self.accelerator.no_sync(self.model)
        with sync:
            output = self.model(**batch)
            if output.loss is None:
                raise ValueError("the model returned no loss: does the batch carry labels?")
            self.accelerator.backward(output.loss * scale)
        return {k: float(v.detach()) for k, v in vars(output).items() if k.startswith("loss") and torch.is_tensor(v) and v.dim() == 0}

    def _optimizer_step(self) -> float | None:
        grad_norm = None
        if self.settings.max_grad_norm > 0:
            params = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = float(self.accelerator.clip_grad_norm_(params, self.settings.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _mean_over_processes(self, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        """Each logged value: its mean over the micro-batches (of every process) that reported it.

        A model may report a key on some batches only (e.g. a loss on the records that have what
        it needs), so each key has its own count, and the processes first agree on the key set.
        """
        keys = sorted(sums)
        if self.accelerator.num_processes > 1:
            keys = sorted(set().union(*gather_object([keys])))
        local = torch.tensor([[sums.get(k, 0.0), counts.get(k, 0)] for k in keys], dtype=torch.float64,
                             device=self.accelerator.device)  # (K, 2): sum and count per key
        total = self.accelerator.reduce(local, reduction="sum") if self.accelerator.num_processes > 1 else local
        return {k: s / n for k, (s, n) in zip(keys, total.tolist()) if n > 0}

    def run_evaluation(self, log: MetricsLog | None) -> dict[str, float]:
        """Main process evaluates the unwrapped model; the others wait. No global RNG is touched."""
        results: dict[str, float] = {}
        if self.evaluate_fn is not None and self.accelerator.is_main_process:
            model = self.unwrapped
            was_training = model.training
            model.eval()
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                results = self.evaluate_fn(model)
            if was_training:
                self._train_mode()
            if log is not None and results:
                log.write(self.step, results)
        self.accelerator.wait_for_everyone()
        return results

    def train(self) -> TrainResult:
        s, acc = self.settings, self.accelerator
        folder = self._resume_folder()
        if folder is not None:
            self.load_checkpoint(folder)
            acc.print(f"resumed from {folder} at step {self.step}")
        resumed_from = self.step
        log = None
        if acc.is_main_process:
            s.output_dir.mkdir(parents=True, exist_ok=True)
            log = MetricsLog(s.output_dir, resume_step=self.step, tensorboard=s.tensorboard)
        self._train_mode()
        bar = tqdm(total=s.max_steps, initial=self.step, desc="train", disable=not (s.progress_bar and acc.is_main_process))
        sums: dict[str, float] = {}  # per logged key: its sum and how many micro-batches reported it
        counts: dict[str, int] = {}
        window, last_loss, started = 0, None, time.perf_counter()
        stream = self.batches.steps(self.step)
        try:
            while self.step < s.max_steps:
                micro_batches = next(stream)
                scale = 1.0 / len(micro_batches)
                for i, batch in enumerate(micro_batches):
                    for key, value in self._micro_step(batch, i == len(micro_batches) - 1, scale).items():
                        sums[key] = sums.get(key, 0.0) + value
                        counts[key] = counts.get(key, 0) + 1
                grad_norm = self._optimizer_step()
                self.step += 1
                window += 1
                bar.update(1)
                if self.step % s.log_every == 0 or self.step == s.max_steps:
                    values = self._mean_over_processes(sums, counts)
                    if not all(math.isfinite(v) for v in values.values()):
                        raise FloatingPointError(f"step {self.step}: loss is not finite ({values}); lower lr or check the data")
                    last_loss = values["loss"]
                    values.update(lr=self.scheduler.get_last_lr()[0], steps_per_s=window / (time.perf_counter() - started))
                    if grad_norm is not None:
                        values["grad_norm"] = grad_norm
                    if log is not None:
                        log.write(self.step, {f"train/{k}": v for k, v in values.items()})
                    bar.set_postfix(loss=f"{last_loss:.4f}")
                    sums, counts, window, started = {}, {}, 0, time.perf_counter()
                if s.eval_every and self.step % s.eval_every == 0 and self.step < s.max_steps:
                    self.run_evaluation(log)
                if s.save_every and self.step % s.save_every == 0 and self.step < s.max_steps:
                    self.save_checkpoint()
            # A run resumed at its end (e.g. to export again) keeps its last checkpoint as is.
            final = self.save_checkpoint() if self.step != resumed_from or folder is None else folder
            self.run_evaluation(log)
        finally:
            bar.close()
            if log is not None:
                log.close()
        return TrainResult(step=self.step, resumed_from=resumed_from, last_loss=last_loss, checkpoint=final)
