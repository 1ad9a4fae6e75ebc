"""save_pretrained -> load_pretrained round trip, transformers reading what we save, and
loading errors that name the problem."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

from instructblip_core import CheckpointError, load_pretrained
from instructblip_core.loading import save_weights
from tiny_checkpoints import KINDS

PROMPT = "how many circles are there?"


def logits(model, image, prompt=PROMPT):
    batch = model.prepare(image, prompt)
    extra = {"decoder_input_ids": torch.tensor([[0, 4, 9]])} if model.model.is_encoder_decoder else {}
    with torch.no_grad():
        return model.model(**batch, **extra).logits, batch, extra


@pytest.mark.parametrize("kind", KINDS)
def test_save_then_load_gives_identical_logits_and_transformers_reads_it(kind, tiny_checkpoints, tmp_path):
    original = load_pretrained(tiny_checkpoints(kind))
    image = Image.new("RGB", (50, 40), (10, 200, 90))
    before, batch, extra = logits(original, image)
    original.save_pretrained(tmp_path / "saved")

    again = load_pretrained(tmp_path / "saved")
    after, _, _ = logits(again, image)
    assert torch.equal(before, after)

    reference_cls = InstructBlipForConditionalGeneration if kind.startswith("instructblip") else Blip2ForConditionalGeneration
    reference = reference_cls.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "saved")
    inputs = dict(processor(images=image, text=PROMPT, return_tensors="pt"))
    with torch.no_grad():
        expected = reference(**inputs, **extra).logits
    assert (expected - before).abs().max().item() < 1e-4


def test_sharded_save_loads(tiny_checkpoints, tmp_path):
    model = load_pretrained(tiny_checkpoints("instructblip-t5"))
    folder = tmp_path / "sharded"
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    save_weights(model.model, folder, max_shard_bytes=200_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    image = Image.new("RGB", (30, 30), "white")
    assert torch.equal(logits(load_pretrained(folder), image)[0], logits(model, image)[0])


def corrupt(folder, tmp_path, edit):
    """Copy a checkpoint with its weights edited by `edit(state_dict)`."""
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    state = load_file(out / "model.safetensors")
    edit(state)
    save_file(state, out / "model.safetensors")
    return out


def test_unexpected_key_is_an_error(tiny_checkpoints, tmp_path):
    folder = corrupt(tiny_checkpoints("instructblip-opt"), tmp_path, lambda s: s.update({"qformer.stray.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"does not: \['qformer.stray.weight'\]"):
        load_pretrained(folder)


def test_missing_key_is_an_error(tiny_checkpoints, tmp_path):
    folder = corrupt(tiny_checkpoints("instructblip-opt"), tmp_path, lambda s: s.pop("language_projection.weight"))
    with pytest.raises(CheckpointError, match=r"lacks 1 weight.*language_projection.weight"):
        load_pretrained(folder)


def test_wrong_shape_is_an_error(tiny_checkpoints, tmp_path):
    folder = corrupt(tiny_checkpoints("blip2-t5"), tmp_path, lambda s: s.update({"query_tokens": torch.zeros(1, 3, 32)}))
    with pytest.raises(CheckpointError, match=r"query_tokens: checkpoint shape \(1, 3, 32\) != model shape \(1, 4, 32\)"):
        load_pretrained(folder)


def test_offline_hub_id_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match=r"not in the local Hugging Face cache.*hf download Salesforce/instructblip-flan-t5-xl"):
        load_pretrained("Salesforce/instructblip-flan-t5-xl")


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="neither a folder nor"):
        load_pretrained(str(tmp_path / "nope"))
