"""Handing freed memory back to the operating system between the compile's stages."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` on a C library without it (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Collect garbage, then return the C heap's free pages to the OS.

    Tensors freed by one stage (the Laplace fit's per-op accumulators, the planner's sorted tables) leave
    their pages in glibc's heap, which the next stage's differently sized allocations fragment rather than
    reuse: on BERT-base 1.3 GB of resident memory after the fit was free heap that ``malloc_trim`` returns.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
