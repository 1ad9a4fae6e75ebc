"""Sampling frames from a video file or an animated image (GIF, WebP, APNG).

InstructBLIP reads a video as a few frames spread evenly over the clip (4 by default, as in
the paper); each frame becomes 32 visual tokens.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageSequence

from .images import ImageError, to_rgb

DEFAULT_NUM_FRAMES = 4
ANIMATED_SUFFIXES = {".gif", ".webp", ".png", ".apng"}


def uniform_indices(total: int, n: int) -> list[int]:
    """n frame indices spread evenly: the centre of each of n equal segments."""
    if total <= 0:
        raise ValueError("the clip has no frames")
    return [min(total - 1, int((i + 0.5) * total / n)) for i in range(n)]


def sample_frames(path: str | Path, num_frames: int = DEFAULT_NUM_FRAMES) -> list[Image.Image]:
    """num_frames RGB frames sampled uniformly from an animated image or a video file.

    A clip with fewer frames than asked repeats frames, so the model always sees num_frames.
    """
    path = Path(path)
    if num_frames < 1:
        raise ValueError("num_frames must be at least 1")
    if not path.is_file():
        raise ImageError(f"{path.name} does not exist or is not a file", "missing", subject=path.name)
    if path.suffix.lower() in ANIMATED_SUFFIXES:
        return _animated_frames(path, num_frames)
    return _video_frames(path, num_frames)


def _animated_frames(path: Path, n: int) -> list[Image.Image]:
    try:
        with Image.open(path) as im:
            frames = [to_rgb(f.copy()) for f in ImageSequence.Iterator(im)]
    except (OSError, SyntaxError) as e:
        raise ImageError(f"{path.name} could not be read as an animated image: {e}", "corrupt", subject=path.name) from e
    return [frames[i] for i in uniform_indices(len(frames), n)]


def _video_frames(path: Path, n: int) -> list[Image.Image]:
    try:
        import av
    except ImportError as e:
        raise ImageError(f"{path.name}: reading video files needs PyAV", subject=path.name, advice="pip install av") from e
    try:
        with av.open(str(path)) as container:
            frames = [f.to_image() for f in container.decode(video=0)]
    except av.error.FFmpegError as e:
        raise ImageError(f"{path.name} is not a readable video: {e}", "corrupt", subject=path.name) from e
    if not frames:
        raise ImageError(f"{path.name} holds no video frames", "empty", subject=path.name)
    return [to_rgb(frames[i]) for i in uniform_indices(len(frames), n)]
