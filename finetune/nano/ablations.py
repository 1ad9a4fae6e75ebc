"""The paper's ablations, in miniature: `python -m finetune.nano.ablations [--out runs/nano]`.

Each variant is instruction-tuned with the same steps as the full recipe (or not tuned at all),
then evaluated on the same test sets. The full recipe adds a grounding stage the paper does not
have, so there are two families. proportional and task_tags start from the full recipe's
grounding stage and keep its grounding loss. The others start from the stage-2 model and train
on the LM loss alone, as in the paper: no_instruction (a Q-Former that reads no instruction
cannot be told where to look), and the paper's own full model and its task-tag ablation.
  full                    the full recipe's model (`python -m finetune.nano` first)
  no_instruction          the Q-Former never reads the instruction (BLIP-2-style visual features)
  proportional            datasets sampled in proportion to their size instead of sqrt-balanced
  task_tags               multitask training without instructions: "[short_vqa] what colour ...?";
                          held-in sets are evaluated with the tags, held-out ones with instructions
  stage2                  the stage-2 model before instruction tuning
  no_grounding            the paper's full model: the Q-Former reads the instruction, but was
                          never taught where to look
  task_tags_no_grounding  task_tags beside no_grounding: from the stage-2 model, LM loss alone
Writes <out>/ablations.json and <out>/ablations.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .__main__ import REPO, Budget
from .evaluate import evaluate_all, results_table
from .logbook import log_to
from .splits import load_manifest
from .stages import run_stage

VARIANTS = ("full", "no_instruction", "proportional", "task_tags", "stage2", "no_grounding", "task_tags_no_grounding")
NO_GROUNDING = dict(grounding_weight=0.0)
TRAINING = {
    "no_instruction": dict(qformer_instruction=False, **NO_GROUNDING),
    "no_grounding": NO_GROUNDING,
    "proportional": dict(sampling="proportional"),
    "task_tags": dict(prompt_style="task_tag"),
    "task_tags_no_grounding": dict(prompt_style="task_tag", **NO_GROUNDING),
}
EVALUATION = {
    "no_instruction": dict(qformer_instruction=False),
    "task_tags": dict(held_in_style="task_tag"),
    "task_tags_no_grounding": dict(held_in_style="task_tag"),
}


def starts_from_stage2(variant: str) -> bool:
    """The paper's family (LM loss alone) starts from stage 2; ours from the full recipe's grounding stage."""
    return TRAINING[variant].get("grounding_weight") == 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.nano.ablations", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "nano")
    p.add_argument("--only", nargs="*", choices=VARIANTS, help="variants to (re)compute; default: all")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="the training seed (the recipe's --seed)")
    args = p.parse_args(argv)
    work = args.out
    log = log_to(work / "nano.log")
    manifest = load_manifest(work / "data")
    stage2, grounded = work / "stage2" / "export", work / "grounding" / "export"
    for needed in (stage2, grounded):
        if not (needed / "config.json").exists():
            raise SystemExit(f"{needed} is missing: run `python -m finetune.nano --out {work}` first")
    steps = Budget(args.quick).steps["instruct"]
    path = work / "ablations.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for variant in args.only or VARIANTS:
        started = time.perf_counter()
        if variant == "full" and (work / "results.json").exists():  # evaluated by the recipe itself
            results[variant] = json.loads((work / "results.json").read_text())
            continue
        if variant == "full":
            model = work / "instruct" / "export"
        elif variant == "stage2":
            model = stage2
        else:
            start = stage2 if starts_from_stage2(variant) else grounded
            model = run_stage("instruct", start, work, manifest, steps, log, quick=args.quick,
                              folder=f"ablation_{variant}", seed=args.seed, **TRAINING[variant])
        results[variant] = evaluate_all(model, manifest, quick=args.quick, **EVALUATION.get(variant, {}))
        path.write_text(json.dumps(results, indent=1))
        log(f"ablation {variant}: {time.perf_counter() - started:.0f} s")
    ordered = {v: results[v] for v in VARIANTS if v in results}
    (work / "ablations.md").write_text(results_table(ordered) + "\n")
    print(results_table(ordered))
    return 0


if __name__ == "__main__":
    sys.exit(main())
