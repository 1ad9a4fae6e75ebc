"""Grounding: records' regions -> patch masks -> the cross-attention loss, and the stage that
trains on it, on real data files and a tiny checkpoint."""

import json
import math

import pytest
import torch
from PIL import Image

from finetune.config import ConfigError, DataConfig, TrainConfig
from finetune.train import prepare
from finetune_fixtures import one_thread  # noqa: F401 (a fixture)
from finetune_fixtures import TRAIN_SIZES, metrics, write_images
from instructblip_core import load_pretrained
from instructblip_core.attention_map import cross_attention_weights
from instructblip_core.collate import InstructionCollator
from instructblip_core.data import DataError, InstructionDataset, load_records
from instructblip_core.grounding import grounding_loss, region_masks, region_patch_mask


def patches(mask: torch.Tensor, grid: int) -> set[tuple[int, int]]:
    assert mask[0] == 0, "the CLS token is in no region"
    return {divmod(i, grid) for i in mask[1:].nonzero().flatten().tolist()}


def test_a_box_marks_the_patches_it_covers_by_a_quarter_or_more():
    assert patches(region_patch_mask((0.0, 0.0, 0.5, 0.5), 4), 4) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    # 0.3 of a 4-wide grid reaches 20% into the second column: not enough to count it.
    assert patches(region_patch_mask((0.0, 0.0, 0.3, 1.0), 4), 4) == {(r, 0) for r in range(4)}
    # x and y 0.2-0.45 on patches 0.25 wide: 0.2 of patch 0 and 0.8 of patch 1 per axis -> shares 0.04, 0.16, 0.16, 0.64
    assert patches(region_patch_mask((0.2, 0.2, 0.45, 0.45), 4), 4) == {(1, 1)}
    # Too small to cover a quarter of any patch: the patch under its centre.
    assert patches(region_patch_mask((0.55, 0.8, 0.6, 0.85), 4), 4) == {(3, 2)}


def test_a_batch_of_boxes_gives_each_box_its_own_patches():
    boxes = [[(0.55, 0.8, 0.6, 0.85), (0.0, 0.0, 0.5, 0.5)], [], [(0.01, 0.02, 0.03, 0.04)], [(0.2, 0.2, 0.45, 0.45)]]
    masks = region_masks(boxes, 4)  # (4, 2, 17)
    assert masks.shape == (4, 2, 17) and masks[:, :, 0].sum() == 0  # CLS never
    for b, regions in enumerate(boxes):
        for k in range(2):
            expected = region_patch_mask(regions[k], 4) if k < len(regions) else torch.zeros(17)
            assert torch.equal(masks[b, k], expected), (b, k)
    assert patches(masks[2, 0], 4) == {(0, 0)}  # tiny boxes in several items each keep their centre's patch


def test_cls_marks_the_cls_token_alone_beside_the_boxes_of_its_item():
    """A question about the whole image ("How many objects are there?") grounds on the encoder's
    CLS token as well as on the objects: its row marks token 0 and no patch."""
    masks = region_masks([[(0.0, 0.0, 0.5, 0.5), "cls"], ["cls"], []], 4)  # (3, 2, 17)
    assert masks.shape == (3, 2, 17)
    assert patches(masks[0, 0], 4) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for row in (masks[0, 1], masks[1, 0], region_patch_mask("cls", 4)):
        assert row[0] == 1 and row[1:].sum() == 0
    assert masks[1, 1].sum() == 0 and masks[2].sum() == 0  # padding
    # All attention on CLS: the CLS region has all of it, the box none.
    on_cls = torch.zeros(3, 1, 2, 17)
    on_cls[..., 0] = 1.0
    assert grounding_loss([on_cls], masks).item() == pytest.approx(-math.log(1e-6) / 3, rel=1e-4)


def test_the_loss_is_minus_log_of_the_attention_mass_on_each_region():
    grid, n = 2, 5  # 4 patches + CLS
    masks = region_masks([[(0.0, 0.0, 0.5, 0.5)], [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)], []], grid)  # (3, 2, 5)
    assert masks.shape == (3, 2, n) and masks[0, 1].sum() == 0 and masks[2].sum() == 0
    uniform = [torch.full((3, 2, 4, n), 1.0 / n)]  # one layer, 2 heads, 4 queries
    assert grounding_loss(uniform, masks).item() == pytest.approx(-math.log(1 / n), rel=1e-5)  # each region is one patch of n tokens
    # All attention on the first patch: region 1 of each row has it all, region 2 of row 2 none.
    on_first = torch.zeros(3, 2, 4, n)
    on_first[..., 1] = 1.0
    loss = grounding_loss([on_first, on_first], masks).item()
    assert loss == pytest.approx((0 + 0 - math.log(1e-6)) / 3, rel=1e-4)
    assert grounding_loss(uniform, region_masks([[], []], grid)[:, :, :n]) is None


def test_regions_are_read_checked_and_batched(tmp_path):
    [image] = write_images(tmp_path, 1)
    good = {"image": image, "question": "where is it?", "answer": "left", "regions": [[0, 0, 0.5, 1], "cls"]}
    bad = [
        ({"regions": ["CLS token"]}, 'regions[0] must be 4 numbers [x0, y0, x1, y1] or "cls", got "CLS token"'),
        ({"regions": [[0, 0, 1.5, 1]]}, "regions[0] = [0, 0, 1.5, 1] is not a box inside the image"),
        ({"regions": [[0.5, 0, 0.2, 1]]}, "need 0 <= x0 < x1 <= 1"),
        ({"regions": [[0, 0, 1]]}, "regions[0] must be 4 numbers"),
        ({"regions": "left"}, "field 'regions' must be a list"),
        ({"image": None, "images": [image, image]}, "video frames have no regions"),
    ]
    lines = [good] + [good | change for change, _ in bad]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = load_records(path, "short_vqa", skip_bad=True)
    assert [r.regions for r in result.records] == [[(0.0, 0.0, 0.5, 1.0), "cls"]]
    for (_, message), skipped, line in zip(bad, result.skipped, range(2, 8)):
        assert skipped.startswith(f"{path}:{line}: ") and message in skipped, skipped
    with pytest.raises(DataError, match=r"data.jsonl:2: wrong type: regions\[0\]"):
        load_records(path, "short_vqa")


def test_the_collator_turns_regions_into_patch_masks_only_when_asked(tiny_checkpoints, tmp_path):
    blip = load_pretrained(tiny_checkpoints("instructblip-llama"))
    images = write_images(tmp_path, 2)
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps({"image": images[0], "question": "left?", "answer": "yes", "regions": [[0, 0, 0.5, 1], [0.5, 0, 1, 1]]}) + "\n"
        + json.dumps({"image": images[1], "question": "none?", "answer": "no"}) + "\n"
    )
    records = load_records(path, "short_vqa").records
    from instructblip_core.augment import EvalTransform

    dataset = InstructionDataset(records, name="d", task="short_vqa", image_transform=EvalTransform(blip.processor.image_processor))
    items = [dataset[0], dataset[1]]
    vision = blip.model.config.vision_config
    grid = vision.image_size // vision.patch_size
    batch = InstructionCollator(blip.processor, region_grid=grid)(items)
    assert batch["region_masks"].shape == (2, 2, 1 + grid * grid)
    left, right = batch["region_masks"][0]
    assert left.sum() == right.sum() == grid * grid / 2 and not (left * right).any()
    assert batch["region_masks"][1].sum() == 0  # the record without regions adds nothing to the loss
    assert "region_masks" not in InstructionCollator(blip.processor)(items)  # evaluation batches stay as they were
    # The grounding stage never runs the LLM: its batches carry no LLM ids, and the same masks.
    grounding = InstructionCollator(blip.processor, region_grid=grid, llm_inputs=False)(items)
    assert set(grounding) == {"pixel_values", "qformer_input_ids", "qformer_attention_mask", "region_masks"}
    assert torch.equal(grounding["region_masks"], batch["region_masks"])
    assert torch.equal(grounding["qformer_input_ids"], batch["qformer_input_ids"])


NAMED = {"red": (255, 0, 0), "purple": (128, 0, 128), "black": (0, 0, 0)}  # words of the tiny tokenizers


def write_halves_dataset(folder, repeats: int = 2):
    """Pictures of two colours side by side; the instruction names one colour, and its half is the region."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    path = folder / "halves.jsonl"
    with open(path, "w") as f:
        for k, (left, right) in enumerate((a, b) for a in NAMED for b in NAMED if a != b):
            picture = Image.new("RGB", (28, 28), NAMED[right])
            picture.paste(NAMED[left], (0, 0, 14, 28))
            picture.save(folder / "img" / f"{k}.png")
            for _ in range(repeats):
                for colour, box in ((left, [0, 0, 0.5, 1]), (right, [0.5, 0, 1, 1])):
                    f.write(json.dumps({"image": f"img/{k}.png", "instruction": f"look at the {colour}", "answer": colour,
                                        "regions": [box]}) + "\n")
    return path


def mass_on_named_half(blip, image, colour: str, side: str) -> float:
    per_token = cross_attention_weights(blip, image, f"look at the {colour}")[1:]  # (N,)
    grid = int(per_token.numel() ** 0.5)
    half = per_token.reshape(grid, grid)
    return float((half[:, : grid // 2] if side == "left" else half[:, grid // 2 :]).sum())


@pytest.mark.usefixtures("one_thread")
def test_the_grounding_stage_teaches_the_qformer_to_look_at_what_the_instruction_names(tiny_checkpoints, tmp_path):
    checkpoint = tiny_checkpoints("instructblip-llama", **TRAIN_SIZES)
    data = write_halves_dataset(tmp_path / "data")
    image = tmp_path / "data" / "img" / "0.png"  # red | purple
    before = load_pretrained(checkpoint)
    config = TrainConfig(
        model=str(checkpoint), train_data=[DataConfig(str(data), "short_vqa")], output_dir=str(tmp_path / "run"),
        stage="grounding", max_steps=120, per_device_batch_size=16, lr=3e-3, warmup_steps=5, save_every=0, log_every=10,
        tensorboard=False, progress_bar=False, qformer_dropout=0.0,
    )  # fmt: skip
    run = prepare(config)
    frozen = {n for n, p in run.blip.model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("language_projection") for n in frozen) and any(n.startswith("language_model") for n in frozen)
    run.trainer.train()
    from finetune import recipe

    after = load_pretrained(recipe.export(config, run.trainer.unwrapped, tmp_path / "export"))
    losses = [m["train/loss_grounding"] for m in metrics(tmp_path / "run") if "train/loss_grounding" in m]
    shares = {c: (mass_on_named_half(before, image, c, side), mass_on_named_half(after, image, c, side))
              for c, side in (("red", "left"), ("purple", "right"))}
    print(f"grounding: loss {losses[0]:.3f} -> {losses[-1]:.3f}; attention on the named half (before, after) {shares}")
    assert losses[-1] < 0.5 * losses[0]
    for colour, (was, now) in shares.items():
        assert now > 0.8 and now > was + 0.2, (colour, was, now)


@pytest.mark.usefixtures("one_thread")
def test_instruction_tuning_adds_the_weighted_grounding_loss_to_the_lm_loss(tiny_checkpoints, tmp_path):
    data = write_halves_dataset(tmp_path / "data", repeats=1)
    config = TrainConfig(
        model=str(tiny_checkpoints("instructblip-llama", **TRAIN_SIZES)), train_data=[DataConfig(str(data), "short_vqa")],
        output_dir=str(tmp_path / "run"), grounding_weight=0.5, max_steps=2, per_device_batch_size=4, lr=1e-3,
        warmup_steps=1, save_every=0, log_every=1, tensorboard=False, progress_bar=False, export=False, qformer_dropout=0.0,
    )  # fmt: skip
    prepare(config).trainer.train()
    for m in metrics(tmp_path / "run"):
        assert m["train/loss"] == pytest.approx(m["train/loss_lm"] + 0.5 * m["train/loss_grounding"], rel=1e-5)


def test_grounding_options_are_checked():
    data = [DataConfig("x.jsonl", "short_vqa")]
    with pytest.raises(ConfigError, match="augment: must be false with grounding"):
        TrainConfig(model="m", train_data=data, stage="grounding", augment=True)
    with pytest.raises(ConfigError, match="grounding_weight: is an instruct-stage option"):
        TrainConfig(model="m", train_data=data, stage="stage2", grounding_weight=1.0)
    with pytest.raises(ConfigError, match="qformer_instruction: must be true with grounding"):
        TrainConfig(model="m", train_data=data, grounding_weight=1.0, qformer_instruction=False)


def test_the_grounding_stage_runs_in_two_processes(tiny_checkpoints, tmp_path):
    """Under DDP: the grounding loss reads only the cross-attention, so the Q-Former's later query
    layers get no gradient; the stage must tell DDP so instead of failing at the first step."""
    import subprocess
    import sys

    from finetune_fixtures import REPO, subprocess_env, write_config
    from test_multiprocess import free_port

    data = write_halves_dataset(tmp_path / "data", repeats=1)
    config = write_config(
        tmp_path / "run.yaml", model=str(tiny_checkpoints("instructblip-llama", **TRAIN_SIZES)), stage="grounding",
        train_data=[{"path": str(data), "task": "short_vqa"}], max_steps=3, per_device_batch_size=4, lr=1e-3,
        warmup_steps=1, log_every=1, save_every=0, progress_bar=False, tensorboard=False, output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "finetune.train", str(config),
    ]  # fmt: skip
    done = subprocess.run(launch, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "global batch 8 = 4 per process x 2 process(es)" in done.stdout + done.stderr
    assert [m["step"] for m in metrics(tmp_path / "run") if "train/loss_grounding" in m] == [1, 2, 3]
    assert (tmp_path / "run" / "export" / "config.json").exists()
