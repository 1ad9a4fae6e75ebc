"""Shared fixtures: tiny checkpoints built once per test session (offline, seconds)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_checkpoints import build_tiny_checkpoint  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """kind -> folder of a tiny random checkpoint saved by transformers (built on first use)."""
    cache = {}

    def get(kind: str, seed: int = 0, **sizes):
        key = (kind, seed, tuple(sorted(sizes.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(kind.replace("-", "_"))
            cache[key] = build_tiny_checkpoint(kind, folder, seed=seed, **sizes)
        return cache[key]

    return get
