"""The bad-input battery: every way a user can get the inputs wrong gets one ``error:`` line on stderr naming
the problem and the fix, exit code 2, no traceback, and nothing at --out (an existing --out untouched)."""

from __future__ import annotations

import errno
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper
from tiny_models import linear_model

from bayesq_onnx.cli import main
from bayesq_onnx.runtime.session import cuda_status


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny FP32 ONNX model with a matching .npz, and variants of both."""
    d = tmp_path_factory.mktemp("bad_inputs")
    model = linear_model()
    onnx.save(model, d / "model.onnx")
    np.savez(d / "calib.npz", x=np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32))
    return d


def _variant_model(files, tmp, case):
    """The FP32 model broken in one way (or a non-model), written to ``tmp``; returns its path."""
    good = (files / "model.onnx").read_bytes()
    path = tmp / "in.onnx"
    if case == "random_bytes":
        path.write_bytes(os.urandom(2048))
    elif case == "truncated":
        path.write_bytes(good[: len(good) // 3])
    elif case == "text":
        path.write_text("this is a README, not a model\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "unknown_op":  # a custom-domain op ONNX Runtime has no kernel for
        m = linear_model()
        m.graph.node.insert(1, helper.make_node("Frobnicate", ["h"], ["h2"], domain="com.example"))
        m.graph.node[2].input[0] = "h2"
        m.opset_import.append(helper.make_opsetid("com.example", 1))
        onnx.save(m, path)
    elif case in ("nan", "inf"):
        m = linear_model()
        w = numpy_helper.to_array(m.graph.initializer[0]).copy()
        w[3, 5] = np.nan if case == "nan" else np.inf
        m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, m.graph.initializer[0].name))
        onnx.save(m, path)
    else:
        raise AssertionError(case)
    return path


def _npz(tmp, case):
    path = tmp / "c.npz"
    x = np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32)
    if case == "empty":
        np.savez(path, x=x[:0])
    elif case == "names":
        np.savez(path, pixels=x)
    elif case == "shape":
        np.savez(path, x=x[:, :10])
    elif case == "dtype":
        np.savez(path, x=x.astype(np.float16))
    elif case == "nan":
        x[0, 0] = np.nan
        np.savez(path, x=x)
    elif case == "not_npz":
        path.write_text("x,y\n1,2\n")
    else:
        raise AssertionError(case)
    return path


def _run(args, out, *, input_=None):
    result = CliRunner().invoke(main, [*args, "--out", str(out), "-q"], catch_exceptions=False, input=input_)
    return result


def _assert_refused(result, out, needle, *, out_existed=False):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    if not out_existed:
        assert not out.exists()


MODEL_CASES = [
    ("random_bytes", "is not a readable ONNX model"),
    ("truncated", "not"),            # protobuf may fail to parse, or parse into a graph without nodes
    ("text", "not"),
    ("empty", "has no graph nodes"),
    ("unknown_op", "ONNX Runtime cannot run the model"),
    ("nan", "holds NaN or Inf values"),
    ("inf", "holds NaN or Inf values"),
]


@pytest.mark.parametrize("case,needle", MODEL_CASES, ids=[c for c, _ in MODEL_CASES])
def test_bad_model_file(files, tmp_path, case, needle):
    path = _variant_model(files, tmp_path, case)
    out = tmp_path / "out"
    _assert_refused(_run(["compile", f"onnx:{path}", "--calib", str(files / "calib.npz"), "--method", "rtn",
                          "--bits", "4"], out), out, needle)


NPZ_CASES = [
    ("empty", "holds no items"),
    ("names", "do not match the model inputs"),
    ("shape", "has shape"),
    ("dtype", "the model wants float32"),
    ("nan", "contains NaN or Inf"),
    ("not_npz", "is not a readable .npz"),
]


@pytest.mark.parametrize("case,needle", NPZ_CASES, ids=[c for c, _ in NPZ_CASES])
def test_bad_calibration_data(files, tmp_path, case, needle):
    out = tmp_path / "out"
    _assert_refused(_run(["compile", f"onnx:{files / 'model.onnx'}", "--calib", str(_npz(tmp_path, case))], out),
                    out, needle)


def test_missing_calibration(files, tmp_path):
    out = tmp_path / "out"
    _assert_refused(_run(["compile", f"onnx:{files / 'model.onnx'}"], out), out, "needs calibration inputs")


def test_missing_model_file(tmp_path):
    out = tmp_path / "out"
    _assert_refused(_run(["compile", f"onnx:{tmp_path / 'nope.onnx'}", "--calib", "x.npz"], out), out,
                    "no such file")


def test_already_quantized_artifact_as_input(files, tmp_path):
    first = tmp_path / "first"
    r = _run(["compile", f"onnx:{files / 'model.onnx'}", "--calib", str(files / "calib.npz"), "--method", "rtn",
              "--bits", "8", "--latency-runs", "1", "--memory-loads", "1"], first)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    _assert_refused(_run(["compile", f"onnx:{first / 'model.onnx'}", "--calib", str(files / "calib.npz")], out),
                    out, "is already a BayesQ artifact")


def test_budget_no_candidate_mix_can_meet(files, tmp_path):
    out = tmp_path / "out"
    _assert_refused(_run(["compile", f"onnx:{files / 'model.onnx'}", "--calib", str(files / "calib.npz"),
                          "--bits", "1.2"], out), out, "--bits 1.2 cannot be met")


ARG_CASES = [
    (["--method", "rtn", "--bits", "7"], "--bits 7 is not available for --method rtn"),
    (["--method", "bayesq-fixed", "--bits", "3.5"], "--bits 3.5 is not available"),
    (["--method", "gptq", "--bits", "1.5"], "outside GPTQ's code widths"),
    (["--bits", "0.5"], "--bits 0.5 cannot be met: every candidate of --target size stores at least 2-bit codes"),
    (["--target", "cuda", "--bits", "3"], "every candidate of --target cuda stores at least 4-bit codes"),
    (["--config", "/no/such/c.yaml"], "--config /no/such/c.yaml: no such file"),
    (["--recipe", "slowest"], "Invalid value for '--recipe'"),
    (["--method", "bogus"], "Invalid value for '--method'"),
    (["--target", "fastest"], "Invalid value for '--target'"),
    (["--provider", "tpu"], "Invalid value for '--provider'"),
    (["--bits", "four"], "Invalid value for '--bits'"),
    (["--no-such-flag"], "No such option"),
    (["--group-size", "48"], "power of two"),
    (["--calib-size", "0"], "--calib-size must be at least 1"),
    (["--method", "rtn", "--bits", "4", "--max-drop", "0.01"], "--max-drop needs --method bayesq"),
    (["--overrides", "/no/such/file.json"], "no such file"),
    (["no-such-model"], "unknown model 'no-such-model'"),
    (["minilm:extra"], "takes no argument"),
    (["module:no_such_pkg.models:build"], "cannot import"),
    (["module:user_models:mlp", "--weights", "/no/such/w.pt"], "no such file"),
]


@pytest.mark.parametrize("args,needle", ARG_CASES, ids=[" ".join(a) for a, _ in ARG_CASES])
def test_bad_arguments(tmp_path, args, needle):
    out = tmp_path / "out"
    _assert_refused(_run(["compile", *args], out), out, needle)


def test_group_size_that_does_not_divide(files, tmp_path):
    out = tmp_path / "out"
    _assert_refused(_run(["compile", f"onnx:{files / 'model.onnx'}", "--calib", str(files / "calib.npz"),
                          "--method", "rtn", "--bits", "4", "--group-size", "128"], out), out, "does not divide")


def test_state_dict_that_does_not_fit(tmp_path):
    import torch

    torch.save({"0.weight": torch.zeros(3, 3)}, tmp_path / "w.pt")
    np.savez(tmp_path / "c.npz", input=np.zeros((8, 64), np.float32))
    out = tmp_path / "out"
    _assert_refused(_run(["compile", "module:user_models:mlp", "--weights", str(tmp_path / "w.pt"),
                          "--calib", str(tmp_path / "c.npz")], out), out, "does not fit")


@pytest.mark.skipif(cuda_status()[0], reason="CUDA is usable here")
def test_cuda_requested_without_cuda(tmp_path):
    out = tmp_path / "out"
    _assert_refused(_run(["compile", "--provider", "cuda"], out), out, "--provider cuda")


def test_out_is_a_file(tmp_path):
    out = tmp_path / "file"
    out.write_text("keep me")
    _assert_refused(_run(["compile"], out), out, "is a file", out_existed=True)
    assert out.read_text() == "keep me"


def test_out_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sub"
    _assert_refused(_run(["compile"], out), out, "is a file")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a read-only /proc")
def test_out_not_writable():
    r = CliRunner().invoke(main, ["compile", "--out", "/proc/self/bayesq-out", "-q"], catch_exceptions=False)
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("error: ") and "cannot write" in r.stderr


def test_disk_full_while_writing(files, tmp_path, monkeypatch):
    """ENOSPC from the file system at write time: one line, nothing (not even a staging file) left."""
    import bayesq_onnx.artifact as artifact

    def full(*_args, **_kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(artifact.os, "fsync", full)
    out = tmp_path / "out"
    _assert_refused(_run(["compile", f"onnx:{files / 'model.onnx'}", "--calib", str(files / "calib.npz"),
                          "--method", "rtn", "--bits", "4", "--latency-runs", "1", "--memory-loads", "1"], out), out,
                    "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_minilm_sizes_beyond_the_corpus(tmp_path):
    out = tmp_path / "out"
    _assert_refused(_run(["compile", "--calib-size", "2000", "--eval-size", "1024"], out), out,
                    "lower one of them")
