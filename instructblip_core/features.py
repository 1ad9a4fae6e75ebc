"""A bounded cache of image-encoder outputs, keyed by image content.

The vision encoder's output depends on the pixels only (the instruction enters later, in the
Q-Former), so a chat turn or a retry about an image already seen skips the largest part of
the image side. Keys are hashes of the preprocessed pixels, so two uploads of the same picture
share an entry and nothing about a conversation is stored. Least recently used entries are
evicted past `max_entries`. Thread-safe: the app serves several users at once.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Callable

import torch


def pixel_key(pixel_values: torch.Tensor) -> str:
    """Content hash of one preprocessed image (3, H, W) or clip (F, 3, H, W)."""
    data = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Content hash of a module's weights (names, dtypes, shapes, values): the same for two copies
    of one encoder wherever they were loaded from, different as soon as one value differs."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    def __init__(self, max_entries: int = 32):
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_compute(self, pixel_values: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """pixel_values (B, ...) -> features (B, ...), computing only the rows not cached yet."""
        keys = [pixel_key(p) for p in pixel_values]
        with self._lock:
            found = {k: self._entries[k] for k in keys if k in self._entries}
            for k in found:
                self._entries.move_to_end(k)
        todo = [i for i, k in enumerate(keys) if k not in found]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            fresh = compute(pixel_values[todo])
            for i, features in zip(todo, fresh):
                found[keys[i]] = features
            self._store({keys[i]: found[keys[i]] for i in todo})
        return torch.stack([found[k] for k in keys])

    def _store(self, items: dict[str, torch.Tensor]) -> None:
        with self._lock:
            for k, v in items.items():
                self._entries[k] = v
                self._entries.move_to_end(k)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
