"""Grounding: teach the Q-Former to look at what the instruction is about.

InstructBLIP's Q-Former reads the instruction so that its queries can pick the visual features
the task needs (Dai et al. 2023, sec. 2.3). The language-model loss alone rewards that only
indirectly, and our small model never learned it: asked about one object of several, its
queries read the whole scene (the soft prompts for "the circle" and "the square" had cosine
0.99988), and the LLM cannot pick the object out of a description of all of them.

When a record names the image regions its answer depends on (`"regions"`: boxes
[x0, y0, x1, y1] as fractions of the width and height, e.g. the referred object of a
RefCOCO-style question, or every object for a caption; or "cls", the image encoder's CLS token,
for what the whole image holds, like the number of objects), this module turns them into
masks over the image tokens and scores the Q-Former's cross-attention against them:

    grounding loss = - mean over the record's regions k of  log( attention mass on region k )

where the attention is averaged over cross-attention layers, heads and queries. With one
region it asks that all attention land on it; with several, that each gets a share (a
caption must read every object, and the queries may split the work between them).

It is used in two places (finetune/recipe.py): the `grounding` stage trains the Q-Former on
this loss alone (no LLM pass, so it is cheap), and instruction tuning adds it to the LM loss
(`grounding_weight`), so the LLM loss does not undo it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .wrapper import ModelWrapper

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the image side
# The CLS token sums up the whole image: in the small model's encoder it knows the number of
# objects exactly, but a Q-Former grounded on the objects alone gave it 0.8% of its attention.
CLS = "cls"
Region = Box | Literal["cls"]
MIN_PATCH_COVER = 0.25  # a patch belongs to a region when the box covers this share of it
EPS = 1e-6  # keeps the log finite when a region gets no attention at all


def region_patch_mask(region: Region, grid: int) -> torch.Tensor:
    """One region -> (1 + grid*grid,) float 0/1 over the image tokens, CLS first.

    "cls" marks the CLS token alone; a box marks the patches it covers (never the CLS token).
    Patches are row-major like the patch embedding's flatten. A box too small to cover any
    patch by MIN_PATCH_COVER still marks the patch under its centre.
    """
    return region_masks([[region]], grid)[0, 0]  # (1 + grid*grid,)


def _patches_inside(regions: list[Box], grid: int) -> torch.Tensor:
    """R boxes -> (R, grid*grid) bool: the patches each box covers (see `region_patch_mask`).

    All boxes at once: one box at a time was half of a grounding batch's collation.
    """
    # Corners as float32 values, then float64 arithmetic (what the per-box version did).
    boxes = torch.tensor(regions, dtype=torch.float32).double()  # (R, 4): x0, y0, x1, y1
    x0, y0, x1, y1 = boxes.unbind(-1)  # (R,) each
    edges = torch.arange(grid + 1, dtype=torch.float64) / grid  # (grid+1,) patch borders
    # Overlap of [a, b] with each patch's [edge_i, edge_i+1], as a share of the patch side.
    cover_x = ((torch.minimum(edges[1:], x1[:, None]) - torch.maximum(edges[:-1], x0[:, None])) * grid).clamp(min=0)  # (R, grid)
    cover_y = ((torch.minimum(edges[1:], y1[:, None]) - torch.maximum(edges[:-1], y0[:, None])) * grid).clamp(min=0)  # (R, grid)
    inside = cover_y[:, :, None] * cover_x[:, None, :] >= MIN_PATCH_COVER  # (R, grid, grid)
    empty = ~inside.flatten(1).any(-1)  # (R,) boxes covering no patch enough: mark the centre's patch
    if empty.any():
        rows = ((y0 + y1) / 2 * grid).long().clamp(max=grid - 1)  # (R,)
        cols = ((x0 + x1) / 2 * grid).long().clamp(max=grid - 1)
        index = empty.nonzero().squeeze(1)
        inside[index, rows[index], cols[index]] = True
    return inside.flatten(1)  # (R, grid*grid)


def region_masks(regions_per_item: list[list[Region]], grid: int) -> torch.Tensor:
    """A batch's regions -> (B, K, 1 + grid*grid), K the most regions of any item; padding rows are all zero."""
    K = max(1, max(len(r) for r in regions_per_item))
    masks = torch.zeros(len(regions_per_item), K, 1 + grid * grid)
    box_places, boxes = [], []
    for b, regions in enumerate(regions_per_item):
        for k, region in enumerate(regions):
            if region == CLS:
                masks[b, k, 0] = 1.0
            else:
                box_places.append((b, k))
                boxes.append(region)
    if boxes:
        b, k = torch.tensor(box_places).unbind(-1)
        masks[b, k, 1:] = _patches_inside(boxes, grid).float()
    return masks


def attention_on_image(cross_attentions: list[torch.Tensor]) -> torch.Tensor:
    """Per cross-attention layer (B, heads, Q, N+1) -> (B, N+1): the mean over layers, heads and queries."""
    if not cross_attentions:
        raise ValueError("grounding needs the Q-Former's cross-attention weights, and this Q-Former returned none")
    return torch.stack([w.float() for w in cross_attentions]).mean(dim=(0, 2, 3))  # (B, N+1)


def grounding_loss(cross_attentions: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor | None:
    """-mean log(attention mass on each region) over the batch's regions; None when it has none.

    masks: (B, K, N+1) from `region_masks` (all-zero rows are padding).
    """
    present = masks.sum(-1) > 0  # (B, K)
    if not present.any():
        return None
    attention = attention_on_image(cross_attentions)  # (B, N+1)
    if attention.shape[-1] != masks.shape[-1]:
        raise ValueError(f"region masks cover {masks.shape[-1]} image tokens but the image has {attention.shape[-1]}")
    mass = torch.einsum("bn,bkn->bk", attention, masks.to(attention.device))  # (B, K)
    return -(mass[present] + EPS).log().mean()


@dataclass
class GroundedOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor  # what the trainer steps on
    loss_lm: torch.Tensor | None = None
    loss_grounding: torch.Tensor | None = None


def _attended_features(model: nn.Module, pixel_values, image_embeds, qformer_input_ids, qformer_attention_mask):
    """Images (or their cached encoder outputs) + instruction -> VisualFeatures with the cross-attention weights."""
    if image_embeds is None:
        if pixel_values is None:
            raise ValueError("pass pixel_values or precomputed image_embeds")
        # No no_grad here: a frozen encoder builds no graph anyway, and with train_vision it must learn.
        image_embeds = model.encode_images(pixel_values)  # (B, N+1, Cv)
    return model.visual_features(image_embeds, qformer_input_ids, qformer_attention_mask, output_cross_attentions=True)


class GroundedInstructionModel(ModelWrapper):
    """Instruction tuning with the grounding loss added: loss = LM + weight * grounding.

    Only the losses are computed (the LM loss without full logits: `losses.decoder_lm_loss`), as training reads nothing else.

    Batches without regions (and video batches, whose records carry none) train on the LM
    loss alone, exactly as without this wrapper, and report no grounding loss: the logged
    `loss_grounding` is the mean over the batches that had regions (the trainer counts each
    logged key on its own).
    """

    def __init__(self, model: nn.Module, weight: float):
        super().__init__(model)
        self.weight = weight

    def forward(self, region_masks: torch.Tensor | None = None, pixel_values=None, image_embeds=None,
                qformer_input_ids=None, qformer_attention_mask=None, **batch) -> GroundedOutput:
        is_video = (pixel_values is not None and pixel_values.dim() == 5) or (image_embeds is not None and image_embeds.dim() == 4)
        if region_masks is None or is_video or not (region_masks.sum(-1) > 0).any():
            out = self.model(pixel_values=pixel_values, image_embeds=image_embeds, qformer_input_ids=qformer_input_ids,
                             qformer_attention_mask=qformer_attention_mask, return_logits=False, **batch)
            return GroundedOutput(out.logits, out.loss, loss_lm=out.loss)
        features = _attended_features(self.model, pixel_values, image_embeds, qformer_input_ids, qformer_attention_mask)
        out = self.model(visual=features.language_inputs, return_logits=False, **batch)
        grounding = grounding_loss(features.cross_attentions, region_masks)
        return GroundedOutput(out.logits, out.loss + self.weight * grounding, loss_lm=out.loss, loss_grounding=grounding)


class GroundingModel(ModelWrapper):
    """The grounding stage: the Q-Former and its queries on the grounding loss alone (no LLM pass)."""

    def forward(self, region_masks: torch.Tensor | None = None, pixel_values=None, image_embeds=None,
                qformer_input_ids=None, qformer_attention_mask=None) -> GroundedOutput:
        features = _attended_features(self.model, pixel_values, image_embeds, qformer_input_ids, qformer_attention_mask)
        grounding = None if region_masks is None else grounding_loss(features.cross_attentions, region_masks)
        if grounding is None:
            raise ValueError("the grounding stage trains on records with 'regions', and this batch has none")
        return GroundedOutput(None, grounding, loss_grounding=grounding)
