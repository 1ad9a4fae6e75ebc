"""Memory per loading mode: resident weight bytes (LLM and whole model) and peak process memory.

Each mode runs in a fresh process, so one mode's allocations cannot hide another's peak.
Peak = max resident set size over loading and one short generation (CPU), or the CUDA
allocator's peak on a GPU.

    python bench/memory.py [--folder CHECKPOINT]     # default: the mid model, else nano
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import common
import torch

MODES = {
    "fp32": dict(dtype=torch.float32),
    "bf16": dict(dtype=torch.bfloat16),
    "8-bit LLM": dict(load_in_8bit=True),
    "4-bit LLM (NF4)": dict(load_in_4bit=True),
}


def one(folder: Path, mode: str, device: str) -> dict:
    from instructblip_core import load_pretrained
    from instructblip_core.quantization import weight_bytes

    model = load_pretrained(folder, device=device, **MODES[mode])
    model.generate(common.test_image(), "what is in the picture?", max_new_tokens=4)
    llm = model.model.language_model
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "llm_weight_bytes": weight_bytes(llm),
        "llm_fp16_bytes": sum(p.numel() for p in llm.parameters()) * 2 if mode in ("fp32", "bf16") else None,
        "model_weight_bytes": weight_bytes(model.model),
        "peak_bytes": peak,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--one", choices=list(MODES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.folder is None:
        from mid_model import build_mid_checkpoint

        args.folder = build_mid_checkpoint(Path("/tmp/instructblip-mid"))
    if args.one:
        print(json.dumps(one(args.folder, args.one, args.device)))
        return 0
    print(common.machine())
    results = {}
    for mode in MODES:
        out = subprocess.run(
            [sys.executable, __file__, "--folder", str(args.folder), "--device", args.device, "--one", mode],
            capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]
        results[mode] = json.loads(out)
    fp16 = results["fp32"]["llm_fp16_bytes"]
    gib = 1024**3
    rows = [
        [mode, r["llm_weight_bytes"] / gib, r["llm_weight_bytes"] / fp16, r["model_weight_bytes"] / gib, r["peak_bytes"] / gib]
        for mode, r in results.items()
    ]
    print(f"\n### {args.folder.name} on {args.device}\n")
    print(common.table(["mode", "LLM weights (GiB)", "LLM weights / fp16", "all weights (GiB)", "peak memory (GiB)"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
