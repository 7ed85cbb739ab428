"""Writing the output directory as a unit: a compile killed at any point leaves the previous artifact or none
at ``out``, never a mix of old and new files and never a partial file.

All files go into a fresh hidden sibling ``.{out}.bayesq-tmp-{pid}-{random}`` (same parent, so renames stay
on one file system) and are fsynced. Then, if ``out`` is absent, one ``rename`` publishes the directory;
otherwise the previous artifact is renamed aside to ``.{out}.bayesq-old-{pid}-{random}``, the new one renamed
to ``out`` and the old one removed. A kill between those two renames leaves no ``out`` (allowed: "none").
Leftovers of killed runs are removed by the next write to the same ``out``. Only a directory holding
nothing but artifact files is ever moved, and only artifact files are ever deleted from it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import UserError

MODEL, REPORT_JSON, REPORT_MD, BITS_PNG = "model.onnx", "report.json", "report.md", "bits.png"
ARTIFACT_FILES = (MODEL, REPORT_JSON, REPORT_MD, BITS_PNG)


def check_output_dir(out: Path) -> None:
    """Fail early, with nothing left behind, when ``out`` cannot be (re)placed as an artifact directory.

    ``out`` must be absent or a directory holding only artifact files (we never move a directory with
    anything else in it). The artifact is renamed into place in ``out``'s parent, so that is where write
    access is probed: permission bits say little for root or on read-only mounts, so this really creates
    (and removes) a scratch directory in the nearest existing parent.
    """
    out = Path(out)
    real = _real(out)
    if real.exists() and not real.is_dir():
        raise UserError(f"`out` {out} is a file, not a directory; pass a directory path")
    if real.is_dir() and (foreign := _foreign(real)):
        raise UserError(f"`out` {out} holds files that are not a BayesQ artifact ({', '.join(foreign[:3])}); "
                        "pass a new or empty directory, or one a previous compile wrote")
    probe = real.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"`out` {out}: {probe} is a file, not a directory; pass a directory path")
    try:
        Path(tempfile.mkdtemp(prefix=".bayesq-probe-", dir=probe)).rmdir()
    except OSError as exc:
        raise UserError(f"`out` {out}: cannot write in {probe} ({exc.strerror}); "
                        "pass a directory you can write to") from exc


def write_files(out: Path, files: dict[str, bytes]) -> dict[str, Path]:
    """Replace directory ``out`` by one holding exactly ``files`` (name -> bytes), as a unit; returns the paths."""
    out = Path(out)
    real = _real(out)
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"`out` {out}: cannot create {real.parent} ({exc.strerror})") from exc
    staging = _sibling(real, "tmp")
    try:
        _remove_leftovers(real)
        os.mkdir(staging)
        for name, data in files.items():
            _write(staging / name, data)
        _fsync_dir(staging)
        _publish(staging, real, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot write {out} ({exc.strerror or exc}); free space or pick another `out`") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {name: out / name for name in files}


def _publish(staging: Path, out: Path, shown: Path) -> None:
    """Rename the complete, synced ``staging`` to ``out``, moving a previous artifact aside first."""
    if not out.exists():
        os.rename(staging, out)  # atomic: readers see no --out, then the whole new one
    else:
        # checked again: something may have appeared since check_output_dir (a user's file, --dump-dir in it)
        if not out.is_dir():
            raise UserError(f"`out` {shown} is now a file, not a directory; pass a directory path")
        if foreign := _foreign(out):
            raise UserError(f"`out` {shown} now holds files that are not a BayesQ artifact ({', '.join(foreign[:3])}); "
                            "nothing was replaced: move them away or pick another `out`")
        os.chmod(staging, stat.S_IMODE(out.stat().st_mode))  # keep the permissions the user gave --out
        old = _sibling(out, "old")
        os.rename(out, old)
        try:
            os.rename(staging, out)
        except OSError:
            os.rename(old, out)  # put the previous artifact back; if this fails too, --out is absent ("none")
            raise
        _remove_artifact_dir(old)
    try:
        _fsync_dir(out.parent)  # make the renames durable; the new artifact is in place either way
    except OSError:
        pass


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode from the umask, like any file
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _real(out: Path) -> Path:
    """Absolute, symlinks resolved: a linked `out` is replaced where it points, and the link keeps working."""
    return Path(os.path.realpath(out))


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.bayesq-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _is_ours(name: str) -> bool:
    return name in ARTIFACT_FILES


def _foreign(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if not _is_ours(n))


def _remove_artifact_dir(directory: Path) -> None:
    """Delete the artifact files in ``directory`` and then the directory, if nothing else is left in it."""
    for name in os.listdir(directory):
        if _is_ours(name):
            try:
                os.unlink(directory / name)
            except OSError:
                pass
    try:
        os.rmdir(directory)
    except OSError:
        pass  # something else is in there: leave it rather than delete what is not ours


def _remove_leftovers(out: Path) -> None:
    """Staging and moved-aside directories of runs to this ``out`` whose process is gone (killed)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.bayesq-(tmp|old)-(\d+)-[0-9a-f]+")
    for entry in os.listdir(out.parent):
        m = pattern.fullmatch(entry)
        if m and not _alive(int(m[2])):
            if m[1] == "tmp":  # ours alone: nothing else ever writes into a staging directory
                shutil.rmtree(out.parent / entry, ignore_errors=True)
            else:
                _remove_artifact_dir(out.parent / entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
