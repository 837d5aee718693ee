"""Tiny benchmark folders in the official layouts, written by the tests (synthetic images, hand-made labels)."""
import json
from pathlib import Path


def _image(path: Path, size=(64, 48), color=(200, 40, 40)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


CHAIR_IMAGES = {  # image id -> (instance categories, reference captions)
    11: (["person", "dog"], ["A man with his dog."]),
    12: (["car"], ["A red car parked on the street."]),
    13: (["cat"], ["A cat on a bed."]),
    14: ([], ["An empty road."]),
    15: (["person", "bus"], ["People waiting for a bus."]),
}
COCO_CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 6, "name": "bus"},
                   {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}, {"id": 65, "name": "bed"}]


def write_chair_data(root: Path) -> Path:
    """``root/annotations/{instances,captions}_val2014.json`` + ``root/val2014/*.jpg``."""
    names = {c["name"]: c["id"] for c in COCO_CATEGORIES}
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 64, "height": 48} for i in CHAIR_IMAGES]
    inst = {"images": images, "categories": COCO_CATEGORIES,
            "annotations": [{"id": k, "image_id": i, "category_id": names[c]}
                            for k, (i, (cats, _)) in enumerate(((i, v) for i, v in CHAIR_IMAGES.items()))
                            for c in cats]}
    caps = {"images": images, "annotations": [{"id": i * 10 + k, "image_id": i, "caption": c}
                                              for i, (_, cs) in CHAIR_IMAGES.items() for k, c in enumerate(cs)]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(inst))
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(caps))
    for im in images:
        _image(root / "val2014" / im["file_name"])
    return root


REGIONS = [
    {"id": "r1", "image": "a.jpg", "bbox": [4, 4, 20, 20], "references": ["a man in a red shirt", "the person on the left"],
     "category": "person"},
    {"id": "r2", "image": "a.jpg", "bbox": [30, 10, 30, 30], "references": ["a brown dog", "dog lying down"]},
    {"id": "r3", "image": "b.jpg", "bbox": [0, 0, 64, 48], "references": ["a white bus"], "category": "bus"},
]


def write_regcap_data(root: Path) -> Path:
    """``root/regions.jsonl`` + ``root/images/{a,b}.jpg``; returns the data file."""
    root.mkdir(parents=True, exist_ok=True)
    _image(root / "images" / "a.jpg", (64, 48))
    _image(root / "images" / "b.jpg", (64, 48), (20, 20, 200))
    path = root / "regions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in REGIONS) + "\n")
    return path


PHD_ITEMS = [
    {"image_id": "21", "task": "object", "yes_question": "Is there a dog?", "no_question": "Is there a cat?",
     "hitem": "cat", "gt": "dog", "subject": "dog",
     "context": {"iac": "A sunny day.", "icc": "There is a cat in the picture."}},
    {"image_id": "22", "task": "counting", "yes_question": "Are there two cups?", "no_question": "Are there four cups?",
     "hitem": "four", "gt": "two", "subject": "cup",
     "context": {"iac": "Cups hold tea.", "icc": "Four cups are on the table."}},
    {"image_id": "0", "task": "object", "yes_question": "Is the cat smaller than the mouse?",
     "no_question": "Is the mouse smaller than the cat?", "ccs_description": "A tiny cat next to a huge mouse."},
]


def write_phd_data(root: Path) -> Path:
    """``root/data.json`` + ``root/images/{train2014,val2014,CCS_images}/...`` as the benchmark lays them out."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.json").write_text(json.dumps(PHD_ITEMS))
    _image(root / "images" / "train2014" / "COCO_train2014_000000000021.jpg")
    _image(root / "images" / "val2014" / "COCO_val2014_000000000022.jpg")
    _image(root / "images" / "CCS_images" / "0.png")
    return root
