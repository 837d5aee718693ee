"""LLaVA-NeXT in the eval harness with images of mixed sizes in one batch (issue 21, item 12).

transformers 4.40 can neither pad LLaVA-NeXT's anyres patch grids in the processor nor stack images with
different numbers of visual tokens in the model, so the harness answers such a batch in groups of one
image size; the answers file must equal the one of batch size 1, byte for byte (MemVR's records included).
"""
import shutil

from PIL import Image

from hallupatch.eval import cli
from hallupatch.testing.families import build_checkpoint

KNOBS = ["--method", "memvr", "--starting-layer", "0", "--ending-layer", "3", "--entropy-threshold", "0.3"]


def test_llava_next_batch_of_mixed_image_sizes_equals_batch_size_1(tmp_path, mme_folder):
    checkpoint = build_checkpoint(tmp_path / "llava-next", "llava_next")
    data = tmp_path / "MME"
    shutil.copytree(mme_folder, data)
    images = sorted(data.rglob("*.png"))
    for k, path in enumerate(images):
        if k % 2:   # 72 x 48 (a 1 x 2 grid) and 60 x 60 (2 x 2): different numbers of visual tokens
            Image.open(path).resize((60, 60)).save(path)
    assert len({Image.open(p).size for p in images}) == 2

    answers = {}
    for batch_size in ("1", "4"):
        out = tmp_path / f"batch-{batch_size}"
        cli.run(["mme", "--model", str(checkpoint), "--data", str(data), "--batch-size", batch_size,
                 "--output", str(out), "--max-new-tokens", "3", "--no-progress", *KNOBS])
        answers[batch_size] = (out / "answers.jsonl").read_bytes()
    assert answers["4"] == answers["1"]
    assert answers["1"].count(b'"question_id"') == 2 * len(images)
