"""Reference outputs of transformers' own DoLa (``generate(dola_layers=...)``, transformers >= 4.43) for a
seeded tiny ``LlamaForCausalLM``, used by ``test_dola_oracle.py`` to check the 4.40 patch against it.

Regenerate (in an environment with a newer transformers; the project pins 4.40, which has no DoLa):

    PYTHONPATH=/path/to/transformers-4.46 python tests/dola_oracle.py
"""
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data" / "dola_oracle_transformers_4_46_3.pt"
PROMPT = [[1, 5, 9, 33, 17, 60, 4]]
STEPS = 12
CASES = [(tie, layers, sample) for tie in (False, True) for layers in ("low", "high", [0, 3, 5, 7]) for sample in (False, True)]


def build_model(tie: bool):
    """An 8-layer, hidden-48 llama whose weights come from a private generator (independent of global RNG)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=8,
                         num_attention_heads=4, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, (3.0 if "lm_head" in name else 1.0) / param.shape[-1] ** 0.5, generator=generator)
    model.tie_weights()
    return model.eval()


def float64_step(final_logits, premature_hidden, head_weight):
    """DESIGN 4c in float64 for one sample and step, from ``generate()``'s outputs: ``final_logits`` (vocab,)
    (``output_logits``), ``premature_hidden`` (candidates, hidden) (each candidate's ``output_hidden_states``
    entry at the last position), ``head_weight`` (vocab, hidden) the LM head. Returns (divergences, index of
    the chosen candidate, expected contrasted scores with ``-inf`` outside the relative-top set)."""
    import math

    log_f = torch.log_softmax(final_logits.double(), -1)
    divergences, log_gs = [], []
    for hidden in premature_hidden:
        log_g = torch.log_softmax(hidden.double() @ head_weight.double().T, -1)
        mix = (log_f.exp() + log_g.exp()) / 2
        # torch's kl_div(input=log p, target=M, reduction="none") is M (log M - log p), averaged over the vocabulary
        divergences.append(0.5 * float((mix * (mix.log() - log_f)).mean() + (mix * (mix.log() - log_g)).mean()))
        log_gs.append(log_g)
    best = max(range(len(divergences)), key=lambda i: divergences[i])
    keep = log_f >= log_f.max() + math.log(0.1)
    expected = torch.where(keep, log_f - log_gs[best], torch.full_like(log_f, -math.inf))
    return divergences, best, expected


def generate_kwargs(sample: bool) -> dict:
    kwargs = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, repetition_penalty=1.2, do_sample=sample,
                  return_dict_in_generate=True, output_scores=True)
    if sample:
        kwargs.update(temperature=0.8, top_k=20)
    return kwargs


def key(tie, layers, sample) -> str:
    return f"tie={tie} layers={layers} sample={sample}"


if __name__ == "__main__":
    import transformers

    results = {"transformers": transformers.__version__}
    for tie, layers, sample in CASES:
        model = build_model(tie)
        torch.manual_seed(123)
        out = model.generate(torch.tensor(PROMPT), dola_layers=layers, **generate_kwargs(sample))
        results[key(tie, layers, sample)] = {"sequences": out.sequences, "scores": torch.stack(out.scores)}
    DATA.parent.mkdir(exist_ok=True)
    torch.save(results, DATA)
    print(f"wrote {DATA} with transformers {transformers.__version__}")
