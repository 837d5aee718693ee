"""A newcomer adds a benchmark with one task file: the toy task below is the whole of it (under 40 lines),
and the harness runs it like any other (resume, several methods, comparison)."""
import json

from hallupatch.eval import cli
from hallupatch.eval.data import Question, json_lines
from hallupatch.eval.tasks import Task, register_task, registered_tasks


# ----------------------------------------------------------------------- the toy task: everything it takes
@register_task
class ColourQuiz(Task):
    name = "colourquiz"
    title = "Colour quiz"
    summary = "is the picture mostly red? (a toy benchmark)"
    data_help = "quiz.jsonl with id, image, question, answer (yes/no)"

    def load(self, data, family, out_dir, answers):
        return [Question(qid=str(r["id"]), group="quiz", image_id=str(r["id"]), image_name=r["image"],
                         question=r["question"], answer=r["answer"], image=str(data.parent / r["image"]),
                         source=where) for where, r in json_lines(data)]

    def score(self, questions, texts):
        answered = [q for q in questions if q.qid in texts]
        right = sum(self.item_correct(q, texts[q.qid]) for q in answered)
        return {"benchmark": self.name, "accuracy": right / len(answered), "answered": len(answered),
                "questions": len(questions)}, None

    def table(self, scores):
        return f"accuracy {scores['accuracy'] * 100:.1f}"

    def headline(self, scores):
        return {"accuracy": scores["accuracy"] * 100}

    def item_correct(self, question, text):
        return text.strip().lower().startswith(question.answer)
# ----------------------------------------------------------------------- end of the toy task


def test_a_toy_task_is_one_small_class_and_runs_through_the_harness(tmp_path, capsys):
    from PIL import Image

    assert registered_tasks()["colourquiz"] is ColourQuiz
    rows = []
    for i, colour in enumerate([(220, 20, 20), (20, 20, 220), (200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
        rows.append({"id": i, "image": f"{i}.png", "question": "Is the picture mostly red?",
                     "answer": "yes" if colour[0] > 100 else "no"})
    data = tmp_path / "quiz.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    out = tmp_path / "out"
    result = cli.run(["colourquiz", "--data", str(data), "--output", str(out), "--max-new-tokens", "2",
                      "--no-progress", "--method", "none,dola"])
    answers = {m: [json.loads(line) for line in (out / m / "answers.jsonl").read_text().splitlines()]
               for m in ("none", "dola")}
    for method, rows_of in answers.items():
        right = sum(r["text"].strip().lower().startswith(r["answer"]) for r in rows_of)
        assert result["methods"][method]["accuracy"] == right / 4
    assert result["comparison"]["methods"]["dola"]["test"]["p"] <= 1.0
    printed = capsys.readouterr().out   # the comparison; each method's own table is in its report.txt
    own_table = (out / "none" / "report.txt").read_text()
    assert f"accuracy {result['methods']['none']['accuracy'] * 100:.1f}" in own_table and "McNemar" in printed
