"""Record what transformers 4.51.3 computes on the tiny Qwen2-VL / Qwen2.5-VL checkpoints.

Run in a venv of its own (never the project's):
    python3 -m venv /work/venvs/tf451
    /work/venvs/tf451/bin/pip install torch==2.13.0 transformers==4.51.3 pillow safetensors
    OMP_NUM_THREADS=1 /work/venvs/tf451/bin/python tests/published/record_qwen2_vl.py

It builds the checkpoints with tests/tiny_qwen2_vl.py (seeded, so the drop-in tests rebuild the same weights)
and writes tests/data/qwen2_vl_transformers_4_51_3_<family>.pt: per case the chat text, the processor's
outputs (pixel values as exact per-row sums and squared sums, and the first four rows), the M-RoPE position ids and deltas, the merger's output, the prefill logits at the last positions, and greedy generate's
tokens, step scores and the position ids of every decoding step, plus the weights' digest.
"""
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForVision2Seq, AutoProcessor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import tiny_qwen2_vl as tiny  # noqa: E402

assert transformers.__version__ == "4.51.3", transformers.__version__


def record_case(model, processor, case):
    rows = case["rows"]
    texts = [processor.apply_chat_template(tiny.case_messages(row), tokenize=False, add_generation_prompt=True)
             for row in rows]
    images = [image for row in rows for image in tiny.case_images(row)]
    videos = [video for row in rows for video in tiny.case_videos(row)]
    out = {"texts": list(texts)}   # a copy: 4.51's processor expands the image placeholders in the given list
    inputs = processor(text=texts, images=images or None, videos=videos or None, padding=True, return_tensors="pt")
    out.update({key: value for key, value in inputs.items() if not key.startswith("pixel_values")})
    if images:   # kept small: exact float64 checksums per patch row, and the first rows' values
        pixels = inputs["pixel_values"]
        out["pixel_values_head"] = pixels[:4]
        out["pixel_row_sums"] = pixels.double().sum(dim=1)
        out["pixel_row_square_sums"] = pixels.double().pow(2).sum(dim=1)
    if videos:
        pixels = inputs["pixel_values_videos"]
        out["video_row_sums"] = pixels.double().sum(dim=1)
        out["video_row_square_sums"] = pixels.double().pow(2).sum(dim=1)
    with torch.no_grad():
        extra = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
        position_ids, deltas = model.get_rope_index(input_ids=inputs["input_ids"],   # keywords: Qwen2.5-VL's
                                                    image_grid_thw=inputs.get("image_grid_thw"),   # 4th is not the mask
                                                    video_grid_thw=inputs.get("video_grid_thw"),
                                                    attention_mask=inputs["attention_mask"], **extra)
        out["position_ids"], out["rope_deltas"] = position_ids, deltas
        if images:
            out["image_embeds"] = model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        if videos:
            out["video_embeds"] = model.visual(inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"])
        out["logits"] = model(**inputs).logits[:, -tiny.RECORDED_POSITIONS:]
        steps = []
        handle = model.model.register_forward_pre_hook(
            lambda module, args, kwargs: steps.append(kwargs["position_ids"].clone()), with_kwargs=True)
        generated = model.generate(**inputs, max_new_tokens=tiny.NEW_TOKENS, min_new_tokens=tiny.NEW_TOKENS,
                                   do_sample=False, output_scores=True,
                                   return_dict_in_generate=True)
        handle.remove()
    out["sequences"] = generated.sequences
    out["scores"] = torch.stack(generated.scores, dim=1)        # (batch, steps, vocab)
    out["decode_position_ids"] = torch.stack([p[..., -1] for p in steps[1:]], dim=-1)   # (3, batch, steps - 1)
    if case.get("beams"):   # beam search repeats each sample's patches (the visual inputs have no batch axis)
        with torch.no_grad():
            beams = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                   num_beams=case["beams"], num_return_sequences=case["beams"],
                                   output_scores=True, return_dict_in_generate=True)
        out["beam_sequences"], out["beam_scores"] = beams.sequences, beams.sequences_scores
    # clone: a saved view would carry its whole storage into the file
    return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in out.items()}


def record(family: str, folder: Path) -> dict:
    recording = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": {}}
    for tied in (False, True):
        path = tiny.build_checkpoint(folder / f"{family}_{'tied' if tied else 'untied'}", family, tied=tied)
        model, info = AutoModelForVision2Seq.from_pretrained(path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        model.eval()
        key = "tied" if tied else "untied"
        recording[f"weights_digest_{key}"] = tiny.weights_digest(tiny.weights(family, tied))
        recording[f"state_dict_keys_{key}"] = sorted(model.state_dict())
        recording["attn_implementation"] = model.config._attn_implementation
        for name, case in tiny.CASES.items():
            if tied and name != "two_images":
                continue
            processor = AutoProcessor.from_pretrained(path, **case.get("processor_kwargs", {}))
            processor.tokenizer.padding_side = "left"
            recording["cases"][f"{name}/{key}"] = record_case(model, processor, case)
    return recording


def main():
    data = HERE.parent / "data"
    with tempfile.TemporaryDirectory() as tmp:
        for family in tiny.FAMILIES:
            recording = record(family, Path(tmp))
            target = data / f"qwen2_vl_transformers_4_51_3_{family}.pt"
            torch.save(recording, target)
            print(f"wrote {target} ({target.stat().st_size} bytes, {len(recording['cases'])} cases)")


if __name__ == "__main__":
    main()
