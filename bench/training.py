"""Training speed: samples/s of one instruction-tuning step (forward, backward, AdamW step).

Ours vs transformers' InstructBlipForConditionalGeneration with the same frozen/trainable
split (ViT and LLM frozen; Q-Former, queries and projection trained) on the same batch, and
ours with the frozen image encoder's outputs cached (what `finetune` does when no image
augmentation is used), and both again computing the loss alone as `finetune` does
(`return_logits=False`). Interleaved in one run; ratios are ours / reference.

    python bench/training.py [--folder CHECKPOINT] [--batch 4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import torch
from transformers import InstructBlipForConditionalGeneration

from instructblip_core import load_pretrained
from instructblip_core.model import IGNORE_INDEX

PROMPTS = ["what colour is the large circle?", "how many squares are there?", "what is left of the star?",
           "what word is written on the square?"]
ANSWERS = ["red", "2", "a small blue triangle", "cat"]


def make_batch(ours, batch_size: int) -> dict[str, torch.Tensor]:
    rows, labels = [], []
    for i in range(batch_size):
        prompt, answer = PROMPTS[i % 4], ANSWERS[i % 4]
        p = ours.processor.encode_prompt(prompt)
        a = ours.processor.encode_answer(prompt, answer)
        rows.append(p + a)
        labels.append([IGNORE_INDEX] * len(p) + a)
    width = max(map(len, rows))
    pad = ours.processor.tokenizer.pad_token_id
    batch = ours.prepare([common.test_image(seed=i) for i in range(batch_size)], [PROMPTS[i % 4] for i in range(batch_size)])
    batch["input_ids"] = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    batch["attention_mask"] = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    batch["labels"] = torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in labels])
    return batch


def reference_batch(batch, config) -> dict[str, torch.Tensor]:
    B, Q = batch["input_ids"].shape[0], config.num_query_tokens
    slots = torch.full((B, Q), config.image_token_index)
    return dict(
        pixel_values=batch["pixel_values"], qformer_input_ids=batch["qformer_input_ids"],
        qformer_attention_mask=batch["qformer_attention_mask"],
        input_ids=torch.cat([slots, batch["input_ids"]], 1),
        attention_mask=torch.cat([torch.ones(B, Q, dtype=torch.long), batch["attention_mask"]], 1),
        labels=torch.cat([torch.full((B, Q), IGNORE_INDEX), batch["labels"]], 1),
    )


def trainable_split(model) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    params = [model.query_tokens, *model.qformer.parameters(), *model.language_projection.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def step_fn(model, batch, **options):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        loss = model(**batch, **options).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.folder is None:
        from mid_model import build_mid_checkpoint

        args.folder = build_mid_checkpoint(Path("/tmp/instructblip-mid"))
    print(common.machine())
    ours = load_pretrained(args.folder)
    ours.model.train()
    trainable_split(ours.model)
    reference = InstructBlipForConditionalGeneration.from_pretrained(args.folder, dtype=torch.float32).train()
    trainable_split(reference)
    batch = make_batch(ours, args.batch)
    with torch.no_grad():
        image_embeds = ours.model.encode_images(batch["pixel_values"])  # the cache's content
    cached = {k: v for k, v in batch.items() if k != "pixel_values"} | {"image_embeds": image_embeds}
    with torch.no_grad():  # same weights, same batch: same loss (dropout off for the check)
        ours.model.eval(), reference.eval()
        a, b = ours.model(**batch).loss.item(), reference(**reference_batch(batch, ours.config)).loss.item()
        c = ours.model(**batch, return_logits=False).loss.item()
        ours.model.train(), reference.train()
    assert abs(a - b) < 1e-4 and abs(c - b) < 1e-4, (a, b, c)
    steps = {
        "ours": step_fn(ours.model, batch),
        "transformers": step_fn(reference, reference_batch(batch, ours.config)),
        "ours + feature cache": step_fn(ours.model, cached),
        # What finetune runs: the LM loss without padding or unlabelled positions (losses.decoder_lm_loss).
        "ours, loss only": step_fn(ours.model, batch, return_logits=False),
        "ours, loss only + feature cache": step_fn(ours.model, cached, return_logits=False),
    }
    times = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    ref = args.batch / median["transformers"]
    rows = [[name, args.batch / t, (args.batch / t) / ref] for name, t in median.items()]
    print(f"\n### instruction-tuning step, {args.folder.name}, batch {args.batch}, fp32\n")
    print(common.table(["variant", "samples/s", "vs transformers"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
