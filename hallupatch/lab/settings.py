"""The method settings the lab compares, in one place.

The lab model's decoder has 6 layers, so the published layer windows (tuned for 32-layer LLaVA-7B) would
fall outside it: :data:`METHOD_KNOBS` holds the knobs that replace them on the lab model, and
:func:`variants` the settings that ``python -m hallupatch.lab measure`` and ``python -m hallupatch.eval
lab`` compare. This module depends on the harness's API (:class:`hallupatch.eval.harness.Variant`),
never on the command line that runs it.
"""
from __future__ import annotations

from typing import Dict

from hallupatch.eval.harness import Variant
from hallupatch.lab.model import TEXT_LAYERS

#: MemVR's layer window on the lab (bounds exclusive): it checks after 0-based layers 1..4 of 6 and
#: retraces in layers 2..5
MEMVR_LAYERS = {"starting_layer": 0, "ending_layer": 5}

#: per method, the knobs that replace the published defaults on the lab model
METHOD_KNOBS: Dict[str, Dict[str, object]] = {
    "memvr": MEMVR_LAYERS,
    # PAI amplifies layers 2..end; its published end (32) is LLaVA-7B's depth
    "pai": {"end_layer": TEXT_LAYERS},
}

def variants(dev_threshold: float) -> Dict[str, Variant]:
    """The settings the main job compares (labels -> variants); MemVR checks after the lab's layers 1..4.

    Each method at its published knobs (MemVR also at its dev-chosen threshold, layer contrast also at
    the high layers). OPERA (a 5-beam search with a forward of every candidate) is left to the powered
    study (``eval lab --full``), which also chooses every method's knobs on dev, so that the main job
    stays under 3 minutes on two busy cores."""
    window = dict(MEMVR_LAYERS)
    chosen = {
        "none": Variant("none"),
        "memvr": Variant("memvr", window),                                  # published threshold 0.75
        f"memvr threshold {dev_threshold:g} (dev)": Variant("memvr", {**window, "entropy_threshold": dev_threshold}),
        "dola low": Variant("dola", {"candidate_layers": "low"}),           # published: no final norm
        "dola high": Variant("dola", {"candidate_layers": "high"}),
        "memvr+dola": Variant("memvr+dola", {**window, "entropy_threshold": dev_threshold, "candidate_layers": "low"}),
        "vcd": Variant("vcd", {"noise_seed": 0}),   # published alpha 1, beta 0.1, step 500; noise fixed per run
        "icd": Variant("icd"),
        "m3id": Variant("m3id"),
        "pai": Variant("pai", dict(METHOD_KNOBS["pai"])),   # end_layer = the lab's depth; published alpha, gamma
    }
    return chosen
