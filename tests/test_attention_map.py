""""Where did it look?": the Q-Former's cross-attention as a heat map over the image."""

import numpy as np
import pytest
import torch
from PIL import Image

from instructblip_core import load_pretrained
from instructblip_core.attention_map import (attention_grid, attention_overlay, cross_attention_weights, heat_colours,
                                             min_max_scale, overlay)

SIDE = 4  # tiny checkpoints: 28 px images, 7 px patches


@pytest.fixture(scope="module")
def instructblip(tiny_checkpoints):
    return load_pretrained(tiny_checkpoints("instructblip-llama"))


def one_bright_patch(row: int, col: int) -> Image.Image:
    """A black 28 x 28 picture whose patch (row, col) alone is white."""
    pixels = np.zeros((28, 28, 3), dtype=np.uint8)
    pixels[row * 7:(row + 1) * 7, col * 7:(col + 1) * 7] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize("row, col", [(0, 3), (2, 1), (3, 0), (1, 2)])
def test_the_map_is_hottest_on_the_patch_that_stands_out(instructblip, row, col):
    # Off-diagonal places: a transposed or CLS-shifted grid would light up elsewhere.
    grid = attention_grid(instructblip, one_bright_patch(row, col), "What colour is the square?")
    assert grid.shape == (SIDE, SIDE)
    assert divmod(int(grid.argmax()), SIDE) == (row, col)
    assert grid.min() == 0 and grid.max() == 1


def test_the_weights_are_the_mean_attention_over_the_image_tokens(instructblip):
    weights = cross_attention_weights(instructblip, one_bright_patch(0, 0), "What colour is the square?")
    assert weights.shape == (SIDE * SIDE + 1,)  # CLS + patches
    assert torch.isclose(weights.sum(), torch.tensor(1.0), atol=1e-5)  # a mean of softmax rows
    assert (weights > 0).all()


def test_another_instruction_moves_the_map_only_for_instructblip(instructblip, tiny_checkpoints):
    picture = Image.blend(one_bright_patch(1, 1), Image.new("RGB", (28, 28), (90, 40, 160)), 0.5)
    colour = attention_grid(instructblip, picture, "What colour is the square?")
    count = attention_grid(instructblip, picture, "How many stars are there at the top?")
    assert (colour - count).abs().max() > 0.01  # the Q-Former read the instruction

    blip2 = load_pretrained(tiny_checkpoints("blip2-opt"))  # its Q-Former reads no text
    assert torch.equal(attention_grid(blip2, picture, "What colour is the square?"),
                       attention_grid(blip2, picture, "How many stars are there at the top?"))


def test_the_overlay_puts_the_heat_where_the_grid_is_hot():
    picture = Image.new("RGB", (200, 100), (128, 128, 128))
    grid = torch.zeros(2, 2)
    grid[0, 1] = 1.0  # top right
    out = np.asarray(overlay(picture, grid, alpha=0.6), dtype=np.float32)
    assert out.shape == (100, 200, 3)
    hot = np.asarray(heat_colours(np.array(1.0)))
    cold = np.asarray(heat_colours(np.array(0.0)))
    expected_hot = 0.4 * 128 + 0.6 * hot
    expected_cold = 0.4 * 128 + 0.6 * cold
    assert np.abs(out[5, 195] - expected_hot).max() <= 1  # the corner of the hot cell
    assert np.abs(out[95, 5] - expected_cold).max() <= 1  # the opposite corner
    assert np.array_equal(np.asarray(overlay(picture, grid, alpha=0.0)), np.asarray(picture))
    with pytest.raises(ValueError, match="alpha"):
        overlay(picture, grid, alpha=1.5)


def test_heat_colours_get_brighter_with_attention_and_constant_maps_are_flat():
    brightness = heat_colours(np.linspace(0, 1, 11)).sum(axis=-1)
    assert np.all(np.diff(brightness) > 0)
    assert torch.equal(min_max_scale(torch.full((3, 3), 0.25)), torch.zeros(3, 3))


def test_attention_overlay_shrinks_big_pictures_for_the_panel(instructblip, tmp_path):
    big = Image.new("RGB", (1200, 600), (20, 160, 60))
    out = attention_overlay(instructblip, big, "Where is the green square?", max_side=384)
    assert out.mode == "RGB" and out.size == (384, 192)
    out.save(tmp_path / "look.png")
    assert Image.open(tmp_path / "look.png").size == (384, 192)
