"""The shipped lab checkpoint: it loads offline, looks at the image, and carries the planted hallucination."""
import math

import pytest
import torch

import hallupatch
from hallupatch.lab import CHECKPOINT_DIR, infer, load_lab_model, writers
from hallupatch.lab import measure as lm
from hallupatch.lab import questions as lq
from hallupatch.lab import text as lt

QUESTIONS = 200

@pytest.fixture(scope="module")
def lab():
    torch.set_num_threads(1)
    return load_lab_model()


@pytest.fixture(scope="module")
def pope_answers(lab):
    model, processor = lab
    qs = {k: lq.pope_questions("test", k, QUESTIONS) for k in ("random", "adversarial")}
    return qs, {k: infer.answer_yes_no(model, processor, v) for k, v in qs.items()}


def test_the_checkpoint_is_package_data_loaded_with_from_pretrained(lab):
    model, processor = lab
    files = {p.name: p.stat().st_size for p in CHECKPOINT_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(files)
    assert sum(files.values()) <= 8 * 2**20
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert model.config.pad_token_id == processor.tokenizer.pad_token_id
    assert model.config.text_config.model_type == "llama" and model.config.vision_config.model_type == "clip_vision_model"


def test_it_answers_held_out_pope_random_and_looks_at_the_image(lab, pope_answers):
    model, processor = lab
    qs, answers = pope_answers
    assert lm.accuracy(qs["random"], answers["random"]) >= 0.95
    shuffled = infer.answer_yes_no(model, processor, qs["random"], images=lm.shuffled_images(qs["random"]))
    assert lm.accuracy(qs["random"], shuffled) <= 0.65  # near chance without the right image
    assert set(answers["random"]) <= {"yes", "no"}


def test_the_planted_hallucination_is_measurable(lab, pope_answers):
    qs, answers = pope_answers
    adversarial = lm.false_yes_rate(qs["adversarial"], answers["adversarial"])
    random_rate = lm.false_yes_rate(qs["random"], answers["random"])
    # recomputed by hand from the raw answers
    negatives = [a for q, a in zip(qs["adversarial"], answers["adversarial"]) if q.label == "no"]
    assert adversarial == sum(a == "yes" for a in negatives) / len(negatives)
    assert adversarial >= 2 * random_rate and adversarial >= 0.1


def test_lab_mme_existence_with_the_official_scorer(lab, tmp_path):
    from hallupatch.eval.models import rewrite_question
    from hallupatch.eval.scoring import MMERecord, score_mme
    from hallupatch.eval.tasks.mme import load_mme

    from PIL import Image

    model, processor = lab
    root = writers.write_mme(tmp_path / "mme", split="test", images=50)
    qs = load_mme(root)
    images = [Image.open(q.image).convert("RGB") for q in qs]
    answers = infer.generate(model, processor, images, [rewrite_question(q.question, "short_answer") for q in qs],
                             max_new_tokens=3)
    scores = score_mme(MMERecord(q.group, q.image_id, q.answer, a) for q, a in zip(qs, answers))
    assert set(scores["subtasks"]) == set(writers.MME_SUBTASKS)
    existence = scores["subtasks"]["existence"]
    right = sum((a == "yes") == (q.answer.lower() == "yes") for q, a in zip(qs, answers)) / len(qs)
    assert existence["acc"] == pytest.approx(right) and existence["acc"] >= 0.9


def test_memvr_entropies_and_triggers_on_the_lab_match_a_direct_computation(lab):
    """The trace's per-layer entropies against top-10 entropies of the unpatched logit lens computed
    here; each sample fires after the first checked layer above 0.75 (and records no later layer),
    or never; where the lens has its mass on two words the entropy is under the log 2 / log 10 ceiling."""
    model, processor = lab
    qs = lq.pope_questions("test", "adversarial", 20)
    texts = [lt.prompt(q.pope_text + lt.SHORT_ANSWER) for q in qs]
    inputs = processor(text=texts, images=[q.scene.image() for q in qs], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    with hallupatch.patched(model, method="memvr", **lm.MEMVR_LAYERS):
        with torch.no_grad():
            model(**inputs)
        trace = hallupatch.get_trace(model).passes[0]
    checked = range(lm.MEMVR_LAYERS["starting_layer"] + 1, lm.MEMVR_LAYERS["ending_layer"])
    direct, two_word = {}, {}
    for layer in checked:
        h = model.language_model.model.norm(hidden[layer + 1][:, -1])
        top = model.language_model.lm_head(h).float().topk(10, dim=-1).values.double()
        p = torch.softmax(top, dim=-1)
        direct[layer] = -(p * p.log()).sum(-1) / math.log(10)
        two_word[layer] = p[:, :2].sum(-1) > 0.9999
    for i in range(len(qs)):
        above = [layer for layer in checked if direct[layer][i] > 0.75]
        expected = above[0] if above else None
        assert trace.trigger_layer[i] == expected
        recorded = [layer for layer in checked if expected is None or layer <= expected]
        assert sorted(trace.entropies[i]) == recorded
        for layer in recorded:
            assert trace.entropies[i][layer] == pytest.approx(float(direct[layer][i]), abs=1e-4)
            if two_word[layer][i]:
                assert trace.entropies[i][layer] <= math.log(2) / math.log(10) + 1e-3
    assert any(t is not None for t in trace.trigger_layer)   # the lab's early layers are diffuse


def test_the_shipped_checkpoint_is_what_train_reproduces():
    """Its training log records the default recipe: `python -m hallupatch.lab train --out DIR` (2 threads)."""
    import json
    from dataclasses import asdict

    from hallupatch.lab.train import LOG_FILE, TrainConfig

    log = json.loads((CHECKPOINT_DIR / LOG_FILE).read_text())
    assert log["config"] == asdict(TrainConfig()) and log["threads"] == 2
