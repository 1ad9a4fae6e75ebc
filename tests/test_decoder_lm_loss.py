"""The training loss without padding or unlabelled positions equals the full-logits loss, value
and gradients, for decoder-only LLMs of two families and for the whole model on a real batch."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from finetune_fixtures import write_images
from instructblip_core import load_pretrained
from instructblip_core.augment import EvalTransform
from instructblip_core.collate import InstructionCollator
from instructblip_core.data import InstructionDataset, load_records
from instructblip_core.losses import IGNORE_INDEX, decoder_lm_loss, length_groups


def _cost(groups, lengths, overhead):
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


def test_groups_cover_every_row_once_in_length_order_at_least_cost():
    lengths = [40, 12, 75, 13, 70, 41, 12, 39]
    groups = length_groups(lengths, max_groups=3, overhead=10)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(lengths)
    # The three natural clusters, at a cost no single group or pair of groups reaches.
    assert [sorted(lengths[i] for i in g) for g in groups] == [[12, 12, 13], [39, 40, 41], [70, 75]]
    assert _cost(groups, lengths, 10) < _cost([list(range(8))], lengths, 10)
    # A group's fixed price above what cutting saves: one group.
    assert length_groups(lengths, max_groups=3, overhead=10_000) == [sorted(range(8), key=lambda i: lengths[i])]
    assert len(length_groups([5] * 32, max_groups=4, overhead=1)) == 1  # equal rows gain nothing from a cut


def _llm(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=64)
        return LlamaForCausalLM(config)
    config = OPTConfig(vocab_size=50, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=16)  # with project_out after the layers
    return OPTForCausalLM(config)


def _batch(lengths: list[int], answer: int, width: int, left: bool = False):
    """Embeddings (B, width, C), mask, positions and labels on the last `answer` kept tokens of each row."""
    B = len(lengths)
    mask = torch.zeros(B, width, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX)
    for b, n in enumerate(lengths):
        kept = slice(width - n, width) if left else slice(0, n)
        mask[b, kept] = 1
        start = kept.stop - answer
        labels[b, start : kept.stop] = torch.randint(0, 50, (answer,))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return mask, positions, labels


@pytest.mark.parametrize("kind", ["llama", "opt"])
@pytest.mark.parametrize("left", [False, True])
def test_the_loss_and_its_gradients_equal_the_full_logits_ones(kind, left):
    model = _llm(kind).eval()
    torch.manual_seed(1)
    lengths = [9, 30, 11, 28, 10, 31]
    mask, positions, labels = _batch(lengths, answer=3, width=34, left=left)
    embeds = torch.randn(len(lengths), 34, model.get_input_embeddings().embedding_dim)

    full_in = embeds.clone().requires_grad_()
    logits = model(inputs_embeds=full_in, attention_mask=mask, position_ids=positions).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    expected.backward()

    fast_in = embeds.clone().requires_grad_()
    # No price per group, so the rows run in groups (unless left-padded, which cannot be cut).
    assert len(length_groups([n for n in lengths], 4, overhead=0)) > 1
    loss = decoder_lm_loss(model, fast_in, mask, positions, labels, group_overhead=0)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    kept = mask.bool()  # padded positions get no gradient on the fast path; on the full path, none either
    assert torch.allclose(fast_in.grad[kept], full_in.grad[kept], atol=1e-6)
    assert fast_in.grad[~kept].abs().max() == 0 and full_in.grad[~kept].abs().max() < 1e-7


def test_a_softcapped_head_gets_the_full_logits_loss():
    """Gemma-2 squashes its logits after the head (final_logit_softcapping): the head alone would
    give another loss, so such a model takes the full-logits path."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, max_position_embeddings=64, final_logit_softcapping=1.0)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # logits of a few units, where a cap at 1 changes them
    torch.manual_seed(1)
    mask, positions, labels = _batch([9, 30, 11], answer=3, width=32)
    embeds = torch.randn(3, 32, 32)
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    hidden = model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    uncapped = F.cross_entropy(model.lm_head(hidden)[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert abs(uncapped.item() - expected.item()) > 0.1  # the cap matters at this scale
    loss = decoder_lm_loss(model, embeds, mask, positions, labels, group_overhead=0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_label_on_a_padded_position_is_still_counted():
    model = _llm("llama").eval()
    mask, positions, labels = _batch([6, 20], answer=2, width=22)
    labels[0, 8] = 7  # past row 0's six kept tokens: the full loss counts it, so must the fast one
    embeds = torch.randn(2, 22, 32)
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert decoder_lm_loss(model, embeds, mask, positions, labels, group_overhead=0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_model_returns_the_same_loss_without_its_logits(tiny_checkpoints, tmp_path):
    blip = load_pretrained(tiny_checkpoints("instructblip-llama"))
    blip.model.eval()
    images = write_images(tmp_path, 3)
    rows = [
        {"image": images[0], "question": "what colour is it?", "answer": "red"},
        {"image": images[1], "question": "describe the picture in a long sentence please", "answer": "a small blue square on the left of a big circle"},
        {"image": images[2], "question": "how many?", "answer": "two"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dataset = InstructionDataset(load_records(path, "short_vqa").records, name="rows", task="short_vqa",
                                 image_transform=EvalTransform(blip.processor.image_processor))
    batch = InstructionCollator(blip.processor)([dataset[i] for i in range(3)])

    full = blip.model(**batch)
    assert full.logits is not None
    fast = blip.model(**batch, return_logits=False)
    assert fast.logits is None
    assert fast.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
