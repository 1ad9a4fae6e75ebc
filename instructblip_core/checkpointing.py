"""Training checkpoints: written atomically, verified on load, the last K kept.

A checkpoint is a folder `step-00000040/` under the run's `checkpoints/` folder:

    trainable.safetensors   the trainable weights only (the frozen ViT and LLM come from the base model)
    optimizer.pt            AdamW state;  trainer.pt  scheduler, step, data position
    rng-rank0.pt, ...       python / numpy / torch RNG states of every process
    manifest.json           size and sha256 of every file above, written last

Every file is first written into `.tmp-step-00000040/` and fsync-ed; the manifest comes last,
then the folder is renamed to its final name with `os.replace` (atomic on POSIX) and the parent
folder is fsync-ed. So a folder named `step-*` is complete, and a crash at any moment leaves at
worst a `.tmp-*` folder that nothing reads and the next save removes. Loading still checks every
file against the manifest, so disk corruption is an error naming the file, not a silent restart.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

MANIFEST = "manifest.json"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
TRAINER_STATE = "trainer.pt"
STEP_FOLDER = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"


class ResumeError(RuntimeError):
    """A checkpoint is corrupt or does not fit the run being resumed."""


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


# ---- files ---------------------------------------------------------------------------------
def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write bytes and force them to disk before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_folder(out: Path, fill: Callable[[Path], None]) -> Path:
    """`fill(tmp)` writes a new folder under a temporary name beside `out`, which then takes the
    place of `out` by renames: a folder named `out` is always complete, the old one or the new."""
    tmp = out.with_name(f"{TMP_PREFIX}{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted earlier write left
    fill(tmp)
    if out.exists():
        old = out.with_name(f".old-{out.name}")
        os.replace(out, old)
        shutil.rmtree(old)
    os.replace(tmp, out)
    return out


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def object_to_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- RNG -------------------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """Every RNG a training step may draw from, in a form `torch.load(weights_only=True)` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    # random.setstate wants the nested tuples back that serialisation may have turned into lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---- the checkpoints folder --------------------------------------------------------------------
class CheckpointFolder:
    """The `checkpoints/` folder of one run. Writing is two-phase so that several processes can
    add their own files: `begin(step)` (main process), every process `write(step, name, data)`,
    then `commit(step)` (main process) after all have written."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _tmp(self, step: int) -> Path:
        return self.root / f"{TMP_PREFIX}step-{step:08d}"

    def final(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def begin(self, step: int) -> Path:
        """Main process only: a fresh, empty temporary folder for `step` (stale ones removed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self._tmp(step)
        tmp.mkdir()
        return tmp

    def write(self, step: int, name: str, data: bytes) -> None:
        write_durable(self._tmp(step) / name, data)

    def commit(self, step: int) -> Path:
        """Main process only: manifest last, then the atomic rename that makes the checkpoint exist."""
        tmp, final = self._tmp(step), self.final(step)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {"step": step, "files": {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
        write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_folder(tmp)
        if final.exists():  # the same step saved again (e.g. at the end of a resumed run)
            self._remove(final)
        os.replace(tmp, final)
        _fsync_folder(self.root)
        return final

    def _remove(self, folder: Path) -> None:
        # Renamed away first: a half-deleted folder must never look like a checkpoint.
        doomed = folder.with_name(f"{TMP_PREFIX}delete-{folder.name}")
        os.replace(folder, doomed)
        shutil.rmtree(doomed)

    def steps(self) -> list[int]:
        """Steps of the checkpoint folders present (complete by construction), ascending."""
        if not self.root.is_dir():
            return []
        found = [STEP_FOLDER.match(p.name) for p in self.root.iterdir() if p.is_dir()]
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.final(steps[-1]) if steps else None

    def prune(self, keep_last: int) -> list[int]:
        """Remove all but the newest `keep_last` checkpoints; returns the removed steps."""
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        doomed = self.steps()[:-keep_last]
        for step in doomed:
            self._remove(self.final(step))
        return doomed


def verify(folder: Path) -> dict:
    """Check every file against the manifest; returns the manifest. Raises ResumeError."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ResumeError(f"{folder} has no {MANIFEST}; it is not a complete checkpoint (delete it to resume from an older one)")
    manifest = json.loads(manifest_path.read_text())
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise ResumeError(f"{path} is listed in {manifest_path} but missing")
        if path.stat().st_size != expected["size"] or _sha256(path) != expected["sha256"]:
            raise ResumeError(f"{path} does not match {manifest_path} (corrupt); delete {folder} to resume from an older checkpoint")
    return manifest


def read_tensors(folder: Path, name: str = TRAINABLE) -> dict[str, torch.Tensor]:
    return load_safetensors_bytes((folder / name).read_bytes())


def read_object(folder: Path, name: str):
    return torch.load(folder / name, map_location="cpu", weights_only=True)
