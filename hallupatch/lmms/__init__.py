"""hallupatch as an lmms-eval model plug-in: ``python -m lmms_eval --model hallupatch --model_args
pretrained=PATH,method=memvr --tasks mme``.

lmms-eval (0.7.3) finds the model through the Python entry-point group ``lmms_eval.models`` (declared in
``setup.py``), whose payload :func:`manifest` returns its ``ModelManifest``. The model class is
:class:`hallupatch.lmms.model.HallupatchLMM`; :mod:`hallupatch.lmms.tasks` writes the lab's MME and POPE
as local lmms-eval tasks (``python -m hallupatch.lmms tasks DIR``). Install with ``pip install
"hallupatch[lmms]"``; nothing here is imported by the rest of hallupatch.
"""
from __future__ import annotations

#: the name lmms-eval's ``--model`` takes
MODEL_ID = "hallupatch"
MODEL_CLASS_PATH = "hallupatch.lmms.model.HallupatchLMM"


def manifest():
    """The ``lmms_eval.models`` entry point's payload: lmms-eval's ``ModelManifest`` for :data:`MODEL_ID`
    (a callable, so that importing hallupatch never needs lmms-eval)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH)
