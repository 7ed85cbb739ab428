"""Atomic output: a process killed (SIGKILL) at any point of writing leaves the previous artifact or none at
--out, never a mix of old and new files and never a partial file; the next run cleans up after it. Disk full
leaves --out untouched. A --out holding anything but artifact files is refused before any work."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bayesq_onnx import artifact
from bayesq_onnx.cli import main
from bayesq_onnx.errors import UserError

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="the kill hook names fds via /proc")

# Prepended to the child's `python -c` code. It wraps os.rename/os.replace/os.fsync; calls that touch one of
# the artifact's hidden sibling directories (".bayesq-" in a path) are counted, and at the chosen call
# (BAYESQ_TEST_STOP = "fsync|rename:<n>:before|after") the child reports on a pipe and waits to be SIGKILLed.
# For a rename out of the staging directory it first hashes what is staged: that is exactly the new artifact.
HOOK = r'''
import hashlib, json, os, signal
_kind, _nth, _when = os.environ["BAYESQ_TEST_STOP"].split(":")
_pipe = int(os.environ["BAYESQ_TEST_PIPE"])
_seen = {"rename": 0, "fsync": 0}

def _path(a):
    a = a.fileno() if hasattr(a, "fileno") else a
    try:
        return os.readlink(f"/proc/self/fd/{a}") if isinstance(a, int) else os.fsdecode(a)
    except (OSError, TypeError):
        return ""

def _hashes(d):
    return {n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest() for n in sorted(os.listdir(d))}

def _wrap(kind, real):
    def wrapped(*args, **kw):
        paths = [_path(a) for a in args]
        if not any(".bayesq-" in p for p in paths):
            return real(*args, **kw)
        _seen[kind] += 1
        hit = kind == _kind and _seen[kind] == int(_nth)
        staged = _hashes(paths[0]) if hit and kind == "rename" and ".bayesq-tmp-" in paths[0] else None
        if hit and _when == "before":
            _stop(staged)
        result = real(*args, **kw)
        if hit:
            _stop(staged)
        return result
    return wrapped

def _stop(staged):
    os.write(_pipe, (json.dumps({"pid": os.getpid(), "staged": staged}) + "\n").encode())
    while True:
        signal.pause()  # until the test's SIGKILL

os.rename, os.replace, os.fsync = _wrap("rename", os.rename), _wrap("rename", os.replace), _wrap("fsync", os.fsync)
'''

# write_files' calls, in order, when --out holds a previous artifact: fsync of the 4 files and of the staging
# directory; rename --out -> .old; rename staging -> --out.
WRITING = "fsync:2:before"     # model.onnx staged and synced, report.json written, not synced
STAGED = "fsync:5:after"       # staging complete and synced, nothing renamed yet
BETWEEN = "rename:1:after"     # previous artifact moved aside, new one not yet in place
PUBLISHED = "rename:2:after"   # new artifact in place, moved-aside previous one not yet deleted


def _env(**extra) -> dict:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    return env


def _run_until(stop: str, code: str, args: list[str], cwd: Path, timeout: float) -> dict:
    """Run ``HOOK + code`` with ``args`` until it stops at ``stop``, SIGKILL it; returns what it reported."""
    r, w = os.pipe()
    log = cwd / "child.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", HOOK + code, *args], cwd=cwd, stdout=fh, stderr=fh,
                                env=_env(BAYESQ_TEST_STOP=stop, BAYESQ_TEST_PIPE=str(w)), pass_fds=(w,))
    os.close(w)  # the child holds the only write end: EOF means it exited without reaching the stop
    try:
        ready, _, _ = select.select([r], [], [], timeout)
        line = os.read(r, 1 << 20) if ready else b""
    finally:
        os.close(r)
        proc.kill()
        proc.wait()  # reaped: its pid is dead for the next run's leftover cleanup
    assert line, f"child never reached {stop} (rc {proc.returncode}):\n{log.read_text()[-3000:]}"
    return json.loads(line)


def _digests(d: Path) -> dict[str, str] | None:
    """name -> sha256 of every entry of ``d``; None when ``d`` is absent."""
    if not d.exists():
        return None
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.bayesq-"))


# ---- kill write_files itself (no compile: fast, every point, with and without a previous artifact) ----------

def _payload(tag: str) -> dict[str, bytes]:
    # ~1 MB per file, so a write really takes several syscalls; distinct per file and per tag
    return {name: f"{tag} {name} ".encode() * 50_000 for name in artifact.ARTIFACT_FILES}


def _hash_all(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}


WRITE_NEW = "import sys; from bayesq_onnx import artifact\n" \
            "artifact.write_files(sys.argv[1], {n: f'new {n} '.encode() * 50_000 for n in artifact.ARTIFACT_FILES})"


@pytest.mark.parametrize("previous,stop,expected", [
    (True, WRITING, "previous"), (True, STAGED, "previous"), (True, BETWEEN, "none"), (True, PUBLISHED, "new"),
    (False, WRITING, "none"), (False, "rename:1:after", "new"),
])
def test_write_killed_leaves_previous_or_none(tmp_path, previous, stop, expected):
    out = tmp_path / "out"
    old, new = _payload("old"), _payload("new")
    if previous:
        artifact.write_files(out, old)
    want = {"previous": _hash_all(old), "none": None, "new": _hash_all(new)}[expected]

    report = _run_until(stop, WRITE_NEW, [str(out)], tmp_path, timeout=60)
    assert _digests(out) == want
    if expected == "new":
        assert report["staged"] == want  # what was staged is what got published, byte for byte
    if previous or expected == "none":  # (a first publish is one rename: nothing is left after it)
        assert _siblings(out), "the killed run should have left its staging/old directory behind"

    # the next write succeeds and removes the dead run's leftovers
    artifact.write_files(out, new)
    assert _digests(out) == _hash_all(new)
    assert _siblings(out) == []


# ---- kill a real compile (CLI in a fresh interpreter) -------------------------------------------------------

CLI = "from bayesq_onnx.cli import main; main()"


def _compile_args(out: Path, bits: int) -> list[str]:
    return ["compile", "module:user_models:bundle", "--method", "rtn", "--bits", str(bits), "--out", str(out),
            "--latency-runs", "1", "--memory-loads", "1", "-q"]


def _compile(out: Path, bits: int, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bayesq_onnx", *_compile_args(out, bits)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # five real compiles in fresh interpreters (~15 s each on 2 busy cores)
def test_compile_killed_mid_write(tmp_path):
    assert (Path(artifact.__file__).parent / "__main__.py").exists()
    out = tmp_path / "X"
    _compile(out, 4, tmp_path)
    previous = _digests(out)
    assert sorted(previous) == sorted(artifact.ARTIFACT_FILES)
    saved = tmp_path / "saved"
    shutil.copytree(out, saved)

    published = None
    for stop, expected in [(WRITING, "previous"), (BETWEEN, "none"), (PUBLISHED, "new")]:
        report = _run_until(stop, CLI, _compile_args(out, 2), tmp_path, timeout=600)
        state = _digests(out)
        if expected == "previous":
            assert state == previous, stop
        elif expected == "none":
            assert state is None, stop
        else:  # complete, and exactly what the killed run staged
            assert state == report["staged"] and sorted(state) == sorted(artifact.ARTIFACT_FILES), stop
            published = state, json.loads((out / artifact.REPORT_JSON).read_text())
        assert _siblings(out), f"{stop}: the killed run should have left its staging/old directory behind"
        if state != previous:  # start the next kill from the previous artifact again
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(saved, out)

    # a normal run of the second config: succeeds over the leftovers of three killed runs and removes them
    _compile(out, 2, tmp_path)
    assert _siblings(out) == []
    final = _digests(out)
    assert sorted(final) == sorted(artifact.ARTIFACT_FILES)
    # the artifact the killed run had published is the one a normal run makes (report.json/md differ only by
    # timings, so compare the model bytes and the plan)
    (state, report) = published
    assert state[artifact.MODEL] == final[artifact.MODEL] != previous[artifact.MODEL]
    assert report["plan"] == json.loads((out / artifact.REPORT_JSON).read_text())["plan"]
    assert report["config"]["bits"] == 2


# ---- disk full ----------------------------------------------------------------------------------------------

def _fail_in_staging(monkeypatch, name: str, quota: int = 0):
    """Make ``os.<name>`` fail with ENOSPC on the artifact's staging files once ``quota`` bytes are written
    there, like a full disk: the write that reaches the quota is short, the next one fails."""
    real = getattr(os, name)
    written = 0

    def failing(fd, *args):
        nonlocal written
        if ".bayesq-tmp-" not in os.readlink(f"/proc/self/fd/{fd}"):
            return real(fd, *args)
        if written >= quota:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, args[0][:quota - written]) if name == "write" else real(fd)
        written += n if name == "write" else 0
        return n

    monkeypatch.setattr(os, name, failing)


def test_disk_full_during_compile_leaves_previous_artifact(tmp_path, monkeypatch):
    from bayesq_onnx.config import CompileConfig
    from bayesq_onnx.pipeline import compile_model
    from tiny_torch import tiny_bundle

    out = tmp_path / "out"
    artifact.write_files(out, _payload("old"))
    before = _digests(out)
    # the disk fills 1000 bytes into model.onnx: a partial file is on disk in the staging directory
    _fail_in_staging(monkeypatch, "write", quota=1000)
    config = CompileConfig(model="tiny", method="rtn", bits=4, out=out, latency_runs=1,
                           memory_loads=1, latency_warmup=0)
    with pytest.raises(UserError, match=r"No space left on device\); free space or pick another `out`"):
        compile_model(config, bundle=tiny_bundle())
    assert _digests(out) == before
    assert _siblings(out) == []


def test_disk_full_at_fsync_creates_nothing(tmp_path, monkeypatch):
    # some file systems (NFS, delayed allocation) report ENOSPC only when the data is flushed
    out = tmp_path / "deep" / "out"
    _fail_in_staging(monkeypatch, "fsync")
    with pytest.raises(UserError, match="No space left on device"):
        artifact.write_files(out, _payload("new"))
    assert not out.exists()
    assert _siblings(out) == []


# ---- --out holding other files ------------------------------------------------------------------------------

@pytest.mark.parametrize("contents", [{"notes.txt": b"mine"}, {"model.onnx": b"old", "notes.txt": b"mine"},
                                      {"sub/data.bin": b"\0" * 10}])
def test_foreign_out_refused_before_any_work(tmp_path, contents):
    out = tmp_path / "out"
    for name, data in contents.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = sorted((str(p.relative_to(out)), p.read_bytes() if p.is_file() else None) for p in out.rglob("*"))
    # the factory `broken` raises when called: a one-line --out error proves the check ran before loading
    r = CliRunner().invoke(main, ["compile", "module:user_models:broken", "--out", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a BayesQ artifact" in lines[0], r.stderr
    assert "cannot build" not in r.output
    assert sorted((str(p.relative_to(out)), p.read_bytes() if p.is_file() else None)
                  for p in out.rglob("*")) == before
    assert _siblings(out) == []


def test_empty_or_artifact_out_is_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    artifact.check_output_dir(tmp_path / "empty")
    artifact.write_files(tmp_path / "empty", _payload("new"))
    artifact.check_output_dir(tmp_path / "empty")  # a previous artifact may be replaced
    artifact.write_files(tmp_path / "empty", _payload("new"))
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == sorted(artifact.ARTIFACT_FILES)


def test_foreign_file_appearing_during_compile_is_not_moved(tmp_path):
    """Checked again right before the renames: e.g. --dump-dir inside --out, or a user's file."""
    out = tmp_path / "out"
    artifact.write_files(out, _payload("old"))
    artifact.check_output_dir(out)
    (out / "mine.txt").write_text("keep")
    before = _digests(out)
    with pytest.raises(UserError, match="mine.txt"):
        artifact.write_files(out, _payload("new"))
    assert _digests(out) == before
    assert _siblings(out) == []


def test_symlinked_out_is_replaced_where_it_points(tmp_path):
    real = tmp_path / "real"
    artifact.write_files(real, _payload("old"))
    (tmp_path / "link").symlink_to(real)
    artifact.write_files(tmp_path / "link", _payload("new"))
    assert (tmp_path / "link").is_symlink()
    assert (tmp_path / "link" / artifact.MODEL).read_bytes() == _payload("new")[artifact.MODEL]
    assert _siblings(real) == [] and _siblings(tmp_path / "link") == []


def test_replaced_out_keeps_its_permissions(tmp_path):
    out = tmp_path / "out"
    artifact.write_files(out, _payload("old"))
    out.chmod(0o750)
    artifact.write_files(out, _payload("new"))
    assert out.stat().st_mode & 0o777 == 0o750
