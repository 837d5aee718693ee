"""OPERA (DESIGN §4e): over-trust penalty and retrospection-allocation inside beam search.

A port of ``opera_beam_search`` in shikiw/OPERA's modified transformers 4.29.2, onto plain
``model.generate(num_beams=k, do_sample=False)`` of transformers 4.40. ``install`` adds, on the patched
model instance:

* hooks on the last decoder layer's attention module (``FamilySpec.layer_attention``) that, only while
  OPERA asks for it, make that one module return its attention weights and keep the last query row's
  maximum over heads (no ``output_attentions`` for the other layers);
* pre-hooks on every layer's attention module that, during the candidates' forward, share each beam's
  cached keys and values among its candidates (one write into what attention reads, no copy per candidate);
* a replacement of the instance's ``_beam_search`` that runs OPERA's loop, sample by sample (each
  sample's rollbacks change its own length, so a batch gives every sample what it gives alone);
* a check on ``generate()``'s configuration (OPERA exists only inside beam search).

Per step and sample (``nb`` beams, ``N`` = ``num_attn_candidates``): the top ``N`` raw logits of every
beam are the candidates; one forward of all ``nb * N`` candidate tokens on the step's cache gives each
candidate's attention row; the response window (rows and columns from the merged prompt length on, the
candidate's row last) is renormalised per row and scaled; column ``j``'s score is ``1e-7 *`` the product
of the column from the diagonal down, stored in float16; the penalty (the image attention as a bonus
while the window has at most 10 columns, then the largest column score) is subtracted from the
candidate's logit and every other logit becomes -999. The winning column per candidate gives a mode per
beam (kept per beam slot) and one over the beams; when every slot's history holds that location more
than ``threshold`` times (location >= 10), the sample goes back to the state before position
``location + 1`` and chooses that position again without the penalty, the (beam, token) pairs chosen
there before excluded. README "OPERA" lists what is reproduced from the fork and what is fixed.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from transformers.generation.beam_search import BeamHypotheses, BeamSearchScorer
from transformers.generation.stopping_criteria import MaxLengthCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

from hallupatch.engine import GenerationState, Patch
from hallupatch.methods import Method, MethodConfig, register_method
from hallupatch.methods.image_positions import image_positions, runs
from hallupatch.spec import ModelParts, bind_call, cache_length, get_path

#: the fork fills every logit that is not a candidate (and every rejected pair) with this value
FILL = -999.0
#: the column score's factor (the fork's ``1e-7 * prod``)
COLUMN_SCALE = 1e-7
#: while the window has at most this many columns the penalty is the image attention (a bonus)
EARLY_WINDOW = 10
#: a rollback needs a location at least this large (the fork's ``rollback_loc < 10`` rule)
MIN_LOCATION = 10
#: the "fast" setting of OPERA's README
FAST = {"threshold": 25, "num_attn_candidates": 1}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class OperaConfig(MethodConfig):
    """OPERA's knobs, with the published defaults (``chair_eval.py`` / ``pope_eval.py``).

    Args:
        scale_factor: the response window's attention is multiplied by this before the column
            products (> 0).
        threshold: a rollback needs the winning location more than this many times in every beam
            slot's history (int >= 0).
        num_attn_candidates: candidates per beam, the top raw logits (int >= 1).
        penalty_weights: the penalty's weight in ``logit - penalty_weights * penalty`` (finite).
        window_size: the fork's history length: how many states are kept and how many positions the
            rollback counts and reject lists cover (int >= 1, 512 as published).
    """

    scale_factor: float = 50.0
    threshold: int = 15
    num_attn_candidates: int = 5
    penalty_weights: float = 1.0
    window_size: int = 512

    def validate(self) -> None:
        if not _is_number(self.scale_factor) or self.scale_factor <= 0:
            raise ValueError(f"scale_factor must be a finite number > 0 (published 50); got {self.scale_factor!r}")
        if not _is_int(self.threshold) or self.threshold < 0:
            raise ValueError(f"threshold must be an int >= 0 (published 15, fast 25); got {self.threshold!r}")
        if not _is_int(self.num_attn_candidates) or self.num_attn_candidates < 1:
            raise ValueError(
                f"num_attn_candidates must be an int >= 1 (published 5, fast 1); got {self.num_attn_candidates!r}"
            )
        if not _is_number(self.penalty_weights):
            raise ValueError(f"penalty_weights must be a finite number (published 1.0); got {self.penalty_weights!r}")
        if not _is_int(self.window_size) or self.window_size < 1:
            raise ValueError(f"window_size must be an int >= 1 (published 512); got {self.window_size!r}")

    def validate_for(self, parts: ModelParts) -> None:
        spec = parts.spec
        if spec.layer_attention is None or spec.image_token_id(parts.model) is None:
            reason = ("its attention module does not return attention weights" if spec.layer_attention is None
                      else "this model marks no image token in input_ids")
            raise TypeError(
                f"OPERA needs the last layer's attention weights and the image span in the merged sequence, and "
                f"{type(parts.model).__name__} (family {spec.name!r}) cannot give them: {reason}. OPERA supports "
                "LLaVA models (LlavaForConditionalGeneration, the original LLaVA LlavaLlamaForCausalLM), "
                "LlavaNextForConditionalGeneration and Qwen2-VL / Qwen2.5-VL (hallupatch's drop-in files)"
            )


@dataclass(frozen=True)
class Rollback:
    """One retrospection of one sample. Positions count generated tokens (0 = the first one).

    ``iteration``: the 0-based pass of OPERA's loop in this ``generate()`` (re-chosen positions count);
    ``from_position``: the response position of the candidates being scored (the fork's
    ``cur_response_lens - 1``); ``location``: the winning column (the fork's ``rollback_loc``);
    ``to_position``: the fork's ``rollback_pos``, the position whose token is chosen again (tokens
    before it are kept).
    """

    iteration: int
    from_position: int
    location: int
    to_position: int


@dataclass(frozen=True)
class CandidateStep:
    """One loop iteration of one sample, each tensor ``(beams, N)`` on the CPU: the candidate tokens, their
    penalties (``-`` image attention while the window has at most 10 columns, then the largest column
    score) and their penalised logits (``logit - penalty_weights * penalty``)."""

    tokens: torch.Tensor
    penalties: torch.Tensor
    scores: torch.Tensor


@dataclass
class OperaTrace:
    """What OPERA did in the latest ``generate()``, per sample: ``hallupatch.get_trace(model, "opera")``.

    ``rollbacks[sample]``: its :class:`Rollback` events in order; ``locations[sample]``: per loop
    iteration, the location voted over all its beams (the fork's ``rollback_loc``);
    ``candidates[sample]``: per loop iteration, a :class:`CandidateStep`.
    """

    rollbacks: List[List[Rollback]] = field(default_factory=list)
    locations: List[List[int]] = field(default_factory=list)
    candidates: List[List[CandidateStep]] = field(default_factory=list)

    def positions(self, sample: int = 0) -> List[Tuple[int, int]]:
        """``[(from_position, to_position), ...]`` of one sample's rollbacks."""
        return [(r.from_position, r.to_position) for r in self.rollbacks[sample]]


@dataclass(frozen=True)
class ImageSpan:
    """OPERA's ``key_position`` of one sample in its merged (image-expanded) sequence. The image attention
    sums the columns ``image_start..image_end``, or exactly ``image_positions`` when the visual tokens are not
    one run (Qwen2-VL with several images: every ``<|image_pad|>``; the published code knows one run)."""

    image_start: int
    image_end: int          # inclusive
    response_start: int     # the merged prompt length
    image_positions: Tuple[int, ...] = ()   # set only when the visual tokens are not one run

    def image_attention(self, rows: torch.Tensor) -> torch.Tensor:
        """The attention rows' sum over the image columns ``(..., keys) -> (...)``."""
        if self.image_positions:
            return rows[..., list(self.image_positions)].sum(-1)
        return rows[..., self.image_start:self.image_end + 1].sum(-1)


def column_scores(window: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """The fork's column scores of a response window ``(..., n, n)`` (rows renormalised, the candidate's row
    last): ``1e-7 * prod(scale * window[j:, j])`` per column ``j``, computed in the window's dtype, stored in
    float16 (underflow gives 0, overflow inf)."""
    scaled = scale_factor * window
    scores = torch.zeros(window.shape[:-1], dtype=torch.float16, device=window.device)
    for j in range(window.shape[-1]):
        scores[..., j] = (COLUMN_SCALE * scaled[..., j:, j].prod(-1)).to(torch.float32)
    return scores


class LastLayerAttention:
    """Hooks that make the last decoder layer's attention module return its weights while ``active`` and
    keep, per row of the batch, the last query's maximum over heads ``(rows, keys)``."""

    def __init__(self, patch: Patch, module: nn.Module):
        self.active = False
        self.rows: Optional[torch.Tensor] = None
        # transformers' SDPA attention classes warn once when asked for weights (they fall back to the eager
        # computation, which is what OPERA wants): that warning is expected here
        self.logger_name = type(module).__module__
        patch.hook(module, self._before, pre=True, with_kwargs=True)
        patch.hook(module, self._after)

    def _before(self, module, args, kwargs):
        if not self.active:
            return None
        return args, {**kwargs, "output_attentions": True}

    def _after(self, module, args, output):
        if not self.active:
            return None
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError(
                f"{type(module).__name__} returned no attention weights with output_attentions=True; OPERA "
                "needs them from the last decoder layer"
            )
        self.rows = weights[:, :, -1, :].amax(dim=1).detach()
        return None

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        logger = logging.getLogger(self.logger_name)
        level = logger.level
        self.active, self.rows = True, None
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            self.active = False
            logger.setLevel(level)


class SharedRows:
    """What one attention layer of the candidates' forward uses as its cache: the step's keys and values
    ``(beams, heads, length, dim)``, each beam's rows shared by its ``repeat`` candidates without a copy of
    their own; ``update`` writes them once, with the candidates' new keys, into what attention reads. Nothing
    is stored: the candidates' forward is discarded and the step's cache stays as it was."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, repeat: int):
        self.keys, self.values, self.repeat = keys, values, repeat

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        return self._with_new(self.keys, key_states), self._with_new(self.values, value_states)

    def _with_new(self, cached: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        rows, heads, length, dim = cached.shape
        shared = cached[:, None].expand(rows, self.repeat, heads, length, dim)
        own = new.view(rows, self.repeat, heads, new.shape[-2], dim)
        return torch.cat([shared, own], dim=-2).view(rows * self.repeat, heads, length + new.shape[-2], dim)


class CandidateCache:
    """Pre-hooks on every decoder layer's attention module that, while ``repeat`` is set (the candidates'
    forward), hand it :class:`SharedRows` of the step's cache instead of the cache transformers passes."""

    def __init__(self, patch: Patch, modules: List[nn.Module]):
        self.repeat: Optional[int] = None
        for module in modules:
            patch.hook(module, self._before, pre=True, with_kwargs=True)

    def _before(self, module, args, kwargs):
        cache = kwargs.get("past_key_value")
        if self.repeat is None or cache is None:
            return None
        keys, values = cache[module.layer_idx]
        return args, {**kwargs, "past_key_value": SharedRows(keys, values, self.repeat)}

    @contextlib.contextmanager
    def sharing(self, repeat: int) -> Iterator[None]:
        self.repeat = repeat
        try:
            yield
        finally:
            self.repeat = None


class Opera:
    """The hooks, the generation check and the beam-search replacement of one OPERA installation."""

    def __init__(self, patch: Patch, config: OperaConfig):
        self.patch = patch
        self.config = config
        self.parts = patch.parts
        self.trace = OperaTrace()
        attention = get_path(self.parts.layers[-1], self.parts.spec.layer_attention)
        self.attention = LastLayerAttention(patch, attention)
        self.candidate_cache = CandidateCache(
            patch, [get_path(layer, self.parts.spec.layer_attention) for layer in self.parts.layers])
        self.prompt_embeds: Optional[torch.Tensor] = None   # the decoder's input at the latest prefill
        self.prompt_positions: Optional[torch.Tensor] = None   # and its position ids (None: the default)
        patch.hook(self.parts.pass_start, self._decoder_input, pre=True, with_kwargs=True)
        patch.wrap_method(patch.model, "_get_logits_processor", self._get_logits_processor)
        patch.wrap_method(patch.model, "_beam_search", self._beam_search)

    def _decoder_input(self, module, args, kwargs):
        """Keep a prefill's merged input embeddings (images in place): choosing a position again starts
        from them, so a generated token equal to the image placeholder stays text, as in the fork."""
        call = bind_call(module, args, kwargs)
        embeds = call.get("inputs_embeds")
        if embeds is not None and cache_length(call.get("past_key_values")) == 0:
            self.prompt_embeds = embeds.detach()
            self.prompt_positions = call.get("position_ids")

    # -- generate()'s configuration ---------------------------------------------------------------
    def _get_logits_processor(self, original, *args, **kwargs):
        generation_config = kwargs.get("generation_config", args[0] if args else None)
        if generation_config is not None:
            self._check_generation_config(generation_config)
        return original(*args, **kwargs)

    def _check_generation_config(self, generation_config) -> None:
        from transformers.generation.configuration_utils import GenerationMode

        mode = generation_config.get_generation_mode()
        if mode != GenerationMode.BEAM_SEARCH:
            raise ValueError(
                "OPERA runs inside beam search (the published fork asserts it): call generate(num_beams=5, "
                f"do_sample=False) with num_beams >= 2; got num_beams={generation_config.num_beams}, "
                f"do_sample={generation_config.do_sample}, num_beam_groups={generation_config.num_beam_groups}"
                f" ({mode.value if mode is not None else mode})"
            )
        if generation_config.low_memory:
            raise ValueError("OPERA does not support low_memory=True (sequential beam search); leave it unset")

    # -- the beam search ------------------------------------------------------------------------
    def _beam_search(self, original, input_ids: torch.LongTensor, beam_scorer: BeamSearchScorer, *args, **kwargs):
        if args:
            raise TypeError("OPERA's beam search takes its options by keyword, as generate() passes them")
        model = self.patch.model
        batch_size, num_beams = len(beam_scorer._beam_hyps), beam_scorer.num_beams
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in SEARCH_OPTIONS}
        model_kwargs = kwargs
        if model_kwargs.get("past_key_values") is not None:
            raise ValueError("OPERA starts from the prompt: generate() with past_key_values is not supported")
        model_kwargs.pop("cache_position", None)
        if options.get("max_length") is not None:
            raise ValueError("OPERA's beam search takes its length from generate()'s stopping criteria "
                             "(max_new_tokens / max_length of generate), not a max_length argument")
        if options.get("synced_gpus"):
            raise ValueError("OPERA does not support synced_gpus (DeepSpeed ZeRO-3 generation)")
        if batch_size > 1 and options.get("return_dict_in_generate") and (
                options.get("output_attentions") or options.get("output_hidden_states")):
            raise ValueError("OPERA returns attentions / hidden states for one sample at a time: run generate() per "
                             "sample, or leave output_attentions / output_hidden_states unset")
        self.trace = OperaTrace()
        results = []
        for sample in range(batch_size):
            rows = slice(sample * num_beams, (sample + 1) * num_beams)
            ids, sample_kwargs, dropped = _sample_inputs(input_ids, model_kwargs, rows, batch_size * num_beams)
            flat = self.parts.spec.flat_inputs_of_rows
            if flat is not None and batch_size > 1:
                sample_kwargs.update(flat(model, input_ids, model_kwargs, rows))
            scorer = _sample_scorer(beam_scorer, dropped)
            criteria = _sample_criteria(options.get("stopping_criteria"), dropped)
            search = _SampleSearch(self, model, ids, scorer, criteria, options, sample_kwargs)
            results.append(search.run())
            self.trace.rollbacks.append(search.rollbacks)
            self.trace.locations.append(search.locations)
            self.trace.candidates.append(search.candidates)
        return _merge(results, input_ids, num_beams, options)


#: ``_beam_search``'s own options (everything else generate() passes are model inputs)
SEARCH_OPTIONS = ("logits_processor", "stopping_criteria", "max_length", "pad_token_id", "eos_token_id",
                  "output_attentions", "output_hidden_states", "output_scores", "output_logits",
                  "return_dict_in_generate", "synced_gpus", "sequential")


def _sample_inputs(input_ids: torch.Tensor, model_kwargs: Dict[str, Any], rows: slice, batch_rows: int):
    """One sample's rows of ``input_ids`` and of every per-row model input, its padding dropped, and the
    number of padding positions dropped."""
    ids = input_ids[rows]
    mask = model_kwargs.get("attention_mask")
    keep = None
    if mask is not None:
        mask = mask[rows]
        if not bool((mask == mask[:1]).all()):
            raise ValueError("the beams of one sample have different attention masks")
        keep = mask[0].bool()
        real = int(keep.sum())
        first = int(keep.nonzero()[0]) if real else 0
        if real == 0 or not bool(keep[first:first + real].all()):
            raise ValueError("OPERA needs each sample's real tokens in one block, padded on the left or the right")
    sample_kwargs = {}
    for name, value in model_kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_rows:
            value = value[rows]
            if name in ("attention_mask", "inputs_embeds") and keep is not None:
                value = value[:, keep]
        sample_kwargs[name] = value
    dropped = 0
    if keep is not None and ids.shape[1] == keep.shape[0]:   # (from inputs_embeds the ids hold no prompt)
        dropped = ids.shape[1] - int(keep.sum())
        ids = ids[:, keep]
    return ids, sample_kwargs, dropped


class WholeLengthHypotheses(BeamHypotheses):
    """Finished hypotheses scored as in the fork's transformers 4.29: the summed log-probabilities divided by
    the length of the whole sequence (prompt ids included, the end token not), and the stopping heuristic on
    that length; 4.40 divides by the generated length. Used with ``decoder_prompt_len=0``."""

    def add(self, hyp, sum_logprobs, beam_indices=None, generated_len=None):
        super().add(hyp, sum_logprobs, beam_indices=beam_indices, generated_len=None)


def _sample_scorer(scorer: BeamSearchScorer, dropped: int) -> BeamSearchScorer:
    """A beam scorer for one sample run alone, its hypotheses scored as the fork scores them."""
    hyps = scorer._beam_hyps[0]
    max_length = None if hyps.max_length is None else hyps.max_length - dropped
    own = BeamSearchScorer(
        batch_size=1, num_beams=scorer.num_beams, device=scorer.device, length_penalty=scorer.length_penalty,
        do_early_stopping=scorer.do_early_stopping, num_beam_hyps_to_keep=scorer.num_beam_hyps_to_keep,
        max_length=max_length,
    )
    own._beam_hyps = [WholeLengthHypotheses(own.group_size, own.length_penalty, own.do_early_stopping, max_length)]
    return own


def _sample_criteria(criteria: Optional[StoppingCriteriaList], dropped: int) -> StoppingCriteriaList:
    """The stopping criteria of a sample run alone: its maximum length counts its own prompt."""
    own = StoppingCriteriaList()
    for criterion in criteria or []:
        if isinstance(criterion, MaxLengthCriteria):
            criterion = MaxLengthCriteria(criterion.max_length - dropped, criterion.max_position_embeddings)
        own.append(criterion)
    return own


@dataclass
class _State:
    """The fork's ``current_state``: everything needed to choose one position again."""

    input_ids: torch.Tensor
    scorer: BeamSearchScorer
    beam_indices: Optional[tuple]
    cur_len: int
    rows: torch.Tensor                     # (beams, k, k) response attention rows, renormalised
    beam_scores: Optional[torch.Tensor] = None
    beam_next_tokens: Optional[torch.Tensor] = None
    beam_idx: Optional[torch.Tensor] = None


@dataclass
class _SampleResult:
    sequences: torch.Tensor
    sequence_scores: Optional[torch.Tensor]
    beam_indices: Optional[torch.Tensor]
    prompt_length: int
    scores: List[torch.Tensor]
    logits: List[torch.Tensor]
    attentions: List[Any]
    hidden_states: List[Any]
    past_key_values: Any


class _SampleSearch:
    """OPERA's beam search for one sample (its ``num_beams`` rows, no padding)."""

    def __init__(self, opera: Opera, model: nn.Module, input_ids: torch.Tensor, scorer: BeamSearchScorer,
                 criteria: StoppingCriteriaList, options: Dict[str, Any], model_kwargs: Dict[str, Any]):
        self.opera, self.model, self.config = opera, model, opera.config
        self.input_ids, self.scorer, self.criteria = input_ids, scorer, criteria
        self.options, self.model_kwargs = options, model_kwargs
        self.processors = options.get("logits_processor") or []
        self.rollbacks: List[Rollback] = []
        self.locations: List[int] = []
        self.candidates: List[CandidateStep] = []

    # -- forwards ---------------------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, model_kwargs: Dict[str, Any], read_attention: bool,
                 side: bool = False):
        inputs = self.model.prepare_inputs_for_generation(input_ids, **model_kwargs)
        extra = {} if side else {"output_attentions": self.output_attentions,
                                 "output_hidden_states": self.output_hidden_states}
        reading = self.opera.attention.reading() if read_attention else contextlib.nullcontext()
        with reading, (_side_pass(self.opera.patch) if side else contextlib.nullcontext()):
            outputs = self.model(**inputs, return_dict=True, **extra)
        return outputs, (self.opera.attention.rows if read_attention else None)

    def _candidate_rows(self, input_ids, candidates, outputs, model_kwargs) -> torch.Tensor:
        """Every beam's candidates in one forward on this step's cache: their last-layer attention rows
        ``(beams, N, keys)`` (maximum over heads)."""
        beams, n = candidates.shape
        kwargs = self.model._update_model_kwargs_for_generation(outputs, dict(model_kwargs))
        for name, value in kwargs.items():   # the step's cache stays per beam: CandidateCache shares its rows
            if name != "past_key_values" and isinstance(value, torch.Tensor) and value.dim() > 0 \
                    and value.shape[0] == beams:
                kwargs[name] = value.repeat_interleave(n, dim=0)
        ids = torch.cat([input_ids.repeat_interleave(n, dim=0), candidates.reshape(-1, 1)], dim=-1)
        with self.opera.candidate_cache.sharing(n):
            _, rows = self._forward(ids, kwargs, read_attention=True, side=True)
        return rows.reshape(beams, n, -1)

    def _image_span(self, input_ids: torch.Tensor, merged_length: int) -> ImageSpan:
        """``key_position`` as OPERA's LLaVA wrapper computes it, in this sample's merged sequence
        (``image_positions``: LLaVA's ``<image>`` expanded at merge time, or Qwen2-VL's ``<|image_pad|>``
        already expanded in the ids). A generation from ``inputs_embeds`` alone (the newer original-LLaVA
        ``generate``, which splices the image itself) has no ids: the image starts where the visual tokens sit
        in those embeddings."""
        patch, spec = self.opera.patch, self.opera.parts.spec
        memory = patch.generation.visual_memory
        visual = memory[0] if memory else None   # every beam of the sample has its image
        if input_ids.shape[1] == 0:
            places = [] if visual is None else _rows_at(self.opera.prompt_embeds[0], visual)
            if len(places) != 1:
                raise ValueError(
                    "OPERA needs exactly one image per sample (its key_position holds one image span); this sample "
                    f"has {len(places) if visual is not None else 0} image(s) among its input embeddings"
                )
            n_visual = visual.shape[0]
            positions = torch.arange(places[0], places[0] + n_visual)
            merged = self.opera.prompt_embeds.shape[1]
        else:
            token = spec.image_token_id(patch.model)
            if visual is None or not bool((input_ids[0] == token).any()):
                raise ValueError("OPERA needs exactly one image per sample (its key_position holds one image "
                                 "span); this sample has no image")
            positions, merged = image_positions(input_ids[0].cpu(), token, visual.shape[0], "opera")
        start, end = int(positions[0]), int(positions[-1])
        several = runs(positions) > 1
        span = ImageSpan(start, end, merged, tuple(positions.tolist()) if several else ())
        if span.response_start != merged_length:
            raise RuntimeError(
                f"OPERA computed a merged prompt of {span.response_start} positions but the model cached "
                f"{merged_length}; the image tokens were not merged as expected"
            )
        return span

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> _SampleResult:
        cfg, model, options = self.config, self.model, self.options
        n_cand, window_size = cfg.num_attn_candidates, cfg.window_size
        input_ids, scorer, model_kwargs = self.input_ids, self.scorer, dict(self.model_kwargs)
        num_beams = scorer.num_beams
        pad_token_id = options.get("pad_token_id")
        eos_token_id = _eos_token_id(self.criteria, model, options.get("eos_token_id"))
        return_dict = bool(options.get("return_dict_in_generate"))
        output_scores = return_dict and bool(options.get("output_scores"))
        output_logits = return_dict and bool(options.get("output_logits"))
        self.output_attentions = bool(options.get("output_attentions"))
        self.output_hidden_states = bool(options.get("output_hidden_states"))
        keep_attentions = return_dict and self.output_attentions
        keep_hidden = return_dict and self.output_hidden_states

        prompt_length = cur_len = input_ids.shape[1]   # 0 when generating from inputs_embeds
        embeds = model_kwargs.get("inputs_embeds")
        cached = embeds.shape[1] if embeds is not None else cur_len
        model_kwargs["cache_position"] = torch.arange(cached, device=input_ids.device)
        original_kwargs = dict(model_kwargs)   # the fork's model_kwargs_ori (for choosing a position again)
        scores: List[torch.Tensor] = []
        raw_logits: List[torch.Tensor] = []
        attentions: List[Any] = []
        hidden_states: List[Any] = []
        beam_indices = tuple(() for _ in range(num_beams)) if output_scores else None
        beam_scores = torch.zeros(num_beams, dtype=torch.float, device=input_ids.device)
        beam_scores[1:] = -1e9

        history: List[_State] = []
        location_history: List[torch.Tensor] = []
        rollback_times = torch.zeros(window_size)
        rejected: List[Any] = [[] for _ in range(window_size)]
        beam_next_tokens = beam_idx = None
        rows: Optional[torch.Tensor] = None
        span: Optional[ImageSpan] = None
        iteration = 0
        while True:
            state = _State(input_ids.clone(), copy.deepcopy(scorer), beam_indices, cur_len, rows)
            prefill = model_kwargs.get("past_key_values") is None
            outputs, new_row = self._forward(input_ids, model_kwargs, read_attention=not prefill)
            if prefill:
                span = self._image_span(input_ids, cache_length(outputs.past_key_values))
                prompt_embeds = self.opera.prompt_embeds[:1]
                prompt_positions = self.opera.prompt_positions
                rows = torch.zeros((num_beams, 0, 0), dtype=torch.float32, device=input_ids.device)
            else:
                rows = _append_row(rows[beam_idx], new_row, span.response_start)
            state.rows = rows
            logits = outputs.logits[:, -1, :]
            raw = logits.clone() if output_logits else None

            candidate_scores, candidate_tokens = torch.topk(logits, n_cand, dim=-1, largest=True, sorted=True)
            state.beam_scores = beam_scores.clone()
            state.beam_next_tokens = beam_next_tokens.clone() if beam_next_tokens is not None else None
            state.beam_idx = beam_idx.clone() if beam_idx is not None else None

            candidate_rows = self._candidate_rows(input_ids, candidate_tokens, outputs, model_kwargs)
            candidate_rows = candidate_rows / candidate_rows.sum(-1, keepdim=True)
            window = _window(rows.to(candidate_rows.dtype), candidate_rows[..., span.response_start:])
            local_scores = column_scores(window, cfg.scale_factor)
            n_columns = window.shape[-1]
            image_attention = span.image_attention(candidate_rows)
            rollback_scores, rollback_locations = local_scores.max(-1)          # (beams, N)
            beam_locations = rollback_locations.mode().values                   # (beams,)
            location = int(beam_locations.mode().values)
            self.locations.append(location)
            penalty = -image_attention if n_columns <= EARLY_WINDOW else rollback_scores
            location_history.append(beam_locations[:, None])
            gathered = torch.cat(location_history, -1)                          # (beams, history)
            candidate_scores -= cfg.penalty_weights * penalty
            self.candidates.append(CandidateStep(candidate_tokens.cpu(), penalty.detach().float().cpu(),
                                                 candidate_scores.detach().cpu()))

            if len(history) >= window_size:
                history.pop(0)
            history.append(state)

            target = self._rollback_position(gathered, location, n_columns, rollback_times, len(history))
            if target is None:
                next_logits = torch.full_like(logits, FILL).scatter_(-1, candidate_tokens, candidate_scores)
            else:
                self.rollbacks.append(Rollback(iteration, n_columns - 1, location, target))
                for j in range(n_columns - target - 2):
                    history.pop(-1)
                    location_history.pop(-1)
                    rejected[-(j + 1)] = []
                back, after = history[-2], history[-1]
                # the stored scorer itself, not a copy, as the fork does: a later rollback to this state sees
                # the hypotheses its next step added
                input_ids, scorer, beam_indices, cur_len = back.input_ids, back.scorer, back.beam_indices, back.cur_len
                rows, beam_scores = back.rows, back.beam_scores
                beam_next_tokens, beam_idx = after.beam_next_tokens, after.beam_idx
                kept = back.cur_len - prompt_length   # steps recorded before the position chosen again
                for recorded in (scores, raw_logits, attentions, hidden_states):
                    del recorded[kept:]
                outputs, model_kwargs = self._choose_again(input_ids, prompt_length, prompt_embeds, prompt_positions,
                                                           original_kwargs)
                logits = outputs.logits[:, -1, :]
                raw = logits.clone() if output_logits else None
                history.pop(-1)
                location_history.pop(-1)
                rejected[target + 1] = []
                next_logits = logits - (-FILL + logits.min(-1, keepdim=True).values)
                vocab = next_logits.shape[-1]
                next_logits = next_logits.view(1, num_beams * vocab)
                reject = (beam_idx.view(1, num_beams) * vocab + beam_next_tokens.view(1, num_beams))
                if len(rejected[target]) > 0:
                    reject = torch.cat([rejected[target], reject], -1)
                rejected[target] = reject
                next_logits = next_logits.scatter(-1, reject, FILL).view(num_beams, vocab)
            iteration += 1

            # stock beam search (transformers 4.40's _beam_search) from here
            next_scores = nn.functional.log_softmax(next_logits, dim=-1)
            processed = self.processors(input_ids, next_scores) if self.processors else next_scores
            next_scores = processed + beam_scores[:, None].expand_as(processed)
            if output_scores:
                scores.append(processed)
            if output_logits:
                raw_logits.append(raw)
            if keep_attentions:
                attentions.append(outputs.attentions)
            if keep_hidden:
                hidden_states.append(outputs.hidden_states)

            vocab = next_scores.shape[-1]
            next_scores = next_scores.view(1, num_beams * vocab)
            n_eos = len(eos_token_id) if eos_token_id else 0
            next_scores, next_tokens = torch.topk(next_scores, max(2, 1 + n_eos) * num_beams, dim=1,
                                                  largest=True, sorted=True)
            next_indices = torch.div(next_tokens, vocab, rounding_mode="floor")
            next_tokens = next_tokens % vocab
            beam_outputs = scorer.process(input_ids, next_scores, next_tokens, next_indices,
                                          pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                                          beam_indices=beam_indices, decoder_prompt_len=0)   # 4.29's lengths
            beam_scores = beam_outputs["next_beam_scores"]
            beam_next_tokens = beam_outputs["next_beam_tokens"]
            beam_idx = beam_outputs["next_beam_indices"]
            input_ids = torch.cat([input_ids[beam_idx, :], beam_next_tokens.unsqueeze(-1)], dim=-1)
            model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
            if model_kwargs.get("past_key_values") is not None:
                model_kwargs["past_key_values"] = model._temporary_reorder_cache(model_kwargs["past_key_values"],
                                                                                 beam_idx)
            if beam_indices is not None:
                beam_indices = tuple(beam_indices[beam_idx[i]] + (beam_idx[i],) for i in range(len(beam_indices)))
            cur_len += 1
            if scorer.is_done or all(self.criteria(input_ids, tuple(scores) if output_scores else None)):
                break

        final = scorer.finalize(input_ids, beam_scores, next_tokens, next_indices, pad_token_id=pad_token_id,
                                eos_token_id=eos_token_id, max_length=self.criteria.max_length,
                                beam_indices=beam_indices, decoder_prompt_len=0)
        return _SampleResult(
            sequences=final["sequences"], sequence_scores=final["sequence_scores"] if output_scores else None,
            beam_indices=final.get("beam_indices"), prompt_length=prompt_length, scores=scores,
            logits=raw_logits, attentions=attentions, hidden_states=hidden_states,
            past_key_values=model_kwargs.get("past_key_values"),
        )

    def _rollback_position(self, gathered: torch.Tensor, location: int, n_columns: int,
                           rollback_times: torch.Tensor, history_length: int) -> Optional[int]:
        """The fork's retrospection rule: the position to choose again, or ``None``."""
        cfg = self.config
        if not all(int((slot == location).long().sum()) > cfg.threshold for slot in gathered):
            return None
        if location < MIN_LOCATION:
            return None
        target = location + 1
        if target >= cfg.window_size - 1:
            return None  # beyond the fork's lists (it fails there and a bare except skips the rollback)
        if rollback_times[target] >= cfg.num_attn_candidates:
            target -= 1
            if rollback_times[target] >= cfg.num_attn_candidates:
                return None
        rollback_times[target] += 1   # counted before the clamp below, as in the fork
        if n_columns - target > cfg.window_size + 1:
            target = max(1, n_columns - cfg.window_size - 1)
        if max(0, n_columns - target - 2) + 2 > history_length:
            return None  # the state to go back to is no longer kept (the fork fails there; no rollback)
        return target

    def _choose_again(self, input_ids: torch.Tensor, prompt_length: int, prompt_embeds: torch.Tensor,
                      prompt_positions: Optional[torch.Tensor], original_kwargs: Dict[str, Any]):
        """The fork's two forwards after a rollback: the sequence but its last token from scratch, then the last
        token on that cache. The first starts from the prompt's merged embeddings (the fork re-merges the image
        into the prompt; the response stays text either way), followed by the response's token embeddings, at
        the prefill's positions continued by the response's (:func:`continued_positions`: Qwen2-VL's M-RoPE
        positions of the image cannot be told from embeddings)."""
        beams = input_ids.shape[0]
        response = self.model.get_input_embeddings()(input_ids[:, prompt_length:-1])
        embeds = torch.cat([prompt_embeds.expand(beams, -1, -1).to(response.dtype), response], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=input_ids.device)
        positions = {}
        if prompt_positions is not None:
            positions["position_ids"] = continued_positions(prompt_positions, response.shape[1], beams)
        with _side_pass(self.opera.patch):
            first = self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, return_dict=True,
                               **positions)
        # generate()'s bookkeeping as it stands after the prompt and the `generated - 1` steps before this one
        generated = input_ids.shape[1] - prompt_length
        kwargs = dict(original_kwargs)
        kwargs["past_key_values"] = first.past_key_values
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = torch.cat([kwargs["attention_mask"],
                                                  kwargs["attention_mask"].new_ones((beams, generated))], 1)
        kwargs["cache_position"] = kwargs["cache_position"][-1:] + generated
        outputs, _ = self._forward(input_ids, kwargs, read_attention=False)
        return outputs, kwargs


def continued_positions(prompt: torch.Tensor, response_length: int, beams: int) -> torch.Tensor:
    """A prefill's position ids ``(..., rows, length)`` (llama: ``(rows, L)``; Qwen2-VL's M-RoPE:
    ``(3, rows, L)``), first row, followed by ``response_length`` text positions that continue from the
    prompt's largest position on every axis (as decoding steps place them), repeated for ``beams`` rows."""
    first = prompt[..., :1, :]
    response = first.amax(dim=-1, keepdim=True) + 1 + torch.arange(response_length, device=prompt.device)
    positions = torch.cat([first, response.to(first.dtype)], dim=-1)
    return positions.expand(*positions.shape[:-2], beams, positions.shape[-1])


def _rows_at(sequence: torch.Tensor, block: torch.Tensor) -> List[int]:
    """The positions where ``block`` (n, hidden) occurs row for row in ``sequence`` (length, hidden)."""
    n = block.shape[0]
    block = block.to(sequence.device, sequence.dtype)
    firsts = (sequence[: sequence.shape[0] - n + 1] == block[0]).all(dim=-1).nonzero().flatten().tolist()
    return [s for s in firsts if torch.equal(sequence[s:s + n], block)]


def _append_row(rows: torch.Tensor, new_row: torch.Tensor, response_start: int) -> torch.Tensor:
    """The response rows with the newest token's row appended: ``(beams, k, k)`` -> ``(beams, k+1, k+1)``;
    each row renormalised over all its keys (prompt included), as the fork's ``attn_last / sum``."""
    new_row = new_row / new_row.sum(-1, keepdim=True)
    rows = rows.to(new_row.dtype)
    padded = nn.functional.pad(rows, (0, 1))
    return torch.cat([padded, new_row[:, None, response_start:]], dim=1)


def _window(rows: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Every candidate's response window: the beam's rows (a zero column added) and the candidate's row last,
    ``(beams, k, k)`` and ``(beams, N, k+1)`` -> ``(beams, N, k+1, k+1)``."""
    beams, n, width = candidate.shape
    padded = nn.functional.pad(rows, (0, 1))[:, None].expand(beams, n, width - 1, width)
    return torch.cat([padded, candidate[:, :, None, :]], dim=2)


@contextlib.contextmanager
def _side_pass(patch: Patch) -> Iterator[None]:
    """A forward of OPERA's own (the candidates): the engine's per-sequence state is left as it was."""
    saved_generation, saved_info, saved_rows = patch.generation, patch.state.info, patch.state.memory_rows
    patch.generation = GenerationState(passes=0, visual_memory=None)
    try:
        yield
    finally:
        patch.generation, patch.state.info, patch.state.memory_rows = saved_generation, saved_info, saved_rows


def _eos_token_id(criteria: StoppingCriteriaList, model: nn.Module, given: Any = None) -> Optional[List[int]]:
    """The end-of-sequence ids as transformers 4.40's ``_beam_search`` finds them (``given``: its deprecated
    ``eos_token_id`` argument)."""
    found = [c.eos_token_id.tolist() for c in criteria if hasattr(c, "eos_token_id")]
    eos = given if given is not None else found[0] if found else model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else eos


def _merge(results: List[_SampleResult], input_ids: torch.Tensor, num_beams: int, options: Dict[str, Any]):
    """The samples' results as one ``generate()`` output: each sample's generated tokens after its
    original (padded) prompt, right-padded with ``pad_token_id``."""
    pad = options.get("pad_token_id")
    pieces = []
    for i, result in enumerate(results):
        generated = result.sequences[:, result.prompt_length:]
        original = input_ids[i * num_beams:i * num_beams + 1].expand(generated.shape[0], -1)
        pieces.append(torch.cat([original, generated], dim=1))
    width = max(p.shape[1] for p in pieces)
    if any(p.shape[1] != width for p in pieces) and pad is None:
        raise ValueError("samples of different lengths need a pad_token_id to be stacked")
    sequences = torch.cat([nn.functional.pad(p, (0, width - p.shape[1]), value=pad or 0) for p in pieces])
    if not options.get("return_dict_in_generate"):
        return sequences
    steps = max(len(r.scores) or len(r.logits) or len(r.attentions) or len(r.hidden_states) for r in results)

    def stacked(name: str):
        if not any(getattr(r, name) for r in results):
            return None
        out = []
        for t in range(steps):
            parts = []
            for r in results:
                own = getattr(r, name)
                parts.append(own[t] if t < len(own) else torch.full_like(own[-1], float("-inf")))
            out.append(torch.cat(parts, dim=0))
        return tuple(out)

    def per_step(name: str):   # one sample only (checked before the search)
        values = getattr(results[0], name)
        return tuple(values) if values else None

    sequence_scores = None
    if results[0].sequence_scores is not None:
        sequence_scores = torch.cat([r.sequence_scores for r in results])
    beam_indices = None
    if results[0].beam_indices is not None:
        width_bi = max(r.beam_indices.shape[1] for r in results)
        beam_indices = torch.cat([
            nn.functional.pad(torch.where(r.beam_indices >= 0, r.beam_indices + i * num_beams, r.beam_indices),
                              (0, width_bi - r.beam_indices.shape[1]), value=-1)
            for i, r in enumerate(results)
        ])
    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences, sequences_scores=sequence_scores, scores=stacked("scores"), logits=stacked("logits"),
        beam_indices=beam_indices, attentions=per_step("attentions"), hidden_states=per_step("hidden_states"),
        past_key_values=results[0].past_key_values if len(results) == 1 else None,
    )


def install(patch: Patch, config: OperaConfig) -> Opera:
    """Add OPERA's hooks; ``hallupatch.apply`` has already run ``config.validate_for``."""
    return Opera(patch, config)


register_method(Method(name="opera", config_cls=OperaConfig, install=install, combinable=False))
