"""Build our small InstructBLIP from nothing: `python -m finetune.nano [--quick] [--install]`.

Stages (each skipped when its output already exists, so a stopped run continues; inside a
training stage, `finetune.train` resumes from its last checkpoint):
  1. data        the procedural world's datasets (held-in train/test, held-out test) + text corpus
  2. tokenizers  BPE for the LLM, WordPiece for the Q-Former, trained on the world's text
  3. vision      the image encoder, pretrained with dense per-patch ground truth, then frozen
  4. text        the LLM (LLaMA architecture), pretrained on the world's text, then frozen; on
                 the CPU it trains in a second process beside stage 3 (side_by_side.py)
  5. base        the first full checkpoint (untrained Q-Former)
  6. stage1      Q-Former on frozen image features: ITC + ITM + ITG on captions (BLIP-2 stage 1)
  7. stage2      Q-Former + projection into the frozen LLM on captions (BLIP-2 stage 2)
  8. grounding   the Q-Former's cross-attention toward the objects each held-in question is about
  9. instruct    instruction tuning on the held-in mixture, sqrt-balanced (InstructBLIP), the
                 grounding loss kept beside the LM loss
 10. evaluate    every held-in and held-out test set -> results.json, results.md; the frozen LLM
                 told each held-in scene in words -> ceiling.md; chat by number of objects -> competence.md
 --install copies the instruction-tuned export to assets/nano-instructblip with its model card.
`--quick` runs every stage for a few steps on a few records (about 20 s; used by the tests).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from instructblip_core.checkpointing import replace_folder
from instructblip_core.data import InstructionDataset, load_records
from instructblip_core.images import load_image
from instructblip_core.prompts import TEMPLATE_KEY

from . import INSTALL_DIR, REPO, build_model
from .ceiling import ceiling
from .ceiling import table as ceiling_table
from .competence import CHAT_TEMPLATE, COMPETENCE_OBJECTS, as_installed, competence, table
from .evaluate import evaluate_all, write_results
from .logbook import log_to
from .pretrain_text import pretrained_llm
from .pretrain_vision import pretrain_vision
from .side_by_side import (LLMPretrainingBeside, encoder_share_of_the_cpu, encoder_threads, llm_thread_schedule, switch_step,
                           threads_restored)
from .splits import QUICK_SIZES, build_splits, load_manifest
from .stages import STAGES, run_stage
from .tokenizers import train_llm_tokenizer, train_qformer_tokenizer


class Budget:
    """Steps of each stage: full recipe (<= 45 min on 2 cores) or --quick (a smoke run)."""

    # Stage 1 at 150 steps (the shipped eleventh build had 250): from the same ViT and LLM it scored
    # attributes 87.7 against 88.3 and held-out 24.9 against 25.4, within one standard error,
    # and saves 40% of the stage (runs/n19). The LLM's 3000 steps are not negotiable: at 2000 the
    # attributes fell to 76-77 in two builds.
    FULL = dict(vision=3000, text=3000, stage1=150, stage2=300, grounding=600, instruct=2000)

    def __init__(self, quick: bool, overrides: dict[str, int] | None = None):
        self.steps = {k: 4 for k in self.FULL} if quick else dict(self.FULL)
        self.steps.update(overrides or {})
        self.quick = quick


def step_override(text: str) -> tuple[str, int]:
    """"text=2000" -> ("text", 2000), for --steps."""
    stage, _, steps = text.partition("=")
    if stage not in Budget.FULL or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected STAGE=STEPS with STAGE one of {', '.join(Budget.FULL)} and STEPS >= 1, got {text!r}")
    return stage, int(steps)


def training_device() -> str:
    """The GPU when there is one (the trainer's stages pick it through accelerate too)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def instruction_lines(manifest, seed: int) -> list[str]:
    """Held-in training records as the LLM will read them: templated instruction + answer."""
    lines = []
    for entry in manifest.training():
        records = load_records(manifest.root / entry.path, entry.task).records
        dataset = InstructionDataset(records, name=entry.name, task=entry.task, image_transform=None, seed=seed)
        for i in range(len(records)):
            t = dataset.texts(i)
            lines.append(f"{t['prompt']} {t['answer']}")
    return lines


def step_tokenizers(work: Path, manifest, texts: list[str], log) -> tuple:
    folder = work / "tokenizers"
    if not (folder / "qformer" / "tokenizer.json").exists():
        train_llm_tokenizer(texts, vocab_size=1024).save_pretrained(folder / "llm")
        train_qformer_tokenizer(texts, vocab_size=1024).save_pretrained(folder / "qformer")
    tokenizer, qformer_tokenizer = AutoTokenizer.from_pretrained(folder / "llm"), AutoTokenizer.from_pretrained(folder / "qformer")
    log(f"tokenizers: LLM {len(tokenizer)} tokens, Q-Former {len(qformer_tokenizer)} tokens")
    return tokenizer, qformer_tokenizer


def step_vision(work: Path, manifest, steps: int, log):
    from instructblip_core.vision import VisionModel

    path = work / "vision.safetensors"
    config = build_model.vision_config()
    model = VisionModel(config)
    if path.exists():
        model.load_state_dict(load_file(path))
        return model
    records = [json.loads(line) for line in (manifest.root / "pretrain_captions.jsonl").read_text().splitlines() if line]
    processor = build_model.image_processor()
    pixels = torch.stack([processor.pixel_values(load_image(manifest.root / r["image"])) for r in records])  # (N, 3, S, S)
    with encoder_share_of_the_cpu(training_device()):
        result = pretrain_vision(config, pixels, [r["scene"] for r in records], steps=steps, batch_size=32,
                                 device=training_device(), log=log)
    log(f"vision pretraining: {result.seconds:.0f} s, held-back accuracy " + json.dumps({k: round(v, 3) for k, v in result.accuracy.items()}))
    (work / "vision_accuracy.json").write_text(json.dumps(result.accuracy, indent=1))
    save_file(result.model.state_dict(), path)
    return result.model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune.nano", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "nano", help="working folder (default runs/nano)")
    p.add_argument("--quick", action="store_true", help="every stage for a few steps on a few records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=step_override, nargs="+", default=[], metavar="STAGE=STEPS",
                   help=f"change a stage's budget, e.g. text=2000 (stages: {', '.join(Budget.FULL)})")
    p.add_argument("--install", action="store_true", help=f"copy the result to {INSTALL_DIR.relative_to(REPO)}")
    p.add_argument("--until", choices=["data", "tokenizers", "vision", "text", "base", *STAGES], help="stop after this stage")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    log = log_to(work / "nano.log")
    budget = Budget(args.quick, dict(args.steps))
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    data = work / "data"
    if not (data / "manifest.json").exists():
        build_splits(data, seed=args.seed, sizes=QUICK_SIZES if args.quick else None, image_size=build_model.IMAGE_SIZE,
                     workers=2, overwrite=True)
    manifest = load_manifest(data)
    log(f"data: {sum(e.count for e in manifest.training())} held-in training records, "
        f"{len(manifest.evaluation())} test sets ({time.perf_counter() - started:.0f} s)")
    if args.until == "data":
        return 0
    corpus = (data / manifest.corpus).read_text(encoding="utf-8").splitlines() if manifest.corpus else []
    instructions = instruction_lines(manifest, args.seed)
    tokenizer, qformer_tokenizer = step_tokenizers(work, manifest, corpus + instructions, log)
    if args.until == "tokenizers":
        return 0
    # The LLM reads the corpus only: its grounded documents already use the instruction wording,
    # and the bare instruction lines (question, answer, no scene) would teach it to guess.
    llm_folder, beside = work / "llm", None
    if (args.until != "vision" and training_device() == "cpu" and torch.get_num_threads() > 1
            and not (llm_folder / "config.json").exists() and not (work / "vision.safetensors").exists()):
        beside = LLMPretrainingBeside(llm_folder, work / "tokenizers" / "llm", corpus, budget.steps["text"], work / "nano.log")
        log(f"text: the LLM pretrains in its own process beside the image encoder ({beside.threads} + "
            f"{encoder_threads()} threads; all {torch.get_num_threads()} from step {switch_step(budget.steps['text'])}, "
            f"with the encoder done)")
    vision = step_vision(work, manifest, budget.steps["vision"], log)
    if args.until == "vision":
        return 0
    if beside is not None:
        llm = beside.result()
    else:
        # Alone too, the LLM keeps the thread schedule it has beside the encoder: on some machines its
        # arithmetic depends on the number of threads, and a rerun must build the same model.
        with threads_restored() as threads:
            schedule = llm_thread_schedule(budget.steps["text"], threads) if training_device() == "cpu" else None
            llm = pretrained_llm(llm_folder, build_model.llm_config(tokenizer), tokenizer, corpus, steps=budget.steps["text"],
                                 device=training_device(), log=log, before_step=schedule)
    if args.until == "text":
        return 0
    base = work / "base"
    if not (base / "config.json").exists():
        # The first checkpoint's fresh weights (Q-Former, projection) follow from the seed alone,
        # not from which earlier stages this run trained and which it found done.
        torch.manual_seed(args.seed)
        build_model.assemble(base, vision, llm, tokenizer, qformer_tokenizer)
    log(f"base checkpoint at {base} ({time.perf_counter() - started:.0f} s so far)")
    if args.until == "base":
        return 0
    model = base
    for stage in STAGES:
        model = run_stage(stage, model, work, manifest, budget.steps[stage], log, quick=args.quick, seed=args.seed)
        log(f"{stage} done ({time.perf_counter() - started:.0f} s so far)")
        if args.until == stage:
            return 0
    results = evaluate_all(model, manifest, quick=args.quick)
    write_results(results, work, title="Full InstructBLIP (nano)")
    # What chat users can rely on, for the model card: the app's route on fresh scenes (30 per
    # column take about 40 s on the 2 cores; the recipe's 45 minutes have little room left).
    installed = as_installed(model)
    chat = competence(installed, scenes=2 if args.quick else 30, objects=COMPETENCE_OBJECTS)
    (work / "competence.md").write_text(table(chat) + "\n", encoding="utf-8")
    # How far the model is from what its frozen LLM answers when told each scene's caption (about
    # 20 s; it uses only the LLM and its tokenizer, which the chat template does not touch).
    told = ceiling(installed, manifest, max_examples=4 if args.quick else None)
    (work / "ceiling.md").write_text(ceiling_table(told, results) + "\n", encoding="utf-8")
    log(f"evaluation written to {work / 'results.md'}, {work / 'competence.md'} and {work / 'ceiling.md'}; "
        f"total {time.perf_counter() - started:.0f} s")
    if args.install:
        install(model, work)
        log(f"installed at {INSTALL_DIR}")
    return 0


def install(model: Path, work: Path) -> None:
    from .model_card import write_model_card

    def fill(tmp: Path) -> None:
        shutil.copytree(model, tmp)
        finish_config(tmp / "config.json")
        write_model_card(tmp, work)

    replace_folder(INSTALL_DIR, fill)


def finish_config(config_file: Path) -> None:
    """The shipped config: the chat template, and nothing about the machine that built it."""
    config = json.loads(config_file.read_text())
    config[TEMPLATE_KEY] = CHAT_TEMPLATE.to_dict()
    # A reused LLM stage loads from <work>/llm, a path of the build machine that means nothing to users.
    config.get("text_config", {}).pop("_name_or_path", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
