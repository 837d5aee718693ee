"""The lab's local lmms-eval tasks use lmms-eval's own MME and POPE functions (prompt, parsing, scores),
so a run is scored by lmms-eval, independently of hallupatch's scorers."""
from lmms_eval.tasks.mme.utils import (  # noqa: F401
    mme_aggregate_results,
    mme_doc_to_text,
    mme_doc_to_visual,
    mme_process_results,
)
from lmms_eval.tasks.pope.utils import (  # noqa: F401
    pope_aggregate_accuracy,
    pope_aggregate_f1_score,
    pope_aggregate_precision,
    pope_aggregate_recall,
    pope_aggregate_yes_ratio,
    pope_doc_to_text,
    pope_doc_to_visual,
    pope_process_results,
)
