"""Writing datasets to disk: PNG images rendered from scenes, and JSONL record files.

Files are written whole or not at all (to a temporary name, then renamed), so a generation
run that is killed never leaves a truncated JSONL or PNG that a later run would trust.
PNG encoding is deterministic (PIL writes no timestamps), so the same scenes give the same
bytes. Rendering can be spread over worker processes: each image depends only on its scene,
so the result is the same with any number of workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from io import BytesIO
from pathlib import Path
from typing import Iterable, Sequence

from .render import render_scene
from .world import Scene

CHUNK = 64  # images per task sent to a worker: large enough that pickling costs little


def atomic_write_bytes(path: Path, data: bytes, *, make_parents: bool = True) -> None:
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    # One writer per file (a worker owns its images), so a per-process temporary name is enough.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    """One JSON object per line (UTF-8, keys in the order given); returns the number of lines."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    atomic_write_bytes(Path(path), ("\n".join(lines) + "\n").encode("utf-8") if lines else b"")
    return len(lines)


def write_text_lines(path: Path, lines: Iterable[str]) -> int:
    lines = list(lines)
    bad = next((k for k, line in enumerate(lines) if "\n" in line), None)
    if bad is not None:
        raise ValueError(f"{path}: line {bad + 1} of the text contains a newline: {lines[bad]!r}")
    atomic_write_bytes(Path(path), ("\n".join(lines) + "\n").encode("utf-8"))
    return len(lines)


def png_bytes(scene: Scene, size: int) -> bytes:
    buffer = BytesIO()
    render_scene(scene, size).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _write_chunk(job: tuple[str, int, list[tuple[str, Scene]]]) -> int:
    root, size, items = job
    for relative, scene in items:
        atomic_write_bytes(Path(root) / relative, png_bytes(scene, size), make_parents=False)
    return len(items)


def write_images(root: Path, images: Sequence[tuple[str, Scene]], *, size: int, workers: int = 1) -> int:
    """Render and save each (path relative to root, scene); returns how many were written.

    workers > 1 renders in that many processes (fork where the platform has it).
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    for folder in sorted({(Path(root) / relative).parent for relative, _ in images}):
        folder.mkdir(parents=True, exist_ok=True)  # once per folder, not once per image
    chunks = [(str(root), size, list(images[i:i + CHUNK])) for i in range(0, len(images), CHUNK)]
    if workers == 1 or len(chunks) < 2:
        return sum(_write_chunk(c) for c in chunks)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(min(workers, len(chunks))) as pool:
        return sum(pool.imap_unordered(_write_chunk, chunks))
