"""Region-caption scoring: pycocoevalcap agreement, an independent ROUGE-L, CHAIR against references, prompts, data."""
import json
import pickle

import pytest

from hallupatch.eval import regcap
from hallupatch.eval.regcap import (
    REGION_PROMPTS,
    RegionSample,
    caption_metrics,
    load_refcocog,
    load_region_samples,
    region_ground_truth,
    region_prompt,
    score_region_captions,
)

needs_java = pytest.mark.skipif(not regcap.java_available(),
                                 reason="no Java runtime on PATH: pycocoevalcap's tokenizer and METEOR need one "
                                        "(.ci/run installs default-jre-headless)")

# Lower-case, unpunctuated text, so that the PTB tokenizer is a plain whitespace split.
REFS = {
    "a": ["a man riding a red bike", "person on a bicycle in the street"],
    "b": ["two dogs playing in the grass", "dogs running on a lawn"],
    "c": ["the woman holding an umbrella", "a lady with a black umbrella"],
}
PREDS = {"a": "a man on a red bike", "b": "two dogs in the grass", "c": "a woman holding a cat"}


def rouge_l_reference(candidate, references, beta=1.2):
    """ROUGE-L as the COCO toolkit defines it, with a plain LCS table."""
    cand = candidate.split()
    precs, recs = [], []
    for ref in references:
        r = ref.split()
        table = [[0] * (len(cand) + 1) for _ in range(len(r) + 1)]
        for i in range(1, len(r) + 1):
            for j in range(1, len(cand) + 1):
                table[i][j] = table[i - 1][j - 1] + 1 if r[i - 1] == cand[j - 1] else max(table[i - 1][j], table[i][j - 1])
        lcs = table[-1][-1]
        precs.append(lcs / len(cand))
        recs.append(lcs / len(r))
    p, rc = max(precs), max(recs)
    return ((1 + beta ** 2) * p * rc) / (rc + beta ** 2 * p) if p and rc else 0.0


@pytest.fixture(scope="module")
def direct_scores():
    """The toolkit called directly, as its own example script does."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": r} for r in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in PREDS.items()})
    meteor = Meteor()
    out = {
        "BLEU-4": Bleu(4).compute_score(gts, res)[0][3],
        "METEOR": meteor.compute_score(gts, res)[0],
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr": Cider().compute_score(gts, res)[0],
    }
    del meteor
    return out


@needs_java
def test_caption_metrics_match_pycocoevalcap(direct_scores):
    ours = caption_metrics(REFS, PREDS)
    assert set(ours) == set(regcap.CAPTION_METRICS)
    for name, value in direct_scores.items():
        assert ours[name] == pytest.approx(float(value), abs=1e-9), name
    # Independent check of ROUGE-L, and sanity ranges for the rest.
    expected_rouge = sum(rouge_l_reference(PREDS[k], REFS[k]) for k in REFS) / len(REFS)
    assert ours["ROUGE-L"] == pytest.approx(expected_rouge, abs=1e-12)
    assert 0 < ours["METEOR"] < 1 and 0 < ours["BLEU-4"] < 1 and ours["CIDEr"] > 0


def test_caption_metrics_without_java(monkeypatch):
    monkeypatch.setattr(regcap.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="default-jre-headless"):
        caption_metrics(REFS, PREDS)


def test_caption_metrics_key_mismatch():
    with pytest.raises(ValueError, match="same keys"):
        caption_metrics(REFS, {"a": "x"})


def test_region_chair_against_references():
    samples = [
        RegionSample("a", "img1.jpg", (0, 0, 10, 10), REFS["a"], category="person"),
        RegionSample("b", "img2.jpg", (0, 0, 10, 10), REFS["b"]),
        RegionSample("c", "img3.jpg", (0, 0, 10, 10), REFS["c"]),
    ]
    gt = region_ground_truth(samples)
    assert gt == {"a": {"person", "bicycle"}, "b": {"dog"}, "c": {"person", "umbrella"}}
    scores, chair = score_region_captions(samples, PREDS, with_caption_metrics=False)
    # a: person, bicycle (bike) -> ok; b: dog -> ok; c: person ok, cat hallucinated.
    assert scores["CHAIRs"] == pytest.approx(1 / 3)
    assert scores["CHAIRi"] == pytest.approx(1 / 5)
    assert chair.captions[2].hallucinated == [("cat", "cat")]
    with pytest.raises(ValueError, match="no prediction"):
        score_region_captions(samples, {"a": "x"}, with_caption_metrics=False)


def test_region_prompts():
    # 200x100 image, box x=20 y=10 w=40 h=30 (x2=60, y2=40). LLaVA pads to a 200x200 square, image
    # pasted 50 px down: [20/200, 60/200, 60/200, 90/200].
    assert region_prompt("llava-hf", (20, 10, 40, 30), 200, 100) == (
        "Please provide a short description for this region: [0.10, 0.30, 0.30, 0.45]")
    # Qwen-VL / GLM-4V: integer coordinates in [0, 1000) of the unpadded image.
    assert "<box>(100,100),(300,400)</box>" in region_prompt("qwen-vl", (20, 10, 40, 30), 200, 100)
    assert "[[100,100,300,400]]" in region_prompt("glm-4v", (20, 10, 40, 30), 200, 100)
    # A full-image box stays inside [0, 999].
    assert "<box>(0,0),(999,999)</box>" in region_prompt("qwen-vl", (0, 0, 200, 100), 200, 100)
    assert region_prompt("qwen2-vl", (20, 10, 40, 30), 200, 100).startswith(
        "<|object_ref_start|>the region<|object_ref_end|><|box_start|>(100,100),(300,400)<|box_end|>")
    assert '{"bbox_2d": [20, 10, 60, 40]}' in region_prompt("qwen2.5-vl", (20, 10, 40, 30), 200, 100)
    assert set(REGION_PROMPTS) == {"llava-hf", "llava", "qwen-vl", "glm-4v", "qwen2-vl", "qwen2.5-vl"}
    with pytest.raises(ValueError, match="known"):
        region_prompt("blip", (0, 0, 1, 1), 10, 10)


def test_load_region_samples(tmp_path):
    path = tmp_path / "regions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "r1", "image": "a.jpg", "bbox": [1, 2, 3, 4], "references": ["a dog"], "category": "dog"},
        {"id": "r2", "image": "b.jpg", "bbox": [0, 0, 5, 5], "caption": "a cat"},
    ]))
    samples = load_region_samples(path)
    assert [s.sample_id for s in samples] == ["r1", "r2"]
    assert samples[0].bbox == (1.0, 2.0, 3.0, 4.0) and samples[1].references == ["a cat"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": 1, "image": "a.jpg", "references": ["x"]}]))
    with pytest.raises(ValueError, match="bbox"):
        load_region_samples(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_region_samples(tmp_path / "missing.json")


def test_load_refcocog(tmp_path):
    refs = [
        {"ref_id": 7, "ann_id": 100, "image_id": 5, "split": "val", "category_id": 18,
         "sentences": [{"sent": "the brown dog"}, {"sent": "dog on the left"}]},
        {"ref_id": 8, "ann_id": 101, "image_id": 5, "split": "train", "category_id": 1,
         "sentences": [{"sent": "a man"}]},
    ]
    inst = {"images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 640, "height": 480}],
            "annotations": [{"id": 100, "image_id": 5, "category_id": 18, "bbox": [1, 2, 30, 40]},
                            {"id": 101, "image_id": 5, "category_id": 1, "bbox": [5, 5, 5, 5]}],
            "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]}
    (tmp_path / "refs(umd).p").write_bytes(pickle.dumps(refs))
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    samples = load_refcocog(tmp_path / "refs(umd).p", tmp_path / "instances.json", split="val")
    assert len(samples) == 1
    s = samples[0]
    assert (s.sample_id, s.image, s.bbox, s.category) == ("7", "COCO_train2014_000000000005.jpg",
                                                          (1.0, 2.0, 30.0, 40.0), "dog")
    assert s.references == ["the brown dog", "dog on the left"]
    with pytest.raises(FileNotFoundError, match="nothing.p"):
        load_refcocog(tmp_path / "nothing.p", tmp_path / "instances.json")


# ---------------------------------------------------------------- the region-caption paper's references
def test_paper_references_one_caption_per_region_and_its_objects_only(tmp_path):
    import json

    from caption_data import write_regcap_data
    from hallupatch.eval.data import DataError
    from hallupatch.eval.regcap import load_paper_references
    from hallupatch.eval.tasks.regcap import load_regcap

    data = write_regcap_data(tmp_path)
    paper = tmp_path / "captions_refcocog_gt.json"
    captions = {"r1": "a man near a dog", "r2": "a brown dog", "r3": "a white bus"}
    paper.write_text(json.dumps({"images": [{"id": k} for k in captions],
                                 "annotations": [{"id": k, "image_id": k, "caption": v} for k, v in captions.items()]}))
    predictions = {"r1": "a man with a dog", "r2": "a brown dog and a cat", "r3": "a white bus"}
    default = load_regcap(data, None, need_images=False).samples
    as_paper = load_regcap(data, None, need_images=False, references=paper).samples
    assert [s.references for s in as_paper] == [[captions[s.sample_id]] for s in default]
    assert region_ground_truth(as_paper) == {"r1": {"person", "dog"}, "r2": {"dog"}, "r3": {"bus"}}
    # default: r1's references and category name a person only, so its dog is a hallucination; the paper's
    # single caption mentions the dog. r2's cat is hallucinated either way.
    assert score_region_captions(default, predictions, with_caption_metrics=False)[0]["CHAIRs"] == pytest.approx(2 / 3)
    assert score_region_captions(as_paper, predictions, with_caption_metrics=False)[0]["CHAIRs"] == pytest.approx(1 / 3)
    paper.write_text(json.dumps({"annotations": [{"image_id": "r1", "caption": "x"}]}))
    with pytest.raises(DataError, match=r"no caption for region\(s\) \['r2', 'r3'\]"):
        load_regcap(data, None, need_images=False, references=paper)
    paper.write_text(json.dumps({"annotations": [{"image_id": "r1", "caption": "x"}, {"image_id": "r1", "caption": "y"}]}))
    with pytest.raises(DataError, match="region r1 has two captions"):
        load_paper_references(paper)
    paper.write_text(json.dumps([{"image_id": "r1", "caption": "x"}]))
    with pytest.raises(DataError, match="captions_refcocog_gt.json"):
        load_paper_references(paper)


@needs_java
def test_paper_references_through_the_command_line(tmp_path):
    import json

    from caption_data import write_regcap_data
    from hallupatch.eval import cli

    data = write_regcap_data(tmp_path)
    paper = tmp_path / "gt.json"
    paper.write_text(json.dumps({"annotations": [{"image_id": k, "caption": v} for k, v in
                                                 {"r1": "a man near a dog", "r2": "a brown dog", "r3": "a white bus"}.items()]}))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": k, "text": v}) + "\n" for k, v in
                               {"r1": "a man with a dog", "r2": "a brown dog and a cat", "r3": "a white bus"}.items()))
    scores = cli.run(["regcap", "--answers", str(answers), "--data", str(data), "--references", str(paper),
                      "--output", str(tmp_path / "out")])
    assert scores["CHAIRs"] == pytest.approx(1 / 3) and scores["num_samples"] == 3
