"""Tests for instructblip_core.images: parity with transformers' BLIP image processor,
mode conversion, and one readable ImageError per kind of bad input. CPU, no network, fast."""

from __future__ import annotations

import io
import json
import re
import struct
import warnings
import zlib

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import torch

from instructblip_core.images import DEFAULT_MAX_PIXELS, ImageError, ImageProcessor, load_image, to_rgb

transformers = pytest.importorskip("transformers")
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil  # noqa: E402

SIZE = {"height": 224, "width": 224}


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def ours() -> ImageProcessor:
    return ImageProcessor()


@pytest.fixture(scope="module")
def theirs() -> BlipImageProcessorPil:
    return BlipImageProcessorPil(size=SIZE)


def hf_pixels(processor, images) -> torch.Tensor:
    return processor(images, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    diff = (a - b).abs().max().item()
    assert diff <= 1e-5, f"max abs difference {diff}"
    return diff


def random_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Noise plus a smooth gradient, so resampling sees both edges and ramps."""
    noise = rng.integers(0, 256, (height, width, 3))
    ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    return ((noise + ramp) / 2).astype(np.uint8)  # (H, W, 3)


def png_bytes(image: PIL.Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save_args)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring width x height, and no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- parity


def test_transformers_default_is_the_pil_backend_here():
    # Which implementation `BlipImageProcessor()` gives decides what "parity" means: without
    # torchvision transformers 5 falls back to the PIL backend, which we reproduce.
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchvision installed: transformers uses its torch backend")
    from transformers import BlipImageProcessor

    assert isinstance(BlipImageProcessor(), BlipImageProcessorPil)


def test_batch_of_varied_images_matches_transformers_exactly(ours, theirs):
    rng = np.random.default_rng(0)
    shapes = [(224, 224), (37, 501), (480, 640), (1000, 90), (1, 1), (3, 1200), (225, 223)]
    images = [PIL.Image.fromarray(random_rgb(rng, h, w)) for h, w in shapes]
    got = ours(images)
    assert got.shape == (len(shapes), 3, 224, 224)
    assert assert_same(got, hf_pixels(theirs, images)) == 0.0


def test_single_image_gives_batch_of_one(ours, theirs):
    image = PIL.Image.fromarray(random_rgb(np.random.default_rng(1), 50, 70))
    assert ours(image).shape == (1, 3, 224, 224)
    assert_same(ours(image), hf_pixels(theirs, image))


def test_other_size_and_config_match_transformers():
    config = {"size": {"height": 96, "width": 128}, "image_mean": [0.5, 0.5, 0.5],
              "image_std": [0.25, 0.5, 1.0], "resample": 2}
    image = PIL.Image.fromarray(random_rgb(np.random.default_rng(2), 77, 311))
    got = ImageProcessor.from_pretrained_dict(config)(image)
    assert got.shape == (1, 3, 96, 128)
    assert assert_same(got, hf_pixels(BlipImageProcessorPil(**config), image)) == 0.0


def _mode_images() -> dict[str, PIL.Image.Image]:
    rng = np.random.default_rng(3)
    rgb = PIL.Image.fromarray(random_rgb(rng, 61, 83))
    alpha = PIL.Image.fromarray(rng.integers(0, 256, (61, 83), dtype=np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    gray = rgb.convert("L")
    la = gray.copy()
    la.putalpha(alpha)
    palette = rgb.quantize(colors=16)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 3
    rgb_t = rgb.copy()
    rgb_t.info["transparency"] = tuple(int(v) for v in np.asarray(rgb)[0, 0])
    return {
        "L": gray, "LA": la, "RGBA": rgba, "P": palette, "P+transparency": palette_t,
        "PA": rgba.convert("PA"), "CMYK": rgb.convert("CMYK"), "1": gray.convert("1"),
        "YCbCr": rgb.convert("YCbCr"), "RGB+transparency": rgb_t,
        "I (0-255)": gray.convert("I"), "F (0-255)": gray.convert("F"),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_mode_conversion_matches_transformers(ours, theirs, mode):
    image = _mode_images()[mode]
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    assert assert_same(ours(image), hf_pixels(theirs, image)) == 0.0


def test_rgba_is_composited_onto_white_like_transformers():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    rgba[0, 0] = (255, 0, 0, 255)  # one opaque red pixel
    rgb = np.asarray(load_image(PIL.Image.fromarray(rgba, "RGBA")))
    assert tuple(rgb[0, 0]) == (255, 0, 0)
    assert (rgb[1:] == 255).all(), "transparent pixels must become white, not black"


def _sixteen_bit_values() -> np.ndarray:
    ramp = np.linspace(0, 65535, 90 * 70).reshape(70, 90)
    return np.round(ramp).astype(np.uint16)  # (H, W) full 16-bit range


def _expected_8bit(values16: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.round(values16 / 257).astype(np.uint8), "L")


def test_16bit_is_scaled_not_clipped(ours, theirs):
    values = _sixteen_bit_values()
    image = PIL.Image.fromarray(values)
    assert image.mode == "I;16"
    rgb = np.asarray(load_image(image))
    assert rgb[..., 0].mean() == pytest.approx(127.5, abs=1.0)  # clipping would give ~255
    assert (rgb == np.asarray(_expected_8bit(values))[..., None]).all()
    # Pixel values equal transformers' output for the correctly scaled 8-bit image.
    assert assert_same(ours(image), hf_pixels(theirs, _expected_8bit(values))) == 0.0


def test_16bit_png_file_and_int32_container(tmp_path, ours, theirs):
    values = _sixteen_bit_values()
    path = tmp_path / "deep.png"
    path.write_bytes(png_bytes(PIL.Image.fromarray(values)))
    expected = hf_pixels(theirs, _expected_8bit(values))
    assert_same(ours(path), expected)
    as_int32 = PIL.Image.fromarray(values.astype(np.int32))  # mode "I", as older Pillow decodes 16-bit PNGs
    assert as_int32.mode == "I"
    assert_same(ours(as_int32), expected)


def test_16bit_transparency_key_becomes_white():
    values = _sixteen_bit_values()
    image = PIL.Image.fromarray(values)
    image.info["transparency"] = int(values[0, 0])
    rgb = np.asarray(load_image(image))
    assert tuple(rgb[0, 0]) == (255, 255, 255)  # the keyed (transparent) value
    assert rgb[0, 1, 0] < 10  # its neighbour is nearly black in the ramp, and stays so


def test_float_images_are_scaled():
    unit = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)  # 0..1 floats
    rgb = np.asarray(load_image(PIL.Image.fromarray(unit)))
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255
    wide = np.linspace(-5, 5000, 100, dtype=np.float32).reshape(10, 10)  # no natural scale
    rgb = np.asarray(load_image(PIL.Image.fromarray(wide)))
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255


@pytest.mark.parametrize("shape", [(40, 60, 3), (40, 60, 4), (40, 60, 1)])
def test_numpy_arrays_match_transformers(ours, theirs, shape):
    array = np.random.default_rng(4).integers(0, 256, shape, dtype=np.uint8)
    assert assert_same(ours(array), hf_pixels(theirs, array)) == 0.0


def test_numpy_2d_is_grayscale(ours, theirs):
    array = np.random.default_rng(5).integers(0, 256, (40, 60), dtype=np.uint8)
    assert_same(ours(array), hf_pixels(theirs, PIL.Image.fromarray(array, "L")))


def test_paths_bytes_and_file_objects_give_the_same_pixels(tmp_path, ours, theirs):
    image = PIL.Image.fromarray(random_rgb(np.random.default_rng(6), 80, 120))
    data = png_bytes(image)
    path = tmp_path / "pic.png"
    path.write_bytes(data)
    expected = hf_pixels(theirs, str(path))
    for source in (path, str(path), data, bytearray(data), io.BytesIO(data)):
        assert_same(ours(source), expected)
    with open(path, "rb") as handle:
        assert_same(ours(handle), expected)
    assert_same(ours([path, data]), torch.cat([expected, expected]))


def _jpeg_with_orientation(path, orientation: int) -> PIL.Image.Image:
    image = PIL.Image.fromarray(random_rgb(np.random.default_rng(7), 40, 100))  # wide: 100 x 40
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    image.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    return image


def test_exif_orientation_matches_transformers(tmp_path, ours, theirs):
    # transformers: a path string goes through image_utils.load_image, which applies
    # exif_transpose; a PIL image is used as stored. We do the same on both routes.
    path = tmp_path / "rotated.jpg"
    _jpeg_with_orientation(path, 6)  # "rotate 90 CW to display"
    assert load_image(path).size == (40, 100)  # upright: tall
    assert_same(ours(str(path)), hf_pixels(theirs, str(path)))
    opened = PIL.Image.open(path)
    assert load_image(opened).size == (100, 40)  # caller's PIL image: left as is
    assert_same(ours(PIL.Image.open(path)), hf_pixels(theirs, PIL.Image.open(path)))


def test_load_image_returns_loaded_rgb(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(PIL.Image.new("RGBA", (5, 7), (10, 20, 30, 128))))
    image = load_image(str(path))
    assert image.mode == "RGB" and image.size == (5, 7)
    assert image.im is not None  # decoded now, not lazily later


# ----------------------------------------------------------------------------- config


def test_to_dict_is_readable_by_transformers(tmp_path):
    ours = ImageProcessor(size=(96, 128), resample=PIL.Image.BILINEAR)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(ours.to_dict()))
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    theirs_dict = json.loads(theirs.to_json_string())  # what transformers would write back
    for key, value in ours.to_dict().items():
        assert theirs_dict[key] == value, key
    image = PIL.Image.fromarray(random_rgb(np.random.default_rng(8), 50, 90))
    assert_same(ours(image), hf_pixels(theirs, image))
    assert ImageProcessor.from_folder(tmp_path) == ours


def test_from_folder_reads_what_transformers_5_saves(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import BertTokenizer, InstructBlipProcessor, PreTrainedTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]))
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    llm_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    image_processor = BlipImageProcessorPil(size={"height": 160, "width": 192}, image_mean=[0.1, 0.2, 0.3])
    processor = InstructBlipProcessor(image_processor, llm_tokenizer, BertTokenizer(str(vocab)), num_query_tokens=32)
    processor.save_pretrained(tmp_path / "saved")

    loaded = ImageProcessor.from_folder(tmp_path / "saved")
    assert loaded.size == (160, 192) and loaded.image_mean == (0.1, 0.2, 0.3)
    image = PIL.Image.fromarray(random_rgb(np.random.default_rng(9), 33, 44))
    assert_same(loaded(image), hf_pixels(image_processor, image))


def test_from_pretrained_dict_forms():
    hub_style = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                 "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "BlipImageProcessor",
                 "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "InstructBlipProcessor",
                 "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224}}
    assert ImageProcessor.from_pretrained_dict(hub_style) == ImageProcessor()
    assert ImageProcessor.from_pretrained_dict({"size": {"shortest_edge": 364}}).size == (364, 364)
    assert ImageProcessor.from_pretrained_dict({"size": 384}).size == (384, 384)
    assert ImageProcessor.from_pretrained_dict({}, max_pixels=5).max_pixels == 5
    with pytest.raises(ValueError, match="do_center_crop"):
        ImageProcessor.from_pretrained_dict({"do_center_crop": True})
    with pytest.raises(ValueError, match="do_normalize"):
        ImageProcessor.from_pretrained_dict({"do_normalize": False})
    with pytest.raises(FileNotFoundError, match="no image processor config"):
        ImageProcessor.from_folder("/nonexistent-folder-for-test")


# ----------------------------------------------------------------------------- bad input


def expect_error(source, pattern: str, **kwargs) -> str:
    with pytest.raises(ImageError) as caught:
        load_image(source, **kwargs)
    message = str(caught.value)
    assert re.search(pattern, message), message
    assert "Traceback" not in message and "\n" not in message
    return message


def test_missing_path(tmp_path):
    expect_error(tmp_path / "photo.jpg", r"photo\.jpg does not exist$")


def test_directory(tmp_path):
    expect_error(tmp_path, r"is a directory, not an image file$")


def test_text_file(tmp_path):
    path = tmp_path / "cat.txt"
    path.write_text("meow " * 100)
    expect_error(path, r"cat\.txt is not an image file \(cannot identify image format\)$")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    expect_error(path, r"empty\.png is empty \(0 bytes\)$")
    expect_error(b"", r"^the image data is empty \(0 bytes\)$")
    expect_error(io.BytesIO(b""), r"is empty \(0 bytes\)$")


@pytest.mark.parametrize("fmt, name", [("PNG", "photo.png"), ("JPEG", "photo.jpg")])
def test_truncated_file(tmp_path, fmt, name):
    buffer = io.BytesIO()
    PIL.Image.fromarray(random_rgb(np.random.default_rng(10), 120, 160)).save(buffer, fmt)
    data = buffer.getvalue()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, rf"{re.escape(name)} is truncated or corrupt: .*truncated")
    # A lazily opened PIL image fails the same way, at our load, not later.
    with PIL.Image.open(path) as lazy:
        expect_error(lazy, rf"{re.escape(name)} is truncated or corrupt")


def test_header_only_fragment_is_called_corrupt(tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    expect_error(path, r"cut\.png is truncated or corrupt: it starts like a PNG file")


def test_too_many_pixels_checked_from_header_without_decoding(tmp_path, monkeypatch):
    def no_decoding(self):  # the guard must fire before any pixel data is read
        raise AssertionError("decoded")

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", no_decoding)
    big = tmp_path / "big.png"
    big.write_bytes(png_header_only(7000, 7000))  # 49 M pixels declared in 57 bytes
    expect_error(
        big, r"big\.png is 7000x7000 = 49,000,000 pixels, over the limit of 40,000,000 \(set max_pixels to allow it\)$"
    )
    expect_error(big.read_bytes(), r"7000x7000 = 49,000,000 pixels, over the limit of 40,000,000")
    # Over Pillow's own hard limit: Pillow raises DecompressionBombError; we reword it.
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_only(20000, 20000))
    expect_error(
        huge, r"huge\.png has 400,000,000 pixels, over the limit of 40,000,000 \(set max_pixels to allow it\)$"
    )
    expect_error(big, r"over the limit of 1,000,000", max_pixels=1_000_000)


def test_pillow_bomb_warning_and_error_become_image_error(tmp_path, monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    small = tmp_path / "small.png"
    small.write_bytes(png_bytes(PIL.Image.new("RGB", (40, 40))))  # 1600: Pillow only warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        assert load_image(small, max_pixels=10_000).size == (40, 40)
        expect_error(small, r"small\.png is 40x40 = 1,600 pixels, over the limit of 1,500", max_pixels=1500)
    large = tmp_path / "large.png"
    large.write_bytes(png_bytes(PIL.Image.new("RGB", (50, 50))))  # 2500 > 2 x 1000: Pillow refuses
    expect_error(
        large, r"large\.png has 2,500 pixels, over Pillow's decompression-bomb limit of 2,000", max_pixels=10_000
    )


def test_default_max_pixels_value():
    assert DEFAULT_MAX_PIXELS == 40_000_000
    assert ImageProcessor().max_pixels == DEFAULT_MAX_PIXELS


@pytest.mark.parametrize("source, pattern", [
    (42, r"cannot load an image from an object of type builtins\.int \(expected a file path"),
    (torch.zeros(3, 8, 8), r"object of type torch\.Tensor"),
    (np.zeros((8, 8, 3), dtype=np.float32), r"numpy image has dtype float32; expected a uint8 array"),
    (np.zeros((3, 8, 8), dtype=np.uint8), r"numpy image has shape \(3, 8, 8\).*channels first"),
    (np.zeros((0, 8, 3), dtype=np.uint8), r"numpy image is 8x0: it has no pixels"),
    ("https://example.com/cat.jpg", r"is a URL; only local files are read"),
])
def test_unsupported_sources(source, pattern):
    expect_error(source, pattern)


def test_heic_gets_a_specific_message(tmp_path):
    path = tmp_path / "phone.heic"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    expect_error(path, r"phone\.heic is a HEIC image, which this Pillow cannot read")


def test_batch_error_names_the_image(tmp_path, ours):
    good = PIL.Image.new("RGB", (8, 8))
    missing = tmp_path / "gone.jpg"
    with pytest.raises(ImageError, match=r"^image 2 of 3: .*gone\.jpg does not exist$"):
        ours([good, missing, good])
    with pytest.raises(ImageError, match="no images were given"):
        ours([])


def test_do_convert_rgb_false_requires_rgb():
    processor = ImageProcessor(do_convert_rgb=False)
    assert processor(PIL.Image.new("RGB", (8, 8))).shape == (1, 3, 224, 224)
    with pytest.raises(ImageError, match="has mode RGBA, but do_convert_rgb is False"):
        processor(PIL.Image.new("RGBA", (8, 8)))


def test_closed_lazy_image_says_so(tmp_path):
    path = tmp_path / "late.png"
    path.write_bytes(png_bytes(PIL.Image.new("RGB", (8, 8))))
    with open(path, "rb") as handle:
        lazy = PIL.Image.open(handle)
    expect_error(lazy, r"was closed before its pixels were read")


def test_unconvertible_mode_is_image_error():
    with pytest.raises(ImageError, match="has mode La, which cannot be converted to RGB"):
        to_rgb(PIL.Image.new("La", (4, 4)))


def test_image_errors_say_what_kind_of_problem_and_can_be_reworded(tmp_path):
    """Callers (the app) word errors their own way from `kind`, `subject` and `advice`, never by editing text."""
    cases = {}
    cases["missing"] = tmp_path / "gone.png"
    (tmp_path / "empty.png").write_bytes(b"")
    cases["empty"] = tmp_path / "empty.png"
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    cases["corrupt"] = tmp_path / "cut.png"
    (tmp_path / "big.png").write_bytes(png_header_only(7000, 7000))
    cases["too_large"] = tmp_path / "big.png"
    (tmp_path / "notes.txt").write_text("not a picture")
    cases["unsupported"] = tmp_path / "notes.txt"
    (tmp_path / "folder").mkdir()
    cases["unreadable"] = tmp_path / "folder"
    for kind, path in cases.items():
        with pytest.raises(ImageError) as caught:
            load_image(path)
        error = caught.value
        assert (error.kind, error.subject) == (kind, str(path))
        assert str(error).startswith(str(path))
        reworded = error.reworded("my photo.png", advice="try another one")
        assert reworded.kind == kind and reworded.__cause__ is error
        assert str(reworded).startswith("my photo.png ") and str(tmp_path) not in str(reworded)
        assert str(reworded).endswith("(try another one)")
    too_large = ImageError("x.png is 9x9 = 81 pixels, over the limit of 10", "too_large", subject="x.png",
                           advice="set max_pixels to allow it")
    assert str(too_large.reworded("y.png")) == "y.png is 9x9 = 81 pixels, over the limit of 10"  # our advice dropped
    with pytest.raises(ImageError) as caught:
        load_image(np.zeros((4, 4, 2), dtype=np.uint8))
    assert caught.value.kind == "unsupported" and caught.value.subject == "the numpy image"
    with pytest.raises(ValueError, match="unknown ImageError kind"):
        ImageError("x", "bad kind")
