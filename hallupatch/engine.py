"""The model-agnostic engine: hooks on module instances, per-pass state and the visual memory.

One :class:`Patch` exists per patched model (stored as ``model._hallupatch``). It records every hook
handle and every replaced instance attribute so :meth:`Patch.undo` restores the exact original model.
Methods (``hallupatch.methods``) install their behaviour through :meth:`Patch.hook`,
:meth:`Patch.wrap_method`, :meth:`Patch.on_pass_start` and :meth:`Patch.on_generate`; they read the
per-pass state from :attr:`Patch.state`.

Lifetimes: what the visual module captured (:class:`PendingInputs`) lives for one top-level call of the
model (its ``forward`` or its ``generate``): a call that fails, or a projector run outside any call, leaves
nothing behind for the next one. Every hook is a bound method (or a ``functools.partial`` of one) of an
object reachable from the Patch, so ``copy.deepcopy`` and ``pickle`` of a patched model give an
independent, patched model.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from hallupatch.compat import PREPARE, generation_inputs_to_drop
from hallupatch.wrapping import MethodWrapper, method_wrapper  # noqa: F401  (MethodWrapper: re-exported)
from hallupatch.spec import ModelParts, PassInfo, bind_call

PATCH_ATTRIBUTE = "_hallupatch"


@dataclass
class PassState:
    """The forward pass in flight (set at every pass start).

    ``memory_rows[r]``: the index into :attr:`GenerationState.visual_memory` that row ``r`` of this pass
    uses, or ``None`` (no visual memory for that row).
    """

    info: Optional[PassInfo] = None
    memory_rows: List[Optional[int]] = field(default_factory=list)

    def last_positions(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """Index of each sample's last real (non-padding) position in this pass."""
        real = self.info.real_positions if self.info is not None else None
        if real is None:
            return torch.full((self.info.batch_size,), seq_len - 1, device=device, dtype=torch.long)
        positions = torch.arange(real.shape[1], device=real.device)
        return torch.where(real, positions, -1).amax(dim=1).clamp(min=0).to(device)


@dataclass
class GenerationState:
    """One sequence's state, from its prefill to the next prefill: the passes so far and its visual memory."""

    passes: int = -1                                     # passes since the prefill (0 = the prefill)
    visual_memory: Optional[List[Optional[torch.Tensor]]] = None   # per sample: (n_vis, hidden) or None


@dataclass
class PendingInputs:
    """What the model's call and its visual module handed over for the pass about to start; discarded at
    that pass's start and when the top-level call ends, normally or not."""

    images: List[torch.Tensor] = field(default_factory=list)   # visual tokens captured, one tensor per call
    input_ids: Optional[torch.Tensor] = None                    # the newest input_ids of the top-level model


@dataclass
class CallState:
    """The top-level call in flight (``model(...)`` or ``model.generate(...)``, nested calls included)."""

    depth: int = 0        # 0 = no call in flight
    # how many rows generate() made of each row it was given (beams, num_return_sequences, contrastive
    # search's candidates: transformers' _expand_inputs_for_generation, rows repeated in place)
    row_repeat: int = 1


class Patch:
    """All the changes hallupatch made to one model instance, and the state they share."""

    def __init__(self, model: nn.Module, parts: ModelParts, wrappers: Sequence[nn.Module] = ()):
        self.model = model
        # modules around the model whose calls are calls of it (PEFT's PeftModel reaches the model's
        # forward without a module call, so the call hooks sit on the wrappers too)
        self.wrappers = list(wrappers)
        self.parts = parts
        self.configs: dict = {}   # method name -> its config
        self.methods: dict = {}   # method name -> what its install() returned
        self.state = PassState()              # per pass
        self.generation = GenerationState()   # per sequence (prefill to prefill)
        self.pending = PendingInputs()        # handed over for the next pass
        self.call = CallState()               # the top-level call in flight
        # per patch: visual tokens given with set_visual_memory (user data, kept across re-apply)
        self.explicit_memory: Optional[List[Optional[torch.Tensor]]] = None
        self._handles: list = []
        self._wrapped: list = []
        self._pass_callbacks: List[Callable[[PassInfo], None]] = []
        self._generate_callbacks: List[Callable[[Dict[str, Any]], None]] = []
        # modules that transformers' gradient_checkpointing_enable() switches (hooks are not recompute-safe)
        self._checkpointable = checkpointing_modules(model)
        self._install_engine_hooks()

    # -- primitives used by methods -------------------------------------------------------------
    def hook(self, module: nn.Module, fn: Callable, *, pre: bool = False, with_kwargs: bool = False,
             always_call: bool = False):
        """Register a forward (pre-)hook on this module instance, removed again by :meth:`undo`.

        ``fn`` must be a bound method (or a ``functools.partial`` of one), never a closure or lambda, so
        that the patched model stays deep-copyable and picklable. ``always_call``: also run the (post)
        hook when the forward raises (then ``output`` is ``None``).
        """
        if pre:
            handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        else:
            handle = module.register_forward_hook(fn, with_kwargs=with_kwargs, always_call=always_call)
        self._handles.append(handle)
        return handle

    def wrap(self, obj: Any, attr: str, new_value: Any) -> None:
        """Set an instance attribute, restored by :meth:`undo`."""
        had_own = attr in vars(obj)
        self._wrapped.append((obj, attr, had_own, vars(obj).get(attr)))
        setattr(obj, attr, new_value)

    def wrap_method(self, obj: Any, name: str, replacement: Callable) -> None:
        """Replace ``obj.name`` on the instance by ``replacement(original, *args, **kwargs)``, where
        ``original`` is the method it replaces (found at call time, so copies and unpickled models call
        their own), restored by :meth:`undo`."""
        self.wrap(obj, name, method_wrapper(obj, name, replacement))

    def on_pass_start(self, callback: Callable[[PassInfo], None]) -> None:
        """Call ``callback(info)`` at the start of every decoder-stack forward, after the engine's update."""
        self._pass_callbacks.append(callback)

    def on_generate(self, callback: Callable[[Dict[str, Any]], None]) -> None:
        """Call ``callback(kwargs)`` (``generate()``'s keyword arguments) when ``model.generate`` starts."""
        self._generate_callbacks.append(callback)

    def undo(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        for obj, attr, had_own, old in reversed(self._wrapped):
            if had_own:
                setattr(obj, attr, old)
            else:
                delattr(obj, attr)
        self._handles.clear()
        self._wrapped.clear()
        self._pass_callbacks.clear()
        self._generate_callbacks.clear()

    # -- engine hooks ---------------------------------------------------------------------------
    def _install_engine_hooks(self) -> None:
        for module in (*self.wrappers, self.model):
            self.hook(module, self._model_call_starts, pre=True, with_kwargs=True)
            self.hook(module, self._model_call_ends, always_call=True)
        self.wrap_method(self.model, "generate", self._generate)
        self.wrap_method(self.model, "_expand_inputs_for_generation", self._expand_inputs)
        # generate() must work even where the model's forward predates an input that transformers'
        # generation passes (the original LLaVA's forward and cache_position): see hallupatch.compat
        drop = generation_inputs_to_drop(self.model)
        if drop is not None:
            self.wrap_method(self.model, PREPARE, drop)
        merge = self.parts.spec.visual_merge_method
        if merge is not None:
            self.wrap_method(self.model, merge, self._capture_merged_visual_tokens)
        elif self.parts.visual is not None:
            self.hook(self.parts.visual, self._capture_visual_tokens)
        self.hook(self.parts.pass_start, self._start_pass, pre=True, with_kwargs=True)

    def _enter_call(self) -> None:
        if self.call.depth == 0:
            refuse_gradient_checkpointing(self._checkpointable)
            self.pending = PendingInputs()   # nothing captured outside a call reaches this one
            self.call.row_repeat = 1
        self.call.depth += 1

    def _leave_call(self) -> None:
        self.call.depth = max(self.call.depth - 1, 0)
        if self.call.depth == 0:
            self.pending = PendingInputs()   # a call that failed before its pass leaves nothing behind

    def _model_call_starts(self, module, args, kwargs):
        self._enter_call()
        ids = bind_call(module, args, kwargs).get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            self.pending.input_ids = ids

    def _model_call_ends(self, module, args, output):
        self._leave_call()   # also when forward raised (always_call)

    def _generate(self, original: Callable, *args, **kwargs):
        self._enter_call()
        try:
            for callback in self._generate_callbacks:
                callback(kwargs)
            return original(*args, **kwargs)
        finally:
            self._leave_call()

    def _expand_inputs(self, original: Callable, *args, **kwargs):
        self.call.row_repeat *= int(kwargs.get("expand_size", args[0] if args else 1))
        return original(*args, **kwargs)

    def _capture_visual_tokens(self, module, args, output):
        if self.call.depth == 0:
            return  # a projector run by hand (e.g. to extract features) is not an image of any pass
        tokens = self.parts.spec.visual_output(output)
        self.pending.images.append(tokens.detach())

    def _capture_merged_visual_tokens(self, merge: Callable, image_features: torch.Tensor, *args, **kwargs):
        """Stands in for the model's merge method (``FamilySpec.visual_merge_method``): its first argument is
        the visual tokens as merged into the sequence."""
        if self.call.depth > 0:  # as _capture_visual_tokens: only images of a call of the model count
            self.pending.images.append(self.parts.spec.visual_output(image_features).detach())
        return merge(image_features, *args, **kwargs)

    def _start_pass(self, module, args, kwargs):
        info = self.parts.spec.pass_info(module, args, kwargs)
        if info.is_prefill:
            self.generation = GenerationState(passes=0, visual_memory=self._memory_for_prefill(info.batch_size))
        else:
            self.generation.passes += 1
        self.state.info = info
        self.state.memory_rows = self._memory_rows(info.batch_size)
        self.pending = PendingInputs()
        for callback in self._pass_callbacks:
            callback(info)

    def _memory_rows(self, batch_size: int) -> List[Optional[int]]:
        """Which visual-memory entry each row of a pass uses: row ``r`` of a batch that generate() widened
        ``k``-fold (rows repeated in place) is entry ``r // k``."""
        memory = self.generation.visual_memory
        if memory is None:
            return [None] * batch_size
        if batch_size == len(memory):
            repeat = 1
        elif batch_size == len(memory) * self.call.row_repeat:
            repeat = self.call.row_repeat
        else:
            raise ValueError(
                f"the visual memory has {len(memory)} samples but this forward pass has {batch_size} rows; "
                "call hallupatch.set_visual_memory(model, tokens) with one entry per sample"
                + (f" (generate() repeats each sample {self.call.row_repeat} times)" if self.call.row_repeat > 1 else "")
            )
        return [r // repeat if memory[r // repeat] is not None else None for r in range(batch_size)]

    def _memory_for_prefill(self, batch_size: int) -> Optional[List[Optional[torch.Tensor]]]:
        """The visual memory of a new sequence: explicit tokens if set, else this prefill's images."""
        if self.explicit_memory is not None:
            return self.explicit_memory   # matched to the pass's rows by _memory_rows
        if not self.pending.images:
            return None  # an image-less prefill clears the memory of any previous image
        images = [img for batch in self.pending.images for img in batch]  # each (tokens, hidden)
        counts = self._images_per_sample(len(images), batch_size)
        memory: List[Optional[torch.Tensor]] = []
        start = 0
        for count in counts:
            memory.append(torch.cat(images[start:start + count], dim=0) if count else None)
            start += count
        return memory

    def _images_per_sample(self, num_images: int, batch_size: int) -> List[int]:
        token = self.parts.spec.image_token_id(self.model)
        ids = self.pending.input_ids
        if token is not None and ids is not None and ids.shape[0] == batch_size:
            per_image = self.parts.spec.tokens_per_image(self.model)
            occurrences = (ids == token).sum(dim=1)
            counts = (occurrences // per_image).tolist()
            if sum(counts) == num_images and bool((occurrences % per_image == 0).all()):
                return counts
        if num_images == batch_size:
            return [1] * batch_size
        if num_images * self.call.row_repeat == batch_size:
            # the images were projected before generate() repeated the rows (inputs_embeds spliced by the
            # model's own generate, then beams): one per sample, matched to its copies by _memory_rows
            return [1] * num_images
        if batch_size == 1:
            return [num_images]
        raise RuntimeError(
            f"hallupatch could not tell which of the {num_images} images belong to which of the {batch_size} "
            "samples; pass one image per sample, or mark each image with the model's image token."
        )


def checkpointing_modules(model: nn.Module) -> List[nn.Module]:
    """The modules that transformers' ``gradient_checkpointing_enable()`` switches on."""
    return [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]


def refuse_gradient_checkpointing(modules: Sequence[nn.Module]) -> None:
    """``ValueError`` when a forward would be recomputed for backward: hallupatch's hooks keep per-pass
    state, so they are not recompute-safe (the checkpoint would see other tensors the second time)."""
    if any(m.training and m.gradient_checkpointing for m in modules):
        raise ValueError(
            "hallupatch does not run with gradient checkpointing in training mode (a recomputed layer would "
            "see other per-pass state); call model.eval() or model.gradient_checkpointing_disable() first, "
            "or hallupatch.remove(model) before training"
        )


def user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called by this function's caller that points at the first frame
    outside hallupatch, transformers and torch (the user's ``generate()`` call)."""
    import contextlib

    import transformers

    import hallupatch

    folders = tuple(os.path.dirname(m.__file__) + os.sep for m in (hallupatch, transformers, torch))
    files = (contextlib.__file__, functools.__file__)
    frame, level = sys._getframe(2), 2
    while frame is not None and (frame.f_code.co_filename.startswith(folders) or frame.f_code.co_filename in files):
        frame, level = frame.f_back, level + 1
    return level


def require_patch(model: nn.Module, what: str) -> Patch:
    """The :class:`Patch` of a patched model; ``ValueError`` saying to apply a method first otherwise."""
    patch = get_patch(model)
    if patch is None:
        raise ValueError(f"{what} needs a patched model: call hallupatch.apply(model, method=...) first")
    return patch


def get_trace(model: nn.Module, method: str = "memvr"):
    """What ``method`` did in the latest forward / ``generate()`` of a patched model.

    ``"memvr"``: a :class:`~hallupatch.methods.memvr.MemVRTrace`, per pass and sample where retracing
    fired (``trace.trigger_layers()``, ``trace.passes[i].entropies``). ``"dola"``: a
    :class:`~hallupatch.methods.dola.LayerContrastTrace`, the premature layer each sample used per step.
    ``"vcd"``, ``"icd"``, ``"m3id"``, ``"pai"``: a :class:`~hallupatch.methods.two_branch.ContrastTrace`,
    the main and second-branch logits and the contrasted scores per step. ``"opera"``: a
    :class:`~hallupatch.methods.opera.OperaTrace`, each sample's rollbacks (``trace.rollbacks[sample]``,
    ``trace.positions(sample)``) and voted locations.
    """
    patch = require_patch(model, "get_trace")
    if method not in patch.methods:
        raise ValueError(
            f"get_trace(method={method!r}) needs a model patched with {method!r}: "
            f"hallupatch.apply(model, method={method!r}); this model is patched with {'+'.join(patch.methods)!r}"
        )
    return patch.methods[method].trace


def get_patch(model: nn.Module) -> Optional[Patch]:
    """The :class:`Patch` of a patched model (of the model inside a PEFT wrapper), or ``None``."""
    from hallupatch.model_wrappers import unwrap

    return vars(unwrap(model).base).get(PATCH_ATTRIBUTE)


def as_memory_list(tokens: Union[torch.Tensor, Sequence[Optional[torch.Tensor]], None]):
    """Normalise user-given visual tokens to a per-sample list of ``(n, hidden)`` tensors or ``None``."""
    if tokens is None:
        return None
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(0)
        if tokens.dim() != 3:
            raise ValueError("visual tokens must be (batch, n_tokens, hidden), (n_tokens, hidden) or a list of those")
        return [t for t in tokens]
    memory = []
    for t in tokens:
        if t is not None and t.dim() != 2:
            raise ValueError("each sample's visual tokens must be a (n_tokens, hidden) tensor or None")
        memory.append(t)
    return memory
