"""Fine-tune InstructBLIP / BLIP-2: `python -m finetune.train CONFIG.yaml [--key=value ...]`.

The same command runs on several processes or GPUs: `accelerate launch --num_processes 2
-m finetune.train CONFIG.yaml` (add `--cpu` for CPU processes talking over gloo). Options are
the fields of `finetune.config.TrainConfig`, documented in finetune/README.md. A run writes to
output_dir: config.yaml (the resolved options), metrics.jsonl, tensorboard/, checkpoints/
and, at the end, export/ (a full Hugging Face checkpoint for `load_pretrained`, the app and
transformers). Running the same command again resumes from the newest checkpoint.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from instructblip_core.batching import StepBatches
from instructblip_core.checkpointing import ResumeError
from instructblip_core.data import DataError
from instructblip_core.images import ImageError
from instructblip_core.loading import CheckpointError
from instructblip_core.optim import OptimizerSettings
from instructblip_core.pipeline import InstructBlip
from instructblip_core.sampling import BalancedSampler, format_mixture, mixture_probabilities
from instructblip_core.trainer import Trainer, TrainerSettings, TrainResult, make_accelerator

from . import recipe
from .config import ConfigError, TrainConfig, load_config

USAGE = "usage: python -m finetune.train CONFIG.yaml [--key=value ...]   (options: finetune/README.md)"
EXPORT_FOLDER = "export"
USER_ERRORS = (ConfigError, DataError, ImageError, CheckpointError, ResumeError)


def trainer_settings(config: TrainConfig) -> TrainerSettings:
    return TrainerSettings(
        output_dir=Path(config.output_dir),
        max_steps=config.max_steps,
        max_grad_norm=config.max_grad_norm,
        log_every=config.log_every,
        eval_every=config.eval_every,
        save_every=config.save_every,
        keep_last=config.keep_last,
        resume=config.resume,
        progress_bar=config.progress_bar,
        tensorboard=config.tensorboard,
        frozen_dropout=config.frozen_dropout,
    )


def optimizer_settings(config: TrainConfig) -> OptimizerSettings:
    return OptimizerSettings(
        lr=config.lr,
        weight_decay=config.weight_decay,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        warmup_steps=config.warmup_steps,
        total_steps=config.max_steps,
        min_lr_ratio=config.min_lr_ratio,
    )


def mixture_sampler(datasets, config: TrainConfig, announce) -> BalancedSampler:
    sizes = {d.name: len(d) for d in datasets}
    weights = {spec.name or Path(spec.path).stem: spec.weight for spec in config.train_data if spec.weight is not None}
    probabilities = mixture_probabilities(sizes, weights, method=config.sampling)
    announce(f"training mixture ({config.sampling} sampling):\n{format_mixture(sizes, probabilities)}")
    return BalancedSampler(sizes, probabilities, seed=config.seed)


@dataclass
class PreparedRun:
    config: TrainConfig
    accelerator: Accelerator
    blip: InstructBlip  # the base model + processor (its .model is what is being tuned)
    trainer: Trainer


def prepare(config: TrainConfig) -> PreparedRun:
    """Model, data, evaluator and trainer of a run, ready for `trainer.train()`."""
    # The grounding stage reads only the cross-attention weights: the Q-Former's later query
    # layers get no gradient there, which DDP must be told about.
    unused = config.find_unused_parameters or config.stage == "grounding"
    accelerator = make_accelerator(config.mixed_precision, find_unused_parameters=unused)
    announce = accelerator.print
    set_seed(config.seed)  # model set-up draws random numbers too (LoRA, stage-1 heads)
    blip = recipe.load_base(config, accelerator.device)
    module = recipe.training_module(blip, config)
    datasets, _ = recipe.load_training_data(blip.processor, config, announce)
    evaluator = recipe.training_evaluator(blip.processor, config, announce)
    batches = StepBatches(
        datasets,
        mixture_sampler(datasets, config, announce),
        recipe.collator(blip.processor, config, blip.model.config.vision_config.patches_per_side),
        micro_batch_size=config.per_device_batch_size,
        accumulation_steps=config.gradient_accumulation_steps,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        num_workers=config.num_workers,
    )
    announce(
        f"global batch {batches.global_batch_size} = {config.per_device_batch_size} per process x "
        f"{accelerator.num_processes} process(es) x {config.gradient_accumulation_steps} accumulation step(s)"
    )
    if accelerator.is_main_process:
        output_dir = Path(config.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    trainer = Trainer(
        module,
        batches,
        trainer_settings(config),
        optimizer_settings(config),
        accelerator,
        evaluate=(lambda _: evaluator(blip.model)) if evaluator is not None else None,
        seed=config.seed,
    )
    return PreparedRun(config, accelerator, blip, trainer)


def run(config: TrainConfig) -> TrainResult:
    prepared = prepare(config)
    accelerator, trainer = prepared.accelerator, prepared.trainer
    result = trainer.train()
    if config.export and accelerator.is_main_process:
        folder = recipe.export(config, trainer.unwrapped, Path(config.output_dir) / EXPORT_FOLDER)
        accelerator.print(f"exported {folder} (load it with load_pretrained, the app's --model, or transformers)")
    accelerator.wait_for_everyone()
    accelerator.print(
        f"done: {result.step} steps (resumed at step {result.resumed_from}), last loss {result.last_loss}, "
        f"checkpoint {result.checkpoint}"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\n" + USAGE)
        return 0 if argv else 2
    try:
        run(load_config(argv[0], argv[1:]))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
