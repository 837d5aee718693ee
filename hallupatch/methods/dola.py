"""Layer-contrast decoding through plain ``model.generate()`` (DESIGN §4c): DoLa and the layer-prior variant.

``install`` adds, on the patched model instance:

* a forward pre-hook on each candidate decoder layer ``k`` that keeps the last position of its input,
  which is hidden-state index ``k`` (index 0 = the embedding output) after anything other methods
  (e.g. MemVR's retracing) did to the layers below;
* hooks on the LM head that, once the decoder stack has run, append those hidden states to the head's
  input, so the premature logits come out of the model's own (memory-bound) LM-head call instead of a
  second pass over its weight; the model's logits are split off unchanged in shape. Where the head is
  not called as a module (e.g. llama's ``pretraining_tp > 1``) the processor computes them itself;
* a wrapper around the instance's ``_get_logits_processor`` that puts :class:`LayerContrastProcessor`
  first in the processor list, so the contrast runs before every user processor and, when sampling,
  before the warpers (transformers 4.40 applies warpers after processors). ``output_logits`` keeps the
  uncontrasted final logits because generate records ``outputs.logits`` itself.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Union

import torch
from transformers import LogitsProcessor

from hallupatch.early_exit import head_logits
from hallupatch.engine import Patch, get_trace, user_stacklevel
from hallupatch.layer_contrast import CandidateSpec, candidate_layers, check_candidate_spec, select_and_contrast
from hallupatch.methods import Method, MethodConfig, register_method
from hallupatch.prior import layer_weights, load_layer_prior
from hallupatch.spec import ModelParts, PassInfo

#: transformers warns below this repetition penalty when decoding with DoLa
RECOMMENDED_REPETITION_PENALTY = 1.2

#: torch.Generator.manual_seed takes a 64-bit unsigned seed
SEED_LIMIT = 2**64

PriorSpec = Union[None, Sequence[float], Mapping[int, float], str, os.PathLike]


def tied_embeddings(parts: ModelParts) -> bool:
    """Whether the model's output embedding (LM head) shares its weight with the input embedding."""
    get_input = getattr(parts.model, "get_input_embeddings", None)
    try:
        embedding = get_input() if get_input is not None else None
    except (NotImplementedError, AttributeError):
        embedding = None
    head_weight = getattr(parts.lm_head, "weight", None)
    if embedding is not None and head_weight is not None and getattr(embedding, "weight", None) is not None:
        if embedding.weight is head_weight:
            return True
        real = not (embedding.weight.is_meta or head_weight.is_meta) and head_weight.data_ptr() != 0
        return real and embedding.weight.data_ptr() == head_weight.data_ptr()
    config = getattr(parts.model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    return bool(getattr(text_config, "tie_word_embeddings", False))


@dataclass
class DoLaConfig(MethodConfig):
    """Layer-contrast knobs. Layer indices are hidden-state indices (0 = embedding output, DESIGN §4a).

    Args:
        candidate_layers: ``"low"``, ``"high"`` (transformers' rules, DESIGN §4c) or a list of
            hidden-state indices; indices ``>= num_layers`` are dropped as in transformers.
        layer_prior: ``None`` (pick the most divergent candidate); one weight per candidate, in the
            order of the candidate layers; a ``{layer: weight}`` mapping (as
            :func:`hallupatch.estimate_layer_prior` returns; keys may be digit strings) with exactly the
            candidate layers; or the path of a prior JSON (``python -m hallupatch.prior``'s, or the
            region-caption paper's ``layer_prob.json``), read as such a mapping. With a prior the
            premature layer is sampled from ``softmax(softmax(d) + prior)``. Weights must be finite.
        early_exit_norm: apply the final norm before the LM head on the candidate layers (``False``,
            as transformers' DoLa and the published code do).
        seed: with a prior, seed the layer draws: every sample gets its own generator seeded with
            ``seed`` at each ``generate()`` call, so a sample's draws do not depend on its batch
            companions (``None``: torch's global generator).
    """

    candidate_layers: CandidateSpec = "high"
    layer_prior: PriorSpec = None
    early_exit_norm: bool = False
    seed: Optional[int] = None

    @classmethod
    def draws_random_numbers(cls, knobs: Mapping[str, Any]) -> bool:
        """A layer prior without ``seed`` draws each step's layer from the global generator."""
        return knobs.get("layer_prior") is not None and knobs.get("seed") is None

    def validate(self) -> None:
        self.candidate_layers = check_candidate_spec(self.candidate_layers)
        prior = self.layer_prior
        if isinstance(prior, (str, os.PathLike)):
            if not Path(prior).is_file():
                raise FileNotFoundError(f"layer prior file not found: {prior} (write one with `python -m hallupatch.prior`)")
        elif isinstance(prior, Mapping):
            self.layer_prior = layer_weights(prior.items())
        elif prior is not None:
            if isinstance(prior, torch.Tensor):
                prior = prior.tolist()
            try:
                values = [float(w) for w in prior]
            except OverflowError:
                raise ValueError(f"layer_prior weights must be finite numbers; got an integer beyond float's range") from None
            except (TypeError, ValueError):
                raise ValueError(
                    f"layer_prior must be None, a list of numbers, a {{layer: weight}} mapping or a JSON path; got {prior!r}"
                ) from None
            if not values or not all(math.isfinite(w) for w in values):
                raise ValueError(f"layer_prior weights must be finite numbers, one per candidate layer; got {prior!r}")
            self.layer_prior = values
        if not isinstance(self.early_exit_norm, bool):
            raise ValueError(f"early_exit_norm must be True or False; got {self.early_exit_norm!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT
        ):
            raise ValueError(f"seed must be None or an int with 0 <= seed < 2**64 (torch.Generator's range); got {self.seed!r}")

    def layers_for(self, parts: ModelParts) -> List[int]:
        """The candidate premature layers (hidden-state indices) on this model."""
        return candidate_layers(self.candidate_layers, parts.num_layers, tied_embeddings(parts))

    def prior_for(self, layers: Sequence[int]) -> Optional[torch.Tensor]:
        """The prior weights of ``layers`` (float32), or ``None`` without a prior."""
        prior = self.layer_prior
        if prior is None:
            return None
        if isinstance(prior, (str, os.PathLike, Mapping)):
            from_file = not isinstance(prior, Mapping)
            table = load_layer_prior(prior) if from_file else prior
            problems = []
            missing = [layer for layer in layers if layer not in table]
            if missing:
                problems.append(f"no weight for candidate layer(s) {missing}")
            extra = sorted(set(table) - set(layers))
            if extra:
                problems.append(f"weights for layer(s) {extra} that are not candidates")
            if problems:
                source = f"layer prior {prior}" if from_file else "the layer_prior mapping"
                raise ValueError(
                    f"{source} has {' and '.join(problems)}: it covers layers {sorted(table)} but the candidate "
                    f"layers are {list(layers)}; set candidate_layers={sorted(table)} (or give one weight per candidate)"
                )
            return torch.tensor([table[layer] for layer in layers], dtype=torch.float32)
        if len(prior) != len(layers):
            raise ValueError(
                f"layer_prior has {len(prior)} weights but there are {len(layers)} candidate layers {list(layers)}; "
                "give one weight per candidate layer"
            )
        return torch.tensor(prior, dtype=torch.float32)

    def validate_for(self, parts: ModelParts) -> None:
        self.prior_for(self.layers_for(parts))


@dataclass
class LayerContrastTrace:
    """Which premature layer each sample contrasted with, per decoding step of the latest ``generate()``.

    ``divergences[step]`` is the ``(candidates, batch)`` divergence tensor of that step (``None`` when
    only one candidate was in play).
    """

    candidates: List[int]
    _chosen: List[torch.Tensor] = field(default_factory=list, repr=False)
    divergences: List[Optional[torch.Tensor]] = field(default_factory=list, repr=False)

    def layers(self) -> List[List[int]]:
        """``[sample][step]`` -> the hidden-state index of the premature layer used."""
        if not self._chosen:
            return []
        chosen = torch.stack([c.cpu() for c in self._chosen], dim=1)
        return [[self.candidates[i] for i in row] for row in chosen.tolist()]

    def counts(self) -> dict:
        """``{layer: how many (sample, step) decisions picked it}``, every candidate listed."""
        totals = {layer: 0 for layer in self.candidates}
        for row in self.layers():
            for layer in row:
                totals[layer] += 1
        return totals


class LayerContrast:
    """The hooks and the logits processor of one layer-contrast installation."""

    def __init__(self, patch: Patch, config: DoLaConfig):
        self.patch = patch
        self.config = config
        self.parts = patch.parts
        self.candidates = config.layers_for(self.parts)
        self.prior = config.prior_for(self.candidates)
        self.forced: Optional[int] = None          # a position in `candidates` used for every step
        self.trace = LayerContrastTrace(self.candidates)
        self._hidden: dict = {}
        self._decoder_done = False
        self._head_rows: Optional[tuple] = None       # (rows of the model's own head input, its shape)
        self._premature: Optional[torch.Tensor] = None  # (K, B, vocab) from the merged head call
        self._generators: Optional[List[torch.Generator]] = None
        self._warned = False

        patch.on_pass_start(self._start_pass)
        for layer in sorted(set(self.candidates)):
            patch.hook(self.parts.layers[layer], functools.partial(self._capture, layer), pre=True, with_kwargs=True)
        # the model's own head call follows the last layer (early-exit heads inside the stack do not)
        patch.hook(self.parts.layers[-1], self._decoder_finished)
        patch.hook(self.parts.lm_head, self._head_input, pre=True)
        patch.hook(self.parts.lm_head, self._head_output)
        patch.wrap_method(patch.model, "_get_logits_processor", self._get_logits_processor)

    # -- hooks ------------------------------------------------------------------------------------
    def _start_pass(self, info: PassInfo) -> None:
        self._hidden = {}
        self._decoder_done = False
        self._premature = None
        self._head_rows = None

    def _capture(self, layer: int, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self._hidden[layer] = hidden[:, -1].detach()
        return None

    def _used_layers(self) -> List[int]:
        return self.candidates if self.forced is None else [self.candidates[self.forced]]

    def _decoder_finished(self, module, args, output) -> None:
        self._decoder_done = True

    def _head_input(self, module, args):
        """The model's own LM-head call (after the decoder stack): append the premature hidden states."""
        use = self._used_layers()
        if not self._decoder_done or not args or any(layer not in self._hidden for layer in use):
            return None  # an early-exit head inside the stack (e.g. MemVR's), or nothing captured
        self._decoder_done = False
        x = args[0]
        hidden = torch.stack([self._hidden[layer].to(x.device, x.dtype) for layer in use], dim=0)  # (K, B, H)
        if self.config.early_exit_norm:
            hidden = self.parts.final_norm(hidden).to(x.dtype)
        rows = x.reshape(-1, x.shape[-1])
        self._head_rows = (rows.shape[0], x.shape[:-1], hidden.shape[:2])
        return (torch.cat([rows, hidden.reshape(-1, hidden.shape[-1])], dim=0),) + tuple(args[1:])

    def _head_output(self, module, args, output):
        if self._head_rows is None:
            return None
        own, shape, (k, batch) = self._head_rows
        self._head_rows = None
        self._premature = output[own:].reshape(k, batch, output.shape[-1]).detach()
        return output[:own].reshape(*shape, output.shape[-1])

    def _get_logits_processor(self, original, *args, **kwargs):
        processors = original(*args, **kwargs)
        generation_config = kwargs.get("generation_config", args[0] if args else None)
        if generation_config is not None:
            self.check_generation_config(generation_config)
            self._warn_repetition_penalty(generation_config)
        # a new generate() call: fresh trace, and the seeded layer draws start again
        self.trace = LayerContrastTrace(self.candidates)
        self._generators = None
        processors.insert(0, LayerContrastProcessor(self))
        return processors

    def check_generation_config(self, generation_config) -> None:
        """Refuse what layer contrast cannot decode (beam search, contrastive search); also run before
        any answer is generated (the eval harness's checks)."""
        if (generation_config.num_beams or 1) > 1:
            raise ValueError(
                "layer contrast (method 'dola') works with greedy decoding and sampling only; "
                f"got num_beams={generation_config.num_beams}: use num_beams=1"
            )
        alpha, top_k = generation_config.penalty_alpha, generation_config.top_k
        if alpha is not None and alpha > 0 and top_k is not None and top_k > 1:
            raise ValueError("layer contrast (method 'dola') does not combine with contrastive search (penalty_alpha)")

    def _warn_repetition_penalty(self, generation_config) -> None:
        penalty = generation_config.repetition_penalty
        if not self._warned and (penalty is None or penalty < RECOMMENDED_REPETITION_PENALTY):
            self._warned = True
            warnings.warn(
                f"repetition_penalty is {penalty}, which can make layer-contrast (DoLa) decoding repeat itself; "
                f"the recommended value is repetition_penalty >= {RECOMMENDED_REPETITION_PENALTY}.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )

    # -- one decoding step ------------------------------------------------------------------------
    def contrast(self, scores: torch.Tensor) -> torch.Tensor:
        """Contrast the final logits ``scores`` (batch, vocab) with the premature layer of each sample."""
        missing = [layer for layer in self.candidates if layer not in self._hidden]
        if missing:
            raise RuntimeError(
                "layer contrast found no hidden state of the forward pass for this step; it supports "
                "generate() with greedy decoding or sampling (not assisted generation or a processor reused "
                "outside generate)"
            )
        use = self._used_layers()
        premature = self._premature
        if premature is None:  # the LM head was not called as a module: project here
            self._decoder_done = False  # (so this head call is not taken for the model's own)
            # (K, B, H); layers may sit on different devices when the model is split across GPUs
            hidden = torch.stack([self._hidden[layer].to(scores.device) for layer in use], dim=0)
            premature = head_logits(self.parts, hidden, norm=self.config.early_exit_norm)
        self._hidden, self._premature = {}, None
        if premature.shape[1] != scores.shape[0]:
            raise RuntimeError(
                f"layer contrast saw a forward pass of batch {premature.shape[1]} but scores of batch {scores.shape[0]}"
            )
        premature = premature.to(scores.device)
        several = len(use) > 1
        uniform = self._uniform(scores.shape[0], scores.device) if several and self.prior is not None else None
        contrasted, chosen, divergence = select_and_contrast(scores, premature, self.prior, uniform)
        if self.forced is not None:
            chosen = torch.full_like(chosen, self.forced)
        self.trace.divergences.append(divergence)
        self.trace._chosen.append(chosen)
        return contrasted

    def _uniform(self, batch: int, device: torch.device) -> Optional[torch.Tensor]:
        if self.config.seed is None:
            return None  # choose_premature draws from torch's global generator
        if self._generators is None:
            self._generators = [torch.Generator().manual_seed(self.config.seed) for _ in range(batch)]
        if len(self._generators) != batch:
            raise RuntimeError(f"layer prior generators were seeded for batch {len(self._generators)}, got {batch}")
        return torch.cat([torch.rand(1, generator=g) for g in self._generators]).to(device)


class LayerContrastProcessor(LogitsProcessor):
    """First processor of a patched ``generate()``: returns the layer-contrasted scores (float32)."""

    def __init__(self, contrast: LayerContrast):
        self.layer_contrast = contrast

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.layer_contrast.contrast(scores)


def install(patch: Patch, config: DoLaConfig) -> LayerContrast:
    """Add the layer-contrast hooks; ``hallupatch.apply`` has already run ``config.validate_for``."""
    return LayerContrast(patch, config)


def get_layer_trace(model) -> LayerContrastTrace:
    """The premature layers chosen during the latest ``generate()``: ``hallupatch.get_trace(model, "dola")``."""
    return get_trace(model, method="dola")


register_method(Method(name="dola", config_cls=DoLaConfig, install=install))
