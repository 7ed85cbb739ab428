"""Texts for the sentence-embedding sources (``minilm``, ``hf:<dir>`` encoders): the built-in offline corpus
(CPython's documentation topics, ``pydoc_data.topics``, split into sentences) or the user's own ``calib`` /
``data`` files (.txt: one text per line; .jsonl: one ``{"text": ...}`` object or JSON string per line)."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
FORMATS = ('a .txt file (one text per non-empty line) or a .jsonl file (one JSON object with a "text" string '
           'per line, or one JSON string per line)')


def pydoc_sentences() -> list[str]:
    """Unique prose sentences of 40–300 characters from every pydoc topic, in a stable order."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out: list[str] = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(para.split())
            for s in _SENTENCE_END.split(text):
                s = s.strip()
                letters = sum(ch.isalpha() for ch in s)
                if 40 <= len(s) <= 300 and letters > 0.6 * len(s) and s not in seen:
                    seen.add(s)
                    out.append(s)
    return out


def split_corpus(sentences: list[str], calib_size: int, eval_size: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sets drawn by a fixed shuffle (the data seed, not the compile seed)."""
    if calib_size + eval_size > len(sentences):
        raise UserError(f"the text corpus has {len(sentences)} sentences; `calib_size` {calib_size} + `eval_size` "
                        f"{eval_size} need more: lower one of them")
    order = list(sentences)
    random.Random(seed).shuffle(order)
    return order[:calib_size], order[calib_size:calib_size + eval_size]


def _corpus_name(sentences: list[str]) -> str:
    return f"pydoc_data.topics sentences ({len(sentences)} in corpus)"


# ---- the user's own text ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextFile:
    """The texts of one ``calib`` or ``data`` file, in file order, repeats dropped (``repeats`` counts them)."""

    path: Path
    texts: list[str]
    repeats: int

    def describe(self) -> str:
        dropped = f", {self.repeats} repeated line(s) dropped" if self.repeats else ""
        return f"{self.path} ({len(self.texts)} texts{dropped})"


def read_texts(path: Path, field: str) -> TextFile:
    """The non-empty texts (stripped) of a .txt or .jsonl file given as config field ``field``; a
    :class:`UserError` naming the file (and line) for anything else."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"`{field}` must be {FORMATS}; {path} is a directory")
    if not path.is_file():
        raise UserError(f"`{field}` {path}: no such file; pass {FORMATS}")
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise UserError(f"`{field}` must be {FORMATS}; {path} is a {path.suffix or 'suffix-less'} file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"`{field}` {path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UserError(f"`{field}` {path} line {line}: not UTF-8 text; save the file as UTF-8") from exc
    jsonl = path.suffix.lower() == ".jsonl"
    texts: list[str] = []
    for number, line in enumerate(content.split("\n"), 1):  # not splitlines: \u2028 etc. stay in the text
        if not line.strip():
            continue
        text = _json_text(line, path, number, field) if jsonl else line
        if text.strip():
            texts.append(text.strip())
    unique = list(dict.fromkeys(texts))  # a text both calibrated on and evaluated would not be held out
    if not unique:
        raise UserError(f"`{field}` {path} holds no texts; pass {FORMATS}")
    return TextFile(path, unique, len(texts) - len(unique))


def _json_text(line: str, path: Path, number: int, field: str) -> str:
    """The text of one .jsonl line: a JSON string, or an object's ``"text"`` string."""
    expected = 'each line must be a JSON object with a "text" string, or a JSON string'
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"`{field}` {path} line {number}: not valid JSON ({exc.msg}); {expected}") from exc
    if isinstance(value, dict):
        value = value.get("text")
    if not isinstance(value, str):
        raise UserError(f"`{field}` {path} line {number}: no text; {expected}")
    return value


def sample_texts(texts: list[str], k: int, seed: int) -> list[str]:
    """A seeded sample of ``k`` of ``texts``, in their order (all of them when ``k >= len(texts)``)."""
    if k >= len(texts):
        return list(texts)
    return [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), k))]


@dataclass(frozen=True)
class TextSets:
    """Calibration and evaluation texts, and ``info`` for the bundle: where they came from (``data``), how
    many (``calibration_items``, ``evaluation_items``) and, when a file held fewer than asked, ``data_note``."""

    calibration: list[str]
    evaluation: list[str]
    info: dict


def text_sets(calib: Path | None, data: Path | None, calib_size: int, eval_size: int, seed: int) -> TextSets:
    """Calibration and evaluation texts for an embedding source.

    * neither file: disjoint draws from the built-in corpus (:func:`split_corpus`);
    * ``data`` alone (or ``calib`` naming the same file): disjoint draws from it, evaluation by a fixed
      shuffle, calibration sampled (``seed``) from the rest; a file with fewer than ``calib_size +
      eval_size`` texts is split in that proportion (at least 1 calibration text);
    * ``calib`` alone: calibration sampled (``seed``) from it, evaluation from the corpus;
    * both: each sampled from its file (evaluation by a fixed seed, so it does not move with ``seed``).

    A file with fewer texts than asked gives all it has. Evaluation needs at least 2 texts.
    """
    same = calib is not None and data is not None and (
        Path(calib).expanduser().resolve() == Path(data).expanduser().resolve())
    if same:
        calib = None
    if calib is None and data is None:
        sentences = pydoc_sentences()
        calibration, evaluation = split_corpus(sentences, calib_size, eval_size)
        return TextSets(calibration, evaluation, {"data": _corpus_name(sentences), "calibration_items":
                                                  len(calibration), "evaluation_items": len(evaluation)})
    if calib is None:
        file = read_texts(data, "data")
        calibration, evaluation, notes = _disjoint_draws(file, calib_size, eval_size, seed)
        source = f"{file.describe()}: disjoint calibration and evaluation draws"
    else:
        cal_file = read_texts(calib, "calib")
        calibration, notes = sample_texts(cal_file.texts, calib_size, seed), []
        if len(cal_file.texts) < calib_size:
            notes.append(f"{cal_file.path} holds {len(cal_file.texts)} texts, fewer than the {calib_size} "
                         "calibration asked: all are used")
        if data is None:
            sentences = pydoc_sentences()
            evaluation, eval_source = sample_texts(sentences, eval_size, 0), _corpus_name(sentences)
        else:
            eval_file = read_texts(data, "data")
            if len(eval_file.texts) < 2:
                raise UserError(f"`data` {eval_file.path} holds 1 text; evaluation compares at least 2 texts with "
                                "each other")
            evaluation, eval_source = sample_texts(eval_file.texts, eval_size, 0), eval_file.describe()
            if len(eval_file.texts) < eval_size:
                notes.append(f"{eval_file.path} holds {len(eval_file.texts)} texts, fewer than the {eval_size} "
                             "evaluation asked: all are used")
        source = f"calibration: {cal_file.describe()}; evaluation: {eval_source}"
    info = {"data": source, "calibration_items": len(calibration), "evaluation_items": len(evaluation)}
    if notes:
        info["data_note"] = "; ".join(notes)
    return TextSets(calibration, evaluation, info)


def _disjoint_draws(file: TextFile, calib_size: int, eval_size: int,
                    seed: int) -> tuple[list[str], list[str], list[str]]:
    """Calibration and evaluation texts from one file, and a note when it holds fewer than asked: evaluation
    by a fixed shuffle, calibration sampled (``seed``) from the rest; a short file is split in the asked
    proportion, with at least 1 calibration text."""
    n = len(file.texts)
    n_calib, n_eval, notes = calib_size, eval_size, []
    if n < calib_size + eval_size:
        n_calib = max(1, round(n * calib_size / (calib_size + eval_size)))
        n_eval = n - n_calib
        notes.append(f"{file.path} holds {n} texts, fewer than the {calib_size} calibration + {eval_size} "
                     f"evaluation asked: all are used, {n_calib} for calibration and {n_eval} for evaluation")
    if n_eval < 2:
        raise UserError(f"`data` {file.path} holds {n} text(s); disjoint calibration and evaluation draws need "
                        "at least 3 (evaluation compares at least 2 texts with each other)")
    order = list(range(n))
    random.Random(0).shuffle(order)
    evaluation = [file.texts[i] for i in sorted(order[:n_eval])]
    rest = [file.texts[i] for i in sorted(order[n_eval:])]
    return sample_texts(rest, n_calib, seed), evaluation, notes
