"""Offline text corpus: CPython's own documentation topics (``pydoc_data.topics``), split into sentences."""

from __future__ import annotations

import random
import re

from ..errors import UserError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


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
        raise UserError(f"the text corpus has {len(sentences)} sentences; --calib-size {calib_size} + --eval-size "
                        f"{eval_size} need more: lower one of them")
    order = list(sentences)
    random.Random(seed).shuffle(order)
    return order[:calib_size], order[calib_size:calib_size + eval_size]
