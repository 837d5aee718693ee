"""CHAIR scorer on hand-written captions and annotations; every expected number is worked out by hand."""
import json

import pytest

from hallupatch.eval.chair import (
    ChairWords,
    coco_ground_truth,
    find_coco_annotations,
    load_synonyms,
    sample_image_ids,
    score_captions,
    tokenize,
)

WORDS = ChairWords()

CATEGORIES = [
    {"id": 1, "name": "person"}, {"id": 6, "name": "bus"}, {"id": 18, "name": "dog"},
    {"id": 35, "name": "skis"}, {"id": 62, "name": "chair"}, {"id": 70, "name": "toilet"},
]
INSTANCES = {
    "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (1, 2, 3, 4, 5)],
    "categories": CATEGORIES,
    "annotations": [
        {"image_id": 1, "category_id": 1}, {"image_id": 1, "category_id": 1},
        {"image_id": 1, "category_id": 18}, {"image_id": 1, "category_id": 62},
        {"image_id": 2, "category_id": 6},
        {"image_id": 3, "category_id": 70},
        {"image_id": 5, "category_id": 1}, {"image_id": 5, "category_id": 35},
    ],
}
REFERENCES = {
    "images": [{"id": i} for i in (1, 2, 3, 4, 5)],
    "annotations": [
        {"image_id": 1, "caption": "A man walking his dog."},
        {"image_id": 2, "caption": "Buses on a street next to a traffic light."},
        {"image_id": 3, "caption": "A white toilet."},
        {"image_id": 4, "caption": "An empty field."},
        {"image_id": 5, "caption": "A child on skis."},
    ],
}
GENERATED = [
    # person(women), dog(puppies: synonym + plural), car (hallucinated), dog again (mentioned twice)
    (1, "Two women walk their puppies past a parked car. The dogs look happy."),
    # bus, traffic light (two-word, plural), mouse (mice, hallucinated), fire hydrant (hallucinated)
    (2, "A red bus stops at the traffic lights while mice run by a fire hydrant."),
    # "toilet seat" -> toilet; the later "seat" is dropped because toilet is mentioned; teddy bear hallucinated
    (3, "The toilet seat is up and a teddy bear sits on the seat."),
    # no object at all
    (4, "A quiet morning with nothing in sight."),
    # person x2 (children, people), skis, bird (baby bird), bird (geese), knife (knives): 3 hallucinated
    (5, "Children and people with skis watch a baby bird and geese near knives."),
]


def test_tokenize_treebank_style():
    assert tokenize("The dog's bowl, isn't it? A hot-dog.") == [
        "the", "dog", "'s", "bowl", ",", "is", "n't", "it", "?", "a", "hot-dog", "."]


@pytest.mark.parametrize("plural,singular", [
    ("mice", "mouse"), ("buses", "bus"), ("glasses", "glass"), ("knives", "knife"),
    ("geese", "goose"), ("women", "woman"), ("men", "man"), ("puppies", "puppy"), ("benches", "bench"),
    ("ladies", "lady"), ("giraffes", "giraffe"), ("couches", "couch"), ("calves", "calf"),
    ("policemen", "policeman"), ("hydrants", "hydrant"), ("toothbrushes", "toothbrush"),
    # words already in the vocabulary stay as they are (the original's pattern turned "bus" into "bu")
    ("bus", "bus"), ("skis", "skis"), ("people", "people"), ("children", "children"),
    ("scissors", "scissors"), ("oxen", "oxen"), ("sheep", "sheep"), ("glass", "glass"),
])
def test_singularize(plural, singular):
    assert WORDS.singularize(plural) == singular


@pytest.mark.parametrize("caption,objects", [
    ("Three people and two children.", ["person", "person"]),
    ("Two wine glasses and a glass.", ["wine glass"]),
    ("He eats hot dogs next to his dog.", ["hot dog", "dog"]),
    ("A passenger train on the train tracks.", ["train"]),
    ("A baby bird and a baby.", ["bird", "person"]),
    ("An adult elephant with a bow tie.", ["elephant", "tie"]),
    ("Skis, a ski and scissors.", ["skis", "skis", "scissors"]),
    ("Mice near the keyboard and buses.", ["mouse", "keyboard", "bus"]),
    ("A sofa, a puppy, a kitten and a fridge.", ["couch", "dog", "cat", "refrigerator"]),
    ("Teddy bears on a motor bike by a stop sign.", ["teddy bear", "motorcycle", "stop sign"]),
    ("A seat and a chair.", ["chair", "chair"]),
    ("The seat of the toilet.", ["toilet"]),
    ("A man's iPhone.", ["person", "cell phone"]),
])
def test_caption_objects(caption, objects):
    assert WORDS.objects(caption) == objects


def test_synonym_table_shipped():
    table = load_synonyms()
    assert len(set(table.values())) == 80
    assert table["motor bike"] == "motorcycle" and table["cheesecake"] == "cake"
    assert table["teddybear"] == "teddy bear" and table["iphone"] == "cell phone"


def test_ground_truth_from_instances_and_references():
    gt = coco_ground_truth([INSTANCES], [REFERENCES])
    assert gt == {
        1: {"person", "dog", "chair"},
        2: {"bus", "traffic light"},
        3: {"toilet"},
        4: set(),
        5: {"person", "skis"},
    }


def test_chair_hand_computed(tmp_path):
    (tmp_path / "instances_val2014.json").write_text(json.dumps(INSTANCES))
    (tmp_path / "captions_val2014.json").write_text(json.dumps(REFERENCES))
    inst, caps = find_coco_annotations(tmp_path)
    gt = coco_ground_truth(inst, caps)
    result = score_captions(GENERATED, gt)

    per = {c.image_id: c for c in result.captions}
    assert [c for _, c in per[1].mentioned] == ["person", "dog", "car", "dog"]
    assert per[1].hallucinated == [("car", "car")]
    assert per[2].hallucinated == [("mouse", "mouse"), ("fire hydrant", "fire hydrant")]
    assert [c for _, c in per[3].mentioned] == ["toilet", "teddy bear"]
    assert per[4].mentioned == [] and per[4].chair_s == 0 and per[4].chair_i == 0.0
    assert [c for _, c in per[5].mentioned] == ["person", "person", "skis", "bird", "bird", "knife"]
    assert per[5].chair_i == pytest.approx(3 / 6)
    assert per[1].recalled == ["dog", "person"]  # chair is in the image but not mentioned
    assert [per[i].num_words for i in (1, 2, 3, 4, 5)] == [15, 14, 12, 8, 13]

    # CHAIRs: captions 1, 2, 3, 5 hallucinate -> 4/5.
    assert result.chair_s == pytest.approx(4 / 5)
    # CHAIRi: mentions 4 + 4 + 2 + 0 + 6 = 16, hallucinated 1 + 2 + 1 + 0 + 3 = 7 (repeats counted).
    assert result.num_mentions == 16 and result.num_hallucinated == 7
    assert result.chair_i == pytest.approx(7 / 16)
    # Recall: distinct gt objects mentioned 2 + 2 + 1 + 0 + 2 = 7 of 3 + 2 + 1 + 0 + 2 = 8.
    assert result.recall == pytest.approx(7 / 8)
    assert result.avg_len == pytest.approx((15 + 14 + 12 + 8 + 13) / 5)
    assert result.metrics()["num_captions"] == 5
    assert json.loads(json.dumps(per[2].to_dict()))["CHAIRs"] == 1


def test_unknown_image_and_missing_files(tmp_path):
    gt = coco_ground_truth([INSTANCES], [REFERENCES])
    with pytest.raises(KeyError, match="image_id 99"):
        score_captions([(99, "A dog.")], gt)
    with pytest.raises(FileNotFoundError, match="instances_"):
        find_coco_annotations(tmp_path)
    missing = tmp_path / "nope" / "instances_val2014.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        coco_ground_truth([missing], [])


def test_ground_truth_restricted_to_image_ids():
    gt = coco_ground_truth([INSTANCES], [REFERENCES], image_ids=[2, 5])
    assert set(gt) == {2, 5}


def test_seeded_sample():
    ids = list(range(100, 200))
    a = sample_image_ids(ids, 10, seed=3)
    assert a == sample_image_ids(reversed(ids), 10, seed=3)
    assert len(set(a)) == 10 and set(a) <= set(ids)
    assert a != sample_image_ids(ids, 10, seed=4)
    assert sample_image_ids(ids, None) == ids
    with pytest.raises(ValueError, match="positive"):
        sample_image_ids(ids, 0)
