"""hallupatch: decoding-time hallucination mitigation for multimodal LLMs, by patching model code.

    import hallupatch
    hallupatch.apply(model, method="memvr")   # then model.generate(...) as always
    hallupatch.remove(model)                  # the exact original model again
"""
import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _map_source_checkout(name: str, folder: str) -> None:
    """From a source checkout (not installed), make ``hallupatch.<name>`` import the top-level folder,
    as ``setup.py``'s ``package_dir`` does for an installation."""
    full = f"{__name__}.{name}"
    source = _Path(__file__).resolve().parent.parent / folder / "__init__.py"
    if full in _sys.modules or _importlib_util.find_spec(full) is not None or not source.exists():
        return
    spec = _importlib_util.spec_from_file_location(full, source, submodule_search_locations=[str(source.parent)])
    _sys.modules[full] = module = _importlib_util.module_from_spec(spec)
    spec.loader.exec_module(module)


from hallupatch.api import apply, get_trace, patched, remove, set_visual_memory  # noqa: E402
from hallupatch.compat import make_generate_compatible  # noqa: E402
from hallupatch.early_exit import early_exit_logits  # noqa: E402
from hallupatch.methods.memvr import MemVRConfig  # noqa: E402
from hallupatch.methods.dola import DoLaConfig, get_layer_trace  # noqa: E402
from hallupatch.methods.opera import OperaConfig  # noqa: E402
from hallupatch.methods.vcd import VCDConfig, add_diffusion_noise  # noqa: E402
from hallupatch.methods.icd import ICD_INSTRUCTIONS, ICDConfig, icd_prompt  # noqa: E402
from hallupatch.methods.m3id import M3IDConfig  # noqa: E402
from hallupatch.methods.pai import PAIConfig  # noqa: E402
from hallupatch.candidates import Candidate, RankedSample, generate_candidates, mask_iou, rank_candidates  # noqa: E402
from hallupatch.prior import estimate_layer_prior  # noqa: E402
from hallupatch.spec import supported  # noqa: E402

_map_source_checkout("patches", "patches")

__all__ = [
    "apply", "remove", "patched", "MemVRConfig", "early_exit_logits", "set_visual_memory", "get_trace",
    "DoLaConfig", "OperaConfig", "get_layer_trace", "generate_candidates", "rank_candidates", "mask_iou", "estimate_layer_prior",
    "Candidate", "RankedSample", "supported", "make_generate_compatible",
    "VCDConfig", "ICDConfig", "M3IDConfig", "PAIConfig", "ICD_INSTRUCTIONS", "icd_prompt", "add_diffusion_noise",
]
__version__ = "0.1.0"
