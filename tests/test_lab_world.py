"""The lab world, its texts and its data writers: deterministic, disjoint splits, official layouts."""
import json

import numpy as np
import pytest

from hallupatch.lab import questions as lq
from hallupatch.lab import text as lt
from hallupatch.lab import world, writers
from hallupatch.lab.train import TrainConfig

# every training scene the shipped checkpoint saw: scene step*batch + j for the longer stage
TRAINING_SCENES = max(TrainConfig().vision_steps, TrainConfig().language_steps) * TrainConfig().batch_size


def test_scenes_are_deterministic_per_seed():
    a = [world.make_scene("train", i) for i in range(50)]
    b = [world.make_scene("train", i) for i in reversed(range(50))][::-1]
    assert a == b
    assert all(np.array_equal(world.render(x), world.render(y)) for x, y in zip(a[:10], b[:10]))
    # other splits (other seeds) give other scenes
    assert [s.layout for s in world.scenes("dev", 50)] != [s.layout for s in a]


def test_world_statistics_plant_the_prior():
    train = world.scenes("train", 4000)
    trig = [s for s in train if "red circle" in s.labels]
    partner_rate = np.mean(["blue square" in s.labels for s in trig])
    assert 0.85 < partner_rate < 0.95
    labelled = [o for s in train for o in s.objects]
    assert 0.17 < np.mean([o.hidden for o in labelled]) < 0.23
    assert all(s.visible for s in train)  # at least one object drawn
    assert all(1 <= len(s.objects) <= 3 for s in train)
    assert not any(o.hidden for s in world.scenes("test", 500) for o in s.objects)


def test_dev_and_test_scenes_never_equal_training_scenes():
    # a sample of the shipped checkpoint's training scenes (all of them: a few seconds more)
    train = {world.make_scene("train", i).layout for i in range(0, TRAINING_SCENES, 4)}
    evaluation = {s.layout for split in ("dev", "test") for s in world.scenes(split, 3000)}
    assert not train & evaluation
    for split in world.SPLITS:  # by construction: each content belongs to one part of the world
        for s in world.scenes(split, 300):
            assert world.split_of_content(s.labels, [(o.x, o.y, o.size) for o in s.objects]) == split
    dev = {s.layout for s in world.scenes("dev", 3000)}
    test = {s.layout for s in world.scenes("test", 3000)}
    assert not dev & test


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown split"):
        world.make_scene("val", 0)
    with pytest.raises(ValueError, match="non-negative"):
        world.make_scene("train", -1)
    with pytest.raises(ValueError, match="even integer"):
        lq.pope_questions("test", "random", 3)
    with pytest.raises(ValueError, match="evaluation split"):
        lq.pope_questions("train", "random", 10)
    with pytest.raises(ValueError, match="POPE split"):
        lq.pope_questions("test", "hard", 10)
    with pytest.raises(ValueError, match="unknown object"):
        lt.yes_no_question("pink circle")


def test_prompt_words_are_all_in_the_vocabulary():
    tok = lt.build_tokenizer()
    texts = [lt.prompt(lt.yes_no_question(o, f, s)) for o in world.OBJECTS for f in (0, 1)
             for s in (lt.SHORT_ANSWER, lt.YES_NO_SUFFIX)]
    texts += [lt.prompt(c) for c in lt.CAPTION_PROMPTS] + [lt.prompt("Is there a red circle in the image?")]
    for t in texts:
        assert tok.unk_token_id not in tok(t)["input_ids"], t
    ids = tok(lt.prompt("Describe the image."))["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.convert_tokens_to_ids("<image>")) == 1


def test_pope_questions_follow_the_definitions():
    ranking = lq.popularity()
    # triggers open 40% of scenes and bring their partners: the eight most frequent objects
    assert set(ranking[:8]) == set(world.TRIGGERS) | set(world.PARTNERS)
    for kind in lq.POPE_KINDS:
        qs = lq.pope_questions("test", kind, 100)
        assert lq.pope_stats(qs) == {"yes": 50, "no": 50}
        for q in qs:
            assert (q.obj in q.scene.labels) == (q.label == "yes")
        if kind == "adversarial":
            for yes, no in zip(qs[0::2], qs[1::2]):
                assert world.PARTNER_OF[yes.obj] == no.obj
        if kind == "popular":
            for q in qs[1::2]:
                absent = [o for o in ranking if o not in q.scene.labels]
                assert q.obj == absent[0]
    adv = lq.pope_questions("test", "adversarial", 100)
    for a, c in zip([q for q in adv if q.label == "no"], lq.control_questions(adv)):
        trigger = [t for t, p in world.PAIRS.items() if p == a.obj][0]
        assert c.obj == a.obj and c.label == "no" and len(c.scene.objects) == len(a.scene.objects)
        assert trigger not in c.scene.labels and a.obj not in c.scene.labels


def test_writers_use_the_official_layouts(tmp_path):
    from hallupatch.eval.tasks.mme import load_mme
    from hallupatch.eval.tasks.pope import load_pope

    mme = writers.write_mme(tmp_path / "mme", split="test", images=6)
    qs = load_mme(mme)
    assert len(qs) == 12 and {q.group for q in qs} == {"existence"}
    lines = (mme / "existence" / "lab_test_000000.txt").read_text().splitlines()
    assert [line.split("\t")[1] for line in lines] == ["Yes", "No"]
    assert (mme / "existence" / "lab_test_000000.png").is_file()

    pope = writers.write_pope(tmp_path / "pope", split="dev", questions=10)
    rows = [json.loads(line) for line in (pope / "coco_pope_adversarial.json").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == list(range(1, 11))
    assert set(rows[0]) == {"question_id", "image", "text", "label"} and rows[0]["text"].startswith("Is there a ")
    loaded = load_pope(pope)
    assert len(loaded) == 30 and {q.group for q in loaded} == set(lq.POPE_KINDS)

    coco = writers.write_coco(tmp_path / "coco", split="test", images=5)
    inst = json.loads((coco / "annotations" / "instances_val2014.json").read_text())
    caps = json.loads((coco / "annotations" / "captions_val2014.json").read_text())
    assert len(inst["images"]) == 5 and len(caps["annotations"]) == 5
    names = {c["id"]: c["name"] for c in inst["categories"]}
    first = world.make_scene("test", 0)
    assert sorted(names[a["category_id"]] for a in inst["annotations"] if a["image_id"] == inst["images"][0]["id"]) \
        == sorted(first.labels)
    assert (coco / "val2014" / inst["images"][0]["file_name"]).is_file()
    vocab = (coco / writers.CHAIR_VOCABULARY_FILE).read_text().splitlines()
    assert vocab[0] == "red circle, red circles" and len(vocab) == len(world.OBJECTS)
    # deterministic: a second write gives the same files
    again = writers.write_pope(tmp_path / "pope2", split="dev", questions=10)
    assert (again / "coco_pope_random.json").read_text() == (pope / "coco_pope_random.json").read_text()


def test_heldout_scenes_are_fresh_and_built_like_test():
    heldout = world.scenes("heldout", 3000)
    test = world.scenes("test", 3000)
    assert not {s.layout for s in heldout} & {s.layout for s in test}   # a part of the world of its own
    assert not any(o.hidden for s in heldout for o in s.objects)
    # built as test: the same object-count mix and trigger/partner rates (within sampling noise)
    for stat in (lambda s: len(s.objects), lambda s: any(t in s.labels for t in world.TRIGGERS),
                 lambda s: any(world.PARTNER_OF.get(t) in s.labels for t in s.labels)):
        assert abs(np.mean([stat(s) for s in heldout]) - np.mean([stat(s) for s in test])) < 0.06
    qs = lq.pope_questions("heldout", "adversarial", 40)
    assert len(qs) == 40 and all(q.scene.split == "heldout" for q in qs)
    assert writers.pope_rows("heldout", "random", 4)[0]["image"].startswith("lab_heldout_")


def _diff_mask(a: world.Scene, b: world.Scene) -> np.ndarray:
    return np.any(world.render(a) != world.render(b), axis=-1)


@pytest.mark.parametrize("mode", world.WEAK_MODES)
def test_weaken_changes_only_the_weakened_object(mode):
    scene = next(s for s in world.scenes("test", 50) if len(s.visible) >= 2)
    target = scene.visible[0]
    weak = world.weaken(scene, target, mode)
    assert weak.weak == (target,) and weak.labels == scene.labels and weak.layout == scene.layout
    obj = next(o for o in scene.objects if o.name == target)
    full = world.shape_mask(obj.shape, obj.x, obj.y, obj.size)
    changed = _diff_mask(scene, weak)
    assert changed.any() and not (changed & ~full).any()   # other objects and the background as before
    full_pixels, weak_pixels = world.render(scene)[full].astype(float), world.render(weak)[full].astype(float)
    background = np.median(world.render(scene)[~full].astype(float), axis=0)
    if mode == "faint":   # every pixel of the object, nearer the background
        assert changed[full].mean() > 0.9
        assert np.abs(weak_pixels - background).mean() < 0.6 * np.abs(full_pixels - background).mean()
    else:                 # part of the object is not drawn at all
        assert 0.3 < changed[full].mean() < 0.9


def test_weaken_is_deterministic_and_refuses_bad_input():
    scene = world.make_scene("dev", 3)
    assert world.weaken(scene, scene.visible[0]) == world.weaken(scene, scene.visible[0])
    assert np.array_equal(world.render(world.weaken(scene, scene.visible[0])),
                          world.render(world.weaken(world.make_scene("dev", 3), scene.visible[0])))
    with pytest.raises(ValueError, match="only evaluation scenes"):
        world.weaken(world.make_scene("train", 0), world.make_scene("train", 0).visible[0])
    with pytest.raises(ValueError, match="not drawn"):
        world.weaken(scene, world.absent_objects(scene)[0])
    with pytest.raises(ValueError, match="unknown weak mode"):
        world.weaken(scene, scene.visible[0], "blurry")


def test_weak_questions_ask_for_the_weak_object_and_its_look_alike():
    qs = lq.weak_questions("test", 200)
    assert lq.pope_stats(qs) == {"yes": 100, "no": 100}
    modes = set()
    for yes, no in zip(qs[0::2], qs[1::2]):
        assert yes.scene is no.scene and yes.scene.weak == (yes.obj,) and yes.label == "yes" and no.label == "no"
        assert no.obj not in yes.scene.labels and no.obj.split()[1] == yes.obj.split()[1]
        prompted = {world.PARTNER_OF[t] for t in yes.scene.labels if t in world.PARTNER_OF}
        assert yes.obj not in prompted and no.obj not in prompted   # the first cause plays no part
        modes |= {o.weak for o in yes.scene.objects if o.weak}
    assert modes == set(world.WEAK_MODES)
    control = lq.full_evidence(qs)
    assert [(q.obj, q.label, q.scene.index) for q in control] == [(q.obj, q.label, q.scene.index) for q in qs]
    assert not any(q.scene.weak for q in control)
    assert lq.scene_file_name(qs[0].scene).endswith("_weak.png")
    assert lq.scene_file_name(control[0].scene) == lq.scene_file_name(qs[0].scene).replace("_weak", "")


def test_write_weak_writes_pope_files_the_harness_reads(tmp_path):
    from hallupatch.eval.tasks.pope import load_pope

    writers.write_weak(tmp_path, "dev", 10)
    weak = load_pope(tmp_path / "weak.jsonl")
    full = load_pope(tmp_path / "full.jsonl")
    assert [q.group for q in weak] == ["weak"] * 10 and [q.group for q in full] == ["full"] * 10
    assert all(q.image_name.endswith("_weak.png") for q in weak)
    assert [q.question for q in weak] == [q.question for q in full]
    assert (tmp_path / "images" / weak[0].image_name).is_file() and (tmp_path / "images" / full[0].image_name).is_file()


def test_the_readme_states_what_the_training_texts_teach_about_the_prior():
    """The README's figure is recomputed from the training generators (seed 0, the default checkpoint)."""
    from pathlib import Path

    from hallupatch.lab.train import partner_question_yes_share

    taught = partner_question_yes_share(TrainConfig(seed=0))
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert f"{100 * taught['yes_share']:.1f}% of the {taught['questions']:,} questions" in readme
    assert 0.5 < taught["yes_share"] < 0.7   # hidden partners make "yes" the better bet
