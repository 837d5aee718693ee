"""MemVR overhead vs vanilla ``generate()``, measured side by side in one run.

Builds a random-weight LLaVA-shaped model, then alternates vanilla and MemVR runs (apply / remove on
the same model) and prints median latencies and their ratio for
  (a) prefill + 1 new token (how MME is run) and
  (b) 32 new tokens,
with MemVR's trigger firing in the first checked layer (threshold 0) and, for reference, never firing.

    python eval/bench_memvr.py                                  # LLaVA, CPU-sized default
    python eval/bench_memvr.py --shape llava-1.5-7b             # the published shape (needs a GPU)
    python eval/bench_memvr.py --family qwen|chatglm [--shape published]

MemVR runs with the family's published window (LLaVA 5-16, Qwen-VL-Chat / GLM-4V 9-16).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import hallupatch
import hallupatch.spec

FAMILIES = ("llama", "qwen", "chatglm")
SHAPES = {  # LLaVA-shaped random models
    # hidden, intermediate, layers, heads, vocab, vision (hidden, layers, image size)
    # "cpu" keeps LLaVA-1.5-7B's share of the LM head in a decoding step (about 2%): MemVR's cost is
    # one early-exit LM-head evaluation per token, so its ratio depends on that share, not on size.
    "cpu": dict(hidden=512, intermediate=1376, layers=18, heads=8, vocab=2048, vision=(64, 2, 336)),
    # the real 32000-token vocabulary on a CPU-sized decoder: the LM head is ~37% of a decoding step
    "cpu-vocab32k": dict(hidden=256, intermediate=688, layers=18, heads=8, vocab=32000, vision=(64, 2, 336)),
    "tiny": dict(hidden=32, intermediate=64, layers=18, heads=2, vocab=256, vision=(32, 1, 28)),  # smoke tests
    "published": dict(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32064, vision=(1024, 24, 336)),
}


def head_share(model) -> float:
    """The LM head's share of the weights a decoding step multiplies with (decoder layers + head)."""
    parts = hallupatch.spec.resolve(model)
    layers = sum(p.numel() for p in parts.layers.parameters() if p.dim() == 2)
    head = parts.lm_head.weight.numel()
    return head / (layers + head)


def build_case(family: str, shape: str, device: str, dtype: torch.dtype):
    """``(model, generate_kwargs)``: a random-weight model of the family and shape, one one-image prompt."""
    if family == "llama":
        return build_llava(shape, device, dtype)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the remote-code stand-ins
    import tiny_remote

    return tiny_remote.build_benchmark_case(family, shape, device=device, dtype=dtype)


def build_llava(shape: str, device: str, dtype: torch.dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    s = SHAPES[shape]
    vision_hidden, vision_layers, image_size = s["vision"]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision_hidden, intermediate_size=4 * vision_hidden, num_hidden_layers=vision_layers,
            num_attention_heads=max(1, vision_hidden // 64), image_size=image_size, patch_size=14,
        ).to_dict(),
        text_config=LlamaConfig(
            vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
            num_hidden_layers=s["layers"], num_attention_heads=s["heads"], max_position_embeddings=4096,
            pad_token_id=0,
        ).to_dict(),
        image_token_index=s["vocab"] - 1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    prompt_len = 40
    input_ids = torch.randint(1, s["vocab"] - 1, (1, prompt_len), device=device)
    input_ids[0, 5] = config.image_token_index
    pixel_values = torch.randn(1, 3, image_size, image_size, device=device, dtype=dtype)
    return model, dict(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids))


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(model, inputs, new_tokens: int, threshold: float, repeats: int, device: str):
    """Median seconds of vanilla and MemVR generate, runs interleaved (order flipping) so drift hits both alike."""
    def run():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    vanilla, memvr = [], []
    run()  # warm-up
    for repeat in range(repeats):
        for patched in ((False, True) if repeat % 2 == 0 else (True, False)):  # order flips every repeat
            if patched:
                hallupatch.apply(model, "memvr", entropy_threshold=threshold)  # the family's published window
                memvr.append(timed(run, device))
                triggers = hallupatch.get_trace(model).trigger_layers()[0]
            else:
                hallupatch.remove(model)
                vanilla.append(timed(run, device))
    hallupatch.remove(model)
    return statistics.median(vanilla), statistics.median(memvr), triggers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="MemVR vs vanilla latency, side by side.")
    parser.add_argument("--family", choices=FAMILIES, default="llama")
    parser.add_argument("--shape", choices=[*SHAPES, "llava-1.5-7b"], default="cpu",
                        help="cpu-sized, or the published model's shape (llava-1.5-7b, Qwen-VL-Chat, GLM-4V-9b); "
                        "qwen and chatglm have cpu, tiny and published")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens of case (b)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 / float16 / bfloat16 (default: fp16 on cuda, fp32 on cpu)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if args.device == "cuda" else torch.float32)

    shape = "published" if args.shape == "llava-1.5-7b" else args.shape
    model, inputs = build_case(args.family, shape, args.device, dtype)
    hallupatch.apply(model, "memvr")
    config = model._hallupatch.configs["memvr"]
    hallupatch.remove(model)
    print(f"family={args.family} shape={shape} device={args.device} dtype={dtype} "
          f"layers={hallupatch.spec.resolve(model).num_layers} LM-head share={head_share(model):.1%} repeats={args.repeats} "
          f"(MemVR window {config.starting_layer}-{config.ending_layer}, ratio {config.retracing_ratio})")
    print(f"{'case':<34} {'vanilla ms':>11} {'memvr ms':>10} {'ratio':>7} {'target':>7}  first triggers")
    with torch.no_grad():
        for label, new_tokens, threshold, target in [
            ("(a) prefill + 1 token, fires early", 1, 0.0, "1.05"),
            (f"(b) {args.new_tokens} tokens, fires early", args.new_tokens, 0.0, "1.03"),
            ("(a) prefill + 1 token, never fires", 1, 2.0, "-"),
            (f"(b) {args.new_tokens} tokens, never fires", args.new_tokens, 2.0, "-"),
        ]:
            base, patched, triggers = compare(model, inputs, new_tokens, threshold, args.repeats, args.device)
            print(f"{label:<34} {base * 1e3:>11.1f} {patched * 1e3:>10.1f} {patched / base:>7.3f} {target:>7}  {triggers[:4]}")


if __name__ == "__main__":
    main()
