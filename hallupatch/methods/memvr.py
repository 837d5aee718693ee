"""MemVR: entropy-triggered visual retracing (DESIGN §4b).

For every forward pass and every sample with a visual memory: after each decoder layer ``l`` with
``starting_layer < l < ending_layer`` (0-based, both exclusive), an early-exit head reads the sample's
next-token distribution at its last real position; when the normalised entropy of the top-10 logits
exceeds ``entropy_threshold`` the sample triggers (once per pass), and the feed-forward output of
layer ``l + 1`` is mixed with a key-value memory built from the sample's visual tokens, at every
position of that pass.

The semantics are per forward pass, as in the published code: with a cache, a decoding step is one pass
over one new position, so the decision is made for every token. Without a cache (``use_cache=False``)
every step re-runs the whole sequence in one pass, and assisted generation checks several draft tokens
in one pass: the entropy is then read at the last position only and the retracing applies to all
positions of the pass, so results differ from cached greedy decoding (``generate()`` warns). Contrastive
search's candidate rows use their sample's visual memory (as beams do). A sample whose visual memory is
empty or all zero (``mean|Z| = 0``) is not retraced; its :class:`PassTrace` says so.
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from transformers.activations import ACT2FN

from hallupatch.early_exit import head_logits
from hallupatch.engine import Patch, user_stacklevel
from hallupatch.methods import Method, MethodConfig, register_method
from hallupatch.spec import ModelParts, PassInfo

TOP_K = 10  # the published method reads the entropy of the top-10 logits
_RANGES = {
    "retracing_ratio": "0 <= retracing_ratio <= 1",
    "entropy_threshold": "entropy_threshold >= 0",
    "layers": "0 <= starting_layer < ending_layer <= num_layers - 1",
}


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def adapter_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "identity":
        return identity
    return ACT2FN[name]


def _activation_names() -> List[str]:
    return ["identity"] + sorted(ACT2FN.keys())


@dataclass
class MemVRConfig(MethodConfig):
    """MemVR knobs. Defaults are the published LLaVA-1.5 MME setting.

    Decisions are per forward pass (module docstring): ``generate()`` without a cache or with an assistant
    model decides once per multi-token pass, so it differs from cached greedy decoding (and warns).

    Args:
        retracing_ratio: ``α`` in ``(1-α)·F(x) + α·scale·A(x)``; in ``[0, 1]``.
        entropy_threshold: a sample triggers when the normalised top-10 entropy exceeds this; ``>= 0``.
        starting_layer, ending_layer: 0-based decoder layers; entropy is checked after layers ``l`` with
            ``starting_layer < l < ending_layer`` (both exclusive, as published) and retracing happens in
            layer ``l + 1``. Must satisfy ``0 <= starting_layer < ending_layer <= num_layers - 1``.
        adapter_activation: ``φ`` of the visual adapter; ``None`` uses the model family's default
            (identity for llama, SiLU for qwen and chatglm). Any transformers activation name or "identity".
        early_exit_norm: apply the final norm in the early-exit head (the design's choice; the
            published Qwen/GLM paths skipped it).
    """

    retracing_ratio: float = 0.12
    entropy_threshold: float = 0.75
    starting_layer: int = 5
    ending_layer: int = 16
    adapter_activation: Optional[str] = None
    early_exit_norm: bool = True

    def validate(self) -> None:
        for name in ("retracing_ratio", "entropy_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number ({_RANGES[name]}); got {value!r}")
            setattr(self, name, float(value))
        for name in ("starting_layer", "ending_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer layer index ({_RANGES['layers']}); got {value!r}")
            setattr(self, name, int(value))
        if not isinstance(self.early_exit_norm, bool):
            raise ValueError(f"early_exit_norm must be True or False; got {self.early_exit_norm!r}")
        if not 0.0 <= float(self.retracing_ratio) <= 1.0:
            raise ValueError(f"retracing_ratio must be in [0, 1]; got {self.retracing_ratio}")
        if not float(self.entropy_threshold) >= 0.0:
            raise ValueError(f"entropy_threshold must be >= 0 (normalised entropy lies in [0, 1]); got {self.entropy_threshold}")
        if not 0 <= int(self.starting_layer) < int(self.ending_layer):
            raise ValueError(
                "starting_layer and ending_layer must satisfy 0 <= starting_layer < ending_layer <= num_layers - 1; "
                f"got starting_layer={self.starting_layer}, ending_layer={self.ending_layer}"
            )
        if self.adapter_activation is not None and self.adapter_activation not in _activation_names():
            raise ValueError(
                f"adapter_activation {self.adapter_activation!r} does not exist; use None (the family default) "
                f"or one of {_activation_names()}"
            )

    def validate_for(self, parts: ModelParts) -> None:
        last = parts.num_layers - 1
        if self.ending_layer > last:
            raise ValueError(
                f"ending_layer must be <= num_layers - 1 = {last} for this model (0 <= starting_layer < "
                f"ending_layer <= {last}); got ending_layer={self.ending_layer}"
            )

    @property
    def checked_layers(self) -> range:
        """0-based layers after which the entropy is read."""
        return range(self.starting_layer + 1, self.ending_layer)


@dataclass
class PassTrace:
    """MemVR's record of one forward pass (a prefill or one decoding step).

    ``trigger_layer[b]``: the 0-based layer after which sample ``b``'s entropy exceeded the threshold
    (retracing then ran in layer ``trigger_layer + 1``), or ``None``. ``entropies[b]``: the normalised
    top-10 entropies computed for sample ``b``, by 0-based layer. ``skipped[b]``: why a sample that has a
    visual memory was not checked (an empty or all-zero memory), else ``None``. In a pass that
    ``generate()`` widened (contrastive search's candidates), ``b`` is a row: sample ``i``'s ``k``
    candidates are rows ``i*k`` to ``i*k + k - 1``.
    """

    is_prefill: bool
    trigger_layer: List[Optional[int]]
    skipped: List[Optional[str]] = field(default_factory=list)
    _entropy_rows: List[tuple] = field(default_factory=list, repr=False)  # (layer, rows, values on device)

    @property
    def entropies(self) -> List[Dict[int, float]]:
        per_sample: List[Dict[int, float]] = [dict() for _ in self.trigger_layer]
        for layer, rows, values in self._entropy_rows:
            for row, value in zip(rows, values.tolist()):
                per_sample[row][layer] = value
        return per_sample


class MemVRTrace:
    """Where retracing fired: one :class:`PassTrace` per forward pass since the last prefill."""

    def __init__(self):
        self.passes: List[PassTrace] = []

    def trigger_layers(self) -> List[List[Optional[int]]]:
        """``[sample][pass]`` -> 0-based trigger layer or ``None``."""
        if not self.passes:
            return []
        return [[p.trigger_layer[b] for p in self.passes] for b in range(len(self.passes[0].trigger_layer))]

    def to_dict(self) -> dict:
        return {
            "passes": [
                {"is_prefill": p.is_prefill, "trigger_layer": p.trigger_layer, "entropies": p.entropies,
                 "skipped": p.skipped}
                for p in self.passes
            ]
        }

    def __repr__(self) -> str:
        return f"MemVRTrace(passes={len(self.passes)}, trigger_layers={self.trigger_layers()})"


class MemVR:
    """The hooks of one MemVR installation."""

    def __init__(self, patch: Patch, config: MemVRConfig):
        self.patch = patch
        self.config = config
        self.parts = patch.parts
        self.activation = adapter_activation(config.adapter_activation or self.parts.spec.adapter_activation)
        self.trace = MemVRTrace()
        self.undecided: List[int] = []        # samples still checked in this pass
        self.retrace_in: Dict[int, List[int]] = {}  # layer -> samples retraced in it this pass
        self.current: Optional[PassTrace] = None
        # constant over passes, so computed once: mean|W_in|, mean|W_out| per layer (the weights do not
        # change while decoding) and the scaled key/value memories per (sample, layer) of a generation
        self._weight_means: Dict[int, tuple] = {}
        self._scaled_memory: Dict[tuple, tuple] = {}
        self._unusable: Dict[int, str] = {}   # visual-memory entry -> why it cannot be retraced

        patch.on_pass_start(self.start_pass)
        patch.on_generate(self.check_generate)
        for layer in config.checked_layers:
            patch.hook(self.parts.layers[layer], functools.partial(self._entropy_hook, layer))
            patch.hook(self.parts.ffn(layer + 1), functools.partial(self._retrace_hook, layer + 1), with_kwargs=True)

    def check_generate(self, kwargs: dict) -> None:
        """Warn when a ``generate()`` call makes passes that cover several new positions (see the module doc)."""
        config = kwargs.get("generation_config") or getattr(self.patch.model, "generation_config", None)
        use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
        assisted = kwargs.get("assistant_model") is not None or (
            kwargs.get("prompt_lookup_num_tokens", getattr(config, "prompt_lookup_num_tokens", None)) is not None
        )
        if use_cache is False or assisted:
            how = "assisted generation checks several draft tokens" if assisted else "use_cache=False re-runs the whole sequence"
            warnings.warn(
                f"MemVR decides per forward pass and {how} in one pass: the entropy is read at the last position "
                "and retracing applies to every position of that pass, so results differ from cached greedy "
                "decoding (as with the published code); use use_cache=True without an assistant model to "
                "decide per token",
                UserWarning,
                stacklevel=user_stacklevel(),
            )

    def start_pass(self, info: PassInfo) -> None:
        rows = self.patch.state.memory_rows
        if info.is_prefill:
            self.trace = MemVRTrace()
            self._scaled_memory = {}
            self._unusable = unusable_memory(self.patch.generation.visual_memory)
        self.current = PassTrace(is_prefill=info.is_prefill, trigger_layer=[None] * info.batch_size,
                                 skipped=[self._unusable.get(i) if i is not None else None for i in rows])
        self.trace.passes.append(self.current)
        self.undecided = [b for b, i in enumerate(rows) if i is not None and i not in self._unusable]
        self.retrace_in = {}
        self._last_positions = None

    def _entropy_hook(self, layer: int, module, args, output):
        if not self.undecided:
            return None
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if self._last_positions is None:
            self._last_positions = self.patch.state.last_positions(hidden.shape[1], hidden.device)
        rows = torch.tensor(self.undecided, device=hidden.device)
        last_hidden = hidden[rows, self._last_positions.to(hidden.device)[rows]]
        logits = head_logits(self.parts, last_hidden, norm=self.config.early_exit_norm).float()
        top = logits.topk(TOP_K, dim=-1).values
        entropy = -(top.softmax(-1) * top.log_softmax(-1)).sum(-1) / math.log(TOP_K)
        self.current._entropy_rows.append((layer, list(self.undecided), entropy))
        fired = (entropy > self.config.entropy_threshold).tolist()  # one host sync per checked layer
        triggered = [b for b, hit in zip(self.undecided, fired) if hit]
        if triggered:
            for b in triggered:
                self.current.trigger_layer[b] = layer
            self.retrace_in[layer + 1] = triggered
            self.undecided = [b for b, hit in zip(self.undecided, fired) if not hit]
        return None

    def _retrace_hook(self, layer: int, module, args, kwargs, output):
        rows = self.retrace_in.get(layer)
        if not rows:
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        real = self.patch.state.info.real_positions
        real = real.to(output.device) if real is not None else None
        mixed = output.clone()
        memory_rows = self.patch.state.memory_rows
        for b in rows:
            keys, values = self.scaled_memory(memory_rows[b], layer, x)
            keep = real[b] if real is not None else slice(None)
            mixed[b] = self.retrace(x[b], output[b], keys, values, keep)
        return mixed

    def scaled_memory(self, sample: int, layer: int, x: torch.Tensor) -> tuple:
        """``(s_k Z, s_v Z)`` of visual-memory entry ``sample`` for one layer: ``s = mean|W| / mean|Z|``,
        means in at least float32."""
        cached = self._scaled_memory.get((sample, layer))
        if cached is not None:
            return cached
        wide = torch.promote_types(x.dtype, torch.float32)
        weights = self.parts.ffn_weights(layer)
        version = tuple((w.data_ptr(), w._version) for w in weights)  # changes when the weights are replaced
        if self._weight_means.get(layer, (None,))[0] != version:
            # Python floats (double): valid whatever device or dtype the model moves to afterwards
            self._weight_means[layer] = (version, tuple(w.abs().double().mean().item() for w in weights))
        in_mean, out_mean = self._weight_means[layer][1]
        memory = self.patch.generation.visual_memory[sample].to(device=x.device, dtype=x.dtype)
        memory_mean = memory.abs().to(wide).mean()
        scaled = tuple((mean / memory_mean).to(x.dtype) * memory for mean in (in_mean, out_mean))
        self._scaled_memory[(sample, layer)] = scaled
        return scaled

    def retrace(self, x, ffn_out, keys, values, keep) -> torch.Tensor:
        """``(1-α)·F(x) + α·(mean|F| / mean|A|)·A(x)`` for one sample, ``A(x) = φ(x keysᵀ) values``."""
        wide = torch.promote_types(x.dtype, torch.float32)
        adapter = self.activation(x @ keys.T) @ values
        ratio = self.config.retracing_ratio
        balance = ffn_out[keep].abs().to(wide).mean() / adapter[keep].abs().to(wide).mean()
        return (1 - ratio) * ffn_out + (ratio * balance).to(x.dtype) * adapter


def memory_problem(tokens: torch.Tensor) -> Optional[str]:
    """Why MemVR cannot retrace with these ``(n, hidden)`` visual tokens, or ``None``: the memory is scaled
    by ``1 / mean|Z|``, so it must be non-empty, finite and not all zero."""
    if tokens.shape[0] == 0:
        return "empty (0 tokens)"
    if not torch.isfinite(tokens).all():
        return "not all finite"
    if not tokens.ne(0).any():
        return "all zero (mean |Z| = 0)"
    return None


def unusable_memory(memory: Optional[List[Optional[torch.Tensor]]]) -> Dict[int, str]:
    """The entries of a visual memory that cannot be retraced, with the reason (checked once per prefill)."""
    problems = {i: memory_problem(t) for i, t in enumerate(memory or []) if t is not None}
    return {i: f"visual memory is {problem}: not retraced" for i, problem in problems.items() if problem}


def install(patch: Patch, config: MemVRConfig) -> MemVR:
    """Add MemVR's hooks; ``hallupatch.apply`` has already run ``config.validate_for``."""
    return MemVR(patch, config)


register_method(Method(name="memvr", config_cls=MemVRConfig, install=install))
