"""Pretraining the small model's image encoder, which is then frozen like EVA-CLIP in BLIP-2.

There is no web-scale image-text data here, so the ViT learns from the world's ground truth
with dense supervision: every patch token predicts what covers it (shape, colour, size of
the object, and the text written on it, or background), and the CLS token predicts the
background colour and the number of objects. Dense targets matter: the Q-Former reads the
patch tokens, so each must say what is at its place.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from instructblip_core.config import VisionConfig
from instructblip_core.vision import VisionModel

from .pretrain_steps import PretrainOptimizer
from .render import object_mask
from .world import BACKGROUNDS, COLOURS, SHAPES, SIZES, TEXTS, SceneObject

# Per patch: index 0 = nothing (background) for every head.
HEADS = {"shape": 1 + len(SHAPES), "colour": 1 + len(COLOURS), "size": 1 + len(SIZES), "text": 1 + len(TEXTS)}
GLOBAL_HEADS = {"background": len(BACKGROUNDS), "count": 6}  # 0..5 objects


def _index(values, value) -> int:
    return 1 + list(values).index(value)


def patch_targets(scene: dict, image_size: int, patch: int) -> dict[str, np.ndarray]:
    """scene: `splits.scene_facts` JSON -> per-head (G, G) int targets, G = image_size // patch."""
    grid = image_size // patch
    targets = {name: np.zeros((grid, grid), dtype=np.int64) for name in HEADS}
    for ident, o in enumerate(scene["objects"]):
        obj = SceneObject(o["shape"], o["colour"], o["size"], o["x"], o["y"], o["text"], ident)
        mask = object_mask(obj, image_size).astype(np.float32)  # (S, S)
        cover = mask.reshape(grid, patch, grid, patch).mean(axis=(1, 3))  # (G, G) covered share
        hit = cover >= 0.25
        targets["shape"][hit] = _index(SHAPES, o["shape"])
        targets["colour"][hit] = _index(COLOURS, o["colour"])
        targets["size"][hit] = _index(SIZES, o["size"])
        if o["text"]:
            targets["text"][hit] = _index(TEXTS, o["text"])
    return targets


def global_targets(scene: dict) -> dict[str, int]:
    return {"background": list(BACKGROUNDS).index(scene["background"]), "count": min(len(scene["objects"]), 5)}


class PretrainHeads(nn.Module):
    """Linear read-outs on the frozen-to-be encoder: per patch and from CLS."""

    def __init__(self, width: int):
        super().__init__()
        self.patch = nn.ModuleDict({name: nn.Linear(width, n) for name, n in HEADS.items()})
        self.cls = nn.ModuleDict({name: nn.Linear(width, n) for name, n in GLOBAL_HEADS.items()})

    def forward(self, tokens: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """tokens (B, 1+G*G, C); targets: patch heads (B, G*G), global heads (B,)."""
        losses, accuracy = [], {}
        for name, head in self.patch.items():
            logits = head(tokens[:, 1:])  # (B, G*G, n)
            losses.append(F.cross_entropy(logits.flatten(0, 1), targets[name].flatten()))
            right = logits.argmax(-1) == targets[name]  # (B, G*G)
            accuracy[name] = right.float().mean().item()
            # Most patches are background, which every head gets right: the patches that show an
            # object (or text) are what the Q-Former must read (shape 0.90 overall was 0.29 on them).
            covered = targets[name] > 0
            if covered.any():
                accuracy[f"{name}_on_objects"] = right[covered].float().mean().item()
        for name, head in self.cls.items():
            logits = head(tokens[:, 0])  # (B, n)
            losses.append(F.cross_entropy(logits, targets[name]))
            accuracy[name] = (logits.argmax(-1) == targets[name]).float().mean().item()
        return sum(losses), accuracy


@dataclass
class VisionPretrainResult:
    model: VisionModel
    accuracy: dict[str, float]  # on held-back images
    seconds: float


def pretrain_vision(
    config: VisionConfig,
    pixels: torch.Tensor,
    scenes: list[dict],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log=print,
) -> VisionPretrainResult:
    """pixels (N, 3, S, S) preprocessed images; scenes their ground truth. The last 5% are held back."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    G, P = config.image_size // config.patch_size, config.patch_size
    per_image = [patch_targets(s, config.image_size, P) for s in scenes]
    targets = {name: torch.from_numpy(np.stack([t[name].reshape(-1) for t in per_image])) for name in HEADS}
    for name in GLOBAL_HEADS:
        targets[name] = torch.tensor([global_targets(s)[name] for s in scenes])
    n_eval = max(1, len(scenes) // 20)
    train_idx = list(range(len(scenes) - n_eval))
    model, heads = VisionModel(config), PretrainHeads(config.hidden_size)
    _init_vit(model)
    model, heads = model.to(device), heads.to(device)
    pixels, targets = pixels.to(device), {k: v.to(device) for k, v in targets.items()}
    optimizer = PretrainOptimizer([*model.parameters(), *heads.parameters()], lr=lr, steps=steps)
    model.train()
    for step in range(steps):
        batch = rng.sample(train_idx, min(batch_size, len(train_idx)))
        loss, acc = heads(model(pixels[batch]), {k: v[batch] for k, v in targets.items()})
        optimizer.step(loss)
        if step % 100 == 0 or step == steps - 1:
            log(f"vision step {step}/{steps} loss {loss.item():.3f} " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    model.eval()
    held = list(range(len(scenes) - n_eval, len(scenes)))
    with torch.no_grad():
        _, accuracy = heads(model(pixels[held]), {k: v[held] for k, v in targets.items()})
    return VisionPretrainResult(model.cpu(), accuracy, time.perf_counter() - started)


def _init_vit(model: VisionModel) -> None:
    """Truncated-normal 0.02 weights, zero biases, as ViTs are usually initialised."""
    for name, p in model.named_parameters():
        if p.dim() >= 2 or name.endswith(("class_embedding", "position_embedding")):
            nn.init.trunc_normal_(p, std=0.02)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
