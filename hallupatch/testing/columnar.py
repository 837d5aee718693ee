"""Tiny LLaVA models whose last decoder layer attends to one chosen token from every later position.

Random tiny weights give diffuse attention: every column product of OPERA underflows and it never rolls
back. Here one token (the "summary" token) writes a key that every query reads, so its column in the
last layer's attention stays large down the whole response window, as OPERA's knowledge-aggregation
pattern does; a logits processor can put that token at a chosen response position.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor

#: a RoPE base so large that the last rotary pair does not rotate over a few hundred positions
STILL_ROPE_BASE = 1e9


def plant_columnar_token(model, token_id: int, strength: float = 12.0, gain: float = 3.0, decoder=None,
                         still_rope: bool = True):
    """Make the last decoder layer of a tiny model attend to ``token_id`` from every later position.

    Embedding dimension 0 becomes a constant ``strength`` (every query reads it), dimension 1 is
    ``strength`` for ``token_id`` only (its key); in every head of the last layer the last rotary
    coordinate maps dimension 0 to the query and dimension 1 to the key with weight ``gain`` (biases of
    those rows zeroed). ``decoder``: the module holding ``layers`` and ``embed_tokens`` (default: a
    ``LlavaForConditionalGeneration``'s); ``still_rope``: raise that layer's RoPE base so the coordinate
    does not rotate (not needed where the base is already large, e.g. Qwen2's 1e6). Returns the model.
    """
    decoder = decoder if decoder is not None else model.language_model.model
    attention = decoder.layers[-1].self_attn
    head_dim = attention.head_dim
    with torch.no_grad():
        embedding = decoder.embed_tokens.weight
        embedding[:, 0] = strength
        embedding[:, 1] = 0.0
        embedding[token_id, 1] = strength
        if still_rope:
            inv_freq = 1.0 / (STILL_ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
            attention.rotary_emb.inv_freq.copy_(inv_freq)
        for projection, heads, column in ((attention.q_proj, attention.num_heads, 0),
                                          (attention.k_proj, attention.num_key_value_heads, 1)):
            for head in range(heads):
                row = head * head_dim + head_dim - 1
                projection.weight[row].zero_()
                if projection.bias is not None:
                    projection.bias[row] = 0.0
                projection.weight[row, column] = gain
    return model


def record_candidate_rows(monkeypatch) -> list:
    """Keep, through pytest's ``monkeypatch``, the beams' sequences that each OPERA iteration's candidates
    extend (one tensor per iteration, appended to the returned list as the search runs)."""
    from hallupatch.methods import opera

    seen: list = []
    original = opera._SampleSearch._candidate_rows

    def spy(self, input_ids, candidates, outputs, model_kwargs):
        seen.append(input_ids.clone())
        return original(self, input_ids, candidates, outputs, model_kwargs)

    monkeypatch.setattr(opera._SampleSearch, "_candidate_rows", spy)
    return seen


class ForceTokenAt(LogitsProcessor):
    """Forces ``token_id`` at response position ``position`` of every row. Positions count from the last
    ``marker_id`` of the row (every prompt ends with it; it is never generated), so the rule is the same
    for a padded row of a batch and for the sample alone."""

    def __init__(self, marker_id: int, position: int, token_id: int):
        self.marker_id, self.position, self.token_id = marker_id, position, token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.marker_id] = float("-inf")
        width = input_ids.shape[1]
        is_marker = input_ids == self.marker_id
        last = torch.where(is_marker, torch.arange(width, device=input_ids.device), -1).amax(dim=1)
        if bool((last < 0).any()):
            raise ValueError("every prompt must end with the marker token")
        rows = (width - 1 - last) == self.position
        scores[rows] = float("-inf")
        scores[rows, self.token_id] = 0.0
        return scores
