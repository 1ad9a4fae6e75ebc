"""Image side of the InstructBLIP processor: load any image safely, turn it into pixel_values.

Numerically this is `transformers.BlipImageProcessor` as transformers 5.x runs it without
torchvision, i.e. its PIL backend (`BlipImageProcessorPil`): convert to RGB (transparency
composited onto white), PIL bicubic resize to a fixed (height, width), `x * (1/255)` in
float64 cast to float32, then `(x - mean) / std` in float32. We compute the same operations
in the same precision, so the output is bit-for-bit equal (max abs difference 0.0). This PIL
path is also what the original LAVIS code does (`torchvision.transforms.Resize` on a PIL image
calls PIL's resize). With torchvision installed transformers switches to its torch backend,
whose antialiased torch resize differs slightly from PIL's; we deliberately stay on PIL.

Where we differ from transformers, on purpose:
- 16-bit ("I;16", "I") and float ("F") images are scaled to 8 bits. Pillow's own
  `convert("RGB")` clips them at 255, which turns most 16-bit photos into a white image.
- Bad input raises `ImageError` with one readable sentence naming the file and the problem,
  instead of a Pillow traceback; oversized images are refused before they are decoded.
- RGBA given as a path: transformers' `load_image` (used for path strings) drops alpha with a
  plain `convert("RGB")`; we composite onto white for every source, as its `convert_to_rgb`
  does for PIL/numpy inputs (transparent pixels often store black, so dropping alpha turns
  transparent backgrounds black).

EXIF orientation: like transformers, files we decode ourselves (path, bytes, file object) are
rotated upright with `ImageOps.exif_transpose` (transformers' `load_image`, used by the image
processor for path strings, does this); PIL images and arrays handed to us are used as they are
(transformers does not transpose those either), so both routes match transformers.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

__all__ = ["DEFAULT_MAX_PIXELS", "ImageError", "ImageProcessor", "load_image", "to_rgb"]


class ImageError(ValueError):
    """One specific, readable problem with an input image.

    str(error) is one sentence that names the image and the problem. For callers that word it
    their own way (the app names an upload by the name its user gave the file, and gives its
    own advice instead of ours):
      kind     "missing", "unreadable" (no permission, a URL, a directory, a closed file),
               "empty", "corrupt", "too_large", "no_pixels", or "unsupported" (a format,
               mode, type or array we do not read)
      subject  how the sentence names the image (a path, "the numpy image"), or None
      advice   the sentence's closing hint in brackets, or None
    """

    KINDS = ("missing", "unreadable", "empty", "corrupt", "too_large", "no_pixels", "unsupported")

    def __init__(self, message: str, kind: str = "unsupported", *, subject: str | None = None,
                 advice: str | None = None):
        if kind not in self.KINDS:
            raise ValueError(f"unknown ImageError kind {kind!r}")
        super().__init__(f"{message} ({advice})" if advice else message)
        self.message, self.kind, self.subject, self.advice = message, kind, subject, advice

    def reworded(self, subject: str | None = None, advice: str | None = None) -> "ImageError":
        """The same error naming the image `subject` (when it named one), with `advice` instead of ours."""
        message = self.message
        if subject is not None and self.subject:
            message = message.replace(self.subject, subject, 1)
        error = ImageError(message, self.kind, subject=subject if self.subject else None, advice=advice)
        error.__cause__ = self
        return error


# Decompression-bomb guard. A tiny PNG/GIF can declare 50,000 x 50,000 pixels and decode to
# 10 GB. 40 M pixels is ~120 MB as RGB (~160 MB as RGBA, plus a copy or two while converting),
# which one request may spend on a shared laptop CPU or a Hugging Face Space without starving
# the other users. It admits every ordinary photo (12 MP phones, 24-36 MP cameras, 8K frames =
# 33 MP) and refuses only 45 MP+ full-sensor originals, which gain nothing here: the model sees
# 224 x 224. Pillow's own limit (PIL.Image.MAX_IMAGE_PIXELS, ~89 M warn / ~179 M error) is
# looser and only a warning below 179 M, so we check ours first.
DEFAULT_MAX_PIXELS = 40_000_000

# Processor settings that transformers' BLIP pipeline has and we do not implement; a config
# that turns one of them on would give different pixels, so we refuse it instead.
_REQUIRED_FLAGS = {"do_resize": True, "do_rescale": True, "do_normalize": True,
                   "do_center_crop": False, "do_pad": False}

_ARRAY_HELP = "expected a uint8 array shaped HxW or HxWxC with C in (1, 3, 4)"


# ----------------------------------------------------------------------------- loading


def load_image(source: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> PIL.Image.Image:
    """Return `source` as a fully decoded RGB PIL image, or raise ImageError.

    source: a path (str / os.PathLike), bytes, a binary file object, a PIL image, or a uint8
    numpy array (HxW, HxWx1, HxWx3, HxWx4). max_pixels: refuse larger images (None: no limit
    of ours; Pillow's own MAX_IMAGE_PIXELS still applies).
    """
    return to_rgb(_open(source, max_pixels))


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert any PIL mode to RGB the way transformers' convert_to_rgb does, plus 16-bit/float."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_depth_to_8bit(image)
    try:
        return _rgb_like_transformers(image)
    except ValueError as e:  # e.g. "La": Pillow has no conversion path for it
        raise ImageError(f"{_name_of(image)} has mode {image.mode}, which cannot be converted to RGB ({e})",
                         subject=_name_of(image)) from e


def _rgb_like_transformers(image: PIL.Image.Image) -> PIL.Image.Image:
    # Same rule as transformers.image_transforms.convert_to_rgb: anything with an alpha band or
    # a transparency key is composited onto opaque white, the rest is a plain convert.
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, rgba).convert("RGB")


def _open(source: Any, max_pixels: int | None) -> PIL.Image.Image:
    """Dispatch on the source type; every branch returns a decoded (loaded) PIL image."""
    if isinstance(source, PIL.Image.Image):
        return _use_pil_image(source, max_pixels)
    if isinstance(source, np.ndarray):
        return _image_from_array(source, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        return _decode_path(os.fspath(source), max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), "the image data", max_pixels)
    if hasattr(source, "read"):
        return _decode_file_object(source, max_pixels)
    raise ImageError(
        f"cannot load an image from an object of type {type(source).__module__}.{type(source).__qualname__} "
        "(expected a file path, bytes, a binary file object, a PIL image or a uint8 numpy array)"
    )


def _use_pil_image(image: PIL.Image.Image, max_pixels: int | None) -> PIL.Image.Image:
    # A caller may hand us a lazy `Image.open(...)` result: check its size and decode it here so
    # that a bomb or a truncated file fails now, with our message. No EXIF transpose (see module doc).
    name = _name_of(image)
    _check_pixels(image.size, name, max_pixels)
    _load(image, name)
    return image


def _decode_path(path: str, max_pixels: int | None) -> PIL.Image.Image:
    _check_path(path)
    try:
        with open(path, "rb") as fp:
            # Decode while the file is open; the returned image no longer needs it.
            return _decode_stream(fp, path, max_pixels)
    except PermissionError as e:
        raise ImageError(f"{path} cannot be read (permission denied)", "unreadable", subject=path) from e


def _check_path(path: str) -> None:
    if re.match(r"^https?://", path):
        raise ImageError(f"{path} is a URL; only local files are read", "unreadable", subject=path,
                         advice="download it first")
    if os.path.isdir(path):
        raise ImageError(f"{path} is a directory, not an image file", "unreadable", subject=path)
    if not os.path.exists(path):
        raise ImageError(f"{path} does not exist", "missing", subject=path)
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path} is empty (0 bytes)", "empty", subject=path)


def _decode_bytes(data: bytes, name: str, max_pixels: int | None) -> PIL.Image.Image:
    if not data:
        raise ImageError(f"{name} is empty (0 bytes)", "empty", subject=name)
    return _decode_stream(io.BytesIO(data), name, max_pixels)


def _decode_file_object(fp: BinaryIO, max_pixels: int | None) -> PIL.Image.Image:
    name = str(getattr(fp, "name", "") or "the image file object")
    seekable = getattr(fp, "seekable", lambda: False)()
    if not seekable:  # Pillow needs to seek; pipes and HTTP bodies cannot
        data = fp.read()
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError(f"{name} is not a binary file (read() returned {type(data).__name__})", subject=name)
        return _decode_bytes(bytes(data), name, max_pixels)
    start = fp.tell()
    end = fp.seek(0, io.SEEK_END)
    fp.seek(start)
    if end == start:
        raise ImageError(f"{name} is empty (0 bytes)", "empty", subject=name)
    return _decode_stream(fp, name, max_pixels)


def _decode_stream(fp: BinaryIO, name: str, max_pixels: int | None) -> PIL.Image.Image:
    """Identify (header only), check the size, decode fully, then apply EXIF orientation."""
    image = _identify(fp, name, max_pixels)
    _check_pixels(image.size, name, max_pixels)
    _load(image, name)
    return _exif_upright(image)


def _identify(fp: BinaryIO, name: str, max_pixels: int | None) -> PIL.Image.Image:
    magic = fp.read(32)
    fp.seek(-len(magic), io.SEEK_CUR)
    try:
        # Image.open reads only the header. Pillow warns (DecompressionBombWarning) above its own
        # limit; our max_pixels check right after is the policy, so the warning is noise here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            return PIL.Image.open(fp)
    except PIL.Image.DecompressionBombError as e:
        raise _bomb_error(e, name, max_pixels) from e
    except PIL.UnidentifiedImageError as e:
        raise _unidentified_error(magic, name) from e
    except Exception as e:  # a recognised format whose header Pillow rejects
        raise ImageError(f"{name} is truncated or corrupt: {_describe(e)}", "corrupt", subject=name) from e


def _load(image: PIL.Image.Image, name: str) -> None:
    # Decode now so truncation shows up here, not later inside resize. (If some other code set
    # PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True, Pillow pads truncated files silently; that
    # process-wide switch is outside our control.)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image.load()
    except PIL.Image.DecompressionBombError as e:  # some formats (e.g. ICO, GIF frames) check at load
        raise _bomb_error(e, name, None) from e
    except ValueError as e:
        if "closed file" in str(e):  # a lazy Image.open(...) whose `with` block already ended
            raise ImageError(f"{name} was closed before its pixels were read", "unreadable", subject=name,
                             advice="load it inside the with block") from e
        raise ImageError(f"{name} is truncated or corrupt: {_describe(e)}", "corrupt", subject=name) from e
    except Exception as e:  # OSError, SyntaxError, EOFError, struct.error, zlib errors ...
        raise ImageError(f"{name} is truncated or corrupt: {_describe(e)}", "corrupt", subject=name) from e


def _exif_upright(image: PIL.Image.Image) -> PIL.Image.Image:
    try:
        return PIL.ImageOps.exif_transpose(image)
    except Exception:
        # A malformed EXIF block must not cost the user the image; show it as stored.
        return image


# ----------------------------------------------------------------------------- size guard


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name} is {width}x{height}: it has no pixels", "no_pixels", subject=name)
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageError(f"{name} is {width}x{height} = {pixels:,} pixels, over the limit of {max_pixels:,}",
                         "too_large", subject=name, advice="set max_pixels to allow it")


def _bomb_error(e: Exception, name: str, max_pixels: int | None) -> ImageError:
    # Pillow refused before we could see the size (over 2 x PIL.Image.MAX_IMAGE_PIXELS). Its
    # message carries the pixel count but not width x height.
    found = re.search(r"\((\d+) pixels\)", str(e))
    pixels = int(found.group(1)) if found else None
    if pixels is not None and max_pixels is not None and pixels > max_pixels:
        return ImageError(f"{name} has {pixels:,} pixels, over the limit of {max_pixels:,}", "too_large",
                          subject=name, advice="set max_pixels to allow it")
    count = f"{pixels:,} pixels" if pixels is not None else "too many pixels"
    return ImageError(
        f"{name} has {count}, over Pillow's decompression-bomb limit of {2 * (PIL.Image.MAX_IMAGE_PIXELS or 0):,}",
        "too_large", subject=name, advice="raise PIL.Image.MAX_IMAGE_PIXELS as well as max_pixels to allow it",
    )


# ----------------------------------------------------------------------------- error wording

# Formats people upload that Pillow may not read, and the signatures of formats it does read
# (a known signature that Pillow cannot identify means a damaged file, not a non-image).
_UNREADABLE_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"heif": "HEIF"}
_KNOWN_SIGNATURES = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP",
                     b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


def _unidentified_error(magic: bytes, name: str) -> ImageError:
    if magic[4:8] == b"ftyp" and magic[8:12] in _UNREADABLE_BRANDS:
        fmt = _UNREADABLE_BRANDS[magic[8:12]]
        return ImageError(f"{name} is a {fmt} image, which this Pillow cannot read", subject=name,
                          advice="convert it to JPEG or PNG")
    for signature, fmt in _KNOWN_SIGNATURES.items():
        if magic.startswith(signature):
            return ImageError(f"{name} is truncated or corrupt: it starts like a {fmt} file but has no valid header",
                              "corrupt", subject=name)
    return ImageError(f"{name} is not an image file (cannot identify image format)", subject=name)


def _describe(e: Exception) -> str:
    return str(e) or type(e).__name__


def _name_of(image: PIL.Image.Image) -> str:
    return str(getattr(image, "filename", "") or "the image")


# ----------------------------------------------------------------------------- mode conversion


def _high_depth_to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """16/32-bit integer and float images -> 'L' (or 'LA' with a 16-bit transparency key).

    Pillow converts these by clipping at 255 (a 16-bit photo becomes almost all white), so
    scale by what the numbers mean instead. Where the values already lie in 0..255, Pillow's
    conversion is right and we use it, which keeps those images identical to transformers.
    """
    values = np.asarray(image)  # (H, W) uint16 / int32 / float32
    if image.mode.startswith("I;16"):
        gray = _scale_16bit(values)  # declared 16-bit: full range is 0..65535
    elif image.mode == "F" and _within(values, 0.0, 1.0):
        gray = _to_l(values * 255.0)  # float images conventionally hold 0..1
    elif _within(values, 0, 255):
        gray = image.convert("L")
    elif image.mode == "I" and _within(values, 0, 65535):
        gray = _scale_16bit(values)  # e.g. a 16-bit PNG decoded into a 32-bit container
    else:
        gray = _stretch(values)  # no natural scale (depth maps, HDR): map min..max to 0..255
    return _with_transparency_key(gray, values, image.info.get("transparency"))


def _within(values: np.ndarray, low: float, high: float) -> bool:
    return bool(np.isfinite(values).all() and values.min() >= low and values.max() <= high)


def _scale_16bit(values: np.ndarray) -> PIL.Image.Image:
    return _to_l(values.astype(np.float64) / 257.0)  # 65535 / 257 = 255 exactly


def _stretch(values: np.ndarray) -> PIL.Image.Image:
    finite = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = finite.min(), finite.max()
    if high == low:  # a flat image has no range to stretch
        return _to_l(np.clip(finite, 0, 255))
    return _to_l((finite - low) * (255.0 / (high - low)))


def _to_l(values: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")


def _with_transparency_key(gray: PIL.Image.Image, values: np.ndarray, key: Any) -> PIL.Image.Image:
    # A 16-bit PNG's tRNS key is a 16-bit value; after scaling it would match the wrong pixels,
    # so turn it into an explicit alpha band while the original values are still at hand.
    if not isinstance(key, (int, float)):
        return gray
    alpha = PIL.Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), mode="L")
    return PIL.Image.merge("LA", (gray, alpha))


def _image_from_array(array: np.ndarray, max_pixels: int | None) -> PIL.Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"the numpy image has dtype {array.dtype}; {_ARRAY_HELP} (0-255)", subject="the numpy image")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]  # (H, W, 1) -> (H, W)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        channels_first = array.ndim == 3 and array.shape[0] in (1, 3, 4)
        hint = " (channels first? use array.transpose(1, 2, 0))" if channels_first else ""
        raise ImageError(f"the numpy image has shape {array.shape}; {_ARRAY_HELP}{hint}", subject="the numpy image")
    _check_pixels((array.shape[1], array.shape[0]), "the numpy image", max_pixels)
    if array.ndim == 3 and array.shape[-1] == 4:
        array = _composite_on_white(array)
    return PIL.Image.fromarray(np.ascontiguousarray(array))


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    # transformers blends numpy RGBA in float64 and rounds (not Pillow's integer alpha_composite,
    # which can differ by 1), so do exactly that to stay bit-identical for array inputs.
    alpha = rgba[..., 3:4] / 255  # (H, W, 1)
    blended = alpha * rgba[..., :3] + (1 - alpha) * 255  # (H, W, 3)
    return np.round(blended).astype(np.uint8)


# ----------------------------------------------------------------------------- processor


@dataclass
class ImageProcessor:
    """BLIP/InstructBLIP preprocessing: images -> (B, 3, H, W) float32 pixel_values."""

    size: tuple[int, int] = (224, 224)  # (height, width)
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    resample: int = PIL.Image.BICUBIC
    rescale_factor: float = 1 / 255
    do_convert_rgb: bool = True
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        self.size = _parse_size(self.size)
        self.image_mean = _three_floats(self.image_mean, "image_mean")
        self.image_std = _three_floats(self.image_std, "image_std")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")
        self.resample = _parse_resample(self.resample)
        self.rescale_factor = float(self.rescale_factor)

    # --- config round trip -----------------------------------------------------------

    @classmethod
    def from_pretrained_dict(cls, d: dict, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> "ImageProcessor":
        """From a preprocessor_config.json dict (or the "image_processor" entry of processor_config.json)."""
        for key, needed in _REQUIRED_FLAGS.items():
            if key in d and d[key] is not None and bool(d[key]) != needed:
                raise ValueError(f"unsupported image processor setting {key}={d[key]!r} (BLIP needs {needed})")
        defaults = cls()
        return cls(
            size=_size_from_config(d.get("size", defaults.size)),
            image_mean=d.get("image_mean") or defaults.image_mean,
            image_std=d.get("image_std") or defaults.image_std,
            resample=d["resample"] if d.get("resample") is not None else defaults.resample,
            rescale_factor=d["rescale_factor"] if d.get("rescale_factor") is not None else defaults.rescale_factor,
            do_convert_rgb=d["do_convert_rgb"] if d.get("do_convert_rgb") is not None else True,
            max_pixels=max_pixels,
        )

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> "ImageProcessor":
        """Read a checkpoint folder the way transformers 5 does.

        transformers 5 `save_pretrained` writes processor_config.json with an "image_processor"
        entry (no preprocessor_config.json); older checkpoints (Salesforce/instructblip-*) have
        preprocessor_config.json. Like transformers, the nested entry wins when both exist.
        """
        folder = Path(folder)
        nested = _read_json(folder / "processor_config.json")
        if nested is not None and isinstance(nested.get("image_processor"), dict):
            return cls.from_pretrained_dict(nested["image_processor"], max_pixels=max_pixels)
        flat = _read_json(folder / "preprocessor_config.json")
        if flat is not None:
            return cls.from_pretrained_dict(flat, max_pixels=max_pixels)
        raise FileNotFoundError(
            f"{folder} has no image processor config (looked for processor_config.json with an "
            "'image_processor' entry, and preprocessor_config.json)"
        )

    def to_dict(self) -> dict:
        """The keys transformers writes for BlipImageProcessor (max_pixels is ours: not saved)."""
        height, width = self.size
        return {
            "do_convert_rgb": self.do_convert_rgb,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(self.image_mean),
            "image_processor_type": "BlipImageProcessor",
            "image_std": list(self.image_std),
            "resample": int(self.resample),
            "rescale_factor": self.rescale_factor,
            "size": {"height": height, "width": width},
        }

    # --- processing --------------------------------------------------------------------

    def __call__(self, images: Any) -> torch.Tensor:
        """One image or a list of them (any source load_image accepts) -> (B, 3, H, W) float32."""
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ImageError("no images were given (empty list)", "missing")
        tensors = [self._one(image, i, len(batch)) for i, image in enumerate(batch)]
        return torch.stack(tensors)  # (B, 3, H, W)

    def _one(self, source: Any, index: int, count: int) -> torch.Tensor:
        try:
            image = self._rgb(source)
        except ImageError as e:
            if count == 1:
                raise
            raise ImageError(f"image {index + 1} of {count}: {e}", e.kind) from e
        return self.pixel_values(image)

    def _rgb(self, source: Any) -> PIL.Image.Image:
        image = _open(source, self.max_pixels)
        if self.do_convert_rgb:
            return to_rgb(image)
        if image.mode != "RGB":  # transformers would fail later with a channel-count error
            raise ImageError(f"{_name_of(image)} has mode {image.mode}, but do_convert_rgb is False (RGB required)",
                             subject=_name_of(image))
        return image

    def model_sized(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """An RGB PIL image resized exactly as `pixel_values` resizes it. `pixel_values` of the
        result equals `pixel_values` of the original (PIL copies an image asked for its own
        size), so a caller may keep this small copy instead of a large upload."""
        height, width = self.size
        return image.resize((width, height), resample=self.resample)  # PIL takes (W, H)

    def pixel_values(self, image: PIL.Image.Image) -> torch.Tensor:
        """An RGB PIL image -> (3, H, W) float32, same arithmetic as transformers' PIL backend."""
        resized = self.model_sized(image)
        pixels = torch.from_numpy(np.array(resized, dtype=np.uint8))  # (H, W, 3) uint8
        pixels = pixels.permute(2, 0, 1)  # (3, H, W)
        # transformers: rescale in float64, then cast; normalise in float32.
        scaled = (pixels.to(torch.float64) * self.rescale_factor).to(torch.float32)  # (3, H, W)
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
        return ((scaled - mean) / std).contiguous()  # (3, H, W) float32


# ----------------------------------------------------------------------------- config helpers


def _parse_size(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    height, width = (int(v) for v in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive (height, width), got {size}")
    return height, width


def _size_from_config(size: Any) -> tuple[int, int]:
    """transformers size forms: {"height", "width"}, {"shortest_edge"}, an int, or [h, w]."""
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            # transformers would keep the aspect ratio here; BLIP's vision tower takes a fixed
            # square (its position embeddings are for size/patch x size/patch), so use N x N.
            edge = int(size["shortest_edge"])
            return edge, edge
        raise ValueError(f"unsupported size in image processor config: {size}")
    return _parse_size(size)


def _three_floats(values: Any, name: str) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        values = (values,) * 3
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{name} needs 3 values (R, G, B), got {values}")
    return values  # type: ignore[return-value]


def _parse_resample(resample: Any) -> int:
    try:
        return int(PIL.Image.Resampling(int(resample)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"resample must be a PIL resampling filter (0-5), got {resample!r}") from e


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
