"""Terminal chat: `python -m instructblip_core.cli --model ID_OR_FOLDER --image cat.jpg`.

With questions on the command line it is one-shot: one answer per question, then exit (for
scripts). Without, it is a multi-turn chat reading questions from standard input, answers
streamed as they are decoded, with commands:
    :image PATH   switch to another image (a new conversation segment)
    :undo         forget the last turn        :retry   answer the last question again
    :reset        start over (keeps the image) :quit    leave (also Ctrl-D)
The model is any Hugging Face-format InstructBLIP or BLIP-2 checkpoint (hub id or folder).
"""

from __future__ import annotations

import argparse
import sys

from .chat import ChatError, ChatSession
from .generation import GenerationOptions
from .images import ImageError, load_image
from .loading import CheckpointError, load_pretrained


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m instructblip_core.cli", description=__doc__.splitlines()[0])
    p.add_argument("questions", nargs="*", help="questions for a one-shot answer; none: interactive chat")
    p.add_argument("--model", required=True, help="hub id (e.g. Salesforce/instructblip-flan-t5-xl) or checkpoint folder")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16/fp16 on GPU)")
    p.add_argument("--load-in-8bit", action="store_true")
    p.add_argument("--load-in-4bit", action="store_true")
    p.add_argument("--quantize-fp32-modules", action="store_true",
                   help="with --load-in-4bit --dtype bfloat16: quantise Flan-T5's wo too (see app.py --help)")
    p.add_argument("--static-cache", action="store_true",
                   help="static KV cache; on CUDA the decode step is compiled into CUDA graphs (see app.py --help)")
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
            quantize_fp32_modules=args.quantize_fp32_modules,
        )
        model.static_cache = args.static_cache
    except (ImageError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.questions:
        for answer in model.generate([image] * len(args.questions), args.questions, **vars(options)):
            print(answer)
        return 0
    return chat_loop(ChatSession(model), image, options)


def chat_loop(chat: ChatSession, image, options: GenerationOptions, lines=sys.stdin, out=sys.stdout) -> int:
    chat.set_image(image)
    print("Ask about the image (:image PATH, :undo, :retry, :reset, :quit).", file=out, flush=True)
    for line in lines:
        text = line.strip()
        try:
            if text in (":quit", ":q"):
                break
            if not text:
                continue
            if text.startswith(":image"):
                chat.set_image(text[len(":image"):].strip())
                print("(new image)", file=out, flush=True)
            elif text == ":undo":
                print(f"(forgot: {chat.undo().question})", file=out, flush=True)
            elif text == ":reset":
                current = chat.image
                chat.reset()
                chat.set_image(current)
                print("(conversation cleared)", file=out, flush=True)
            elif text == ":retry":
                _print_stream(chat.retry_stream(**vars(options)), out)
            else:
                _print_stream(chat.stream(text, **vars(options)), out)
            for notice in chat.notices:
                print(f"({notice})", file=out, flush=True)
        except (ChatError, ImageError, ValueError) as e:
            print(f"error: {e}", file=out, flush=True)
    return 0


def _print_stream(pieces, out) -> None:
    for piece in pieces:
        print(piece, end="", file=out, flush=True)
    print(file=out, flush=True)


if __name__ == "__main__":
    sys.exit(main())
