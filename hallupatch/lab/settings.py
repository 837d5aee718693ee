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
from hallupatch.methods.opera import FAST as OPERA_FAST

#: MemVR's layer window on the lab (bounds exclusive): it checks after 0-based layers 1..4 of 6 and
#: retraces in layers 2..5
MEMVR_LAYERS = {"starting_layer": 0, "ending_layer": 5}

#: per method, the knobs that replace the published defaults on the lab model
METHOD_KNOBS: Dict[str, Dict[str, object]] = {
    "memvr": MEMVR_LAYERS,
    # PAI amplifies layers 2..end; its published end (32) is LLaVA-7B's depth
    "pai": {"end_layer": TEXT_LAYERS},
}

#: in ``eval lab --full`` only, so that the main job stays under 3 minutes on two busy cores: the settings
#: that explain a method rather than compare it (MemVR firing at once, DoLa with the final norm, OPERA's fast
#: setting) and OPERA (a 5-beam search with a forward of every candidate: the full run's largest share)
DIAGNOSTIC = ("memvr threshold 0", "dola low +norm", "dola high +norm", "opera", "opera fast")


def variants(dev_threshold: float, full: bool = True) -> Dict[str, Variant]:
    """The settings compared (labels -> variants); MemVR checks after the lab's layers 1..4.

    Each method at its published knobs (MemVR also at its dev-chosen threshold, layer contrast also at
    the high layers); ``full`` adds :data:`DIAGNOSTIC` (OPERA and the diagnostic settings), which the main
    job leaves out to stay quick (``eval lab --full`` runs them)."""
    window = dict(MEMVR_LAYERS)
    chosen = {
        "none": Variant("none"),
        "memvr": Variant("memvr", window),                                  # published threshold 0.75
        "memvr threshold 0": Variant("memvr", {**window, "entropy_threshold": 0.0}),  # fires at once
        f"memvr threshold {dev_threshold:g} (dev)": Variant("memvr", {**window, "entropy_threshold": dev_threshold}),
        "dola low": Variant("dola", {"candidate_layers": "low"}),           # published: no final norm
        "dola high": Variant("dola", {"candidate_layers": "high"}),
        "dola low +norm": Variant("dola", {"candidate_layers": "low", "early_exit_norm": True}),
        "dola high +norm": Variant("dola", {"candidate_layers": "high", "early_exit_norm": True}),
        "memvr+dola": Variant("memvr+dola", {**window, "entropy_threshold": dev_threshold, "candidate_layers": "low"}),
        "vcd": Variant("vcd", {"noise_seed": 0}),   # published alpha 1, beta 0.1, step 500; noise fixed per run
        "icd": Variant("icd"),
        "m3id": Variant("m3id"),
        "pai": Variant("pai", dict(METHOD_KNOBS["pai"])),   # end_layer = the lab's depth; published alpha, gamma
        "opera": Variant("opera"),                                          # published knobs, 5 beams
        "opera fast": Variant("opera", dict(OPERA_FAST)),                   # threshold 25, 1 candidate
    }
    return chosen if full else {label: v for label, v in chosen.items() if label not in DIAGNOSTIC}
