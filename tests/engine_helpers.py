"""Helpers shared by the inference-engine tests: coloured images and call counters."""

from contextlib import contextmanager

import torch
from PIL import Image

COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 60), "yellow": (230, 220, 40)}


def coloured(name: str, size=(48, 40)) -> Image.Image:
    image = Image.new("RGB", size, COLOURS[name])
    # a second shape so the images are not flat colour fields
    for x in range(size[0] // 4, size[0] // 2):
        for y in range(size[1] // 4, size[1] // 2):
            image.putpixel((x, y), (255 - COLOURS[name][0], 128, 255 - COLOURS[name][2]))
    return image


@contextmanager
def count_calls(module: torch.nn.Module):
    """Counts forward calls of `module` while the block runs: `with count_calls(m) as calls: ...; calls[0]`."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    handle = module.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()
