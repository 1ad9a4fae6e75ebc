"""Inference speed, ours vs transformers' InstructBlipForConditionalGeneration on the same files.

Same image, same prompt, greedy, same number of new tokens; the generated tokens are asserted
equal. Figures: first-turn latency (image never seen), a later chat turn about the same image
(ours serves the image encoder's output from its feature cache; the reference recomputes it),
time to the first streamed text piece, and decode tokens/s. Ratios are ours / reference,
measured in the same run with the two interleaved, since these machines are noisy.

    python bench/inference.py --config nano --config mid --dtype float32 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import common
import torch
from transformers import AutoProcessor, InstructBlipForConditionalGeneration, TextIteratorStreamer

from instructblip_core import load_pretrained
from instructblip_core.prompts import build_prompt

NANO = common.REPO / "assets" / "nano-instructblip"
QUESTION_1 = "what colour is the large circle?"
QUESTION_2 = "and where is it?"


def reference_inputs(processor, image, prompt, dtype):
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return dict(inputs)


def reference_generate(reference, inputs, n: int) -> list[int]:
    """The reference's n greedy new tokens."""
    out = reference.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1)
    # Decoder-only outputs repeat the prompt; T5's start with the decoder start token.
    start = 1 if reference.config.text_config.is_encoder_decoder else inputs["input_ids"].shape[1]
    return out[0, start:].tolist()


def ours_generate(ours, image, prompt, n, *, cold: bool):
    if cold:
        ours.feature_cache.clear()
    batch = ours.prepare(image, prompt)
    from instructblip_core import GenerationOptions

    run = ours._decoder(batch, GenerationOptions(max_new_tokens=n, min_new_tokens=n))
    return run()[0].tolist()


def first_piece_seconds(pieces) -> float:
    """Seconds until the first non-blank piece; `pieces` is a fresh, not yet started generator."""
    start = time.perf_counter()
    for piece in pieces:
        if piece.strip():
            break
    elapsed = time.perf_counter() - start
    for _ in pieces:  # drain, so the decoding thread ends
        pass
    return elapsed


def reference_stream(reference, processor, make_inputs, n):
    inputs = make_inputs()  # inside the generator: timed like our preprocessing
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer)
    thread = threading.Thread(target=reference.generate, kwargs=kwargs)
    thread.start()
    yield from streamer
    thread.join()


def first_turn_case(ours, reference, image, ref_first, n: int) -> tuple:
    """(ours, reference) callables for a first turn: the image never seen, n greedy tokens."""
    return (lambda: ours_generate(ours, image, QUESTION_1, n, cold=True),
            lambda: reference_generate(reference, ref_first(), n))


def turn_cases(ours, reference, processor, image, follow_up: str, ref_first, ref_later, n: int, stream_n: int) -> dict:
    """The timed cases, name -> (ours, reference) callables. `ref_first` / `ref_later` make the
    reference's inputs (preprocessing inside the timing, as ours); the streamed piece is timed on
    a `stream_n`-token answer; "one token" lets decode tokens/s be derived from the later turn."""
    return {
        "first turn (s)": first_turn_case(ours, reference, image, ref_first, n),
        "later turn, same image (s)": (lambda: ours_generate(ours, image, follow_up, n, cold=False),
                                       lambda: reference_generate(reference, ref_later(), n)),
        "first streamed piece (s)": (
            lambda: first_piece_seconds(ours.stream(image, follow_up, max_new_tokens=stream_n, min_new_tokens=stream_n)),
            lambda: first_piece_seconds(reference_stream(reference, processor, ref_later, stream_n))),
        "one token (s)": (lambda: ours_generate(ours, image, follow_up, 1, cold=False),
                          lambda: reference_generate(reference, ref_later(), 1)),
    }


def measure(folder: Path, dtype: torch.dtype, n_new: int, repeats: int) -> list:
    image = common.test_image()
    ours = load_pretrained(folder, dtype=dtype)
    reference = InstructBlipForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(folder)
    first = ours_generate(ours, image, QUESTION_1, n_new, cold=True)
    expected = reference_generate(reference, reference_inputs(processor, image, QUESTION_1, dtype), n_new)
    assert first == expected, "ours and the reference generated different tokens"
    follow_up = build_prompt(QUESTION_2, [(QUESTION_1, ours.processor.decode(torch.tensor([first]))[0])]).llm
    # Both sides start from the PIL image and the text: preprocessing is inside every timing.
    ref_first = lambda: reference_inputs(processor, image, QUESTION_1, dtype)  # noqa: E731
    ref_later = lambda: reference_inputs(processor, image, follow_up, dtype)  # noqa: E731
    assert ours_generate(ours, image, follow_up, n_new, cold=False) == reference_generate(reference, ref_later(), n_new)

    cases = turn_cases(ours, reference, processor, image, follow_up, ref_first, ref_later, n_new, n_new)
    results = {name: ([], []) for name in cases}
    with torch.inference_mode():
        for fn_pair in cases.values():  # warm-up
            fn_pair[0](), fn_pair[1]()
        for _ in range(repeats):
            for name, (ours_fn, ref_fn) in cases.items():
                for side, fn in zip(results[name], (ours_fn, ref_fn)):
                    start = time.perf_counter()
                    value = fn()
                    elapsed = time.perf_counter() - start
                    side.append(value if name.startswith("first streamed") else elapsed)
    med = {name: (sorted(o)[len(o) // 2], sorted(r)[len(r) // 2]) for name, (o, r) in results.items()}
    rows = [[name, o, r, o / r] for name, (o, r) in med.items() if name != "one token (s)"]
    decode = [(n_new - 1) / (med["later turn, same image (s)"][i] - med["one token (s)"][i]) for i in (0, 1)]
    rows.append(["decode tokens/s", decode[0], decode[1], decode[0] / decode[1]])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", choices=["nano", "mid"], help="default: nano (if shipped) and mid")
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mid-folder", type=Path, default=Path("/tmp/instructblip-mid"))
    p.add_argument("--mid-llm-layers", type=int, default=24)
    args = p.parse_args(argv)
    configs = args.config or (["nano"] if NANO.exists() else []) + ["mid"]
    dtypes = args.dtype or ["float32", "bfloat16"]
    print(common.machine())
    for name in configs:
        if name == "nano":
            folder = NANO
        else:
            from mid_model import build_mid_checkpoint

            folder = build_mid_checkpoint(args.mid_folder, llm_layers=args.mid_llm_layers)
        for dtype in dtypes:
            rows = measure(folder, getattr(torch, dtype), args.new_tokens, args.repeats)
            print(f"\n### {name}, {dtype}, {args.new_tokens} new tokens, greedy, same tokens asserted\n")
            print(common.table(["measure", "ours", "transformers", "ours / transformers"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
