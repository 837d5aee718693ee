"""OPERA's cost vs plain 5-beam search and vs greedy decoding, measured side by side in one run.

Builds a random-weight LLaVA-shaped model (``bench_memvr.py``'s shapes), then for each length (32 and 128
new tokens by default) runs greedy, 5-beam search and OPERA (5 beams, its published knobs) on the same
one-image prompt, interleaved (the order rotates every repeat so load drift hits all three alike), and
prints the median latencies and the ratios OPERA / beam and OPERA / greedy. Every run generates exactly
the requested number of tokens (``min_new_tokens``). The MemVR paper measured the published OPERA at 3.66x
greedy on LLaVA-1.5-7B.

    python eval/bench_opera.py                          # CPU-sized default
    python eval/bench_opera.py --shape llava-1.5-7b     # the published shape (needs a GPU)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memvr import SHAPES, build_llava, timed  # noqa: E402  (one place for the benchmark shapes)

import hallupatch  # noqa: E402

MODES = ("greedy", "beam", "opera")
# the `cpu` decoder with a 168-pixel image (144 visual tokens instead of LLaVA-1.5's 576): on a shared 2-core
# machine, 5 beams x 5 candidates over a 600-token prompt do not finish in a sitting
SHAPES.setdefault("cpu-opera", {**SHAPES["cpu"], "vision": (64, 2, 168)})


def run_mode(model, inputs, mode: str, new_tokens: int, beams: int, knobs: dict):
    """Generate ``new_tokens`` tokens in ``mode``; returns OPERA's rollback count (0 otherwise)."""
    if mode == "opera":
        hallupatch.apply(model, "opera", **knobs)
    try:
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       num_beams=1 if mode == "greedy" else beams)
        return len(hallupatch.get_trace(model, "opera").rollbacks[0]) if mode == "opera" else 0
    finally:
        hallupatch.remove(model)


def compare(model, inputs, new_tokens: int, beams: int, knobs: dict, repeats: int, device: str):
    """Median seconds per mode (runs interleaved, order rotating) and OPERA's rollbacks in the last run."""
    times = {mode: [] for mode in MODES}
    rollbacks = 0
    for repeat in range(repeats):
        order = MODES[repeat % 3:] + MODES[:repeat % 3]
        for mode in order:
            result = {}
            seconds = timed(lambda: result.setdefault("rollbacks", run_mode(model, inputs, mode, new_tokens, beams,
                                                                             knobs)), device)
            times[mode].append(seconds)
            if mode == "opera":
                rollbacks = result["rollbacks"]
    return {mode: statistics.median(values) for mode, values in times.items()}, rollbacks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="OPERA vs 5-beam search vs greedy latency, side by side.")
    parser.add_argument("--shape", choices=[*SHAPES, "llava-1.5-7b"], default="cpu-opera")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--fast", action="store_true", help="OPERA's fast setting (threshold 25, 1 candidate)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 / float16 / bfloat16 (default: fp16 on cuda, fp32 on cpu)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if args.device == "cuda" else torch.float32)
    knobs = {"threshold": 25, "num_attn_candidates": 1} if args.fast else {}

    shape = "published" if args.shape == "llava-1.5-7b" else args.shape
    model, inputs = build_llava(shape, args.device, dtype)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"shape={shape} device={args.device} dtype={dtype} threads={torch.get_num_threads()} beams={args.beams} "
          f"opera knobs={knobs or 'published'} repeats={args.repeats} load average={load}")
    print(f"{'new tokens':>10} {'greedy ms':>10} {'beam ms':>10} {'opera ms':>10} {'opera/beam':>11} "
          f"{'opera/greedy':>13} {'beam/greedy':>12} {'rollbacks':>10}")
    with torch.no_grad():
        for mode in MODES:  # warm-up (allocator, one-time checks), once
            run_mode(model, inputs, mode, 2, args.beams, knobs)
        for new_tokens in args.new_tokens:
            medians, rollbacks = compare(model, inputs, new_tokens, args.beams, knobs, args.repeats, args.device)
            g, b, o = (medians[m] for m in MODES)
            print(f"{new_tokens:>10} {g * 1e3:>10.0f} {b * 1e3:>10.0f} {o * 1e3:>10.0f} {o / b:>11.2f} "
                  f"{o / g:>13.2f} {b / g:>12.2f} {rollbacks:>10}")
    if load is not None:
        print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
