"""Writing the output directory safely: checked before any work, every file written to a temporary
name in the same directory and renamed into place, so a reader never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UserError

MODEL, REPORT_JSON, REPORT_MD, BITS_PNG = "model.onnx", "report.json", "report.md", "bits.png"


def check_output_dir(out: Path) -> None:
    """Fail early, with nothing left behind, when ``out`` cannot become a writable directory.

    Permission bits say little for root or on read-only mounts, so this really creates (and removes) a
    scratch directory where the first missing part of ``out`` would go.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; pass a directory path")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"--out {out}: {probe} is a file, not a directory; pass a directory path")
    try:
        Path(tempfile.mkdtemp(prefix=".bayesq-probe-", dir=probe)).rmdir()
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write in {probe} ({exc.strerror}); "
                        "pass a directory you can write to") from exc


def write_files(out: Path, files: dict[str, bytes]) -> dict[str, Path]:
    """Write each ``name -> bytes`` atomically into ``out`` (created if needed); returns the paths."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the directory ({exc.strerror})") from exc
    written: dict[str, Path] = {}
    for name, data in files.items():
        target = out / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise UserError(f"cannot write {target} ({exc.strerror}); free space or pick another --out") from exc
        written[name] = target
    return written
