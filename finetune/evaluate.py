"""Evaluate a checkpoint on data files: `python -m finetune.evaluate --model FOLDER --data FILE --task TASK`.

    python -m finetune.evaluate --model runs/x/export --data val.jsonl --task short_vqa
    python -m finetune.evaluate --model runs/x/export --data mc.jsonl --task multiple_choice --metric ranking_accuracy
    python -m finetune.evaluate --config run.yaml      # every eval_data set of a training config, on its export

Prints one line per metric (`eval/<name>/<metric> = value`) and, with --predictions, writes
every prompt, prediction and reference answer as JSONL. Metrics: vqa_accuracy (default for
short-answer tasks), exact_match, ranking_accuracy (default for multiple_choice /
classification records with options), cider (default for captions).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from instructblip_core.data import DataError
from instructblip_core.evaluation import METRICS
from instructblip_core.generation import GenerationOptions
from instructblip_core.images import ImageError
from instructblip_core.loading import CheckpointError, load_pretrained
from instructblip_core.templates import TASK_TYPES

from . import recipe
from .config import ConfigError, EvalDataConfig, load_config
from .train import EXPORT_FOLDER


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder or hub id (with --config: default <output_dir>/export)")
    p.add_argument("--config", help="training config: evaluate its eval_data sets with its data options")
    p.add_argument("--data", help="evaluation data file (.jsonl / .json)")
    p.add_argument("--task", choices=TASK_TYPES, help="task type of --data")
    p.add_argument("--name", default="", help="set name in the metric names (default: the file's stem)")
    p.add_argument("--metric", default="auto", choices=("auto", *METRICS))
    p.add_argument("--max-examples", type=int, default=None, help="evaluate the first N records only")
    p.add_argument("--prompt-style", default="instruction", choices=("instruction", "task_tag", "none"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--num-beams", type=int, default=1, help="the paper evaluates with 5")
    p.add_argument("--seed", type=int, default=42, help="picks each record's template, as in training")
    p.add_argument("--device", default="cpu")
    p.add_argument("--load-in-8bit", action="store_true")
    p.add_argument("--load-in-4bit", action="store_true")
    p.add_argument("--predictions", help="write prompts, predictions and answers here (JSONL)")
    return p


def _evaluation_plan(args) -> tuple[str, list[EvalDataConfig], recipe.DataOptions]:
    """(model, eval sets, data options) from --config or from --data/--task."""
    if args.config:
        config = load_config(args.config)
        if not config.eval_data:
            raise ConfigError(f"{args.config}: has no eval_data to evaluate")
        model = args.model or str(Path(config.output_dir) / EXPORT_FOLDER)
        return model, config.eval_data, recipe.DataOptions.of(config)
    if not (args.model and args.data and args.task):
        raise ConfigError("give --model, --data and --task (or --config CONFIG.yaml)")
    spec = EvalDataConfig(path=args.data, task=args.task, name=args.name, metric=args.metric, max_examples=args.max_examples)
    return args.model, [spec], recipe.DataOptions(prompt_style=args.prompt_style, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model_name, specs, options = _evaluation_plan(args)
        blip = load_pretrained(model_name, device=args.device, load_in_8bit=args.load_in_8bit, load_in_4bit=args.load_in_4bit)
        generation = GenerationOptions(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
        evaluator = recipe.build_evaluator(
            blip.processor, specs, options, batch_size=args.batch_size, generation=generation, report=print
        )
        report = evaluator.run(blip.model)
    except (ConfigError, DataError, ImageError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, value in report.metrics.items():
        print(f"{name} = {value:.4f}")
    if args.predictions:
        with open(args.predictions, "w") as f:
            for set_name, rows in report.predictions.items():
                for row in rows:
                    f.write(json.dumps({"set": set_name, **row}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
