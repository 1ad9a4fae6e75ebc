"""`python -m finetune.nano --quick`: every stage of the small model's recipe runs, for real,
for a few steps; the result is a checkpoint both loaders read, and a rerun resumes."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, InstructBlipForConditionalGeneration

from finetune.nano.competence import LABELS
from instructblip_core import load_pretrained

# the held-in sets with one short right answer, in the manifest's order
CEILING_SETS = ("vqa_attributes", "counting", "spatial", "ocr", "yes_no")
STAGE_OUTPUTS = ["data/manifest.json", "tokenizers/llm/tokenizer.json", "tokenizers/qformer/tokenizer.json",
                 "vision.safetensors", "llm/config.json", "base/config.json", "stage1/export/config.json",
                 "stage2/export/config.json", "grounding/export/config.json", "instruct/export/config.json", "results.json", "results.md"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nano")
    result = subprocess.run([sys.executable, "-m", "finetune.nano", "--quick", "--out", str(out), "--seed", "3"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_every_stage_ran(quick_run):
    out, log = quick_run
    for name in STAGE_OUTPUTS:
        assert (out / name).exists(), name
    for stage in ("vision step", "text step", "stage1", "stage2", "grounding", "instruct"):
        assert stage in log
    assert "the LLM pretrains in its own process beside the image encoder (1 + 1 threads; all 2 from step 1, with the encoder done)" in log
    for stage in ("stage1", "stage2", "grounding", "instruct"):  # --seed reaches the training stages too
        assert "seed: 3" in (out / f"{stage}.yaml").read_text().splitlines(), stage
    assert any((out / "image_features").rglob("*.safetensors"))  # the stages' shared encodings
    # The grounding stage trains on the grounding loss alone; instruction tuning keeps it beside the LM loss.
    grounded = [json.loads(line) for line in (out / "grounding" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["train/loss"] == m["train/loss_grounding"] for m in grounded if "train/loss" in m)
    tuned = [json.loads(line) for line in (out / "instruct" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss_grounding" in m and "train/loss_lm" in m for m in tuned)
    chat = (out / "competence.md").read_text().splitlines()  # the model card's chat table
    assert chat[0] == "| question | 1 object | 2 objects | 3 objects | 4 objects | 5 objects |"
    assert [row.split(" | ")[0].removeprefix("| ") for row in chat[2:]] == list(LABELS.values())
    told = (out / "ceiling.md").read_text().splitlines()  # the model card's LLM ceiling table
    assert told[0].startswith("| test set | model (image) | LLM told the caption | ")
    assert [row.split(" | ")[0].removeprefix("| ") for row in told[2:]] == list(CEILING_SETS)


def test_result_loads_in_both_implementations_and_answers(quick_run):
    out, _ = quick_run
    export = out / "instruct" / "export"
    ours = load_pretrained(export)
    assert ours.config.num_query_tokens == 16 and ours.config.vision_config.image_size == 64
    reference = InstructBlipForConditionalGeneration.from_pretrained(export, dtype=torch.float32).eval()
    image = next((out / "data" / "caption" / "images").glob("*.png"))
    batch = ours.prepare(str(image), "what colour is the circle?")
    n_query = ours.config.num_query_tokens
    slots = torch.full((1, n_query), ours.config.image_token_index)
    with torch.no_grad():
        expected = reference(pixel_values=batch["pixel_values"], qformer_input_ids=batch["qformer_input_ids"],
                             qformer_attention_mask=batch["qformer_attention_mask"],
                             input_ids=torch.cat([slots, batch["input_ids"]], 1)).logits
        got = ours.model(**batch).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert isinstance(ours.generate(str(image), "what colour is the circle?", max_new_tokens=5)[0], str)


def test_results_cover_every_test_set(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    tests = {e["name"] for e in manifest["entries"] if e["part"] == "test"}
    assert set(results) == tests
    assert {r["split"] for r in results.values()} == {"held_in", "held_out"}
    assert results["classification"]["metric"] == "ranking_accuracy"  # vocabulary ranking over the shapes
    assert results["multiple_choice"]["metric"] == "ranking_accuracy"
    assert all(0 <= r["value"] <= 10 for r in results.values())
    # per question kind: the kinds' scores, weighted by their counts, make up the set's score
    for name in ("vqa_attributes", "counting", "spatial"):
        kinds = results[name]["by_kind"]
        assert sum(k["n"] for k in kinds.values()) == results[name]["n"]
        weighted = sum(k["value"] * k["n"] for k in kinds.values()) / results[name]["n"]
        assert abs(weighted - results[name]["value"]) < 1e-9, name
    assert set(results["vqa_attributes"]["by_kind"]) <= {"colour", "shape", "size"}
    assert "by_kind" not in results["multiple_choice"]  # ranked, not generated: no per-row VQA score


def test_model_card_states_the_measured_accuracy_by_question_kind():
    from finetune.nano.model_card import kinds_sentence

    results = {"vqa_attributes": {"by_kind": {"colour": {"value": 0.576, "n": 106}, "shape": {"value": 0.4, "n": 100},
                                              "size": {"value": 0.702, "n": 94}}},
               "spatial": {"by_kind": {"where": {"value": 0.076, "n": 132}, "neighbour": {"value": 0.2, "n": 71}}}}
    assert kinds_sentence(results) == (
        "Asked about one object of a held-in test scene, it names its colour in 58% (chance 17%), its shape in "
        "40% (chance 20%), its size in 70% (chance 50%) and its place in 8%.")
    assert kinds_sentence({}) == ""


def test_rerun_resumes_instead_of_starting_over(quick_run):
    out, _ = quick_run
    result = subprocess.run([sys.executable, "-m", "finetune.nano", "--quick", "--out", str(out), "--seed", "3", "--until", "stage2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stage1: export exists" in result.stdout and "stage2: export exists" in result.stdout
    assert "vision step" not in result.stdout and "text step" not in result.stdout


def test_the_same_command_in_another_folder_builds_the_same_model_bit_for_bit(quick_run, tmp_path):
    """The recipe is repeatable: same --seed, same tokenizers and weights (the Q-Former's WordPiece
    vocabulary used to differ from run to run, and everything trained after it with it)."""
    out, _ = quick_run
    again = tmp_path / "again"
    result = subprocess.run([sys.executable, "-m", "finetune.nano", "--quick", "--out", str(again), "--seed", "3"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("tokenizers/qformer/tokenizer.json", "tokenizers/llm/tokenizer.json", "vision.safetensors",
                 "llm/model.safetensors", "stage1/export/model.safetensors", "grounding/export/model.safetensors", "instruct/export/model.safetensors"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_ablations_train_each_variant_from_its_start_with_its_settings(quick_run):
    """`python -m finetune.nano.ablations`: the paper's variants beside the full model, each a real
    instruction-tuning run. (2) and the paper's ungrounded full and task-tag models start from stage
    2, so that the instruction's effect can be told apart from grounding's."""
    import yaml

    out, _ = quick_run
    result = subprocess.run([sys.executable, "-m", "finetune.nano.ablations", "--quick", "--out", str(out), "--seed", "3"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    header = (out / "ablations.md").read_text().splitlines()[0]
    assert header == ("| dataset | split | task | metric | full | no_instruction | proportional | task_tags | stage2 | "
                      "no_grounding | task_tags_no_grounding |")
    config = {v: yaml.safe_load((out / f"ablation_{v}.yaml").read_text())
              for v in ("no_instruction", "no_grounding", "task_tags_no_grounding", "proportional", "task_tags")}
    stage2, grounded = str(out / "stage2" / "export"), str(out / "grounding" / "export")
    assert [config[v]["model"] for v in config] == [stage2, stage2, stage2, grounded, grounded]
    assert config["no_instruction"]["qformer_instruction"] is False
    assert config["no_grounding"].get("qformer_instruction", True) is True
    assert {config[v]["grounding_weight"] for v in ("no_instruction", "no_grounding", "task_tags_no_grounding")} == {0.0}
    assert config["proportional"]["grounding_weight"] > 0 and config["proportional"]["sampling"] == "proportional"
    assert config["task_tags"]["prompt_style"] == config["task_tags_no_grounding"]["prompt_style"] == "task_tag"
    assert {c["seed"] for c in config.values()} == {3}
    ablations = json.loads((out / "ablations.json").read_text())
    assert list(ablations) == ["full", "no_instruction", "proportional", "task_tags", "stage2", "no_grounding",
                               "task_tags_no_grounding"]
    assert ablations["full"] == json.loads((out / "results.json").read_text())  # the recipe's own evaluation


def test_pretrainings_trained_side_by_side_equal_each_trained_alone(quick_run, tmp_path):
    """The recipe trains the LLM in a second process beside the image encoder and gives it every
    core once the encoder is done. Trained alone, as a rerun that finds the other one done does,
    each comes out with the same bytes: the schedule changes the time, not the model."""
    out, _ = quick_run
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "data").symlink_to(out / "data")
    shutil.copytree(out / "tokenizers", alone / "tokenizers")
    command = [sys.executable, "-m", "finetune.nano", "--quick", "--out", str(alone), "--seed", "3", "--until"]
    vision = subprocess.run(command + ["vision"], capture_output=True, text=True, timeout=300)
    assert vision.returncode == 0, vision.stderr[-2000:]
    assert "vision step" in vision.stdout and "text step" not in vision.stdout
    text = subprocess.run(command + ["text"], capture_output=True, text=True, timeout=300)
    assert text.returncode == 0, text.stderr[-2000:]
    assert "text step" in text.stdout and "vision step" not in text.stdout and "own process" not in text.stdout
    # and the first checkpoint, assembled by a run that trained neither, follows from the seed alone
    base = subprocess.run(command + ["base"], capture_output=True, text=True, timeout=300)
    assert base.returncode == 0, base.stderr[-2000:]
    for name in ("vision.safetensors", "llm/model.safetensors", "base/model.safetensors"):
        assert (alone / name).read_bytes() == (out / name).read_bytes(), name


def test_the_llm_takes_every_core_at_a_fixed_step_and_waits_there_for_the_encoder():
    """The LLM's arithmetic can depend on the number of threads, so its schedule is tied to its
    steps, never to when the encoder happens to finish: a seed then builds one model."""
    import threading
    import time

    from finetune.nano.side_by_side import llm_thread_schedule, switch_step

    before = torch.get_num_threads()
    try:
        switch = switch_step(100)
        assert switch == 45
        encoder_done = threading.Event()
        schedule = llm_thread_schedule(100, 2, encoder_done)
        threads = []
        for step in range(switch):
            schedule(step)
            threads.append(torch.get_num_threads())
        assert threads == [1] * switch
        finishes = threading.Timer(2.0, encoder_done.set)  # the encoder is done 2 s from now
        started = time.monotonic()
        finishes.start()
        schedule(switch)  # torch's thread count belongs to the calling thread: wait right here
        assert time.monotonic() - started >= 1.9 and torch.get_num_threads() == 2
        # alone (a rerun that finds the encoder done): the same threads at every step, no wait
        alone = llm_thread_schedule(100, 2)
        for step in (0, switch - 1, switch, 99):
            alone(step)
            assert torch.get_num_threads() == (1 if step < switch else 2)
        llm_thread_schedule(100, 1)(0)  # one thread in all: it keeps it
        assert torch.get_num_threads() == 1
        gone = llm_thread_schedule(100, 2, threading.Event(), still_wanted=lambda: False)
        with pytest.raises(SystemExit, match="the recipe that started this LLM pretraining is gone"):
            gone(0)
    finally:
        torch.set_num_threads(before)


def test_the_llm_process_stops_when_the_recipe_is_killed(quick_run, tmp_path):
    """A recipe killed outright cannot stop its daemon; the LLM's process notices and stops, so a
    rerun never finds an orphan still writing the LLM's folder."""
    import os
    import time

    out, _ = quick_run
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from finetune.nano.side_by_side import LLMPretrainingBeside\n"
        "if __name__ == '__main__':\n"
        "    out, work = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "    lines = (out / 'data' / 'corpus.txt').read_text().splitlines()\n"
        "    beside = LLMPretrainingBeside(work / 'llm', out / 'tokenizers' / 'llm', lines, 100000, work / 'nano.log')\n"
        "    while 'text step 0/' not in ((work / 'nano.log').read_text() if (work / 'nano.log').exists() else ''):\n"
        "        pass\n"
        "    print('llm process', beside.process.pid, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    pid = int(next(line for line in killed.stdout.splitlines() if line.startswith("llm process ")).split()[-1])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(pid, 9)
        pytest.fail("the LLM's process went on after its recipe was killed")
    assert not (tmp_path / "llm").exists()


def test_a_failed_llm_process_stops_the_recipe_with_its_reason(tmp_path):
    from finetune.nano.side_by_side import LLMPretrainingBeside

    beside = LLMPretrainingBeside(tmp_path / "llm", tmp_path / "no-tokenizer-here", ["a line"], 2, tmp_path / "nano.log")
    with pytest.raises(RuntimeError, match=r"LLM pretraining failed in its own process \(exit code 1\)"):
        beside.result()
    assert not (tmp_path / "llm").exists()


def test_llm_pretraining_batches_are_length_bucketed_samples_of_the_corpus():
    import random

    from finetune.nano.pretrain_text import length_bucketed_batches

    rng = random.Random(0)
    rows = [[i] * rng.randint(3, 180) for i in range(2000)]  # row i is made of id i, lengths like the corpus
    batches = length_bucketed_batches(rows, 32, random.Random(1))
    drawn = [next(batches) for _ in range(200)]
    assert all(len(b) == 32 for b in drawn)
    assert all(r is rows[r[0]] for b in drawn for r in b)  # real rows, unchanged
    assert all(len({r[0] for r in b}) == 32 for b in drawn)  # no row twice in a batch
    seen = {r[0] for b in drawn for r in b}
    assert len(seen) > 1900  # 6400 draws cover nearly the whole corpus, not one length band
    text = sum(len(r) for b in drawn for r in b)
    padded = sum(max(map(len, b)) * len(b) for b in drawn)
    assert text / padded > 0.9  # random batches of these lengths are about half padding


def test_steps_change_one_stage_budget_and_name_what_is_wrong(capsys):
    from finetune.nano.__main__ import Budget, build_parser

    args = build_parser().parse_args(["--steps", "text=2000", "stage1=250"])
    budget = Budget(False, dict(args.steps))
    assert budget.steps == {**Budget.FULL, "text": 2000, "stage1": 250}
    assert Budget(True, {"instruct": 7}).steps == {**{k: 4 for k in Budget.FULL}, "instruct": 7}  # --quick too
    for bad in ("txt=10", "text=0", "text=ten", "text"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--steps", bad])
        assert f"expected STAGE=STEPS with STAGE one of vision, text, stage1, stage2, grounding, instruct and STEPS >= 1, got '{bad}'" in capsys.readouterr().err


def test_the_encoders_share_of_the_cpu_is_given_back_even_when_its_training_fails():
    """The recipe goes on to the Q-Former stages with every thread; an encoder that raised must not
    leave the rest of the run (or a caller that catches the error) on half the CPU."""
    from finetune.nano.side_by_side import encoder_share_of_the_cpu, threads_restored

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(RuntimeError, match="diverged"):
            with encoder_share_of_the_cpu("cpu"):
                assert torch.get_num_threads() == 1
                raise RuntimeError("diverged")
        assert torch.get_num_threads() == 2
        with encoder_share_of_the_cpu("cuda"):  # a GPU encoder leaves the CPU threads alone
            assert torch.get_num_threads() == 2
        with threads_restored() as threads:  # the alone-LLM path: its schedule changes them per step
            assert threads == 2
            torch.set_num_threads(1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
