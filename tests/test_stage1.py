"""BLIP-2 stage 1 (ITC + ITM + ITG) on a tiny Q-Former: it learns, the hard negatives are
negatives, gradients reach the queries but not the frozen image encoder, the masks do what
they say inside the model, `export_to` copies weights exactly, and two real processes (gloo)
see one gathered batch."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_checkpoints import build_qformer_tokenizer

from instructblip_core import load_pretrained
from instructblip_core.config import QFormerConfig, VisionConfig
from instructblip_core.masks import unimodal_mask
from instructblip_core.stage1 import (
    TEMP_MAX,
    QFormerPretrainer,
    gather_keep_local_grad,
    sample_hard_negatives,
)
from instructblip_core.vision import VisionModel

COLOURS = ("red", "blue", "green", "yellow")
SHAPES = ("square", "circle", "star", "heart")
IMAGE_WIDTH = 16  # Cv of the fake image tokens
IMAGE_TOKENS = 6
HIDDEN = 32
INIT_STD = HIDDEN**-0.5  # see QFormerPretrainer's init_std: BERT's 0.02 stalls a width-32 model


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tokenizer():
    return build_qformer_tokenizer()


def tiny_qformer_config(vocab_size: int, encoder_hidden_size: int = IMAGE_WIDTH) -> QFormerConfig:
    return QFormerConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * HIDDEN,
        encoder_hidden_size=encoder_hidden_size,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def make_pretrainer(tokenizer, seed: int = 0, **config) -> QFormerPretrainer:
    torch.manual_seed(seed)
    return QFormerPretrainer(
        tiny_qformer_config(len(tokenizer), **config),
        bos_token_id=tokenizer.bos_token_id,
        num_query_tokens=4,
        embed_dim=32,
        init_std=INIT_STD,
    )


def toy_pairs(tokenizer, seed: int = 1):
    """16 distinct (image, caption) pairs: image tokens = colour vector + shape vector + noise,
    caption "a <colour> <shape>". Returns image_embeds (16, N, Cv), ids (16, T), mask (16, T)."""
    g = torch.Generator().manual_seed(seed)
    colour_vecs = torch.randn(len(COLOURS), IMAGE_WIDTH, generator=g)
    shape_vecs = torch.randn(len(SHAPES), IMAGE_WIDTH, generator=g)
    images, captions = [], []
    for c, colour in enumerate(COLOURS):
        for s, shape in enumerate(SHAPES):
            noise = 0.3 * torch.randn(IMAGE_TOKENS, IMAGE_WIDTH, generator=g)
            images.append(colour_vecs[c] + shape_vecs[s] + noise)
            captions.append(f"a {colour} {shape}")
    enc = tokenizer(captions, padding=True, return_tensors="pt")
    return torch.stack(images), enc["input_ids"], enc["attention_mask"]


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from a second thread, and on a busy machine two OpenMP threads
    waiting for each other made the training test 10x slower (36 s instead of 3 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def derangement(n: int, shift: int = 5) -> torch.Tensor:
    return (torch.arange(n) + shift) % n


# ----------------------------------------------------------------------------- learning


def test_tiny_stage1_run_lowers_every_loss_and_itm_separates_matched_pairs(tokenizer, one_thread):
    model = make_pretrainer(tokenizer)
    images, ids, mask = toy_pairs(tokenizer)
    mismatched = derangement(len(ids))
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.0)
    history = []
    for _ in range(80):
        out = model(images, ids, mask)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append([out.loss_itc.item(), out.loss_itm.item(), out.loss_itg.item()])
        assert torch.allclose(out.loss, out.loss_itc + out.loss_itm + out.loss_itg)
    history = torch.tensor(history)  # (steps, 3)
    first, last = history[:5].mean(0), history[-5:].mean(0)
    print("stage-1 losses ITC/ITM/ITG first", first.tolist(), "last", last.tolist())
    assert last[0] < 0.5 * first[0], "ITC did not decrease"
    # ITM starts at the no-skill value (about 0.64 with 1 positive per 2 negatives) and stays
    # there until the features separate; across seeds it then falls to 0.02-0.5 of its start.
    assert last[1] < 0.7 * first[1], "ITM did not decrease"
    assert last[2] < 0.5 * first[2], "ITG did not decrease"

    matched = model.itm_score(images, ids, mask)  # (16,)
    unmatched = model.itm_score(images, ids[mismatched], mask[mismatched])  # (16,)
    print("ITM match probability: matched", matched.mean().item(), "mismatched", unmatched.mean().item())
    assert matched.mean() > unmatched.mean() + 0.3
    assert (matched > unmatched).float().mean() >= 0.75
    assert model.training, "itm_score must leave the training mode as it found it"

    # ITC retrieval: each image's best caption (max over queries of the cosine) is its own.
    with torch.no_grad():
        sim = model.similarity(model.image_features(images), model.text_features(ids, mask))  # (16, 16)
    recall_at_1 = (sim.argmax(dim=1) == torch.arange(len(ids))).float().mean()
    print("ITC image->text recall@1", recall_at_1.item())
    assert recall_at_1 >= 0.75


# ----------------------------------------------------------------------------- hard negatives


def test_hard_negatives_are_never_positives_and_follow_the_softmax():
    g = torch.Generator().manual_seed(0)
    pair_ids = torch.tensor([0, 0, 1, 2, 2, 3])  # pairs 0/1 and 3/4 share an image
    positives = pair_ids[:, None] == pair_ids[None, :]
    for _ in range(200):
        sim = 5 * torch.randn(6, 6, generator=g)
        sim[positives] += 50.0  # tempting positives, and a near-zero temperature's scale
        picked = sample_hard_negatives(sim, positives, generator=g)
        assert not positives[torch.arange(6), picked].any()

    # One row: the positive (column 0) is excluded; negatives 1 and 2 get softmax weights 1/4 and 3/4.
    sim = torch.tensor([[10.0, 0.0, torch.log(torch.tensor(3.0)).item()]]).repeat(4000, 1)
    positives = torch.tensor([[True, False, False]]).repeat(4000, 1)
    picked = sample_hard_negatives(sim, positives, generator=g)
    assert set(picked.tolist()) == {1, 2}
    assert abs((picked == 2).float().mean().item() - 0.75) < 0.03


def test_hard_negatives_need_a_negative_in_every_row():
    positives = torch.tensor([[True, False], [True, True]])
    with pytest.raises(ValueError, match=r"rows \[1\] have no negative"):
        sample_hard_negatives(torch.zeros(2, 2), positives)


def test_forward_samples_itm_negatives_outside_the_pair(tokenizer):
    model = make_pretrainer(tokenizer)
    images, ids, mask = toy_pairs(tokenizer)
    pair_ids = torch.arange(16) // 2  # pretend every two pairs show the same image
    for _ in range(5):
        out = model(images, ids, mask, pair_ids=pair_ids)
        assert not (pair_ids[out.negative_text_index] == pair_ids).any()
        assert not (pair_ids[out.negative_image_index] == pair_ids).any()
        out = model(images, ids, mask)
        assert not (out.negative_text_index == torch.arange(16)).any()
        assert not (out.negative_image_index == torch.arange(16)).any()


def test_given_negative_captions_join_itm_as_non_matching_rows(tokenizer):
    """A caption's own negatives (e.g. attributes swapped between two objects) are extra ITM rows
    labelled "no match": the loss is the mean over the 3B sampled rows and these K rows."""
    model = make_pretrainer(tokenizer).eval()  # no dropout: the same rows give the same logits
    images, ids, mask = toy_pairs(tokenizer)
    B = len(ids)
    swapped = tokenizer([f"a {c} {s} and more" for c in COLOURS for s in reversed(SHAPES)], padding=True, return_tensors="pt")
    has_negative = torch.arange(B) % 3 != 0  # some captions come without a negative
    K = int(has_negative.sum())

    rows = []
    hook = model.itm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    torch.manual_seed(7)
    plain = model(images, ids, mask)
    torch.manual_seed(7)  # the same sampled in-batch negatives
    given = model(images, ids, mask, negative_input_ids=swapped["input_ids"], negative_attention_mask=swapped["attention_mask"],
                  has_negative=has_negative)
    torch.manual_seed(7)
    none_present = model(images, ids, mask, negative_input_ids=swapped["input_ids"],
                         negative_attention_mask=swapped["attention_mask"], has_negative=torch.zeros(B, dtype=torch.bool))
    hook.remove()
    assert rows == [3 * B, 3 * B + K, 3 * B]
    assert torch.equal(given.negative_text_index, plain.negative_text_index)
    assert torch.allclose(none_present.loss_itm, plain.loss_itm, atol=1e-6)

    with torch.no_grad():
        extra = model.itm_logits(images[has_negative], swapped["input_ids"][has_negative], swapped["attention_mask"][has_negative])
        extra_loss = torch.nn.functional.cross_entropy(extra, torch.zeros(K, dtype=torch.long), reduction="sum")
    expected = (3 * B * plain.loss_itm + extra_loss) / (3 * B + K)
    assert torch.allclose(given.loss_itm, expected, atol=1e-5)
    assert torch.allclose(given.loss_itc, plain.loss_itc) and torch.allclose(given.loss_itg, plain.loss_itg)

    with pytest.raises(ValueError, match="needs negative_attention_mask"):
        model(images, ids, mask, negative_input_ids=swapped["input_ids"])
    with pytest.raises(ValueError, match="must both be"):
        model(images, ids, mask, negative_input_ids=swapped["input_ids"][:3], negative_attention_mask=swapped["attention_mask"][:3])


# ----------------------------------------------------------------------------- gradients


def test_gradients_reach_queries_and_every_stage1_weight_but_not_the_frozen_encoder(tokenizer):
    vision = VisionModel(VisionConfig(hidden_size=IMAGE_WIDTH, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=28, patch_size=7))
    vision.requires_grad_(False)
    model = make_pretrainer(tokenizer)
    _, ids, mask = toy_pairs(tokenizer)
    pixels = torch.randn(len(ids), 3, 28, 28)
    image_embeds = vision(pixels)  # (16, 17, Cv), no graph: the encoder is frozen
    assert not image_embeds.requires_grad
    model(image_embeds, ids, mask).loss.backward()

    assert all(p.grad is None for p in vision.parameters())
    assert model.query_tokens.grad is not None and model.query_tokens.grad.abs().sum() > 0
    without_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert without_grad == []
    for name in ("temp", "vision_proj.weight", "text_proj.weight", "itm_head.weight", "lm_head.bias",
                 "qformer.encoder.layer.0.crossattention.attention.key.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_temperature_is_kept_in_range(tokenizer):
    model = make_pretrainer(tokenizer)
    images, ids, mask = toy_pairs(tokenizer)
    with torch.no_grad():
        model.temp.fill_(3.0)
    out = model(images, ids, mask)
    assert model.temp.item() == pytest.approx(TEMP_MAX)
    # ITC logits are cosine similarities (at most 1) divided by the temperature.
    assert out.sim_i2t.abs().max() <= 1.0 / TEMP_MAX + 1e-4


# ----------------------------------------------------------------------------- masks inside the model


def test_unimodal_joint_pass_equals_separate_image_and_text_passes(tokenizer):
    model = make_pretrainer(tokenizer).eval()
    images, ids, mask = toy_pairs(tokenizer)
    Q = model.num_query_tokens
    with torch.no_grad():
        hidden, _ = model.qformer(model.query_tokens.expand(16, -1, -1), images, ids, unimodal_mask(Q, mask))
        joint_image = torch.nn.functional.normalize(model.vision_proj(hidden[:, :Q]), dim=-1)
        joint_text = torch.nn.functional.normalize(model.text_proj(hidden[:, Q]), dim=-1)
        torch.testing.assert_close(joint_image, model.image_features(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(joint_text, model.text_features(ids, mask), atol=1e-5, rtol=1e-5)


def test_itg_decoder_never_reads_later_tokens_but_reads_the_image(tokenizer):
    model = make_pretrainer(tokenizer).eval()
    images, ids, mask = toy_pairs(tokenizer)
    changed = ids.clone()
    changed[:, 2] = tokenizer.convert_tokens_to_ids("purple")
    with torch.no_grad():
        before = model.caption_logits(images, ids, mask)  # (16, T, V)
        after = model.caption_logits(images, changed, mask)
        other_image = model.caption_logits(images[derangement(16)], ids, mask)
    torch.testing.assert_close(before[:, :2], after[:, :2], atol=1e-5, rtol=1e-5)  # positions 0, 1 cannot see token 2
    assert not torch.allclose(before[:, 2:], after[:, 2:], atol=1e-4)
    assert not torch.allclose(before[:, :1], other_image[:, :1], atol=1e-4)  # even the BOS position sees the queries


def test_padding_does_not_change_the_losses(tokenizer):
    model = make_pretrainer(tokenizer).eval()
    images, ids, mask = toy_pairs(tokenizer)
    pad = torch.zeros(len(ids), 3, dtype=ids.dtype)
    torch.manual_seed(0)
    short = model(images, ids, mask)
    torch.manual_seed(0)
    long = model(images, torch.cat([ids, pad], 1), torch.cat([mask, pad], 1))
    for name in ("loss_itc", "loss_itm", "loss_itg"):
        torch.testing.assert_close(getattr(short, name), getattr(long, name), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_are_named(tokenizer):
    model = make_pretrainer(tokenizer)
    images, ids, mask = toy_pairs(tokenizer)
    with pytest.raises(ValueError, match=r"image_embeds must be \(B, N, 16\)"):
        model(images[..., :8], ids, mask)
    left_padded = mask.clone()
    left_padded[3, 0] = 0
    with pytest.raises(ValueError, match="start with \\[CLS\\] at position 0 and be right-padded"):
        model(images, ids, left_padded)
    with pytest.raises(ValueError, match=r"text ids \(16, \d+\) and mask"):
        model(images, ids, mask[:, :-1])
    with pytest.raises(ValueError, match=r"bos_token_id 9999 \(\[DEC\]\) is outside the Q-Former vocabulary"):
        QFormerPretrainer(tiny_qformer_config(100), bos_token_id=9999)
    with pytest.raises(ValueError, match="ITM needs at least two different pairs"):
        model(images[:1], ids[:1], mask[:1])


# ----------------------------------------------------------------------------- stage 2 export


def _pretrainer_for(model, tokenizer) -> QFormerPretrainer:
    torch.manual_seed(7)
    return QFormerPretrainer(
        model.config.qformer_config,
        bos_token_id=tokenizer.bos_token_id,
        num_query_tokens=model.config.num_query_tokens,
    )


def test_export_to_instructblip_copies_qformer_and_queries_exactly(tiny_checkpoints, tokenizer):
    model = load_pretrained(tiny_checkpoints("instructblip-opt")).model
    stage1 = _pretrainer_for(model, tokenizer)
    other = {k: v.clone() for k, v in model.state_dict().items() if not (k.startswith("qformer.") or k == "query_tokens")}
    stage1.export_to(model)
    assert torch.equal(model.query_tokens, stage1.query_tokens)
    ours = stage1.qformer.state_dict()
    theirs = model.qformer.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(tensor, ours[name]), name
    for name, tensor in model.state_dict().items():  # nothing outside the Q-Former moved
        if name in other:
            assert torch.equal(tensor, other[name]), name
    # The model still runs, now with the exported Q-Former.
    ids = torch.tensor([[5, 6, 7]])
    model(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28), qformer_input_ids=torch.tensor([[2, 40, 3]]))


def test_export_to_blip2_moves_the_query_layernorm_and_drops_the_text_side(tiny_checkpoints, tokenizer):
    model = load_pretrained(tiny_checkpoints("blip2-opt")).model
    instruct = load_pretrained(tiny_checkpoints("instructblip-opt")).model
    stage1 = _pretrainer_for(instruct, tokenizer)  # the same Q-Former sizes, with a text side
    stage1.export_to(model)
    ours = stage1.qformer.state_dict()
    for name, tensor in model.qformer.state_dict().items():
        source = "embeddings.layernorm." + name.split(".")[-1] if name.startswith("layernorm.") else name
        assert torch.equal(tensor, ours[source]), name
    assert torch.equal(model.query_tokens, stage1.query_tokens)


def test_export_to_refuses_a_model_of_another_shape(tiny_checkpoints, tokenizer):
    model = load_pretrained(tiny_checkpoints("instructblip-opt")).model
    torch.manual_seed(0)
    wrong_queries = QFormerPretrainer(model.config.qformer_config, bos_token_id=tokenizer.bos_token_id, num_query_tokens=2)
    before = model.qformer.encoder.layer[0].attention.attention.query.weight.clone()
    with pytest.raises(ValueError, match=r"query_tokens: ours \(1, 2, 32\), model \(1, 4, 32\)"):
        wrong_queries.export_to(model)
    assert torch.equal(before, model.qformer.encoder.layer[0].attention.attention.query.weight)  # nothing copied
    fewer_layers = QFormerPretrainer(
        dataclasses.replace(model.config.qformer_config, num_hidden_layers=1),
        bos_token_id=tokenizer.bos_token_id,
        num_query_tokens=4,
    )
    with pytest.raises(ValueError, match=r"missing \['qformer\.encoder\.layer\.1\."):
        fewer_layers.export_to(model)


# ----------------------------------------------------------------------------- two processes


def _two_process_worker(rank: int, store: str, results: str):
    """Rank r takes its slice of the same 8 pairs (3 and 5 pairs, different text lengths)."""
    torch.set_num_threads(1)  # two processes on the test machine's two cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        tokenizer = build_qformer_tokenizer()
        model = make_pretrainer(tokenizer)
        images, ids, mask = toy_pairs(tokenizer)
        rows = slice(0, 3) if rank == 0 else slice(3, 8)
        local_ids, local_mask = ids[rows], mask[rows]
        keep = int(local_mask.sum(1).max())  # each process pads only to its own longest text
        local_ids, local_mask = local_ids[:, :keep], local_mask[:, :keep]
        if rank == 0:
            local_ids = torch.cat([local_ids, torch.zeros(3, 2, dtype=ids.dtype)], 1)  # a different T
            local_mask = torch.cat([local_mask, torch.zeros(3, 2, dtype=mask.dtype)], 1)

        gathered, offset = gather_keep_local_grad(local_ids, pad_value=0)
        model.eval()
        image_feats = model.image_features(images[rows])
        text_feat = model.text_features(local_ids, local_mask)
        itc = model.contrastive(image_feats, text_feat)
        out = model(images[rows], local_ids, local_mask)
        out.loss.backward()
        torch.save(
            {
                "gathered": gathered,
                "offset": offset,
                "itc": itc.loss.detach(),
                "sim_i2t": itc.sim_i2t.detach(),
                "negative_text": out.negative_text_index,
                "negative_image": out.negative_image_index,
                "finite": bool(torch.isfinite(out.loss)),
                "query_grad": model.query_tokens.grad.clone(),
            },
            f"{results}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_processes_gather_one_batch_and_match_single_process_itc(tokenizer, tmp_path):
    # fork: the workers inherit the imported modules instead of importing torch and transformers
    # again (seconds each); they then use one thread each, as DataLoader workers do.
    mp.start_processes(
        _two_process_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert (r0["offset"], r1["offset"]) == (0, 3)
    assert torch.equal(r0["gathered"], r1["gathered"]) and r0["gathered"].shape[0] == 8

    model = make_pretrainer(tokenizer).eval()
    images, ids, mask = toy_pairs(tokenizer)
    with torch.no_grad():
        full = model.contrastive(model.image_features(images[:8]), model.text_features(ids[:8], mask[:8]))
    # Each process averages over its own rows; weighted by rows, they make the single-process loss.
    torch.testing.assert_close((3 * r0["itc"] + 5 * r1["itc"]) / 8, full.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r0["sim_i2t"], r1["sim_i2t"]]), full.sim_i2t, atol=1e-4, rtol=1e-4)
    for r, offset, n in ((r0, 0, 3), (r1, 3, 5)):
        own = torch.arange(n) + offset
        assert r["finite"] and r["query_grad"].abs().sum() > 0
        assert ((r["negative_text"] >= 0) & (r["negative_text"] < 8)).all()
        assert not (r["negative_text"] == own).any() and not (r["negative_image"] == own).any()
