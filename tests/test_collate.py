"""Collator: labels on answer tokens only, loss equal to a hand computation, padding-invariant."""

import json

import PIL.Image
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.utils.data import ConcatDataset, DataLoader
from transformers import PreTrainedTokenizerFast

from instructblip_core import load_pretrained
from instructblip_core.augment import EvalTransform, TrainTransform
from instructblip_core.collate import InstructionCollator, answer_token_counter
from instructblip_core.data import DataError, InstructionDataset, load_records
from instructblip_core.images import ImageProcessor
from instructblip_core.model import IGNORE_INDEX
from instructblip_core.processing import Processor
from instructblip_core.sampling import BalancedSampler, mixture_probabilities

KINDS = ["instructblip-llama", "instructblip-opt", "instructblip-t5", "blip2-opt", "blip2-t5"]
EXAMPLES = [
    ("Question: what colour is the square? Short answer:", "red"),
    ("Describe the image in detail.", "The picture shows two circles and one square on a grey background."),
    ("Question: how many stars are there? Answer:", "three yellow stars"),
]


@pytest.fixture(scope="module")
def tiny_models(tiny_checkpoints):
    cache = {}

    def get(kind):
        if kind not in cache:
            model = load_pretrained(tiny_checkpoints(kind))
            model.model.eval()
            cache[kind] = model
        return cache[kind]

    return get


def make_items(processor, examples=EXAMPLES):
    items = []
    for i, (prompt, answer) in enumerate(examples):
        image = PIL.Image.new("RGB", (30 + 5 * i, 28), (40 * i, 200 - 30 * i, 90))
        items.append({
            "pixel_values": processor.image_processor.pixel_values(image),
            "prompt": prompt,
            "qformer_text": prompt,
            "answer": answer,
            "source": f"test.jsonl:{i + 1}",
        })
    return items


def expected_answer_ids(tokenizer, prompt, answer, encoder_decoder):
    """Independent of the collator: what generation after the prompt would emit, then EOS."""
    if encoder_decoder:
        return tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    full = tokenizer(f"{prompt} {answer}", add_special_tokens=False).input_ids
    assert full[: len(prompt_ids)] == prompt_ids
    return full[len(prompt_ids):] + [tokenizer.eos_token_id]


def hand_losses(model, batch):
    """(batch mean over answer tokens, per-item means) from the model's logits, by hand."""
    with torch.no_grad():
        out = model.model(**batch)
    labels = batch["labels"]  # (B, T)
    logits = out.logits.double()
    if not model.processor.is_encoder_decoder:
        visual = logits.shape[1] - labels.shape[1]  # the soft prompt's length
        logits = logits[:, visual - 1 : -1]  # the logit before token t predicts token t
    log_probs = logits.log_softmax(-1)
    total, count, per_item = 0.0, 0, []
    for b in range(labels.shape[0]):
        nll = [-log_probs[b, t, labels[b, t]].item() for t in range(labels.shape[1]) if labels[b, t] != IGNORE_INDEX]
        per_item.append(sum(nll) / len(nll))
        total, count = total + sum(nll), count + len(nll)
    return out.loss.item(), total / count, per_item


@pytest.mark.parametrize("kind", KINDS)
def test_labels_are_exactly_the_answer_tokens(tiny_models, kind):
    model = tiny_models(kind)
    tok = model.processor.tokenizer
    enc_dec = model.processor.is_encoder_decoder
    batch = InstructionCollator(model.processor)(make_items(model.processor))
    B = len(EXAMPLES)
    for b, (prompt, answer) in enumerate(EXAMPLES):
        labels = batch["labels"][b]
        answer_ids = expected_answer_ids(tok, prompt, answer, enc_dec)
        assert labels[labels != IGNORE_INDEX].tolist() == answer_ids
        assert tok.decode(answer_ids, skip_special_tokens=True).strip() == answer
        mask = (batch["decoder_attention_mask"] if enc_dec else batch["attention_mask"])[b]
        if enc_dec:
            assert labels[: len(answer_ids)].tolist() == answer_ids and (labels[len(answer_ids):] == IGNORE_INDEX).all()
            assert batch["input_ids"][b][: batch["attention_mask"][b].sum()].tolist() == tok(prompt).input_ids
        else:
            prompt_ids = tok(prompt).input_ids  # with BOS
            n = len(prompt_ids) + len(answer_ids)
            assert batch["input_ids"][b][:n].tolist() == prompt_ids + answer_ids
            assert prompt_ids[0] == tok.bos_token_id
            assert (labels[: len(prompt_ids)] == IGNORE_INDEX).all() and (labels[n:] == IGNORE_INDEX).all()
            assert (batch["input_ids"][b][n:] == tok.pad_token_id).all()
        assert mask.sum() == (len(answer_ids) if enc_dec else len(tok(prompt).input_ids) + len(answer_ids))
    assert batch["pixel_values"].shape == (B, 3, 28, 28)
    has_qformer = kind.startswith("instructblip")
    assert ("qformer_input_ids" in batch) == has_qformer and ("qformer_attention_mask" in batch) == has_qformer


@pytest.mark.parametrize("kind", ["instructblip-llama", "instructblip-t5", "blip2-opt"])
def test_model_loss_equals_hand_computation_and_ignores_padding(tiny_models, kind):
    model = tiny_models(kind)
    collate = InstructionCollator(model.processor)
    items = make_items(model.processor)
    batch = collate(items)
    model_loss, hand_mean, per_item = hand_losses(model, batch)
    assert model_loss == pytest.approx(hand_mean, rel=1e-5)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1, "the items must differ in length so that padding happens"
    for b, item in enumerate(items):
        single_loss, single_mean, _ = hand_losses(model, collate([item]))
        assert single_loss == pytest.approx(single_mean, rel=1e-5)
        assert per_item[b] == pytest.approx(single_mean, rel=1e-4, abs=1e-5)


def test_answer_over_the_limit_is_an_error_naming_the_source(tiny_models):
    processor = tiny_models("instructblip-llama").processor
    collate = InstructionCollator(processor, max_answer_tokens=5)
    items = make_items(processor)
    with pytest.raises(DataError, match=r"^test.jsonl:2: answer is \d+ tokens, over max_answer_tokens=5"):
        collate(items)
    count = answer_token_counter(processor)
    assert count("red") == len(expected_answer_ids(processor.tokenizer, "Answer:", "red", False)) - 1


@pytest.mark.parametrize("kind", ["instructblip-llama", "instructblip-t5"])
def test_long_prompts_are_cut_from_the_left_keeping_special_tokens(tiny_models, kind):
    processor = tiny_models(kind).processor
    tok = processor.tokenizer
    prompt, answer = EXAMPLES[1][1] + " What colour is the square?", "red"
    collate = InstructionCollator(processor, max_prompt_tokens=8)
    with pytest.warns(UserWarning, match=r"test.jsonl:1: prompt is \d+ tokens, cut from the left to max_prompt_tokens=8"):
        batch = collate(make_items(processor, [(prompt, answer)]))
    assert collate.truncated_prompts == 1
    full = tok(prompt).input_ids
    if processor.is_encoder_decoder:  # text ..., EOS
        assert batch["input_ids"][0].tolist() == full[-8:]
    else:  # BOS, last 7 text tokens, then the answer
        assert batch["input_ids"][0][:8].tolist() == [tok.bos_token_id] + full[-7:]
        assert batch["labels"][0][8:].tolist() == expected_answer_ids(tok, prompt, answer, False)


def test_prompt_cut_warnings_stop_after_a_few_but_all_are_counted(tiny_models):
    processor = tiny_models("instructblip-llama").processor
    collate = InstructionCollator(processor, max_prompt_tokens=8)
    items = make_items(processor, [(EXAMPLES[1][1], "red")] * 7)
    with pytest.warns(UserWarning) as caught:
        collate(items)
    assert collate.truncated_prompts == 7
    assert len(caught) == 5 and "later cuts are only counted" in str(caught[-1].message)


def _byte_level_processor():
    """An OPT/GPT-2-like byte-level BPE: a word's leading space is part of its token."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([q + " " + a for q, a in EXAMPLES] * 3 + ["blue sky red green"], trainer)
    backend.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    return Processor(image_processor=ImageProcessor(size=(28, 28)), tokenizer=tok, qformer_tokenizer=None,
                     num_query_tokens=4, is_encoder_decoder=False)


def test_byte_level_answers_keep_their_leading_space():
    processor = _byte_level_processor()
    tok = processor.tokenizer
    prompt, answer = "Question: what colour is the sky? Answer:", "blue sky"
    batch = InstructionCollator(processor)(make_items(processor, [(prompt, answer)]))
    labels = batch["labels"][0]
    answer_ids = labels[labels != IGNORE_INDEX].tolist()
    assert answer_ids == tok(" blue sky", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert answer_ids[:-1] != tok("blue sky", add_special_tokens=False).input_ids  # the naive way would differ
    assert tok.decode(batch["input_ids"][0], skip_special_tokens=True) == f"{prompt} {answer}"


def test_mixed_pixel_shapes_name_the_items(tiny_models):
    processor = tiny_models("instructblip-llama").processor
    items = make_items(processor)
    items[1]["pixel_values"] = torch.stack([items[1]["pixel_values"]] * 4)  # (4, 3, H, W): a video
    with pytest.raises(ValueError, match=r"test.jsonl:1: \(3, 28, 28\); test.jsonl:2: \(4, 3, 28, 28\)"):
        InstructionCollator(processor)(items)
    with pytest.raises(KeyError, match="missing \\['answer'\\]"):
        InstructionCollator(processor)([{k: v for k, v in items[0].items() if k != "answer"}])


def test_video_batches_run_through_the_model(tiny_models):
    model = tiny_models("instructblip-llama")
    items = make_items(model.processor)
    for item in items:
        item["pixel_values"] = torch.stack([item["pixel_values"], item["pixel_values"].flip(-1)])  # (2, 3, H, W)
    batch = InstructionCollator(model.processor)(items)
    assert batch["pixel_values"].shape == (3, 2, 3, 28, 28)
    model_loss, hand_mean, _ = hand_losses(model, batch)
    assert model_loss == pytest.approx(hand_mean, rel=1e-5)


def test_from_jsonl_files_to_a_training_step(tiny_models, tmp_path):
    """The whole data path: files -> records -> datasets -> balanced sampler -> collator -> loss -> grads."""
    model = tiny_models("instructblip-llama")
    processor = model.processor
    for i in range(6):
        PIL.Image.new("RGB", (36, 30), (40 * i, 100, 200 - 30 * i)).save(tmp_path / f"{i}.png")
    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text("\n".join(json.dumps({"image": f"{i}.png", "question": f"what colour is shape {i}?", "answer": "red"}) for i in range(6)))
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A square."},
        {"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "Blue."}]}], indent=1))
    count = answer_token_counter(processor)
    parts = {}
    for path, task in [(vqa, "short_vqa"), (chat, "dialogue")]:
        records = load_records(path, task, count_tokens=count, max_answer_tokens=256).records
        parts[path.stem] = InstructionDataset(records, name=path.stem, task=task,
                                              image_transform=TrainTransform(processor.image_processor), seed=0)
    sizes = {name: len(ds) for name, ds in parts.items()}
    sampler = BalancedSampler(sizes, mixture_probabilities(sizes), seed=0, num_samples=8)
    loader = DataLoader(ConcatDataset(list(parts.values())), batch_size=4, sampler=sampler,
                        collate_fn=InstructionCollator(processor))
    network = model.model
    network.freeze_for_instruction_tuning()
    network.train()
    for batch in loader:
        network.zero_grad()
        loss = network(**batch).loss
        loss.backward()
        assert torch.isfinite(loss)
        assert network.query_tokens.grad is not None and network.query_tokens.grad.abs().sum() > 0
        assert all(p.grad is None for p in network.language_model.parameters())
    network.eval()


def test_eval_transform_batches_match_the_processor(tiny_models):
    processor = tiny_models("instructblip-opt").processor
    image = PIL.Image.new("RGB", (50, 40), (10, 20, 250))
    item = {"pixel_values": EvalTransform(processor.image_processor)(image), "prompt": "Describe.",
            "qformer_text": "Describe.", "answer": "blue", "source": "x:1"}
    batch = InstructionCollator(processor)([item])
    reference = processor([image], ["Describe."])
    assert torch.equal(batch["pixel_values"], reference["pixel_values"])
    assert torch.equal(batch["qformer_input_ids"], reference["qformer_input_ids"])
