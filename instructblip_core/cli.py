"""Command-line answers: `python -m instructblip_core.cli --model ID_OR_FOLDER --image cat.jpg "question"`.

One-shot: prints one answer per question and exits (for scripts). The model is any
Hugging Face-format InstructBLIP or BLIP-2 checkpoint (hub id or local folder).
"""

from __future__ import annotations

import argparse
import sys

from .generation import GenerationOptions
from .images import ImageError, load_image
from .loading import CheckpointError, load_pretrained


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m instructblip_core.cli", description=__doc__.splitlines()[0])
    p.add_argument("questions", nargs="+", help="one or more questions about the image")
    p.add_argument("--model", required=True, help="hub id (e.g. Salesforce/instructblip-flan-t5-xl) or checkpoint folder")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16/fp16 on GPU)")
    p.add_argument("--load-in-8bit", action="store_true")
    p.add_argument("--load-in-4bit", action="store_true")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy/beam decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = GenerationOptions(
            num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
            temperature=args.temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        )
        image = load_image(args.image)
        model = load_pretrained(
            args.model, device=args.device, dtype=args.dtype,
            load_in_8bit=args.load_in_8bit, load_in_4bit=args.load_in_4bit,
        )
    except (ImageError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    answers = model.generate([image] * len(args.questions), args.questions, **vars(options))
    for answer in answers:
        print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
