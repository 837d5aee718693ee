"""MME and POPE scorers against hand-computed official scores."""
import pytest

from hallupatch.eval.scoring import (
    MME_COGNITION,
    MME_PERCEPTION,
    MMERecord,
    POPERecord,
    mme_tool_lines,
    parse_mme_answer,
    parse_pope_answer,
    pope_metrics,
    score_mme,
    score_pope,
)


def test_official_subtask_names():
    assert MME_PERCEPTION == ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                              "landmark", "artwork", "OCR")
    assert MME_COGNITION == ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


@pytest.mark.parametrize(
    "prediction, label",
    [
        ("yes", "yes"), ("no", "no"),            # exact
        ("Yes", "yes"), ("NO \n", "no"),         # lower-cased; trailing white space changes nothing
        ("  yes", "other"), ("  NO \n", "no"),   # not stripped: leading spaces count, as in the tool
        ("yes, there is", "yes"),                # prefix rule
        ("No.", "no"), ("nope", "no"),           # "no" inside the first four characters
        ("ayes", "yes"),                         # "yes" anywhere in the first four
        ("nyes", "yes"),                         # "yes" is checked before "no"
        ("noyes", "no"),                         # "yes" not inside the first four
        ("the answer is yes", "other"),          # beyond four characters -> other
        ("I don't know", "other"), ("", "other"), ("other", "other"),
    ],
)
def test_parse_mme_answer(prediction, label):
    assert parse_mme_answer(prediction) == label


def _mme_records():
    rows = [
        # existence: image a both right, b one wrong, c both wrong (one "other")
        ("existence", "a.jpg", "Yes", "Yes"), ("existence", "a.jpg", "No", "no"),
        ("existence", "b.jpg", "Yes", "yes, there is"), ("existence", "b.jpg", "No", "Yes"),
        ("existence", "c.jpg", "Yes", "nope"), ("existence", "c.jpg", "No", "I don't know"),
        # count: d one wrong ("  YES  " is "other": the tool does not strip), e both wrong
        ("count", "d.jpg", "Yes", "  YES  "), ("count", "d.jpg", "No", "No."),
        ("count", "e.jpg", "Yes", "The answer is yes"), ("count", "e.jpg", "No", "nyes"),
        # code_reasoning (cognition): all wrong
        ("code_reasoning", "f.png", "Yes", "no"), ("code_reasoning", "f.png", "No", "yes"),
        ("code_reasoning", "g.png", "Yes", "other"), ("code_reasoning", "g.png", "No", ""),
    ]
    return [MMERecord(*r) for r in rows]


def test_score_mme_hand_computed():
    scores = score_mme(_mme_records())
    sub = scores["subtasks"]
    assert list(sub) == ["existence", "count", "code_reasoning"]  # official order
    # existence: 3 of 6 right, 1 of 3 images fully right
    assert sub["existence"]["acc"] == pytest.approx(3 / 6)
    assert sub["existence"]["acc_plus"] == pytest.approx(1 / 3)
    assert sub["existence"]["score"] == pytest.approx(50 + 100 / 3)
    assert sub["existence"]["other_answers"] == 1
    # count: 1 of 4, 0 of 2 images
    assert sub["count"]["score"] == pytest.approx(25 + 0)
    assert sub["count"]["other_answers"] == 2
    # a subtask with all wrong
    assert sub["code_reasoning"]["acc"] == 0 and sub["code_reasoning"]["acc_plus"] == 0
    assert sub["code_reasoning"]["score"] == 0
    assert sub["code_reasoning"]["category"] == "cognition"
    assert scores["perception"] == pytest.approx(50 + 100 / 3 + 25)
    assert scores["cognition"] == 0
    assert all(s["images_not_paired"] == 0 for s in sub.values())


def test_score_mme_perfect_subtask_is_200_and_bad_gt_raises():
    recs = [MMERecord("OCR", "x.jpg", "Yes", "yes"), MMERecord("OCR", "x.jpg", "No", "no")]
    assert score_mme(recs)["subtasks"]["OCR"]["score"] == 200
    assert score_mme(recs)["perception"] == 200
    with pytest.raises(ValueError, match="Yes or No"):
        score_mme([MMERecord("OCR", "x.jpg", "maybe", "yes")])


def _official_tool_scores(lines_by_subtask):
    """Independent re-computation of the official tool on its input lines: two consecutive lines are one
    image; the prediction is the last tab field read with its line break."""
    out = {}
    for subtask, lines in lines_by_subtask.items():
        correct = 0
        plus = 0
        for i in range(0, len(lines), 2):
            both = 0
            for line in lines[i:i + 2]:
                _, _, gt, pred = (line + "\n").split("\t")
                gt, pred = gt.lower(), pred.lower()
                if pred in ("yes", "no"):
                    label = pred
                elif "yes" in pred[:4]:
                    label = "yes"
                elif "no" in pred[:4]:
                    label = "no"
                else:
                    label = "other"
                both += label == gt
            correct += both
            plus += both == 2
        out[subtask] = correct / len(lines) * 100 + plus / (len(lines) / 2) * 100
    return out


def test_tool_lines_rescore_to_the_same_numbers():
    records = _mme_records() + [MMERecord("OCR", "t.jpg", "Yes", "yes\tand\nmore"), MMERecord("OCR", "t.jpg", "No", "no")]
    lines = {}
    for r in records:
        row = {"image": r.image, "question": "Q? Please answer yes or no.", "answer": r.answer, "prediction": r.prediction}
        lines.setdefault(r.subtask, []).extend(mme_tool_lines([row]))
    assert all(len(line.split("\t")) == 4 for ls in lines.values() for line in ls)
    official = _official_tool_scores(lines)
    ours = score_mme(records)["subtasks"]
    assert official.keys() == ours.keys()
    for name in official:
        assert ours[name]["score"] == pytest.approx(official[name])


@pytest.mark.parametrize(
    "prediction, label",
    [
        ("Yes, there is a dog.", "yes"),
        ("No, there is not.", "no"),
        ("no", "no"),
        ("NO", "yes"),                                  # case-sensitive, as published
        ("There is no dog in the image.", "no"),
        ("Not really", "yes"),                          # only lower-case "not" counts
        ("The image shows a cat. There is no dog.", "yes"),  # only the first sentence is read
        ("no,it isn't", "yes"),                         # commas are deleted, not split on
        ("", "yes"),
        ("yes\nno", "yes"),                             # split on single spaces only
        ("It is not a dog", "no"),
    ],
)
def test_parse_pope_answer(prediction, label):
    assert parse_pope_answer(prediction) == label


def test_score_pope_hand_computed():
    random_split = [
        ("Yes, there is a dog.", "yes"),                       # TP
        ("No, there is not.", "no"),                           # TN
        ("no", "yes"),                                         # FN
        ("NO", "no"),                                          # FP
        ("There is no dog in the image.", "no"),               # TN
        ("Not really", "no"),                                  # FP
        ("The image shows a cat. There is no dog.", "yes"),    # TP
        ("no,it isn't", "no"),                                 # FP
        ("", "yes"),                                           # TP
        ("yes\nno", "yes"),                                    # TP
    ]
    popular = [("yes", "yes"), ("yes", "yes"), ("yes", "no"), ("yes", "no")]
    records = [POPERecord("random", label, pred) for pred, label in random_split]
    records += [POPERecord("popular", label, pred) for pred, label in popular]
    scores = score_pope(records)
    assert list(scores["splits"]) == ["random", "popular"]
    r = scores["splits"]["random"]
    assert (r["TP"], r["FP"], r["TN"], r["FN"]) == (4, 3, 2, 1)
    assert r["accuracy"] == pytest.approx(0.6)
    assert r["precision"] == pytest.approx(4 / 7)
    assert r["recall"] == pytest.approx(4 / 5)
    assert r["f1"] == pytest.approx(2 / 3)
    assert r["yes_ratio"] == pytest.approx(0.7)
    p = scores["splits"]["popular"]
    assert (p["accuracy"], p["precision"], p["recall"], p["yes_ratio"]) == (0.5, 0.5, 1.0, 1.0)
    assert p["f1"] == pytest.approx(2 / 3)
    assert scores["mean_f1"] == pytest.approx(2 / 3)
    assert scores["mean_accuracy"] == pytest.approx(0.55)


def test_pope_no_positive_prediction_gives_zero_not_division_error():
    m = pope_metrics(["yes", "no"], ["no", "No"])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"], m["yes_ratio"]) == (0.0, 0.0, 0.0, 0.5, 0.0)
    with pytest.raises(ValueError):
        pope_metrics(["yes"], [])
