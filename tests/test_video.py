"""Video: frames sampled uniformly; each frame through the encoder and Q-Former with the same
instruction, the query outputs concatenated."""

import av
import numpy as np
import pytest
import torch
from PIL import Image

from engine_helpers import coloured
from instructblip_core import ImageError, load_pretrained, sample_frames
from instructblip_core.video import uniform_indices

SHADES = [(i * 30, 255 - i * 30, 100) for i in range(8)]  # frame i has its own colour


def test_uniform_indices():
    assert uniform_indices(8, 4) == [1, 3, 5, 7]
    assert uniform_indices(2, 4) == [0, 0, 1, 1]  # a short clip repeats frames
    with pytest.raises(ValueError):
        uniform_indices(0, 4)


def test_frames_from_an_animated_gif(tmp_path):
    frames = [Image.new("RGB", (32, 24), c) for c in SHADES]
    path = tmp_path / "clip.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    picked = sample_frames(path, 4)
    assert len(picked) == 4 and all(f.mode == "RGB" for f in picked)
    got = [f.getpixel((5, 5)) for f in picked]
    for colour, index in zip(got, [1, 3, 5, 7]):
        assert np.abs(np.subtract(colour, SHADES[index])).max() <= 12  # GIF palette rounding


def test_frames_from_a_video_file(tmp_path):
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for c in SHADES:
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), c, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    picked = sample_frames(path, 4)
    got = [f.getpixel((16, 16)) for f in picked]
    for colour, index in zip(got, [1, 3, 5, 7]):
        assert np.abs(np.subtract(colour, SHADES[index])).max() <= 20  # lossy codec


def test_bad_video_is_a_readable_error(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"not a video at all")
    with pytest.raises(ImageError, match="broken.mp4 is not a readable video"):
        sample_frames(path)
    with pytest.raises(ImageError, match="missing.gif does not exist"):
        sample_frames(tmp_path / "missing.gif")


@pytest.mark.parametrize("kind", ["instructblip-llama", "instructblip-t5"])
def test_frames_concatenate_per_frame_query_outputs(kind, tiny_checkpoints):
    model = load_pretrained(tiny_checkpoints(kind))
    frames = [coloured(c) for c in ("red", "blue", "green", "yellow")]
    prompt = "what happens in the video?"
    batch = model.prepare([frames], prompt)
    assert batch["pixel_values"].shape[:2] == (1, 4)
    clip = model.visual_prompt(batch)  # (1, 4*Q, C)
    Q = model.config.num_query_tokens
    assert clip.shape[1] == 4 * Q
    for i, frame in enumerate(frames):
        single = model.visual_prompt(model.prepare(frame, prompt))  # (1, Q, C): same instruction
        torch.testing.assert_close(clip[:, i * Q : (i + 1) * Q], single, rtol=1e-5, atol=1e-5)
    answer = model.generate([frames], prompt, max_new_tokens=6)[0]
    assert answer == "".join(model.stream(frames, prompt, max_new_tokens=6))
