"""Error family. A :class:`UserError` is the user's to fix: the CLI prints its one line and exits 2.

Messages name settings by their config field in backticks (`calib_size`), as a Python caller writes them;
the CLI rewrites those into its own spelling (--calib-size) with :func:`in_words_of`.
"""

import re
from collections.abc import Mapping

_FIELD = re.compile(r"`([a-z][a-z0-9_]*)`")


def in_words_of(text: str, names: Mapping[str, str]) -> str:
    """``text`` with each backticked field name that ``names`` knows replaced by ``names[field]``."""
    return _FIELD.sub(lambda m: names.get(m.group(1), m.group(0)), text)


class BayesQError(Exception):
    """Base of every error this package raises on purpose."""


class UserError(BayesQError):
    """Bad input (model, data, flags, paths): one line saying what is wrong and what to pass instead."""


class PassFailure(BayesQError):
    """A compile pass failed; the message names the pass and the tensor."""


class VerdictFailure(BayesQError):
    """The validated artifact is at least as bad as `fail_on` allows (the CLI exits 3); the artifact and its
    report are written, ``result`` holds them."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class BayesQWarning(UserWarning):
    """What a compile warns about (the verdict when it does not hold, weights left in float, a model with
    no pretrained weights), raised through Python's ``warnings`` by :func:`bayesq_onnx.compile`."""
