"""The Q-Former's training stages of the small model, each one `finetune.train` run.

Every stage is an ordinary recipe config (written to <work>/<stage>.yaml, so it can be read
and rerun by hand) and starts from the previous stage's export. The frozen image encoder's
outputs are cached on disk and shared by the stages, since no stage augments images.
"""

from __future__ import annotations

from pathlib import Path

import yaml

STAGES = ("stage1", "stage2", "grounding", "instruct")

# Learning rates for a Q-Former trained from scratch at this size (the paper's 1e-5 is for
# fine-tuning a pretrained BERT-base).
LR = {"stage1": 1e-3, "stage2": 5e-4, "grounding": 1e-3, "instruct": 3e-4}
BATCH = 32
# The grounding stage has no LLM pass (a step costs about 0.2 s at 64), so it takes larger batches.
GROUNDING_BATCH = 64
# Instruction tuning keeps the grounding loss at this weight beside the LM loss; without it the
# LM loss alone let the attention drift off the asked object again (experiments of the eighth build).
GROUNDING_WEIGHT = 1.0


def stage_config(stage: str, model: Path, work: Path, manifest, steps: int, *, quick: bool, **overrides) -> dict:
    captions = [{"path": str(manifest.root / "pretrain_captions.jsonl"), "task": "caption", "name": "captions"}]
    mixture = [{"path": str(manifest.root / e.path), "task": e.task, "name": e.name} for e in manifest.training()]
    config = {
        "model": str(model),
        "stage": stage,
        "output_dir": str(work / overrides.pop("folder", stage)),
        "train_data": mixture if stage in ("grounding", "instruct") else captions,
        "max_steps": steps,
        "per_device_batch_size": 4 if quick else GROUNDING_BATCH if stage == "grounding" else BATCH,
        "lr": LR[stage],
        "warmup_steps": 1 if quick else max(10, steps // 20),
        "min_lr_ratio": 0.05,
        "weight_decay": 0.05,
        "cache_image_features": True,
        # One folder for every stage and ablation: they share the frozen encoder, so each image is
        # encoded once per build instead of once per stage (about 50 s of the budget).
        "feature_cache_dir": str(work / "image_features"),
        "save_every": max(1, steps // 4),
        "keep_last": 1,
        "log_every": 1 if quick else 25,
        "progress_bar": False,
        "tensorboard": not quick,
        "seed": 0,
    }
    if stage == "stage1":
        config["stage1_init"] = "random"
    if stage == "instruct":
        config["grounding_weight"] = GROUNDING_WEIGHT
    config.update(overrides)
    return config


def run_stage(stage: str, model: Path, work: Path, manifest, steps: int, log, *, quick: bool, **overrides) -> Path:
    """Train `stage` from `model`; returns the export folder (reused if it exists already)."""
    from finetune.train import main as train_main

    config = stage_config(stage, model, work, manifest, steps, quick=quick, **overrides)
    export = Path(config["output_dir"]) / "export"
    if (export / "config.json").exists():
        log(f"{stage}: export exists at {export}, reusing it")
        return export
    path = work / f"{Path(config['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log(f"{stage}: python -m finetune.train {path}")
    code = train_main([str(path)])
    if code != 0 or not (export / "config.json").exists():
        raise RuntimeError(f"{stage} failed (exit code {code}); see {config['output_dir']}")
    return export
