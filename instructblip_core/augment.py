"""Image transforms for training and evaluation: PIL RGB image -> (3, H, W) pixel values.

Training (BLIP-2 / InstructBLIP recipe): a random crop covering 50-100% of the image area with
aspect ratio between 3/4 and 4/3, resized bicubic to the model's input size, then the
processor's own normalisation. The paper also flips horizontally; we leave that OFF by
default because a flip silently turns the right answer to "what is on the left?" into a wrong
one (and mirrors any text in the image). Evaluation is the processor's deterministic resize.

Every random number comes from the `torch.Generator` passed in, so the dataset can make an
item's crop a function of (seed, epoch, index) and a resumed run sees the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import PIL.Image
import torch

from .images import ImageProcessor

CROP_ATTEMPTS = 10  # tries at a random box before falling back to a centred crop


@dataclass
class EvalTransform:
    """The processor's deterministic preprocessing (what inference uses)."""

    image_processor: ImageProcessor
    deterministic: ClassVar[bool] = True  # same image -> same pixels, so encoder outputs may be cached

    def __call__(self, image: PIL.Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.image_processor.pixel_values(image)  # (3, H, W)


@dataclass
class TrainTransform:
    """RandomResizedCrop (bicubic) + optional horizontal flip + the processor's normalisation."""

    image_processor: ImageProcessor
    scale: tuple[float, float] = (0.5, 1.0)  # share of the image area the crop covers
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height
    # Off by default: flipping breaks left/right questions and mirrored text reads wrong.
    horizontal_flip: bool = False
    deterministic: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {self.ratio}")

    def crop_box(self, width: int, height: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """A random (left, top, right, bottom) box of the wanted area share and aspect ratio."""
        area = width * height
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(CROP_ATTEMPTS):
            target = area * _uniform(self.scale[0], self.scale[1], generator)
            aspect = math.exp(_uniform(log_low, log_high, generator))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = _randint(width - w + 1, generator)
                top = _randint(height - h + 1, generator)
                return left, top, left + w, top + h
        return _centre_box(width, height, self.ratio)

    def __call__(self, image: PIL.Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        crop = image.crop(self.crop_box(image.width, image.height, generator))
        if self.horizontal_flip and _uniform(0.0, 1.0, generator) < 0.5:
            crop = crop.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        return self.image_processor.pixel_values(crop)  # (3, H, W): bicubic resize + normalise


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform in [0, high)."""
    return int(torch.randint(high, (), generator=generator).item())


def _centre_box(width: int, height: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    # No random box fitted (a very long or tall image): the largest centred box whose aspect
    # ratio is within range.
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h
