"""Layer-contrast (DoLa) overhead vs vanilla ``generate()``, measured side by side in one run.

Uses the same random-weight LLaVA shapes as ``eval/bench_memvr.py`` and alternates vanilla and patched
runs (apply / remove on the same model, the order flipping every repeat), then prints median latencies
and their ratio for greedy decoding of a fixed number of new tokens.

    python eval/bench_dola.py                          # CPU-sized default shape
    python eval/bench_dola.py --shape llava-1.5-7b     # the published shape (needs a GPU)
    python eval/bench_dola.py --method memvr+dola --candidate-layers 16,18,20
"""
from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hallupatch  # noqa: E402
from bench_memvr import SHAPES, build_llava, timed  # noqa: E402
from hallupatch.engine import get_patch  # noqa: E402


def parse_candidate_layers(text: str):
    if text in ("low", "high"):
        return text
    return [int(part) for part in text.split(",")]


def compare(model, inputs, new_tokens: int, knobs: dict, repeats: int, device: str):
    """Median seconds of vanilla and patched generate, alternating so drift hits both alike."""

    def run():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       repetition_penalty=1.2)

    run()  # warm-up
    vanilla, contrast = [], []
    for repeat in range(repeats):
        for patched in ((False, True) if repeat % 2 == 0 else (True, False)):
            if patched:
                hallupatch.apply(model, **knobs)
                contrast.append(timed(run, device))
            else:
                hallupatch.remove(model)
                vanilla.append(timed(run, device))
    hallupatch.remove(model)
    return statistics.median(vanilla), statistics.median(contrast)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Layer contrast vs vanilla latency, side by side.")
    parser.add_argument("--shape", choices=[*SHAPES, "llava-1.5-7b"], default="cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 / float16 / bfloat16 (default: fp16 on cuda, fp32 on cpu)")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--method", default="dola", help="'dola' or 'memvr+dola'")
    parser.add_argument("--candidate-layers", type=parse_candidate_layers, default=None,
                        help="'low', 'high' or comma-separated hidden-state indices (default: both 'high' and 'low')")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if args.device == "cuda" else torch.float32)

    shape = "published" if args.shape == "llava-1.5-7b" else args.shape
    model, inputs = build_llava(shape, args.device, dtype)
    specs = [args.candidate_layers] if args.candidate_layers is not None else ["high", "low"]
    print(f"shape={args.shape} device={args.device} dtype={dtype} layers={len(model.language_model.model.layers)} "
          f"vocab={model.config.text_config.vocab_size} threads={torch.get_num_threads()} repeats={args.repeats} "
          f"method={args.method} repetition_penalty=1.2")
    print(f"{'case':<44} {'vanilla ms':>11} {'contrast ms':>12} {'ratio':>7} {'target':>7}")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for spec in specs:
            knobs = dict(method=args.method, candidate_layers=spec)
            hallupatch.apply(model, **knobs)
            layers = get_patch(model).methods["dola"].candidates
            hallupatch.remove(model)
            for new_tokens in (1, args.new_tokens):
                base, patched = compare(model, inputs, new_tokens, knobs, args.repeats, args.device)
                label = f"{spec!r} {layers}, {new_tokens} new token{'s' if new_tokens > 1 else ''}"
                target = "1.10" if spec == "high" and new_tokens > 1 else "-"
                print(f"{label:<44} {base * 1e3:>11.1f} {patched * 1e3:>12.1f} {patched / base:>7.3f} {target:>7}")


if __name__ == "__main__":
    main()
