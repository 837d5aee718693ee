"""Questions per second of `python -m hallupatch.eval` generation at batch size 1 vs 8.

Runs the llava-hf backend (the same code path as the CLI) on the built-in MME sample with two
random-weight models: the tiny embedded default and a larger one. Greedy, a fixed number of new
tokens (random models seldom stop on their own), after one warm-up batch.

    python eval/bench_eval_throughput.py                    # CPU or the first GPU
    python eval/bench_eval_throughput.py --device cuda --questions 64 --max-new-tokens 32
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hallupatch.eval.models import RECIPES, LlavaHFBackend  # noqa: E402
from hallupatch.testing.mme_sample import write_mme_sample  # noqa: E402
from hallupatch.eval.tasks.mme import load_mme_folder  # noqa: E402
from hallupatch.testing.tiny import tiny_llava  # noqa: E402

MODELS = {
    "tiny (embedded default)": dict(num_layers=4, hidden_size=64, image_size=56),
    "larger random": dict(num_layers=8, hidden_size=512, image_size=112),
}


def questions_per_second(backend, questions, batch_size: int, max_new_tokens: int, device: str) -> float:
    backend.generate(questions[:batch_size], max_new_tokens)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(questions), batch_size):
        backend.generate(questions[i:i + batch_size], max_new_tokens)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(questions) / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs=2, default=[1, 8])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if args.device.startswith("cuda") else torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        questions = load_mme_folder(write_mme_sample(Path(tmp) / "mme"))
        questions = (questions * (args.questions // len(questions) + 1))[: args.questions]
        small, large = args.batch_sizes
        print(f"device {args.device}, dtype {str(dtype).replace('torch.', '')}, {len(questions)} questions, "
              f"{args.max_new_tokens} new tokens each, torch threads {torch.get_num_threads()}")
        print(f"{'model':<26}{'params':>10}{f'q/s @{small}':>12}{f'q/s @{large}':>12}{'ratio':>8}")
        for name, shape in MODELS.items():
            model, processor = tiny_llava(seed=0, **shape)
            model = model.to(args.device, dtype)
            backend = LlavaHFBackend(model, processor, RECIPES["llava-hf"], name)
            params = sum(p.numel() for p in model.parameters())
            rates = [questions_per_second(backend, questions, b, args.max_new_tokens, args.device) for b in (small, large)]
            print(f"{name:<26}{params / 1e6:>9.1f}M{rates[0]:>12.2f}{rates[1]:>12.2f}{rates[1] / rates[0]:>7.2f}x")


if __name__ == "__main__":
    main()
