"""The model-agnostic engine: hooks on module instances, per-pass state and the visual memory.

One :class:`Patch` exists per patched model (stored as ``model._hallupatch``). It records every hook
handle and every replaced instance attribute so :meth:`Patch.undo` restores the exact original model.
Methods (``hallupatch.methods``) install their behaviour through :meth:`Patch.hook`, :meth:`Patch.wrap`
and :meth:`Patch.on_pass_start`; they read the per-pass state from :attr:`Patch.state`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from hallupatch.spec import ModelParts, PassInfo, bind_call

PATCH_ATTRIBUTE = "_hallupatch"


@dataclass
class PassState:
    """The forward pass in flight (its ``info`` is set at every pass start)."""

    info: Optional[PassInfo] = None

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
    """What the model's call and its visual module handed over for the pass about to start."""

    images: List[torch.Tensor] = field(default_factory=list)   # visual tokens captured, one tensor per call
    input_ids: Optional[torch.Tensor] = None                    # the newest input_ids of the top-level model


class Patch:
    """All the changes hallupatch made to one model instance, and the state they share."""

    def __init__(self, model: nn.Module, parts: ModelParts):
        self.model = model
        self.parts = parts
        self.configs: dict = {}   # method name -> its config
        self.methods: dict = {}   # method name -> what its install() returned
        self.state = PassState()              # per pass
        self.generation = GenerationState()   # per sequence (prefill to prefill)
        self.pending = PendingInputs()        # handed over for the next pass
        # per patch: visual tokens given with set_visual_memory (user data, kept across re-apply)
        self.explicit_memory: Optional[List[Optional[torch.Tensor]]] = None
        self._handles: list = []
        self._wrapped: list = []
        self._pass_callbacks: List[Callable[[PassInfo], None]] = []
        self._install_engine_hooks()

    # -- primitives used by methods -------------------------------------------------------------
    def hook(self, module: nn.Module, fn: Callable, *, pre: bool = False, with_kwargs: bool = False):
        """Register a forward (pre-)hook on this module instance, removed again by :meth:`undo`."""
        if pre:
            handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        else:
            handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
        self._handles.append(handle)
        return handle

    def wrap(self, obj: Any, attr: str, new_value: Any) -> None:
        """Set an instance attribute (e.g. a bound method replacement), restored by :meth:`undo`."""
        had_own = attr in vars(obj)
        self._wrapped.append((obj, attr, had_own, vars(obj).get(attr)))
        setattr(obj, attr, new_value)

    def on_pass_start(self, callback: Callable[[PassInfo], None]) -> None:
        """Call ``callback(info)`` at the start of every decoder-stack forward, after the engine's update."""
        self._pass_callbacks.append(callback)

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

    # -- engine hooks ---------------------------------------------------------------------------
    def _install_engine_hooks(self) -> None:
        self.hook(self.model, self._remember_input_ids, pre=True, with_kwargs=True)
        merge = self.parts.spec.visual_merge_method
        if merge is not None:
            self.wrap(self.model, merge, functools.partial(self._capture_merged_visual_tokens, getattr(self.model, merge)))
        elif self.parts.visual is not None:
            self.hook(self.parts.visual, self._capture_visual_tokens)
        self.hook(self.parts.pass_start, self._start_pass, pre=True, with_kwargs=True)

    def _remember_input_ids(self, module, args, kwargs):
        ids = bind_call(module, args, kwargs).get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            self.pending.input_ids = ids

    def _capture_visual_tokens(self, module, args, output):
        tokens = self.parts.spec.visual_output(output)
        self.pending.images.append(tokens.detach())

    def _capture_merged_visual_tokens(self, merge: Callable, image_features: torch.Tensor, *args, **kwargs):
        """Stands in for the model's merge method (``FamilySpec.visual_merge_method``): its first argument is
        the visual tokens as merged into the sequence."""
        self.pending.images.append(self.parts.spec.visual_output(image_features).detach())
        return merge(image_features, *args, **kwargs)

    def _start_pass(self, module, args, kwargs):
        info = self.parts.spec.pass_info(module, args, kwargs)
        self.state.info = info
        if info.is_prefill:
            self.generation = GenerationState(passes=0, visual_memory=self._memory_for_prefill(info.batch_size))
        else:
            self.generation.passes += 1
        self.pending = PendingInputs()
        for callback in self._pass_callbacks:
            callback(info)

    def _memory_for_prefill(self, batch_size: int) -> Optional[List[Optional[torch.Tensor]]]:
        """The visual memory of a new sequence: explicit tokens if set, else this prefill's images."""
        if self.explicit_memory is not None:
            if len(self.explicit_memory) != batch_size:
                raise ValueError(
                    f"set_visual_memory was given {len(self.explicit_memory)} samples but the batch has "
                    f"{batch_size}; call hallupatch.set_visual_memory(model, tokens) with one entry per sample."
                )
            return self.explicit_memory
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
        if batch_size == 1:
            return [num_images]
        raise RuntimeError(
            f"hallupatch could not tell which of the {num_images} images belong to which of the {batch_size} "
            "samples; pass one image per sample, or mark each image with the model's image token."
        )


def get_patch(model: nn.Module) -> Optional[Patch]:
    """The :class:`Patch` of a patched model, or ``None``."""
    return vars(model).get(PATCH_ATTRIBUTE)


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
