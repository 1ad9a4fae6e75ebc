"""The shipped small model (assets/nano-instructblip) on freshly generated samples.

The samples come from the world's "fresh" seed stream, which no training or test set of the
recipe ever drew from, so this measures what the model learnt, not what it memorised.
Thresholds sit safely below the accuracy measured when the model was built (see README).
"""

from pathlib import Path

import pytest
from transformers import InstructBlipForConditionalGeneration

from finetune.nano.ceiling import ceiling, cut_answer
from finetune.nano.competence import competence, table
from finetune.nano.evaluate import evaluate_all
from finetune.nano.splits import FRESH, HELD_IN, Manifest, build_dataset
from instructblip_core import load_pretrained

MODEL = Path(__file__).resolve().parent.parent / "assets" / "nano-instructblip"
SAMPLES = 48
# dataset -> minimum accuracy (0..1) on fresh samples; set from the measured results
# Measured on 48 fresh samples each when the shipped model was built (twelfth build):
# vqa_attributes 0.938 (chance 1/6), counting 0.604 (most frequent answer 0.32), caption CIDEr-D
# 2.578, vqa_compositional 0.417 (eleventh build: 0.854, 0.646, 2.239, 0.375); yes_no is near
# chance (0.59 on the test set), so it is not asserted. The floors, set when the eleventh build
# shipped, sit 1.5-5 standard errors (0.05-0.07 at 48 samples) below the measured values
# (caption: 70% of it) and catch a broken build, loader or preprocessing.
THRESHOLDS: dict[str, float] = {"vqa_attributes": 0.75, "counting": 0.5, "caption": 1.8, "vqa_compositional": 0.25}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh")
    entries = [build_dataset(root, name, seed=0, part=FRESH, count=SAMPLES) for name in THRESHOLDS]
    # evaluate_all reads test parts; the fresh parts play that role here
    return Manifest(root, 0, 64, [e.__class__(**{**e.__dict__, "part": "test"}) for e in entries])


def test_shipped_model_is_small_and_loads_everywhere():
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size <= 50 * 1024**2, f"{size / 1024**2:.1f} MB"
    model = load_pretrained(MODEL)
    assert model.config.num_query_tokens == 16
    InstructBlipForConditionalGeneration.from_pretrained(MODEL)
    assert (MODEL / "README.md").read_text().count("Real photos need a real checkpoint") == 1


def test_accuracy_on_fresh_samples(fresh):
    results = evaluate_all(MODEL, fresh)
    report = {name: round(r["value"], 3) for name, r in results.items()}
    print(report)
    for name, minimum in THRESHOLDS.items():
        assert results[name]["value"] >= minimum, (name, report)
    assert {r["split"] for r in results.values()} >= {HELD_IN}


# What the app's examples gallery and end-to-end test rely on: one-object scenes' colour and size
# and the number of objects in scenes of up to three. Measured over 30 scenes each (twelfth build,
# the recipe's competence.md; the README has the table): colour 100%, size 97%, the number of
# objects 100% for one object, 93% for three (eleventh build: 100%, 100%, 97%, 97%). And what
# grounding brought: one object's attributes among three, colour 93%, shape 80%, size 93%
# (eleventh build 93%, 90%, 100%; seventh build, before grounding, 60 scenes: 33%, 37%, 70%).
ONE_OBJECT_FLOORS = {"colour": 0.9, "size": 0.8, "count_all": 0.9}
AMONG_THREE_FLOORS = {"colour": 0.75, "shape": 0.65, "size": 0.8}


def test_chat_answers_what_the_gallery_promises():
    scores = competence(load_pretrained(MODEL), scenes=12, objects=(1, 3))
    report = table(scores)
    print(report)
    assert report.splitlines()[0] == "| question | 1 object | 3 objects |"
    for kind, minimum in ONE_OBJECT_FLOORS.items():
        one = scores[kind][1]
        assert len(one) == 12 and sum(one) / len(one) >= minimum, (kind, report)
    three = scores["count_all"][3]
    assert sum(three) / len(three) >= ONE_OBJECT_FLOORS["count_all"], report
    for kind, minimum in AMONG_THREE_FLOORS.items():  # the question names one object of three
        asked = scores[kind][3]
        assert sum(asked) / len(asked) >= minimum, (kind, report)


def test_later_turns_keep_what_the_gallery_promises():
    """A user asks more than one question about a picture. Asked as the second turn, after another
    question about the same image (`--follow-up`, twelfth build, 30 one-object scenes): colour
    100%, size 97%, the number of objects 100% (eleventh build: 100%, 93%, 97%)."""
    scores = competence(load_pretrained(MODEL), scenes=12, objects=(1,), follow_up=True)
    report = table(scores)
    print(report)
    for kind, minimum in ONE_OBJECT_FLOORS.items():
        asked = scores[kind][1]
        assert len(asked) == 12 and sum(asked) / len(asked) >= minimum, (kind, report)


def test_competence_command_scores_an_export_with_the_chat_template(tmp_path, capsys):
    """A stage's export keeps its training template; `python -m finetune.nano.competence EXPORT`
    must still ask as the installed model is asked (it used to score exports under their
    training template: colour of a lone object 57% instead of 100% on 30 scenes)."""
    import json
    import shutil

    from finetune.nano.competence import main
    from instructblip_core.prompts import TEMPLATE_KEY, PromptTemplate

    export = Path(shutil.copytree(MODEL, tmp_path / "export"))
    config = json.loads((export / "config.json").read_text())
    config[TEMPLATE_KEY] = PromptTemplate().to_dict()  # what an instruction-tuning export carries
    (export / "config.json").write_text(json.dumps(config))
    shown = []
    for model in (MODEL, export):
        assert main([str(model), "--scenes", "8", "--objects", "1"]) == 0
        shown.append(capsys.readouterr().out)
    assert shown[0] == shown[1]


def test_answers_are_cut_where_the_llm_goes_on_to_the_next_question():
    assert cut_answer("red Question: What colour is") == "red"
    assert cut_answer("top left Is the circle") == "top left"
    assert cut_answer(" yellow triangle What is") == "yellow triangle"
    assert cut_answer("UP Which object") == "UP"
    assert cut_answer("3") == "3"
    assert cut_answer("Question: What") == ""


# What the frozen LLM answers when told the scene's caption: the most a soft prompt describing the
# whole scene can get out of it. Measured on the test sets when the shipped model was built
# (README): a lone object's attributes 100%, 2-5 objects 43-74%. A broken prompt, scene redraw or
# answer cut would show first on one object.
def test_the_frozen_llm_answers_about_a_lone_object_from_its_caption(fresh):
    held_in = Manifest(fresh.root, 0, 64, [e for e in fresh.entries if e.name == "vqa_attributes"])
    results = ceiling(load_pretrained(MODEL), held_in)
    attributes = results["vqa_attributes"]
    print(results)
    assert attributes["n"] == SAMPLES and set(attributes["by_objects"]) <= {1, 2, 3, 4, 5}
    assert attributes["by_objects"][1] >= 0.9, attributes
    assert attributes["value"] >= 0.4, attributes
