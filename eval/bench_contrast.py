"""Two-branch baselines (VCD, ICD, M3ID, PAI) vs vanilla ``generate()``, side by side in one run.

A random-weight LLaVA of ``eval/bench_memvr.py``'s shapes; for each method, batch size and length
(prefill + 1 token, and 32 tokens), vanilla and patched greedy runs alternate (apply / remove on the same
model, the order flipping every repeat) and the medians' ratio is printed. Target (issue 18): <= 2.05x
vanilla at batch 1 (the MemVR paper measured the published VCD at 2.20x). The second branch runs as its
own forward with its own cache (not stacked with the main rows).

    python eval/bench_contrast.py                       # CPU-sized default shape
    python eval/bench_contrast.py --methods vcd,pai --batches 1 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hallupatch  # noqa: E402
from bench_memvr import SHAPES, build_llava, timed  # noqa: E402


def batched(inputs: dict, batch: int) -> dict:
    return {k: v.repeat(batch, *([1] * (v.dim() - 1))) for k, v in inputs.items()}


def method_inputs(method: str, inputs: dict) -> dict:
    """The call's extra inputs: ICD's disturbed prompt (the first 8 tokens replaced)."""
    if method != "icd":
        return {}
    ids = inputs["input_ids"].clone()
    ids[:, :5] = (ids[:, :5] + 1) % 100 + 1
    return {"input_ids_cd": ids}


def compare(model, inputs: dict, method: str, knobs: dict, new_tokens: int, repeats: int, device: str):
    """Median seconds of vanilla and patched greedy generate, interleaved with the order flipping."""
    extra = method_inputs(method, inputs)

    def run(patched: bool):
        model.generate(**inputs, **(extra if patched else {}), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False)

    hallupatch.apply(model, method, **knobs)
    run(True)   # warm-up
    hallupatch.remove(model)
    run(False)
    vanilla, contrast = [], []
    for repeat in range(repeats):
        for patched in ((False, True) if repeat % 2 == 0 else (True, False)):
            if patched:
                hallupatch.apply(model, method, **knobs)
                contrast.append(timed(lambda: run(True), device))
                hallupatch.remove(model)
            else:
                vanilla.append(timed(lambda: run(False), device))
    return statistics.median(vanilla), statistics.median(contrast)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Two-branch baselines vs vanilla latency, side by side.")
    parser.add_argument("--shape", choices=[*SHAPES], default="cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 / float16 / bfloat16 (default: fp16 on cuda, fp32 on cpu)")
    parser.add_argument("--methods", default="vcd,icd,m3id,pai")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if args.device == "cuda" else torch.float32)
    model, single = build_llava(args.shape, args.device, dtype)
    layers = len(model.language_model.model.layers)
    knobs = {"vcd": {"noise_seed": 0}, "icd": {}, "m3id": {}, "pai": {"end_layer": layers}}
    print(f"shape={args.shape} device={args.device} dtype={dtype} layers={layers} prompt={single['input_ids'].shape[1]} "
          f"tokens + 1 image threads={torch.get_num_threads()} repeats={args.repeats} (greedy; medians)")
    print(f"{'method':<6} {'batch':>5} {'new tokens':>10} {'vanilla ms':>11} {'method ms':>10} {'ratio':>7} {'target':>7}")
    with torch.no_grad():
        for method in args.methods.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                inputs = batched(single, batch)
                for new_tokens in (1, args.new_tokens):
                    base, patched = compare(model, inputs, method, knobs[method], new_tokens, args.repeats, args.device)
                    target = "2.05" if batch == 1 else "-"
                    print(f"{method:<6} {batch:>5} {new_tokens:>10} {base * 1e3:>11.1f} {patched * 1e3:>10.1f} "
                          f"{patched / base:>7.3f} {target:>7}", flush=True)


if __name__ == "__main__":
    main()
