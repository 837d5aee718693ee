"""The lab's figures: does the model look, is the planted hallucination there, and what do MemVR and
layer contrast do to it. Knobs are chosen on the dev split; every reported figure is on the test split.

``python -m hallupatch.lab measure`` prints them; :func:`measure` returns them as a dict.
"""
from __future__ import annotations

import contextlib
import json
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import hallupatch
from hallupatch.lab import infer
from hallupatch.lab import questions as lab_questions
from hallupatch.lab import text as lab_text
from hallupatch.lab.model import load_lab_model
from hallupatch.lab.settings import MEMVR_LAYERS, variants

# the normalised entropy lies in [0, 1]; on the lab's early layers it spans most of that range
DEV_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def false_yes_rate(questions: Sequence[lab_questions.YesNo], answers: Sequence[str]) -> float:
    """Share of the "no" questions answered yes (POPE parsing)."""
    negatives = [infer.is_yes(a) for q, a in zip(questions, answers) if q.label == "no"]
    if not negatives:
        raise ValueError("no negative questions to compute a false-yes rate on")
    return sum(negatives) / len(negatives)


def accuracy(questions: Sequence[lab_questions.YesNo], answers: Sequence[str]) -> float:
    """Share of questions answered right (POPE parsing)."""
    if len(questions) != len(answers) or not questions:
        raise ValueError(f"need as many answers as questions, at least one; got {len(questions)} and {len(answers)}")
    return sum(infer.is_yes(a) == (q.label == "yes") for q, a in zip(questions, answers)) / len(questions)


def shuffled_images(questions: Sequence[lab_questions.YesNo]) -> List:
    """Each question's image replaced by another scene's: question ``i`` gets the image of question
    ``i + n/2`` (mod ``n``), which comes from another scene when scenes hold two questions each."""
    n = len(questions)
    return [questions[(i + n // 2) % n].scene.image() for i in range(n)]


def partner_mention_rate(captions: Sequence[str], partners: Sequence[str]) -> float:
    """Share of captions that name their given absent partner."""
    if len(captions) != len(partners) or not captions:
        raise ValueError("need one partner per caption, at least one caption")
    return sum(p in lab_text.caption_objects(c) for c, p in zip(captions, partners)) / len(captions)


def hallucinated_mention_rate(captions: Sequence[str], scenes: Sequence) -> float:
    """Share of object mentions that name an object not in the scene (CHAIRi on the lab's objects)."""
    named = [(o, s) for c, s in zip(captions, scenes) for o in lab_text.caption_objects(c)]
    return sum(o not in s.labels for o, s in named) / max(1, len(named))


def entropy_profile(model, processor, qs: Sequence[lab_questions.YesNo], batch_size: int = 50) -> Dict[int, Dict[str, float]]:
    """MemVR's normalised top-10 entropy after each checked layer on the prefill pass of the yes/no
    answers (``{layer: {"mean", "max"}}``), read from ``hallupatch.get_trace`` with threshold 1.0, which
    can never be exceeded (the normalised entropy is at most 1), so every checked layer is recorded."""
    values: Dict[int, List[float]] = {}
    with hallupatch.patched(model, method="memvr", entropy_threshold=1.0, **MEMVR_LAYERS):
        for start in range(0, len(qs), batch_size):
            chunk = qs[start:start + batch_size]
            texts = [lab_text.prompt(q.pope_text + lab_text.SHORT_ANSWER) for q in chunk]
            inputs = processor(text=texts, images=[q.scene.image() for q in chunk], return_tensors="pt", padding=True)
            with torch.no_grad():
                model(**inputs)
            for sample in hallupatch.get_trace(model).passes[0].entropies:
                for layer, h in sample.items():
                    values.setdefault(layer, []).append(h)
    return {layer: {"mean": sum(v) / len(v), "max": max(v)} for layer, v in sorted(values.items())}


def split_entropy_profile(model, processor, questions: int, split: str = "test") -> Dict[int, Dict[str, float]]:
    """:func:`entropy_profile` on the first ``questions`` adversarial and ``questions`` random POPE
    questions of ``split`` (on test: the profile ``python -m hallupatch.eval lab`` shows)."""
    qs = lab_questions.pope_questions(split, "adversarial", questions) + \
        lab_questions.pope_questions(split, "random", questions)
    return entropy_profile(model, processor, qs)


def _trigger_layers(model) -> List[Optional[int]]:
    trace = hallupatch.get_trace(model)
    return [p for p in trace.passes[0].trigger_layer] if trace.passes else []


def evaluate_setting(model, processor, split: str, questions: int, captions: int,
                     method: Optional[str] = None, **knobs) -> Dict[str, float]:
    """One method setting on ``split``: false-yes rates, accuracies and caption figures."""
    patch = hallupatch.patched(model, method=method, **knobs) if method else contextlib.nullcontext()
    adversarial = lab_questions.pope_questions(split, "adversarial", questions)
    random_qs = lab_questions.pope_questions(split, "random", questions)
    control = lab_questions.control_questions(adversarial)
    triples = lab_questions.caption_pairs(split, captions)
    with patch:
        adv = infer.answer_yes_no(model, processor, adversarial)
        rnd = infer.answer_yes_no(model, processor, random_qs)
        ctl = infer.answer_yes_no(model, processor, control)
        trig_caps = infer.describe(model, processor, [t for t, _, _ in triples])
        ctl_caps = infer.describe(model, processor, [c for _, c, _ in triples])
    partners = [p for _, _, p in triples]
    return {
        "adversarial_false_yes": false_yes_rate(adversarial, adv),
        "adversarial_accuracy": accuracy(adversarial, adv),
        "control_false_yes": false_yes_rate(control, ctl),
        "random_false_yes": false_yes_rate(random_qs, rnd),
        "random_accuracy": accuracy(random_qs, rnd),
        "partner_mentions_trigger": partner_mention_rate(trig_caps, partners),
        "partner_mentions_control": partner_mention_rate(ctl_caps, partners),
        "hallucinated_mentions_trigger": hallucinated_mention_rate(trig_caps, [t for t, _, _ in triples]),
    }


def choose_threshold(model, processor, questions: int) -> Tuple[float, Dict[float, float]]:
    """MemVR's entropy threshold chosen on **dev**: the best adversarial accuracy (balanced yes/no),
    ties to the higher threshold; returns ``(threshold, {threshold: dev accuracy})``."""
    adversarial = lab_questions.pope_questions("dev", "adversarial", questions)
    scores = {}
    for threshold in DEV_THRESHOLDS:
        with hallupatch.patched(model, method="memvr", entropy_threshold=threshold, **MEMVR_LAYERS):
            scores[threshold] = accuracy(adversarial, infer.answer_yes_no(model, processor, adversarial))
    best = max(scores.items(), key=lambda kv: (kv[1], kv[0]))[0]
    return best, scores


def measure(model_path: Optional[str] = None, questions: int = 200, captions: int = 100, threads: int = 1,
            methods: bool = True, out=print) -> Dict:
    """Print and return the lab's figures (test split; knobs from dev)."""
    torch.set_num_threads(threads)
    model, processor = load_lab_model(model_path)
    figures: Dict = {}
    test = {k: lab_questions.pope_questions("test", k, questions) for k in lab_questions.POPE_KINDS}
    answers = {k: infer.answer_yes_no(model, processor, qs) for k, qs in test.items()}
    for kind, qs in test.items():
        figures[f"pope_{kind}_accuracy"] = accuracy(qs, answers[kind])
        figures[f"pope_{kind}_false_yes"] = false_yes_rate(qs, answers[kind])
    shuffled = infer.answer_yes_no(model, processor, test["random"], images=shuffled_images(test["random"]))
    figures["pope_random_accuracy_shuffled_images"] = accuracy(test["random"], shuffled)
    control = lab_questions.control_questions(test["adversarial"])
    figures["control_false_yes"] = false_yes_rate(control, infer.answer_yes_no(model, processor, control))
    triples = lab_questions.caption_pairs("test", captions)
    trig = infer.describe(model, processor, [t for t, _, _ in triples])
    ctl = infer.describe(model, processor, [c for _, c, _ in triples])
    figures["partner_mentions_trigger"] = partner_mention_rate(trig, [p for _, _, p in triples])
    figures["partner_mentions_control"] = partner_mention_rate(ctl, [p for _, _, p in triples])
    figures["caption_examples"] = [{"objects": list(t.labels), "partner": p, "caption": c}
                                   for (t, _, p), c in list(zip(triples, trig))[:5]]
    out(f"== lab model, test split ({questions} questions per POPE split, {len(triples)} caption pairs)")
    for key, value in figures.items():
        if key != "caption_examples":
            out(f"{key:<42}{value:>8.3f}")
    for ex in figures["caption_examples"]:
        out(f"  scene {ex['objects']} (absent partner {ex['partner']}): {ex['caption']!r}")
    profile = entropy_profile(model, processor, test["adversarial"] + test["random"])
    figures["entropy_profile"] = profile
    out("== MemVR normalised top-10 entropy on the yes/no answers' prefill (0-based layer: mean / max); "
        f"ceiling log2/log10 = {0.30103:.3f} once the mass is on yes/no")
    for layer, stats in profile.items():
        out(f"  layer {layer}: {stats['mean']:.3f} / {stats['max']:.3f}")
    if not methods:
        return figures
    threshold, dev_scores = choose_threshold(model, processor, questions)
    figures["memvr_dev_threshold_scores"] = dev_scores
    figures["memvr_dev_threshold"] = threshold
    out("== MemVR threshold on dev (adversarial accuracy): "
        + ", ".join(f"{t:g}: {s:.3f}" for t, s in dev_scores.items()) + f" -> {threshold:g}")
    rows = {}
    for name, variant in variants(threshold).items():
        method = None if variant.method == "none" else variant.method
        rows[name] = evaluate_setting(model, processor, "test", questions, captions, method, **variant.knobs)
    figures["methods"] = rows
    columns = ["adversarial_false_yes", "control_false_yes", "random_accuracy", "adversarial_accuracy",
               "partner_mentions_trigger", "partner_mentions_control", "hallucinated_mentions_trigger"]
    short = ["adv FY", "ctl FY", "rnd acc", "adv acc", "partner(trig)", "partner(ctl)", "halluc/mention"]
    out("== methods on test")
    out(f"{'setting':<28}" + "".join(f"{s:>15}" for s in short))
    for name, row in rows.items():
        out(f"{name:<28}" + "".join(f"{row[c]:>15.3f}" for c in columns))
    out(json.dumps({k: v for k, v in figures.items() if k != "caption_examples"}, default=str))
    return figures
