""""Where did it look?": the Q-Former's cross-attention over the image, as a heat-map overlay.

InstructBLIP's Q-Former reads the instruction beside its learned queries, and the queries pick
visual features by cross-attending to the image encoder's patch tokens (every 2nd layer). So the
cross-attention weights show which parts of the picture fed the answer, and a different
instruction can move them: the point of instruction-aware features (Dai et al. 2023, sec. 2.3).

    grid = attention_grid(model, image, "What colour is the circle?")  # (side, side), in [0, 1]
    picture = attention_overlay(model, image, "What colour is the circle?")  # RGB PIL image

The summary is deliberately simple: the mean over cross-attention layers, heads and queries of
the weight each patch gets (the CLS token dropped), min-max scaled. It is a view of where the
queries read, not a causal explanation of the answer. No UI code here.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .images import load_image
from .pipeline import InstructBlip

DEFAULT_MAX_SIDE = 384  # the overlay is for a side panel; larger pictures only cost memory
DEFAULT_ALPHA = 0.55  # weight of the heat colour where attention is highest

# Anchor colours of the heat scale, from no attention to the most (dark violet -> red -> yellow),
# interpolated linearly; dark-to-bright keeps the order readable for colour-blind viewers too.
_HEAT_ANCHORS = np.array(
    [[20, 10, 60], [110, 20, 130], [210, 50, 80], [250, 140, 30], [255, 240, 120]], dtype=np.float32
)


@torch.inference_mode()
def cross_attention_weights(model: InstructBlip, image, instruction: str) -> torch.Tensor:
    """Mean cross-attention each image token gets, over layers, heads and queries: (N+1,), CLS first.

    `instruction` is what the Q-Former reads (in a chat: the current question). BLIP-2 models
    read no text, so for them the result does not depend on it.
    """
    batch = model.prepare([image], [instruction], [instruction])
    # The image encoder's output depends on the pixels only: share the generation's cache.
    image_embeds = model.feature_cache.get_or_compute(batch["pixel_values"], model.model.encode_images)  # (1, N+1, Cv)
    features = model.model.visual_features(
        image_embeds,
        batch.get("qformer_input_ids"),
        batch.get("qformer_attention_mask"),
        output_cross_attentions=True,
    )
    if not features.cross_attentions:
        raise ValueError("this Q-Former has no cross-attention layer to show")
    weights = torch.stack([w.float() for w in features.cross_attentions])  # (L, 1, heads, Q, N+1)
    return weights.mean(dim=(0, 2, 3))[0].cpu()  # (N+1,)


def attention_grid(model: InstructBlip, image, instruction: str) -> torch.Tensor:
    """The patches' share of the cross-attention on the patch grid, min-max scaled: (side, side) in [0, 1].

    Row-major like the patch embedding's `flatten(2)`: grid[r, c] is the patch r rows down and
    c columns across the (square-resized) image the model saw.
    """
    per_token = cross_attention_weights(model, image, instruction)  # (N+1,)
    per_patch = per_token[1:]  # (N,) the CLS token has no place in the picture
    side = model.config.vision_config.patches_per_side
    if per_patch.numel() != side * side:
        raise ValueError(f"expected {side * side} patch tokens for a {side}x{side} grid, got {per_patch.numel()}")
    return min_max_scale(per_patch.reshape(side, side))  # (side, side)


def min_max_scale(values: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1]; a constant input (nothing stands out) becomes all zeros."""
    low, high = values.min(), values.max()
    if high - low <= torch.finfo(values.dtype).eps * max(1.0, float(high.abs())):
        return torch.zeros_like(values)
    return (values - low) / (high - low)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """values (...,) in [0, 1] -> RGB (..., 3) float32 in [0, 255] on the heat scale."""
    position = np.clip(values, 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    low = np.minimum(position.astype(np.int64), len(_HEAT_ANCHORS) - 2)
    frac = (position - low)[..., None]
    return _HEAT_ANCHORS[low] * (1 - frac) + _HEAT_ANCHORS[low + 1] * frac


def overlay(image: PIL.Image.Image, grid: torch.Tensor, *, alpha: float = DEFAULT_ALPHA,
            max_side: int = DEFAULT_MAX_SIDE) -> PIL.Image.Image:
    """Blend the heat colours of `grid` (h, w) in [0, 1] over `image`, upsampled to its size.

    The picture is first shrunk to at most `max_side` pixels per side (aspect kept). The model
    saw a square resize of the whole picture, so stretching the grid over the picture's own
    width and height puts each patch back where it came from.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    picture = image.convert("RGB")
    picture.thumbnail((max_side, max_side), PIL.Image.Resampling.BICUBIC)
    width, height = picture.size
    heat = F.interpolate(grid.float()[None, None], size=(height, width), mode="bilinear", align_corners=False)
    heat = heat[0, 0].clamp(0, 1).numpy()  # (H, W)
    colours = heat_colours(heat)  # (H, W, 3)
    base = np.asarray(picture, dtype=np.float32)  # (H, W, 3)
    blended = base * (1 - alpha) + colours * alpha
    return PIL.Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def attention_overlay(model: InstructBlip, image, instruction: str, *, display=None, alpha: float = DEFAULT_ALPHA,
                      max_side: int = DEFAULT_MAX_SIDE) -> PIL.Image.Image:
    """The heat map of where the Q-Former looked for `instruction` in `image`, over `display`
    (default: `image`; e.g. a chat's display copy when `image` is its model-sized one), as RGB PIL."""
    picture = load_image(image)
    shown = load_image(display) if display is not None else picture
    return overlay(shown, attention_grid(model, picture, instruction), alpha=alpha, max_side=max_side)
