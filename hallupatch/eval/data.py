"""What every benchmark task is made of: :class:`Question`, :class:`DataError` and the readers of
JSON, JSON-lines and answer files.

Loading checks every file and line up front: a missing image or a malformed line raises
:class:`DataError` naming the path and line, before any answer is generated.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union


PathLike = Union[str, Path]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class DataError(ValueError):
    """Benchmark data that cannot be used as it is; the message names the file (and line)."""


@dataclass
class Question:
    """One benchmark question.

    ``qid`` is unique within a benchmark (MME: ``<subtask>/<image>#<k>``, POPE: ``<split>/<question_id>``);
    ``image_id`` is LLaVA's question id for the image (MME: ``<subtask>/<image>``, POPE: the image file);
    ``group`` is the MME subtask or the POPE split; ``answer`` the ground truth as written in the data.
    """

    qid: str
    group: str
    image_id: str
    image_name: str
    question: str
    answer: str
    image: Union[str, Callable[[], "object"]] = field(repr=False)
    source: str = ""

    def load_image(self):
        """The image as an RGB ``PIL.Image``."""
        from PIL import Image

        if callable(self.image):
            img = self.image()
        else:
            try:
                img = Image.open(self.image)
                img.load()
            except OSError as err:
                raise DataError(f"cannot read image {self.image} (question {self.source}): {err}") from err
        return img.convert("RGB")


def read_text(path: Union[str, Path]) -> str:
    """A data file's text; bytes that are not UTF-8 are a :class:`DataError` naming the file and offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r}); "
                        "save it as UTF-8") from None


def parse_json(text: str, where: str):
    """``json.loads(text)``; invalid or absurdly nested JSON is a :class:`DataError` naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): "
                        f"{text.strip()[:120]!r}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read (thousands of levels); "
                        "this is not a benchmark file") from None


def read_json(path: Union[str, Path]):
    """A JSON file's content; invalid JSON or text is a :class:`DataError` naming the file."""
    return parse_json(read_text(path), str(path))


def json_lines(path: Union[str, Path]) -> Iterator[Tuple[str, dict]]:
    """``(where, record)`` for every non-blank line of a JSON-lines file, ``where`` = ``path:line``.

    A line that is not a JSON object (or not UTF-8) is a :class:`DataError` naming the path and line number.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8 text ({raw.strip()[:60]!r}); save the file as UTF-8") from None
            if not line.strip():
                continue
            row = parse_json(line, where)
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object; got {line.strip()[:120]!r}")
            yield where, row


def yes_no_label(value: str, where: str, line: str) -> str:
    """A Yes/No ground truth as written (stripped); anything else is a :class:`DataError`."""
    if str(value).strip().lower() not in ("yes", "no"):
        raise DataError(f"{where}: the answer must be Yes or No, got {value!r} in line {line!r}")
    return str(value).strip()




def answer_records(path: Path) -> List[dict]:
    """The records of an answers file: a JSON list, or JSON lines (bad lines named with their number)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"answers file not found: {path}")
    text = read_text(path)
    if text.lstrip().startswith("["):
        return parse_json(text, str(path))
    return [row for _, row in json_lines(path)]


def answer_text(value: Any, where: str, key: str = "text") -> str:
    """An answer's text as read from a file made elsewhere: a string; ``null`` or any other type is a
    :class:`DataError` (it would otherwise be scored as the string ``"None"``, or as a yes)."""
    if value is None:
        raise DataError(f"{where}: {key!r} is null; every answer needs its text as a string (\"\" for no answer)")
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string; got {type(value).__name__} {str(value)[:60]}")
    return value


def add_answer(texts: Dict[Any, str], key: Any, text: str, where: str) -> None:
    """``texts[key] = text``; a second answer for ``key`` is dropped when equal and refused when it differs
    (scoring both would count the question twice)."""
    if key in texts and texts[key] != text:
        raise DataError(f"{where}: a second answer for {key!r} ({text[:40]!r}) differs from the first "
                        f"({texts[key][:40]!r}); keep one answer per question")
    texts.setdefault(key, text)


def read_id_text_answers(path: Union[str, Path], id_key: str = "question_id",
                         text_keys: Sequence[str] = ("text", "caption")) -> Dict[str, str]:
    """``{id: text}`` from a JSONL (or JSON list) of answer records (LLaVA's ``question_id`` + ``text``)."""
    path = Path(path)
    out: Dict[str, str] = {}
    for i, row in enumerate(answer_records(path), 1):
        key = next((k for k in text_keys if k in row), None)
        if id_key not in row or key is None:
            raise DataError(f"{path}: record {i} needs {id_key} and one of {list(text_keys)}; got keys {sorted(row)}")
        where = f"{path}: record {i}"
        add_answer(out, str(row[id_key]), answer_text(row[key], where, key), where)
    return out


# --------------------------------------------------------------------------- yes/no answers made elsewhere
_PROMPT_NOISE = re.compile(r"Answer the question using a single word or phrase\.|Please answer yes or no\.")


def normalized_prompt(text: str) -> str:
    """A question's text without the recipes' answer-style suffixes and with whitespace collapsed (for
    matching answers made elsewhere to the loaded questions)."""
    return " ".join(_PROMPT_NOISE.sub(" ", text).split())


def _image_key(image_id: str):
    parts = str(image_id).split("/")
    return (parts[0], parts[-1].rsplit(".", 1)[0]) if len(parts) > 1 else ("", parts[0])


def match_llava_answers(path: Path, questions: Sequence[Question]) -> Dict[str, str]:
    """``{question id: text}`` from an answers JSONL produced elsewhere (LLaVA's ``question_id, text``
    and optional ``prompt``, or this tool's own ``answers.jsonl``).

    A line whose ``question_id`` is one of ours is matched directly. LLaVA's MME ids name the image
    (``<subtask>/<file>``, shared by its two questions): those are matched by ``prompt`` when given,
    else in order. A POPE id that exists in several loaded splits is an error (score one split at a time).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"answers file not found: {path}")
    by_qid = {q.qid: q for q in questions}
    by_image: Dict[Any, List[Question]] = defaultdict(list)
    by_plain: Dict[str, List[Question]] = defaultdict(list)
    for q in questions:
        by_image[_image_key(q.image_id)].append(q)
        if "#" not in q.qid:
            by_plain[q.qid.split("/", 1)[-1]].append(q)  # POPE: "<split>/<id>" -> "<id>"
    texts: Dict[str, str] = {}
    for where, row in json_lines(path):
        if "question_id" not in row or "text" not in row:
            raise DataError(f"{where}: an answer line needs 'question_id' and 'text'")
        qid, text = str(row["question_id"]), answer_text(row["text"], where)
        if qid in by_qid:
            target = by_qid[qid]
        elif qid in by_plain and len(by_plain[qid]) == 1:
            target = by_plain[qid][0]  # POPE numbers every split 1..N: the prompt, when given, must agree
            if "prompt" in row and normalized_prompt(target.question) != normalized_prompt(str(row["prompt"])):
                raise DataError(
                    f"{where}: question {qid!r} asks {str(row['prompt'])[:80]!r} but question {qid} of split "
                    f"{target.group!r} asks {target.question[:80]!r}; score the split these answers belong to (--splits)"
                )
        elif qid in by_plain:
            raise DataError(
                f"{where}: question id {qid!r} exists in several splits ({sorted({q.group for q in by_plain[qid]})}); "
                "score one split at a time with --splits"
            )
        else:
            candidates = [q for q in by_image.get(_image_key(qid), []) if q.qid not in texts]
            if "prompt" in row:
                candidates = [q for q in candidates if normalized_prompt(q.question) == normalized_prompt(str(row["prompt"]))]
            if not candidates:
                raise DataError(f"{where}: question {qid!r} matches no unanswered question of the loaded data")
            target = candidates[0]
        add_answer(texts, target.qid, text, where)
    return texts
