"""GLUE tasks from the official TSV distribution: the task table, a reader, label mapping, and each task's
official metric (pure numpy/scipy).

A task dir holds ``train.tsv`` and ``dev.tsv`` (MNLI: ``dev_matched.tsv``; ``mnli-mm``: ``dev_mismatched.tsv``)
exactly as the GLUE download script writes them. Files are read with the :mod:`csv` module and ``QUOTE_NONE``:
GLUE sentences contain stray ``"`` characters that a quoting reader would swallow.
"""

from __future__ import annotations

import csv
import random
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class GlueTask:
    name: str                        # glue:<name>
    title: str                       # the GLUE directory name (SST-2, ...)
    dev_file: str
    header: tuple[str, ...] | None   # columns the header must hold (None: headerless, ``columns`` by position)
    text: tuple[str | int, ...]      # the text column(s): one for single-sentence tasks, two for pairs
    label: str | int                 # the label column
    labels: tuple[str, ...] | None   # label strings in GLUE's standard id order (None: integer or float labels)
    num_labels: int                  # 1: regression
    metrics: tuple[str, ...]         # official metrics, headline first
    columns: int = 0                 # headerless files: the number of columns
    train_file: str = "train.tsv"

    @property
    def headline(self) -> str:
        return self.metrics[0]

    @property
    def regression(self) -> bool:
        return self.num_labels == 1

    @property
    def expected(self) -> str:
        """The expected layout, as an error message names it."""
        if self.header is None:
            return (f"{self.columns} tab-separated columns and no header "
                    "(source, label, original_label_mark, sentence)")
        return "a header with columns " + ", ".join(self.header)


_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")
_MNLI_HEADER = ("sentence1", "sentence2", "gold_label")

TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", "CoLA", "dev.tsv", None, (3,), 1, None, 2, ("matthews", "accuracy"), columns=4),
    GlueTask("sst2", "SST-2", "dev.tsv", ("sentence", "label"), ("sentence",), "label", None, 2, ("accuracy",)),
    GlueTask("mrpc", "MRPC", "dev.tsv", ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
             ("#1 String", "#2 String"), "Quality", None, 2, ("f1", "accuracy")),
    GlueTask("qqp", "QQP", "dev.tsv", ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
             ("question1", "question2"), "is_duplicate", None, 2, ("f1", "accuracy")),
    GlueTask("mnli", "MNLI", "dev_matched.tsv", _MNLI_HEADER, ("sentence1", "sentence2"), "gold_label", _NLI3, 3,
             ("accuracy",)),
    GlueTask("mnli-mm", "MNLI", "dev_mismatched.tsv", _MNLI_HEADER, ("sentence1", "sentence2"), "gold_label",
             _NLI3, 3, ("accuracy",)),
    GlueTask("qnli", "QNLI", "dev.tsv", ("index", "question", "sentence", "label"), ("question", "sentence"),
             "label", _NLI2, 2, ("accuracy",)),
    GlueTask("rte", "RTE", "dev.tsv", ("index", "sentence1", "sentence2", "label"), ("sentence1", "sentence2"),
             "label", _NLI2, 2, ("accuracy",)),
    GlueTask("stsb", "STS-B", "dev.tsv", ("sentence1", "sentence2", "score"), ("sentence1", "sentence2"), "score",
             None, 1, ("pearson", "spearman")),
)}


def task_names() -> str:
    return ", ".join(f"glue:{n}" for n in TASKS)


def get_task(spec: str) -> GlueTask:
    """``"glue:sst2"`` (also ``glue:SST-2``, ``glue:sts-b``) → the task; :class:`UserError` otherwise."""
    prefix, sep, name = spec.partition(":")
    if prefix.lower() != "glue" or not sep:
        raise UserError(f"`task` {spec!r}: hf: models take a GLUE task, one of {task_names()}")
    key = name.strip().lower().replace("_", "-")
    key = {"mnli-m": "mnli", "mnli-matched": "mnli", "mnli-mismatched": "mnli-mm"}.get(key, key)
    if key not in TASKS:
        key = key.replace("-", "")
    if key not in TASKS:
        raise UserError(f"`task` {spec!r}: unknown GLUE task {name!r}; choose one of {task_names()}")
    return TASKS[key]


@dataclass
class GlueSplit:
    """One split: texts (one or two per item), raw labels (str, or float for STS-B) and where they came from."""

    path: Path
    texts: list[tuple[str, ...]]
    labels: list[str]
    skipped: int = 0  # rows with too few columns (QQP's train file has a few)

    def __len__(self) -> int:
        return len(self.texts)


def split_path(task: GlueTask, data: Path | None, split: str) -> Path:
    """The file of ``split`` (train | dev) in the task dir ``data``; :class:`UserError` if it is missing."""
    file = task.train_file if split == "train" else task.dev_file
    if data is None:
        raise UserError(f"`task` glue:{task.name} needs `data` DIR: the GLUE {task.title} dir with "
                        f"{task.train_file} and {task.dev_file}")
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"`data` {data}: not a directory; pass the GLUE {task.title} dir "
                        f"(with {task.train_file} and {task.dev_file})")
    path = data / file
    if not path.is_file():
        raise UserError(f"`data` {data}: no {file} for glue:{task.name}; pass the GLUE {task.title} dir "
                        f"(with {task.train_file} and {task.dev_file})")
    return path


def read_split(task: GlueTask, data: Path | None, split: str) -> GlueSplit:
    """Read ``train`` or ``dev`` of ``task`` from the GLUE dir ``data``."""
    path = split_path(task, data, split)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = [r for r in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if r and any(r)]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} ({exc}); pass a GLUE {task.title} dir of UTF-8 TSV files") from exc
    wrong = f"{path}: not GLUE {task.title}'s layout; expected {task.expected} (is `task` glue:{task.name} right?)"
    if task.header is None:
        width = task.columns
        index = {c: c for c in range(width)}
        if rows and (len(rows[0]) != width or rows[0][task.label].strip() not in ("0", "1")):
            raise UserError(wrong + f"; the first line has {len(rows[0])} column(s): {_clip(rows[0])}")
        body = rows
    else:
        if not rows:
            raise UserError(f"{path} is empty; expected {task.expected} and one item per line")
        header = [c.strip() for c in rows[0]]
        missing = [c for c in task.header if c not in header]
        if missing:
            raise UserError(wrong + f"; found {_clip(header)}")
        index = {c: header.index(c) for c in task.header}
        width = max(index.values()) + 1
        body = rows[1:]
    text_cols = [index[c] for c in task.text]
    label_col = index[task.label]
    texts, labels, skipped = [], [], 0
    for row in body:
        if len(row) < width:
            skipped += 1
            continue
        texts.append(tuple(row[c] for c in text_cols))
        labels.append(row[label_col].strip())
    if not texts:
        detail = f" ({skipped} line(s) with too few columns)" if skipped else ""
        raise UserError(f"{path} has no items{detail}; pass a GLUE {task.title} dir whose {path.name} "
                        f"holds {task.expected} and one item per line")
    return GlueSplit(path, texts, labels, skipped)


def _clip(cells: list[str], width: int = 80) -> str:
    text = ", ".join(repr(c) for c in cells)
    return text if len(text) <= width else text[:width - 3] + "..."


def label_order(task: GlueTask, label2id: dict | None) -> tuple[dict[str, int], str]:
    """Label string → class id: the model's ``config.label2id`` when its names are the task's, else GLUE's
    standard order. Returns the mapping and where it came from (``model`` | ``glue``)."""
    if task.labels is None:
        return {}, "glue"
    norm = lambda s: str(s).strip().lower().replace(" ", "_").replace("-", "_")
    if label2id:
        model = {norm(k): int(v) for k, v in label2id.items()}
        if set(model) == {norm(n) for n in task.labels} and sorted(model.values()) == list(range(len(task.labels))):
            return {n: model[norm(n)] for n in task.labels}, "model"
    return {n: i for i, n in enumerate(task.labels)}, "glue"


def encode_labels(task: GlueTask, split: GlueSplit, mapping: dict[str, int]) -> np.ndarray:
    """Raw labels → int64 class ids (float32 scores for STS-B); :class:`UserError` names a bad one."""
    out = []
    for i, raw in enumerate(split.labels):
        try:
            if task.regression:
                value = float(raw)
                if not np.isfinite(value):
                    raise ValueError(raw)
            elif task.labels is not None:
                value = mapping[raw.lower()]
            else:
                value = int(raw)
                if not 0 <= value < task.num_labels:
                    raise ValueError(raw)
        except (KeyError, ValueError):
            allowed = ("a number (similarity 0-5)" if task.regression else
                       ", ".join(task.labels) if task.labels is not None else
                       ", ".join(map(str, range(task.num_labels))))
            raise UserError(f"{split.path}: item {i + 1} has label {raw!r}, not one of glue:{task.name}'s "
                            f"({allowed}); fix the file or the `task`") from None
        out.append(value)
    return np.asarray(out, dtype=np.float32 if task.regression else np.int64)


def sample(n: int, k: int, seed: int) -> list[int]:
    """A fixed sample of ``k`` of ``n`` indices, in file order (all of them when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


# ---- metrics --------------------------------------------------------------------------------------------

def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(pred) == np.asarray(labels)).mean())


def f1_score(pred: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the ``positive`` class (0 when it is neither predicted nor present)."""
    pred, labels = np.asarray(pred) == positive, np.asarray(labels) == positive
    tp = float(np.sum(pred & labels))
    denom = float(pred.sum() + labels.sum())
    return 2.0 * tp / denom if denom else 0.0


def matthews_corrcoef(pred: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (Gorodkin's multiclass form; the usual φ for two classes); 0 when undefined."""
    pred, labels = np.asarray(pred, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    k = max(int(pred.max(initial=0)), int(labels.max(initial=0))) + 1
    c = np.zeros((k, k), dtype=np.float64)
    np.add.at(c, (labels, pred), 1.0)
    t, p = c.sum(axis=1), c.sum(axis=0)   # true / predicted counts per class
    n, correct = c.sum(), np.trace(c)
    cov = correct * n - t @ p
    denom = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float(cov / denom) if denom > 0 else 0.0


def _correlation(fn, a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(a, b)[0])


def pearson(pred: np.ndarray, labels: np.ndarray) -> float:
    from scipy.stats import pearsonr
    return _correlation(pearsonr, pred, labels)


def spearman(pred: np.ndarray, labels: np.ndarray) -> float:
    from scipy.stats import spearmanr
    return _correlation(spearmanr, pred, labels)


_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy, "f1": f1_score, "matthews": matthews_corrcoef, "pearson": pearson, "spearman": spearman}


def task_scores(task: GlueTask, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's official metrics for model ``outputs`` (logits; one score column for STS-B)."""
    outputs = np.asarray(outputs)
    pred = outputs.reshape(len(outputs), -1)[:, 0] if task.regression else outputs.argmax(axis=1)
    return {m: _METRICS[m](pred, labels) for m in task.metrics}


def glue_metric(task: GlueTask, labels: np.ndarray) -> Callable[..., dict]:
    """``metric(reference, candidate)`` for ``task`` with true ``labels`` (in evaluation order): each official
    metric for the candidate and for the FP32 reference (``<name>_fp32``), the headline's drop in points
    (×100), and how the two models agree (argmax agreement; for STS-B the Pearson between their scores and
    the largest score difference). ``rows``: the items the arrays were drawn with (a bootstrap resample)."""
    all_labels = np.asarray(labels)

    def metric(reference: np.ndarray, candidate: np.ndarray, rows: np.ndarray | None = None) -> dict:
        labels = all_labels if rows is None else all_labels[rows]
        if len(candidate) != len(labels):
            raise ValueError(f"{len(candidate)} outputs for {len(labels)} labels")
        out: dict = {"items": len(labels)}
        cand, ref = task_scores(task, candidate, labels), task_scores(task, reference, labels)
        out.update(cand)
        out.update({f"{k}_fp32": v for k, v in ref.items()})
        out[f"{task.headline}_drop_points"] = 100.0 * (ref[task.headline] - cand[task.headline])
        if task.regression:
            r, c = np.asarray(reference).reshape(-1), np.asarray(candidate).reshape(-1)
            out["score_pearson_to_fp32"] = pearson(c, r)
            out["score_max_abs_diff"] = float(np.abs(r - c).max())
        else:
            out["agreement"] = float((np.asarray(reference).argmax(1) == np.asarray(candidate).argmax(1)).mean())
        return out

    return metric
