"""Speed of layer-contrast decoding against vanilla ``generate()`` on a random-weight tiny LLaVA.

    python eval/bench_dola.py                      # CPU-sized default, candidate_layers="high"
    python eval/bench_dola.py --candidate-layers low --layers 16 --hidden 512 --device cuda

Vanilla and patched runs alternate in one process (apply / remove between them), so drifts in machine
load hit both alike; the medians of the per-run latencies and their ratio are printed. Greedy decoding
with a fixed number of new tokens (``min_new_tokens``), so both sides decode the same number of steps.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hallupatch  # noqa: E402
from hallupatch.engine import get_patch  # noqa: E402
from hallupatch.tiny import tiny_image, tiny_llava  # noqa: E402

PROMPT = "USER: <image>\ndescribe the picture in detail. ASSISTANT:"


def parse_candidate_layers(text: str):
    if text in ("low", "high"):
        return text
    return [int(part) for part in text.split(",")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the tiny model")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny model")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per side (after one warm-up each)")
    parser.add_argument("--candidate-layers", type=parse_candidate_layers, default="high",
                        help="'low', 'high' or comma-separated hidden-state indices")
    parser.add_argument("--method", default="dola", help="'dola' or 'memvr+dola'")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, processor = tiny_llava(seed=0, num_layers=args.layers, hidden_size=args.hidden)
    model.to(args.device)
    inputs = processor(text=[PROMPT] * args.batch, images=[tiny_image(i) for i in range(args.batch)],
                       return_tensors="pt", padding=True).to(args.device)
    generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    repetition_penalty=1.2)

    def timed(patched: bool) -> float:
        if patched:
            hallupatch.apply(model, method=args.method, candidate_layers=args.candidate_layers)
        try:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(**inputs, **generate)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - start
        finally:
            hallupatch.remove(model)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        timed(False), timed(True)  # warm-up
        vanilla, contrast = [], []
        for run in range(args.runs):
            order = (False, True) if run % 2 == 0 else (True, False)
            for patched in order:
                (contrast if patched else vanilla).append(timed(patched))
        hallupatch.apply(model, method=args.method, candidate_layers=args.candidate_layers)
        candidates = get_patch(model).methods["dola"].candidates
        hallupatch.remove(model)

    v, c = statistics.median(vanilla), statistics.median(contrast)
    print(f"model: tiny LLaVA, {args.layers} layers, hidden {args.hidden}, batch {args.batch}, "
          f"{args.new_tokens} new tokens, device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"method: {args.method}, candidate_layers={args.candidate_layers!r} -> hidden-state indices {candidates}")
    print(f"vanilla generate   median {v * 1000:8.1f} ms  ({v / args.new_tokens * 1000:.2f} ms/token)")
    print(f"layer contrast     median {c * 1000:8.1f} ms  ({c / args.new_tokens * 1000:.2f} ms/token)")
    print(f"ratio              {c / v:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
