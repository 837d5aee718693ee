"""``python -m hallupatch``: MemVR end to end on a tiny random LLaVA built on the spot (no download).

Prints the generated tokens and, for every generated token, the decoder layer after which retracing
fired (or ``-`` when the entropy never crossed the threshold).
"""
from __future__ import annotations

import argparse

import torch

import hallupatch
from hallupatch.testing.tiny import tiny_image, tiny_llava


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hallupatch", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--prompt", default="what is shown in the picture ?", help="question about the image")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--retracing-ratio", type=float, default=0.12)
    parser.add_argument("--entropy-threshold", type=float, default=0.75)
    parser.add_argument("--starting-layer", type=int, default=0, help="0-based, exclusive (the tiny model has 6 layers)")
    parser.add_argument("--ending-layer", type=int, default=5, help="0-based, exclusive")
    args = parser.parse_args(argv)

    model, processor = tiny_llava(seed=0, num_layers=6)
    inputs = processor(text=f"USER: <image>\n{args.prompt} ASSISTANT:", images=tiny_image(0), return_tensors="pt")
    hallupatch.apply(
        model, method="memvr", retracing_ratio=args.retracing_ratio, entropy_threshold=args.entropy_threshold,
        starting_layer=args.starting_layer, ending_layer=args.ending_layer,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False)
    new_tokens = output[0, inputs.input_ids.shape[1]:].tolist()
    trace = hallupatch.get_trace(model)

    print(f"tiny random LLaVA ({len(model.language_model.model.layers)} layers), MemVR "
          f"ratio={args.retracing_ratio} threshold={args.entropy_threshold} "
          f"window=({args.starting_layer}, {args.ending_layer}) exclusive")
    print(f"prompt: {args.prompt}")
    print(f"{'step':>4}  {'token':<14} {'fired after layer':>17}  entropies by layer")
    for step, (token, record) in enumerate(zip(new_tokens, trace.passes)):
        layer = record.trigger_layer[0]
        entropies = " ".join(f"{k}:{v:.2f}" for k, v in sorted(record.entropies[0].items()))
        print(f"{step:>4}  {processor.tokenizer.decode([token]):<14} {'-' if layer is None else layer:>17}  {entropies}")
    print("generated:", processor.tokenizer.decode(new_tokens))


if __name__ == "__main__":
    main()
