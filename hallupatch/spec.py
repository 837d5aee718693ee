"""Model-family specs: *where* the parts of a model are, never *what* an algorithm does.

A family is described by a :class:`FamilySpec` in ``patches/<family>.py`` and registered with
:func:`register_family`. The engine resolves a spec against a model instance into a
:class:`ModelParts` (the actual modules), and every algorithm works on ``ModelParts`` only, so no
algorithm ever branches on the family.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn


@dataclass
class PassInfo:
    """What the engine needs to know about one forward pass of the decoder stack.

    ``real_positions``: bool ``(batch, new_positions)`` mask of the non-padding positions that this
    pass processes (``None`` = no padding). ``is_prefill``: the pass starts a new sequence (no cache).
    """

    real_positions: Optional[torch.Tensor]
    is_prefill: bool
    batch_size: int


def bind_call(module: nn.Module, args: tuple, kwargs: dict) -> Dict[str, Any]:
    """Map a forward call's positional and keyword arguments to parameter names (the keywords a
    ``**kwargs`` parameter collects, as PEFT's wrappers have, by their own names)."""
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return dict(kwargs)
    call = dict(bound.arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in call:
            call.update(call.pop(name))
    return call


def cache_length(past_key_values: Any) -> int:
    """Number of cached positions in a transformers cache (legacy tuple, ``Cache`` or ``None``)."""
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    if isinstance(past_key_values, (tuple, list)):
        if len(past_key_values) == 0 or past_key_values[0] is None:
            return 0
        first = past_key_values[0]
        key = first[0] if isinstance(first, (tuple, list)) else first
        return 0 if key is None else int(key.shape[-2])
    return 0


def hf_pass_info(module: nn.Module, args: tuple, kwargs: dict) -> PassInfo:
    """PassInfo for decoder stacks called like transformers' ``LlamaModel.forward``.

    The 2-D ``attention_mask`` covers cached plus new positions; the new positions are its last
    ``seq_len`` columns. A pass is a prefill when the cache is empty.
    A 4-D mask (already expanded by a caller) is not read: positions are then treated as all real.
    """
    call = bind_call(module, args, kwargs)
    embeds = call.get("inputs_embeds")
    ids = call.get("input_ids")
    seq_len = (embeds if embeds is not None else ids).shape[1]
    mask = call.get("attention_mask")
    real = None
    if mask is not None and mask.dim() == 2:
        real = mask[:, -seq_len:].bool()
    return PassInfo(
        real_positions=real,
        is_prefill=cache_length(call.get("past_key_values")) == 0,
        batch_size=(embeds if embeds is not None else ids).shape[0],
    )


def one_token_per_image(model: nn.Module) -> int:
    """The default of :attr:`FamilySpec.tokens_per_image`: one placeholder token marks one image."""
    return 1


def no_image_token(model: nn.Module) -> Optional[int]:
    """The default ``FamilySpec.image_token_id``: the family marks no image in ``input_ids``."""
    return None


def no_image_wrappers(model: nn.Module) -> Tuple[int, ...]:
    """The default ``FamilySpec.image_wrapper_token_ids``: nothing wraps the image token."""
    return ()


def visual_output_as_is(output: Any) -> torch.Tensor:
    """The default ``FamilySpec.visual_output``: the visual module returns ``(num_images, tokens, hidden)``."""
    return output


@dataclass(frozen=True)
class FamilySpec:
    """Declarative description of one model family.

    Every ``*_paths`` field lists dotted attribute paths from the top-level model, tried in order;
    the first one that exists wins (so one spec covers e.g. ``LlamaForCausalLM`` and a
    ``LlavaForConditionalGeneration`` wrapping one). Paths in ``layer_*`` fields are relative to
    one decoder layer.

    Detection is structural: a model belongs to the family when ``layers_paths`` resolves to a
    ``ModuleList`` whose layers all have every path of ``layer_signature`` and the model has every path
    of ``model_signature``. Families are tried in registration order, so a family whose signature is
    a refinement of another's (LLaVA-NeXT of llama) is registered first.
    """

    name: str
    # the module whose forward pre-hook starts a pass once the visual tokens exist: the decoder stack for
    # llama and chatglm; block 0 for Qwen, which encodes its images inside QWenModel.forward
    pass_start_paths: Tuple[str, ...]
    layers_paths: Tuple[str, ...]         # nn.ModuleList of decoder layers
    final_norm_paths: Tuple[str, ...]
    lm_head_paths: Tuple[str, ...]
    visual_paths: Tuple[str, ...]         # module whose output are the visual tokens (may be absent)
    layer_signature: Tuple[str, ...]
    layer_ffn: str                        # the feed-forward module of a layer
    layer_ffn_in: str                     # its input projection weight (W_in of DESIGN 4b)
    layer_ffn_out: str                    # its output projection weight (W_out of DESIGN 4b)
    adapter_activation: str               # MemVR's default adapter activation for the family
    pass_info: Callable[[nn.Module, tuple, dict], PassInfo] = hf_pass_info
    # the architecture class names this spec is tested on (``hallupatch.supported()``, error messages);
    # documentation only: detection stays structural
    architectures: Tuple[str, ...] = ()
    # paths that must exist on the top-level model for it to belong to the family (besides the layers)
    model_signature: Tuple[str, ...] = ()
    # a method of the top-level model whose first argument is the visual tokens exactly as they are merged
    # into the sequence, (num_images, tokens, hidden); when set, the visual tokens are captured there
    # instead of at the output of the visual module (LLaVA-NeXT assembles tiles and image-newline rows
    # after its projector)
    visual_merge_method: Optional[str] = None
    # token id that marks one image in input_ids (one occurrence per image), read from the model. Callables
    # here are module-level functions, never lambdas, so that a patched model can be pickled.
    image_token_id: Callable[[nn.Module], Optional[int]] = no_image_token
    # tokens that only wrap an image in input_ids (Qwen2-VL's <|vision_start|> / <|vision_end|>): a prompt
    # "without its image" (M3ID's branch) drops them with the image tokens
    image_wrapper_token_ids: Callable[[nn.Module], Tuple[int, ...]] = no_image_wrappers
    # how many times image_token_id occurs in input_ids per image (Idefics2 writes one per visual token)
    tokens_per_image: Callable[[nn.Module], int] = one_token_per_image
    # turns the visual module's output into a (num_images, tokens, hidden) tensor
    visual_output: Callable[[Any], torch.Tensor] = visual_output_as_is
    # whether the last entry of the model's output_hidden_states has the final norm applied (transformers
    # models: yes; GLM-4V's own code returns the last layer's raw output there)
    final_hidden_normed: bool = True
    # the attention module of a decoder layer (path relative to the layer) that returns its attention
    # weights as output[1] when called with output_attentions=True (OPERA reads the last layer's); None
    # where the family's attention cannot return them
    layer_attention: Optional[str] = None
    # runs the ``layer_attention`` module with the family's eager formula and ``edit_scores`` applied to its
    # pre-softmax scores ``(batch, heads, queries, keys)`` after the mask (PAI's site):
    # ``eager_attention(module, original_forward, hidden_states, call_kwargs, edit_scores) -> module output``;
    # None where the family has none
    eager_attention: Optional[Callable[..., Any]] = None
    # model inputs that hold every row's images without a batch dimension (Qwen2-VL's flat ``pixel_values``
    # and ``image_grid_thw``), restricted to some rows: ``(model, input_ids, model_inputs, rows: slice) ->
    # {name: value}``; None where every image input has a batch dimension
    flat_inputs_of_rows: Optional[Callable[..., Dict[str, Any]]] = None
    # published per-method defaults for the family, e.g. {"memvr": {"starting_layer": 9}}; they
    # replace the config class's own defaults for knobs the user does not set
    method_defaults: Dict[str, Dict[str, Any]] = field(default_factory=dict)


@dataclass
class ModelParts:
    """A :class:`FamilySpec` resolved against one model instance: the hook sites the methods use.

    Layer arguments are **0-based decoder layers** ``l`` unless a name says otherwise; decoder layer
    ``l`` reads hidden-state index ``l`` and writes hidden-state index ``l + 1`` (transformers'
    ``output_hidden_states`` convention, DESIGN §4a). The sites, named for what they read:

    * ``pass_start`` (pre-hook): a forward pass of the decoder begins, the visual tokens exist;
    * ``layers[l]`` (output): the residual stream after decoder layer ``l`` (hidden-state ``l + 1``);
    * ``ffn(l)`` (output): decoder layer ``l``'s feed-forward output, before it joins the residual;
    * ``final_norm`` / ``lm_head``: the early-exit head's two halves;
    * ``visual`` (output): the visual tokens, one row per token, as the decoder receives them.
    """

    spec: FamilySpec
    model: nn.Module
    pass_start: nn.Module     # see FamilySpec.pass_start_paths
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    visual: Optional[nn.Module]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def ffn(self, layer: int) -> nn.Module:
        """The feed-forward module of 0-based decoder layer ``layer``."""
        return get_path(self.layers[layer], self.spec.layer_ffn)

    def ffn_weights(self, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(W_in, W_out)`` of 0-based decoder layer ``layer``'s feed-forward module (DESIGN §4b)."""
        block = self.layers[layer]
        return applied_weight(block, self.spec.layer_ffn_in), applied_weight(block, self.spec.layer_ffn_out)


_MISSING = object()


def applied_weight(block: nn.Module, path: str) -> torch.Tensor:
    """The weight at ``path`` as the layer applies it: a PEFT LoRA layer whose adapters are active and not
    merged into the base weight adds their deltas (``get_delta_weight``); any other module's weight as is."""
    owner_path, _, name = path.rpartition(".")
    owner = get_path(block, owner_path) if owner_path else block
    weight = getattr(owner, name)
    adapters = getattr(owner, "lora_A", None)
    if name != "weight" or adapters is None or not hasattr(owner, "get_delta_weight"):
        return weight
    if owner.merged or owner.disable_adapters:
        return weight
    active = [a for a in owner.active_adapters if a in adapters]
    return weight + sum(owner.get_delta_weight(a) for a in active) if active else weight


def get_path(obj: Any, path: str, default: Any = _MISSING) -> Any:
    """``get_path(model, "language_model.model.layers")``; raises AttributeError unless default given."""
    for name in path.split("."):
        nxt = getattr(obj, name, _MISSING)
        if nxt is _MISSING or nxt is None:
            if default is _MISSING:
                raise AttributeError(path)
            return default
        obj = nxt
    return obj


def first_path(obj: Any, paths: Sequence[str]) -> Optional[Any]:
    for path in paths:
        found = get_path(obj, path, None)
        if found is not None:
            return found
    return None


_REGISTRY: List[FamilySpec] = []


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add (or replace, by name) a family spec in the registry."""
    _REGISTRY[:] = [s for s in _REGISTRY if s.name != spec.name] + [spec]
    return spec


def registered_families() -> List[FamilySpec]:
    import hallupatch.patches  # noqa: F401  (registers the built-in families)

    return list(_REGISTRY)


def supported() -> List[str]:
    """The architecture class names hallupatch supports, in detection order (``hallupatch.supported()``)."""
    return [name for spec in registered_families() for name in spec.architectures]


def matches(spec: FamilySpec, model: nn.Module) -> bool:
    layers = first_path(model, spec.layers_paths)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return False
    if any(get_path(model, p, None) is None for p in spec.model_signature):
        return False
    return all(get_path(layer, p, None) is not None for layer in layers for p in spec.layer_signature)


def resolve(model: nn.Module) -> ModelParts:
    """Find the family of ``model`` by structure and return its parts.

    Raises ``TypeError`` naming the supported architectures and families when none matches.
    """
    families = registered_families()
    for spec in families:
        if not matches(spec, model):
            continue
        parts = dict(
            pass_start=first_path(model, spec.pass_start_paths),
            layers=first_path(model, spec.layers_paths),
            final_norm=first_path(model, spec.final_norm_paths),
            lm_head=first_path(model, spec.lm_head_paths),
        )
        missing = [name for name, module in parts.items() if module is None]
        if missing:
            continue
        return ModelParts(spec=spec, model=model, visual=first_path(model, spec.visual_paths), **parts)
    names = ", ".join(s.name for s in families)
    raise TypeError(
        f"hallupatch does not support {type(model).__name__}: supported architectures are "
        f"{', '.join(supported())} (supported families are {names}; a subclass or any model with the same "
        "module structure works too). See hallupatch.supported()."
    )
