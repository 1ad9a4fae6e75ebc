"""Trainer on real data files and tiny checkpoints, in this process (CPU, one thread).

Overfitting 16 examples, only trainable tensors changing, AdamW groups, the schedule, LoRA
(with its export merged and loaded by both loaders), an 8-bit LLM, gradient checkpointing,
bf16 autocast, the frozen-feature cache, and BLIP-2 stage 1 / stage 2.
"""

import math

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import InstructBlipForConditionalGeneration as ReferenceInstructBlip

from finetune import recipe
from finetune.config import DataConfig, EvalDataConfig, TrainConfig
from finetune.train import prepare
from finetune_fixtures import one_thread  # noqa: F401 (a fixture)
from finetune_fixtures import TRAIN_SIZES, metrics, train_losses, write_caption_dataset, write_word_dataset
from instructblip_core import load_pretrained
from instructblip_core.lora import default_target_modules
from instructblip_core.optim import parameter_groups, warmup_cosine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    return write_word_dataset(tmp_path_factory.mktemp("words"))


def config_for(checkpoint, data, out, **overrides) -> TrainConfig:
    fields = dict(
        model=str(checkpoint), train_data=[DataConfig(str(data), "short_vqa")], output_dir=str(out),
        max_steps=4, per_device_batch_size=4, lr=1e-3, warmup_steps=1, save_every=0, log_every=1,
        tensorboard=False, progress_bar=False, export=False, qformer_dropout=0.0,
    )  # fmt: skip
    fields.update(overrides)
    return TrainConfig(**fields)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_tensors(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_overfits_16_examples_and_changes_only_trainable_tensors(tiny_checkpoints, words, tmp_path):
    checkpoint = tiny_checkpoints("instructblip-llama", **TRAIN_SIZES)
    config = config_for(
        checkpoint, words, tmp_path / "run", max_steps=150, per_device_batch_size=16, lr=1e-2, warmup_steps=10,
        max_grad_norm=0.0, min_lr_ratio=0.1, log_every=10, eval_data=[EvalDataConfig(str(words), "short_vqa", name="seen")],
    )  # fmt: skip
    run = prepare(config)
    model = run.blip.model
    before = snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    run.trainer.train()

    losses = train_losses(tmp_path / "run")
    print(f"overfit: loss {losses[10]:.3f} (steps 1-10) -> {losses[150]:.4f} (steps 141-150)")
    assert losses[150] < 0.1 < 4.0 < losses[10]
    evaluation = [m for m in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "eval/" in m]
    assert '"eval/seen/vqa_accuracy": 1.0' in evaluation[-1]  # greedy answers are the 16 words

    changed = changed_tensors(before, snapshot(model))
    assert changed <= trainable, f"frozen tensors changed: {sorted(changed - trainable)[:5]}"
    assert {"query_tokens", "language_projection.weight", "qformer.encoder.layer.0.crossattention.attention.query.weight"} <= changed
    assert not any(n.startswith(("vision_model.", "language_model.")) for n in trainable)
    # Every trainable tensor moved but the text-side feed-forward of the LAST Q-Former layer:
    # only the query outputs go on to the LLM, so it gets zero gradients (its matrices still
    # move by weight decay; its biases and LayerNorm, which are not decayed, stay).
    last = f"qformer.encoder.layer.{len(model.qformer.encoder.layer) - 1}"
    dead = {f"{last}.intermediate.dense.bias", f"{last}.output.dense.bias", f"{last}.output.LayerNorm.weight", f"{last}.output.LayerNorm.bias"}
    assert trainable - changed == dead


def test_no_weight_decay_on_biases_and_norms(tiny_checkpoints):
    model = load_pretrained(tiny_checkpoints("instructblip-opt")).model
    model.freeze_for_instruction_tuning()
    decay, no_decay = parameter_groups(model, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert all(n.endswith(".bias") or "LayerNorm" in n or "layernorm" in n for n in no_decay["names"])
    assert "qformer.encoder.layer.0.output.LayerNorm.weight" in no_decay["names"]
    assert "language_projection.bias" in no_decay["names"]
    assert {"query_tokens", "language_projection.weight", "qformer.embeddings.word_embeddings.weight"} <= set(decay["names"])
    assert not any(n.startswith(("vision_model", "language_model")) for n in decay["names"] + no_decay["names"])


def test_warmup_then_cosine():
    values = [warmup_cosine(step, 10, 110, 0.1) for step in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert values[10] == pytest.approx(1.0) and values[60] == pytest.approx(0.55)  # cosine halfway
    assert values[110] == pytest.approx(0.1)  # floor
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


@pytest.mark.parametrize(("kind", "expected"), [("instructblip-llama", ["q_proj", "v_proj"]),
                                                ("instructblip-opt", ["q_proj", "v_proj"]),
                                                ("instructblip-t5", ["q", "v"])])  # fmt: skip
def test_lora_targets_come_from_the_module_names(tiny_checkpoints, kind, expected):
    model = load_pretrained(tiny_checkpoints(kind)).model
    assert default_target_modules(model.language_model) == expected


def model_logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def transformers_inputs(batch: dict, config) -> dict:
    """transformers marks the visual slots with Q `<image>` tokens in input_ids; we prepend them."""
    B, Q = batch["input_ids"].shape[0], config.num_query_tokens
    inputs = dict(batch)
    inputs["input_ids"] = torch.cat([torch.full((B, Q), config.image_token_index), batch["input_ids"]], dim=1)
    inputs["attention_mask"] = torch.cat([torch.ones(B, Q, dtype=torch.long), batch["attention_mask"]], dim=1)
    if not config.is_encoder_decoder:
        del inputs["labels"]  # aligned differently there; the logits are what we compare
    return inputs


@pytest.mark.parametrize("kind", ["instructblip-opt", "instructblip-t5"])
def test_lora_training_and_merged_export(tiny_checkpoints, words, tmp_path, kind):
    config = config_for(tiny_checkpoints(kind), words, tmp_path / "run", lora=True, lora_r=4, lr=5e-3, max_steps=3,
                        eval_data=[EvalDataConfig(str(words), "short_vqa", max_examples=4)])  # generation through peft  # fmt: skip
    run = prepare(config)
    model = run.blip.model
    before = snapshot(model)
    run.trainer.train()
    changed = changed_tensors(before, snapshot(model))
    lora_changed = {n for n in changed if ".lora_" in n}
    assert lora_changed and all(".lora_A." in n or ".lora_B." in n or n.startswith(("qformer.", "query_tokens", "language_projection")) for n in changed)

    exported = recipe.export(config, run.trainer.unwrapped, tmp_path / "export")
    batch = {k: v for k, v in next(run.trainer.batches.steps(0))[0].items()}
    model.eval()
    expected = model_logits(model, batch)  # the adapters still separate
    ours = load_pretrained(exported)
    assert not any(".lora_" in n for n in ours.model.state_dict())
    assert (model_logits(ours.model, batch) - expected).abs().max() < 1e-4
    reference = ReferenceInstructBlip.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = reference(**transformers_inputs(batch, ours.model.config)).logits
    assert (ref - expected).abs().max() < 1e-4


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_llm_with_lora_trains_and_exports_in_float(tiny_checkpoints, words, tmp_path, bits):
    config = config_for(tiny_checkpoints("instructblip-llama"), words, tmp_path / "run", load_in_8bit=bits == 8,
                        load_in_4bit=bits == 4, lora=True, max_steps=6, lr=5e-3)  # fmt: skip
    run = prepare(config)
    before = snapshot(run.blip.model.qformer)
    run.trainer.train()
    assert changed_tensors(before, snapshot(run.blip.model.qformer))
    losses = train_losses(tmp_path / "run")
    assert all(math.isfinite(v) for v in losses.values())
    exported = recipe.export(config, run.trainer.unwrapped, tmp_path / "export")
    reloaded = load_pretrained(exported)
    assert reloaded.model.language_model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    trained_queries = run.blip.model.query_tokens.detach()
    assert torch.equal(reloaded.model.query_tokens, trained_queries)


def test_train_vision_unfreezes_the_vit(tiny_checkpoints, words, tmp_path):
    AcceleratorState._reset_state(reset_partial_state=True)
    run = prepare(config_for(tiny_checkpoints("instructblip-opt"), words, tmp_path / "run", train_vision=True, max_steps=2))
    before = snapshot(run.blip.model)
    run.trainer.train()
    changed = changed_tensors(before, snapshot(run.blip.model))
    assert "vision_model.embeddings.patch_embedding.weight" in changed
    assert not any(n.startswith("language_model.") for n in changed)


def train_variant(checkpoint, words, out, **options):
    """A short run with `options`; returns it (trained) in a fresh accelerate state."""
    AcceleratorState._reset_state(reset_partial_state=True)
    run = prepare(config_for(checkpoint, words, out, **options))
    run.trainer.train()
    return run


def test_gradient_checkpointing_gives_the_same_update(tiny_checkpoints, words, tmp_path):
    plain, recomputed = (
        train_variant(tiny_checkpoints("instructblip-opt"), words, tmp_path / f"gc{on}", gradient_checkpointing=on, max_steps=2)
        for on in (False, True)
    )
    expected = plain.trainer.trainable_state()
    for name, value in recomputed.trainer.trainable_state().items():
        assert torch.allclose(value, expected[name], atol=1e-6), name


def test_bf16_autocast_on_cpu_keeps_float32_master_weights(tiny_checkpoints, words, tmp_path):
    run = train_variant(tiny_checkpoints("instructblip-opt"), words, tmp_path / "run", mixed_precision="bf16", max_steps=3)
    assert all(math.isfinite(v) for v in train_losses(tmp_path / "run").values())
    assert all(p.dtype == torch.float32 for p in run.trainer.trainable_state().values())


def test_cached_image_features_give_the_same_training(tiny_checkpoints, words, tmp_path):
    plain, cached = (
        train_variant(tiny_checkpoints("instructblip-opt"), words, tmp_path / f"c{on}", cache_image_features=on, max_steps=6)
        for on in (False, True)
    )
    assert all(d.defer_images for d in cached.trainer.batches.datasets)  # images decoded only to be encoded
    assert not any(d.defer_images for d in plain.trainer.batches.datasets)
    cache = cached.trainer.unwrapped.cache
    assert cache.hits + cache.misses == 6 * 4 and cache.hits > 0
    assert cache.misses == len(cache)  # every image encoded once
    expected = plain.trainer.trainable_state()
    got = {name.removeprefix("model."): value for name, value in cached.trainer.trainable_state().items()}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name


def test_undecoded_images_travel_through_loader_workers(tiny_checkpoints, words, tmp_path):
    """With the feature cache, items carry undecoded images; a worker process hands them over
    (pickled) and the run trains exactly as without workers."""
    inline, workers = (
        train_variant(tiny_checkpoints("instructblip-opt"), words, tmp_path / f"w{n}", cache_image_features=True,
                      num_workers=n, max_steps=3)
        for n in (0, 1)
    )
    assert workers.trainer.unwrapped.cache.misses > 0
    expected = inline.trainer.trainable_state()
    for name, value in workers.trainer.trainable_state().items():
        assert torch.equal(value, expected[name]), name


def test_a_feature_folder_is_shared_by_checkpoints_with_the_same_image_encoder(tiny_checkpoints, words, tmp_path):
    """The recipes' stages start from one another's exports with the same frozen encoder: a second
    stage reads the first one's encodings; another encoder, even at the same path, never does."""
    import shutil

    first = tiny_checkpoints("instructblip-opt")
    copy = shutil.copytree(first, tmp_path / "next_stage")  # another folder, the same weights
    folder = tmp_path / "features"
    options = dict(cache_image_features=True, feature_cache_dir=str(folder), max_steps=3)
    one = train_variant(first, words, tmp_path / "one", **options).trainer.unwrapped.cache
    two = train_variant(copy, words, tmp_path / "two", **options).trainer.unwrapped.cache
    assert one.misses > 0 and two.misses == 0 and two.hits == 3 * 4
    shutil.rmtree(copy)
    shutil.copytree(tiny_checkpoints("instructblip-opt", seed=1), copy)  # another encoder saved over that folder
    three = train_variant(copy, words, tmp_path / "three", **options).trainer.unwrapped.cache
    assert three.hits == 0 and three.misses == one.misses


def test_stage2_blip2_trains_and_exports(tiny_checkpoints, tmp_path):
    captions = write_caption_dataset(tmp_path / "data")
    config = config_for(tiny_checkpoints("blip2-opt"), captions, tmp_path / "run", stage="stage2", max_steps=3,
                        train_data=[DataConfig(str(captions), "caption")])  # fmt: skip
    assert config.resolved_prompt_style == "none"
    run = prepare(config)
    item = run.trainer.batches.datasets[0][0]
    assert item["prompt"] == ""  # BLIP-2 captioning: no prompt, no instruction
    run.trainer.train()
    exported = recipe.export(config, run.trainer.unwrapped, tmp_path / "export")
    assert torch.equal(load_pretrained(exported).model.language_projection.weight, run.blip.model.language_projection.weight.detach())


def test_stage1_losses_decrease_and_export_moves_the_qformer(tiny_checkpoints, tmp_path):
    captions = write_caption_dataset(tmp_path / "data", negatives=True)
    config = config_for(tiny_checkpoints("instructblip-opt"), captions, tmp_path / "run", stage="stage1", max_steps=30, lr=1e-3,
                        warmup_steps=5, log_every=10, per_device_batch_size=8, train_data=[DataConfig(str(captions), "caption")])  # fmt: skip
    run = prepare(config)
    pretrainer = run.trainer.unwrapped.pretrainer
    assert torch.equal(pretrainer.query_tokens, run.blip.model.query_tokens)  # stage1_init: base
    itm_rows = []
    pretrainer.itm_head.register_forward_hook(lambda module, args, out: itm_rows.append(args[0].shape[0]))
    run.trainer.train()
    # Each batch of 8 has 4 captions with a negative caption of their own: ITM sees 3 x 8 + 4 rows.
    assert itm_rows == [28] * 30
    logged = [m for m in metrics(tmp_path / "run") if "train/loss" in m]
    first, last = logged[0], logged[-1]  # means over steps 1-10 and 21-30
    print({k: (round(first[k], 3), round(last[k], 3)) for k in first if k.startswith("train/loss")})
    for part in ("loss", "loss_itc", "loss_itg", "loss_itm"):
        assert last[f"train/{part}"] < first[f"train/{part}"], part
    assert last["train/loss"] < 0.7 * first["train/loss"]
    exported = recipe.export(config, run.trainer.unwrapped, tmp_path / "export")
    reloaded = load_pretrained(exported)
    assert torch.equal(reloaded.model.query_tokens, run.trainer.unwrapped.pretrainer.query_tokens.detach())


# ---- how a global batch is split --------------------------------------------------------------


class Numbers(torch.utils.data.Dataset):
    """Item i is the number i: the batches show which stream positions went where."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def micro_batches(processes: int, accumulation: int, rank: int, steps: int = 3, workers: int = 0, start: int = 0) -> list[list[list[int]]]:
    from instructblip_core.batching import StepBatches
    from instructblip_core.sampling import BalancedSampler

    datasets = [Numbers(10), Numbers(30)]
    sampler = BalancedSampler({"a": 10, "b": 30}, {"a": 0.5, "b": 0.5}, seed=3)
    batches = StepBatches(datasets, sampler, list, micro_batch_size=2, accumulation_steps=accumulation,
                          num_processes=processes, process_index=rank, num_workers=workers)  # fmt: skip
    stream = batches.steps(start)
    return [next(stream) for _ in range(steps)]


def test_one_process_accumulating_sees_the_micro_batches_of_two_processes():
    single = micro_batches(processes=1, accumulation=2, rank=0)
    rank0, rank1 = micro_batches(2, 1, 0), micro_batches(2, 1, 1)
    for step in range(3):
        assert single[step] == [rank0[step][0], rank1[step][0]]
        assert len(set(single[step][0] + single[step][1])) > 1
    assert micro_batches(1, 2, 0, workers=2) == single  # worker processes load the same batches
    assert micro_batches(1, 2, 0, steps=1, start=2) == single[2:]  # resuming at step 2 continues the stream there
