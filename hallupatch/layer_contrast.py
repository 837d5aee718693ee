"""Layer-contrast decoding (DoLa and its layer-prior variant), as pure tensor functions (DESIGN §4c).

Layer indices here are *hidden-state indices* (DESIGN §4a): ``0`` is the embedding output, ``k``
(``1 <= k < N``) the raw output of decoder layer ``k`` (the input of 0-based decoder layer ``k``),
``N`` the final-norm output. Candidate premature layers are always ``< N``.

Facts kept from transformers' own DoLa (4.43-4.52, ``generation/utils.py``):

* the candidate sets for ``"low"``/``"high"`` (:func:`candidate_layers`);
* the divergence is ``0.5 * (mean_v kl_div(log p_f, M) + mean_v kl_div(log p_c, M))`` with
  ``torch.nn.functional.kl_div(..., reduction="none")``, i.e. ``KL(M || .)`` and a mean (not a sum)
  over the vocabulary (:func:`layer_divergence`);
* the relative-top filter keeps tokens whose final log-probability is at least
  ``max + log(0.1)``; the output is ``log_softmax(f) - log_softmax(g)`` there and ``-inf``
  elsewhere (:func:`contrast_logits`).

Deliberate difference: the premature layer is chosen *per sample* (transformers averages the
divergence over the batch), so a batched run equals the single runs.
"""
from __future__ import annotations

import math
import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

CandidateSpec = Union[str, Sequence[int]]

#: tokens kept by the relative-top filter: final probability >= RELATIVE_TOP * max probability
RELATIVE_TOP = 0.1


def start_layer(num_layers: int, tied_embeddings: bool) -> int:
    """First hidden-state index usable as a premature layer.

    With tied input/output embeddings the embedding output's early exit is (nearly) the identity,
    so it is skipped: start at 2 when ``num_layers > 2``, 1 when ``num_layers == 2``, else 0.
    Untied embeddings start at 0.
    """
    if not tied_embeddings:
        return 0
    if num_layers > 2:
        return 2
    if num_layers == 2:
        return 1
    return 0


def check_candidate_spec(spec: CandidateSpec) -> CandidateSpec:
    """Validate a candidate-layer spec: ``"low"``, ``"high"`` or a non-empty list of hidden-state indices >= 0.

    Returns the spec with a sequence turned into a list of ints; raises ``ValueError`` otherwise.
    """
    usage = "candidate_layers must be 'low', 'high' or a list of hidden-state indices (0 = embedding output)"
    if isinstance(spec, str):
        if spec not in ("low", "high"):
            raise ValueError(f"{usage}; got {spec!r}")
        return spec
    if spec is None or isinstance(spec, (int, float)) or isinstance(spec, torch.Tensor) and spec.dim() == 0:
        raise ValueError(f"{usage}; got {spec!r}")
    try:
        given = list(spec)
    except TypeError:
        raise ValueError(f"{usage}; got {spec!r}") from None
    if not given:
        raise ValueError(f"{usage}; got an empty list")
    layers = []
    for layer in given:
        try:
            index = operator.index(layer)  # ints, numpy ints, integer scalar tensors; not floats
        except TypeError:
            index = None
        if isinstance(layer, bool) or index is None or index < 0:
            raise ValueError(f"candidate_layers entries must be hidden-state indices >= 0; got {layer!r}")
        layers.append(index)
    return layers


def candidate_layers(spec: CandidateSpec, num_layers: int, tied_embeddings: bool) -> List[int]:
    """Candidate premature layers (hidden-state indices) for ``spec`` on an ``num_layers``-layer model.

    ``"low"``: ``[start]`` if ``start == N // 2`` else ``range(start, N // 2, 2)`` (``range(start, 20, 2)``
    above 40 layers). ``"high"``: ``range(N // 2, N, 2)`` (``range(N - 20, N, 2)`` above 40 layers).
    A list keeps its indices below ``N`` (in the given order), as transformers does.

    Raises ``ValueError`` for an invalid spec (see :func:`check_candidate_spec`) or an empty result.
    """
    n = int(num_layers)
    if n < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    spec = check_candidate_spec(spec)
    if spec == "low":
        start = start_layer(n, tied_embeddings)
        if start == n // 2:
            layers = [start]
        else:
            layers = list(range(start, n // 2, 2)) if n <= 40 else list(range(start, 20, 2))
    elif spec == "high":
        layers = list(range(n // 2, n, 2)) if n <= 40 else list(range(n - 20, n, 2))
    else:
        layers = [layer for layer in spec if layer < n]
    if not layers:
        raise ValueError(
            f"candidate_layers={spec!r} leaves no premature layer for a {n}-layer model "
            f"({'tied' if tied_embeddings else 'untied'} embeddings); pass a list of hidden-state indices in [0, {n - 1}]"
        )
    return layers


def layer_divergence(final_logits: torch.Tensor, premature_logits: torch.Tensor) -> torch.Tensor:
    """DoLa's divergence between the final distribution and each candidate's.

    ``final_logits``: ``(batch, vocab)``; ``premature_logits``: ``(candidates, batch, vocab)``.
    Returns ``(candidates, batch)`` float32: ``0.5 * (mean_v kl_div(log p_f, M) + mean_v kl_div(log p_c, M))``
    with ``M = (p_f + p_c) / 2`` and ``kl_div`` as in torch (``KL(M || .)``, as published).
    """
    return _divergence(F.log_softmax(final_logits.float(), dim=-1), F.log_softmax(premature_logits.float(), dim=-1))


def _divergence(log_final: torch.Tensor, log_premature: torch.Tensor) -> torch.Tensor:
    # kl_div(x, M) is M * (log M - x) elementwise (0 where M = 0), so the two published terms add up to
    # mean_v M (2 log M - log p_f - log p_c): the same quantity with one log and fewer passes. Clamping M
    # before the log keeps M = 0 at 0 (as kl_div's xlogy does, at a fraction of its cost).
    log_final = log_final.unsqueeze(0)
    mix = 0.5 * (log_final.exp() + log_premature.exp())
    log_mix = mix.clamp_min(torch.finfo(mix.dtype).tiny).log()
    return 0.5 * (mix * (2 * log_mix - log_final - log_premature)).mean(-1)


def layer_probabilities(divergence: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Sampling distribution over candidates with a layer prior: ``softmax(softmax(d) + prior)``.

    ``divergence``: ``(candidates, batch)``; ``prior``: ``(candidates,)``. Returns ``(batch, candidates)``.
    """
    d = divergence.float().transpose(0, 1)
    return F.softmax(F.softmax(d, dim=-1) + prior.to(d.device, torch.float32), dim=-1)


def choose_premature(
    divergence: torch.Tensor,
    prior: Optional[torch.Tensor] = None,
    uniform: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample premature layer, as positions into the candidate list: ``(batch,)`` long.

    Without a prior: the candidate with the largest divergence (first one on ties). With a prior:
    a draw from :func:`layer_probabilities`, by inverse CDF of ``uniform`` (``(batch,)`` in [0, 1);
    drawn from torch's global generator when ``None``).
    """
    if prior is None:
        return divergence.argmax(dim=0)
    probs = layer_probabilities(divergence, prior)
    if uniform is None:
        uniform = torch.rand(probs.shape[0], device=probs.device)
    cdf = probs.cumsum(dim=-1)
    chosen = (cdf <= uniform.to(probs.device, torch.float32).unsqueeze(-1)).sum(dim=-1)
    return chosen.clamp(max=probs.shape[-1] - 1)


def contrast_logits(final_logits: torch.Tensor, premature_logits: torch.Tensor) -> torch.Tensor:
    """Relative-top filter and contrast, row by row: ``(batch, vocab)`` float32.

    ``log_softmax(f) - log_softmax(g)`` where ``log_softmax(f) >= max + log(RELATIVE_TOP)`` (the
    arg-max token always passes), ``-inf`` elsewhere.
    """
    return _contrast(F.log_softmax(final_logits.float(), dim=-1), F.log_softmax(premature_logits.float(), dim=-1))


def _contrast(log_final: torch.Tensor, log_premature: torch.Tensor) -> torch.Tensor:
    threshold = log_final.max(dim=-1, keepdim=True).values + math.log(RELATIVE_TOP)
    keep = log_final >= threshold
    # the published filter writes -1e-3 on the premature side outside `keep`; those
    # entries end as -inf either way
    return torch.where(keep, log_final - log_premature, float("-inf"))


def select_and_contrast(
    final_logits: torch.Tensor,
    premature_logits: torch.Tensor,
    prior: Optional[torch.Tensor] = None,
    uniform: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One decoding step of §4c for a batch.

    ``final_logits``: ``(batch, vocab)``; ``premature_logits``: ``(candidates, batch, vocab)``.
    Returns ``(contrasted (batch, vocab) float32, chosen (batch,) positions into the candidates,
    divergence (candidates, batch) or None)``. With a single candidate no divergence is computed and
    that candidate is used. Each log-softmax is computed once and shared by both steps.
    """
    batch = final_logits.shape[0]
    log_final = F.log_softmax(final_logits.float(), dim=-1)
    log_premature = F.log_softmax(premature_logits.to(final_logits.device).float(), dim=-1)
    divergence = None
    if log_premature.shape[0] == 1:
        chosen = torch.zeros(batch, dtype=torch.long, device=final_logits.device)
    else:
        divergence = _divergence(log_final, log_premature)
        chosen = choose_premature(divergence, prior, uniform)
    rows = torch.arange(batch, device=final_logits.device)
    return _contrast(log_final, log_premature[chosen, rows]), chosen, divergence
