"""PhD (Liu et al. 2024): yes/no questions in four modes (base, inaccurate context, incorrect context,
counter-common-sense images); the PhD index is the harmonic mean of yes- and no-recall.

Data: ``PhD/data.json`` and ``PhD/images/{train2014,val2014,CCS_images}/``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple, Union

from hallupatch.eval.data import DataError, PathLike, Question
from hallupatch.eval.phd import PHD_MODES, load_phd, score_phd
from hallupatch.eval.scoring import parse_pope_answer
from hallupatch.eval.tasks import Task, fmt_percent, partial_note, register_task, with_counts



def load_phd_questions(data: PathLike, modes: Sequence[str] = PHD_MODES, need_images: bool = True
                       ) -> Tuple[List[Question], Dict[str, Tuple[str, str]]]:
    """PhD questions from ``<data>/data.json`` (or the file itself) with images under ``<data>/images/``.

    Returns the questions and ``{qid: (mode, task)}``.
    """
    data = Path(data)
    file = data / "data.json" if data.is_dir() else data
    root = file.parent
    items = load_phd(file, modes)
    questions, meta = [], {}
    for q in items:
        image = str(q.resolve_image(root)) if need_images else str(root / q.image)
        questions.append(Question(qid=q.qid, group=f"{q.mode}/{q.task}", image_id=q.image_id,
                                  image_name=Path(image).name, question=q.question, answer=q.label,
                                  image=image, source=f"{file} {q.qid}"))
        meta[q.qid] = (q.mode, q.task)
    return questions, meta


def score_phd_answers(questions: Sequence[Question], meta: Mapping[str, Tuple[str, str]],
                      answers: Mapping[str, str]) -> dict:
    """PhD scores of the questions that have an answer in ``answers`` (``{qid: text}``); ``answered`` and
    ``questions`` say how many of the loaded questions that is."""
    answered = [q for q in questions if q.qid in answers]
    if not answered:
        raise DataError(f"none of the {len(questions)} PhD questions has an answer")
    scores = score_phd((*meta[q.qid], q.answer, answers[q.qid]) for q in answered)
    return with_counts(scores, answered, questions)


def phd_table(scores: Mapping) -> str:
    lines = [f"{'group':<22}{'yes-rec':>8}{'no-rec':>8}{'PhD':>8}{'n':>7}"]
    sections = list(scores["groups"].items()) + [(f"{m} (all tasks)", v) for m, v in scores["modes"].items()]
    sections.append(("overall", scores["overall"]))
    for name, s in sections:
        lines.append(f"{name:<22}{fmt_percent(s['yes_recall']):>8}{fmt_percent(s['no_recall']):>8}{fmt_percent(s['phd_index']):>8}"
                     f"{s['questions']:>7}")
    return "\n".join(lines + partial_note(scores))


@register_task
class PhD(Task):
    name = "phd"
    title = "PhD"
    summary = "PhD yes/no hallucination questions in four modes (PhD index)"
    data_help = "PhD/data.json and PhD/images/{train2014,val2014,CCS_images}/"

    @classmethod
    def add_arguments(cls, group):
        group.add_argument("--modes", nargs="+", choices=PHD_MODES, help="PhD modes (default: all four)")

    def settings(self):
        return {"modes": self.args.modes or list(PHD_MODES)}

    def load(self, data, recipe, out_dir, answers):
        questions, self.meta = load_phd_questions(data, self.args.modes or list(PHD_MODES),
                                                  need_images=answers is None)
        return questions

    def score(self, questions, texts):
        return score_phd_answers(questions, self.meta, texts), None

    def table(self, scores):
        return phd_table(scores)

    def headline(self, scores):
        heads = {"PhD index": scores["overall"]["phd_index"]}
        heads.update({f"{mode} PhD index": s["phd_index"] for mode, s in scores["modes"].items()})
        return {k: float("nan") if v is None else v * 100 for k, v in heads.items()}

    def item_correct(self, question, text):
        return parse_pope_answer(text) == question.answer
