"""The second branch shared by the field's contrast baselines (VCD, ICD, M3ID, PAI; DESIGN §4e).

A *second branch* is a forward of the same model on other inputs (a distorted image, another system prompt,
no image) with its own KV cache, run once per decoding step of a plain ``generate()``. A method built on it
(:class:`TwoBranch` subclass, one file each) says three things:

- :meth:`TwoBranch.branch_prompt`: the branch's prompt (ids, attention mask, image) from the call;
- :meth:`TwoBranch.combine`: how the main scores and the branch's last-position logits become the scores;
- :attr:`TwoBranch.placement`: ``"first"`` (before every transformers processor and warper: VCD, ICD, M3ID) or
  ``"after_processors"`` (after transformers' logits processors, before the warpers: PAI's CFG processor).

The branch follows the main branch's tokens: at step ``s >= 1`` it is fed the token the main branch chose at
step ``s - 1``, through the model's own ``prepare_inputs_for_generation``, exactly as ``generate()`` feeds the
main branch. The published call forms are accepted: ``generate(images_cd=...)``, ``generate(input_ids_cd=...,
attention_mask_cd=...)`` and the per-call ``cd_alpha`` / ``cd_beta``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from hallupatch.engine import Patch
from hallupatch.spec import cache_length

#: ``generate()`` keywords that carry the image: llava-hf (``pixel_values``), the original LLaVA (``images``)
IMAGE_INPUTS: Tuple[str, ...] = ("pixel_values", "images")
#: ``generate()`` keywords that go with the image into the branch as given (Qwen2-VL's per-image patch grid)
IMAGE_COMPANIONS: Tuple[str, ...] = ("image_grid_thw",)
#: ``generate()`` keywords a second branch cannot follow (it would see them unchanged or not at all)
REFUSED_INPUTS: Tuple[str, ...] = ("pixel_values_videos", "video_grid_thw")
#: the published samplers' extra ``generate()`` keywords; each method accepts those in its ``call_inputs``
PUBLISHED_CALL_INPUTS: Tuple[str, ...] = ("images_cd", "input_ids_cd", "attention_mask_cd", "cd_alpha", "cd_beta")


@dataclass
class GenerateCall:
    """The main branch's inputs of one ``generate()`` call and the published extras given with it."""

    input_ids: torch.Tensor                      # (batch, prompt length), as given (rows not yet repeated)
    attention_mask: Optional[torch.Tensor]
    image_input: Optional[str]                   # which of IMAGE_INPUTS carries the image, if any
    image: Optional[torch.Tensor]
    extras: Dict[str, Any] = field(default_factory=dict)   # the PUBLISHED_CALL_INPUTS given
    companions: Dict[str, Any] = field(default_factory=dict)   # the IMAGE_COMPANIONS given


@dataclass
class BranchPrompt:
    """The second branch's prompt: ``image=None`` runs it without an image (and without its companions)."""

    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor] = None
    image: Optional[torch.Tensor] = None


@dataclass
class ContrastTrace:
    """Per decoding step of the latest ``generate()``, float32 ``(batch, vocab)`` tensors: the scores the
    method received from the main branch (raw logits for VCD/ICD/M3ID; after transformers' processors for
    PAI), the second branch's raw last-position logits, and the method's output before any later processor."""

    main: List[torch.Tensor] = field(default_factory=list)
    branch: List[torch.Tensor] = field(default_factory=list)
    contrasted: List[torch.Tensor] = field(default_factory=list)
    images_cd: Optional[torch.Tensor] = None     # VCD: the distorted image the branch saw


@dataclass
class BranchState:
    """The second branch during one ``generate()``: its tokens, mask, image inputs and its own cache."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_inputs: Dict[str, torch.Tensor]
    past_key_values: Any = None
    logits: Optional[torch.Tensor] = None   # (batch, vocab) float32, last position of the latest forward


def remove_tokens(ids: torch.Tensor, mask: Optional[torch.Tensor], tokens: Tuple[int, ...], pad_id: int
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``ids`` with every one of ``tokens`` removed from each row, left-padded again with ``pad_id`` (mask 0)."""
    mask = torch.ones_like(ids) if mask is None else mask
    keep = ~torch.isin(ids, torch.tensor(tokens, dtype=ids.dtype, device=ids.device))
    rows = [(i[k], m[k]) for i, m, k in zip(ids, mask, keep)]
    width = max(len(i) for i, _ in rows)
    out_ids = torch.full((len(rows), width), pad_id, dtype=ids.dtype, device=ids.device)
    out_mask = torch.zeros((len(rows), width), dtype=mask.dtype, device=mask.device)
    for r, (i, m) in enumerate(rows):
        if len(i):
            out_ids[r, width - len(i):] = i
            out_mask[r, width - len(i):] = m
    return out_ids, out_mask


def pad_token_id(model) -> Optional[int]:
    """The model's padding id (generation config first, then config), or ``None``."""
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        pad = getattr(source, "pad_token_id", None)
        if pad is not None:
            return int(pad)
    return None


def image_free_prompt(method: TwoBranch, call: GenerateCall) -> BranchPrompt:
    """The prompt with every image token and the family's image wrapper tokens (Qwen2-VL's
    ``<|vision_start|>`` / ``<|vision_end|>``) removed, each row left-padded again, no image: M3ID's and
    PAI's branch."""
    spec, model = method.parts.spec, method.patch.model
    token = spec.image_token_id(model)
    if token is None or not bool((call.input_ids == token).any()):
        raise ValueError(
            f"method {method.name!r} contrasts with the prompt without its image, but the prompt has no image token "
            f"({token}); give the prompt with its image placeholder (e.g. '<image>')"
        )
    pad = pad_token_id(method.patch.model)
    removed = (token,) + tuple(spec.image_wrapper_token_ids(model))
    ids, mask = remove_tokens(call.input_ids, call.attention_mask, removed, 0 if pad is None else pad)
    return BranchPrompt(ids, mask, None)


def plausibility_cutoff(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """``log beta + max logits`` per row, computed as the published code does (``beta = 0``: ``-inf``)."""
    return torch.log(torch.tensor(beta)).to(logits.device) + logits.max(dim=-1, keepdim=True).values


class TwoBranch:
    """One installation of a two-branch method on a patched model (see the module docstring)."""

    #: ``"first"`` or ``"after_processors"``: where the method's logits processor goes
    placement: str = "first"
    #: which of :data:`PUBLISHED_CALL_INPUTS` this method takes in ``generate()``
    call_inputs: Tuple[str, ...] = ()

    def __init__(self, patch: Patch, config: Any):
        self.patch = patch
        self.config = config
        self.parts = patch.parts
        self.trace = ContrastTrace()
        self.call: Optional[GenerateCall] = None
        self.branch: Optional[BranchState] = None
        self.in_branch = False                     # a branch forward is running
        self.main_image_inputs: Optional[set] = None   # image inputs the main prefill's model call received
        patch.wrap_method(patch.model, "generate", self._generate)
        patch.wrap_method(patch.model, "_get_logits_processor", self._get_logits_processor)
        patch.hook(patch.model, self._model_call, pre=True, with_kwargs=True)

    # -- what a method defines ----------------------------------------------------------------------
    def branch_prompt(self, call: GenerateCall) -> BranchPrompt:
        raise NotImplementedError

    def combine(self, main: torch.Tensor, branch: torch.Tensor, step: int) -> torch.Tensor:
        raise NotImplementedError

    def start(self, call: GenerateCall) -> None:
        """Called at the start of every ``generate()``, before the prefill (VCD draws its noise here)."""

    def adds_processor(self) -> bool:
        """Whether this configuration adds its logits processor (PAI with ``use_cfg=False`` does not)."""
        return True

    def prompt_inputs(self, prompts: List[str], encode: Callable[[List[str]], Any]) -> Dict[str, Any]:
        """Extra ``generate()`` inputs built from the rendered prompts (ICD: its branch's ids), tokenized with
        ``encode``; none by default."""
        return {}

    def uses_branch(self) -> bool:
        """Whether this configuration runs a second branch at all (PAI without its CFG part does not)."""
        return True

    # -- the published per-call knobs ----------------------------------------------------------------
    def knob(self, name: str, call_name: str) -> float:
        """The config's knob ``name``, unless this ``generate()`` call gave the published ``call_name``."""
        given = self.call.extras.get(call_name) if self.call is not None else None
        return float(getattr(self.config, name) if given is None else given)

    # -- generate() --------------------------------------------------------------------------------
    def _generate(self, original, *args, **kwargs):
        # a published extra given as None means "not given" (the published scripts pass e.g. images_cd=None)
        extras = {name: kwargs.pop(name) for name in PUBLISHED_CALL_INPUTS if name in kwargs}
        extras = {name: value for name, value in extras.items() if value is not None}
        refused = sorted(set(extras) - set(self.call_inputs))
        if refused:
            raise ValueError(
                f"generate() got {refused}, which method {self.name!r} does not use; it takes "
                f"{list(self.call_inputs) or 'none of ' + str(list(PUBLISHED_CALL_INPUTS))}"
            )
        for name in ("cd_alpha", "cd_beta"):
            value = extras.get(name)
            if value is not None:
                self.config.check_value(name[3:], value)
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(
                f"method {self.name!r} needs the prompt's token ids in generate(input_ids=...) (a 2-D tensor) "
                "to build its second branch"
            )
        refused = [name for name in REFUSED_INPUTS if kwargs.get(name) is not None]
        if refused:
            raise ValueError(
                f"method {self.name!r} contrasts images; generate() got {refused} (a video), which its second "
                "branch cannot follow: give the frames as images, or run this prompt without the method"
            )
        image_input = next((name for name in IMAGE_INPUTS if kwargs.get(name) is not None), None)
        companions = {name: kwargs[name] for name in IMAGE_COMPANIONS if kwargs.get(name) is not None}
        call = GenerateCall(ids, kwargs.get("attention_mask"), image_input,
                            kwargs.get(image_input) if image_input else None, extras, companions)
        self.trace = ContrastTrace()
        self.branch, self.main_image_inputs = None, None
        self.call = call
        try:
            self.start(call)
            return original(*args, **kwargs)
        finally:
            self.call, self.branch = None, None   # the branch's cache is freed with the call

    def _model_call(self, module, args, kwargs):
        if self.call is not None and not self.in_branch and self.main_image_inputs is None:
            self.main_image_inputs = {name for name in IMAGE_INPUTS if kwargs.get(name) is not None}

    def _get_logits_processor(self, original, *args, **kwargs):
        processors = original(*args, **kwargs)
        config = kwargs.get("generation_config", args[0] if args else None)
        if self.call is None:
            return processors
        if config is not None and (config.num_beams or 1) > 1:
            raise ValueError(
                f"method {self.name!r} runs with greedy decoding and sampling; beam search is refused "
                f"(got num_beams={config.num_beams}): use num_beams=1"
            )
        if config is not None and config.penalty_alpha is not None and config.penalty_alpha > 0 and (config.top_k or 0) > 1:
            raise ValueError(f"method {self.name!r} does not combine with contrastive search (penalty_alpha)")
        if not self.adds_processor():
            return processors
        processor = ContrastProcessor(self)
        if self.placement == "first":
            processors.insert(0, processor)
        else:
            processors.append(processor)
        return processors

    # -- the second branch -------------------------------------------------------------------------
    @contextlib.contextmanager
    def branch_forward(self) -> Iterator[None]:
        self.in_branch = True
        try:
            yield
        finally:
            self.in_branch = False

    def _open_branch(self) -> BranchState:
        prompt = self.branch_prompt(self.call)
        repeat = self.patch.call.row_repeat   # generate() repeats rows in place (num_return_sequences)
        ids = prompt.input_ids.repeat_interleave(repeat, dim=0)
        mask = torch.ones_like(ids) if prompt.attention_mask is None else prompt.attention_mask
        mask = mask.to(ids.device).repeat_interleave(repeat, dim=0)
        images = {}
        if prompt.image is not None:
            if self.call.companions and repeat > 1:
                raise ValueError(
                    f"method {self.name!r} on this model repeats no image for num_return_sequences > 1 (its image "
                    f"inputs {sorted(self.call.companions)} have no batch dimension): use num_return_sequences=1"
                )
            images[self.call.image_input] = prompt.image.repeat_interleave(repeat, dim=0)
            images.update(self.call.companions)
        state = BranchState(ids, mask, images)
        if not images or self.call.image_input in (self.main_image_inputs or set()):
            self._forward(state)
            return state
        # the model's own generate() consumed the image before the loop (the original LLaVA splices it into
        # inputs_embeds): the branch's prefill is the model's forward on ids and image, which splices it the
        # same way; later steps run without the image, on a mask as long as the cache, like the main branch
        if not bool(mask.all()):
            raise ValueError(
                f"method {self.name!r} on this model class needs prompts without padding (batch them by length "
                "or run them one at a time): its generate() merges the image into the sequence itself"
            )
        with self.branch_forward():
            output = self.patch.model(input_ids=ids, use_cache=True, return_dict=True, **images)
        state.past_key_values = output.past_key_values
        state.logits = output.logits[:, -1, :].float()
        state.image_inputs = {}
        state.attention_mask = torch.ones((ids.shape[0], cache_length(state.past_key_values)),
                                          dtype=mask.dtype, device=mask.device)
        return state

    def _advance(self, state: BranchState, tokens: torch.Tensor) -> None:
        state.input_ids = torch.cat([state.input_ids, tokens], dim=1)
        state.attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones((tokens.shape[0], 1))], dim=1)
        self._forward(state)

    def _forward(self, state: BranchState) -> None:
        model = self.patch.model
        inputs = model.prepare_inputs_for_generation(
            state.input_ids, past_key_values=state.past_key_values, attention_mask=state.attention_mask,
            use_cache=True, **state.image_inputs,
        )
        with self.branch_forward():
            output = model(**inputs, return_dict=True)
        state.past_key_values = output.past_key_values
        state.logits = output.logits[:, -1, :].float()

    def branch_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The branch's next-token logits for this step (opening it at the first step)."""
        if self.branch is None:
            self.branch = self._open_branch()
        else:
            self._advance(self.branch, input_ids[:, -1:].to(self.branch.input_ids.device))
        return self.branch.logits

    def step(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.call is None:
            raise RuntimeError(
                f"method {self.name!r}'s processor ran outside the patched model's generate(); call model.generate(...)"
            )
        step = len(self.trace.main)
        main = scores.float()
        branch = self.branch_logits(input_ids).to(main.device) if self.uses_branch() else None
        out = self.combine(main, branch, step)
        self.trace.main.append(main.detach())
        if branch is not None:
            self.trace.branch.append(branch.detach())
        self.trace.contrasted.append(out.detach())
        return out

    @property
    def name(self) -> str:
        return type(self.config).method_name


class ContrastProcessor:
    """The logits processor a two-branch method adds to ``generate()``."""

    def __init__(self, method: TwoBranch):
        self.method = method

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.method.step(input_ids, scores)


def branch_call_inputs(model: Any, prompts: List[str], encode: Callable[[List[str]], Any]) -> Dict[str, Any]:
    """The ``generate()`` inputs that the two-branch method patched into ``model`` builds from the rendered
    ``prompts`` (ICD: ``input_ids_cd`` / ``attention_mask_cd``), tokenized with ``encode`` (texts -> a mapping
    with ``input_ids`` and optionally ``attention_mask``, as the caller tokenizes its own prompts); ``{}`` for
    any other model. Used by the eval backends so that a harness never needs to know the method."""
    from hallupatch.engine import get_patch

    patch = get_patch(model)
    out: Dict[str, Any] = {}
    for method in (patch.methods.values() if patch is not None else ()):
        if isinstance(method, TwoBranch):
            out.update(method.prompt_inputs(list(prompts), encode))
    return out


def contrast_raw(main: torch.Tensor, branch: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """VCD / ICD: ``(1 + alpha) z - alpha z'`` on raw logits, ``-inf`` where ``z < log beta + max z``."""
    diffs = (1 + alpha) * main - alpha * branch
    return diffs.masked_fill(main < plausibility_cutoff(main, beta), -float("inf"))


def check_alpha(value: Any, name: str = "alpha") -> float:
    """``alpha >= 0``, a real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0 (the contrast strength); got {value!r}")
    return float(value)


def check_beta(value: Any, name: str = "beta") -> float:
    """``0 <= beta <= 1`` (0: no plausibility mask)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(
            f"{name} must be a number in [0, 1] (the plausibility cutoff log(beta) + max logit; 0 = no mask); got {value!r}"
        )
    return float(value)


def check_family(parts: Any, method: str, families: Dict[str, str], why_not: str) -> None:
    """Refuse a model whose family is not a key of ``families`` (family name -> the classes it was tested on),
    saying ``why_not`` (what the port would need)."""
    if parts.spec.name not in families:
        taken = "; ".join(f"{name}: {classes}" for name, classes in families.items())
        raise TypeError(
            f"method {method!r} does not run on {type(parts.model).__name__} (family {parts.spec.name!r}): "
            f"{why_not}. It takes the families {taken}. Use method 'memvr' or 'dola' on this model"
        )
