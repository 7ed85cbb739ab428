"""The Python API (``bayesq_onnx.compile``), ``module:`` specs and ``--weights`` state dicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import run
from user_models import TwoInput, mlp

import bayesq_onnx
from bayesq_onnx import CompileConfig
from bayesq_onnx.cli import main
from bayesq_onnx.errors import UserError
from bayesq_onnx.models.state_dict import load_weights


def _config(tmp_path, **kw):
    kw.setdefault("bits", 4.0)
    return CompileConfig(out=tmp_path / "out", latency_runs=2, memory_loads=1, latency_warmup=1, **kw)


def test_compile_a_module_from_python(tmp_path):
    model = mlp()
    batches = [torch.randn(16, 64, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    result = bayesq_onnx.compile(model, batches, likelihood="categorical", config=_config(tmp_path))
    assert result.artifact == tmp_path / "out" / "model.onnx" and result.artifact.is_file()
    r = result.report
    assert r["bits"]["all_in"] <= 4.0 and r["bits"]["all_in"] == pytest.approx(r["bits"]["all_in_from_file"])
    assert r["model"]["evaluation"].startswith("last 2 of the given calibration batches")
    # the report's fidelity is what the artifact gives on the held-out batches
    got = np.concatenate([run(result.artifact.read_bytes(), {"input": b.numpy()}) for b in batches[6:]])
    with torch.no_grad():
        ref = np.concatenate([model(b).numpy() for b in batches[6:]])
    cos = np.sum(got * ref, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert r["fidelity"]["cosine_mean"] == pytest.approx(float(cos.mean()), abs=1e-5)
    # the default (size) target keeps both Linear weights packed as MatMulNBits: 2/4/8-bit codes only, so at
    # 4.0 bits all-in (4-bit codes in blocks of 32 cost 4.63) part of it is 2-bit
    assert {t["candidate"]["kernel"] for t in r["plan"]["tensors"]} == {"nbits"}
    assert r["headline"]["metric"] == "cosine_mean" and r["fidelity"]["cosine_mean"] > 0.93
    # --target fold takes every width (3/5/6-bit codes, codebooks) and folds the decodes at load: more fidelity
    fold = bayesq_onnx.compile(model, batches, likelihood="categorical",
                               config=_config(tmp_path, target="fold")).report
    assert fold["bits"]["all_in"] <= 4.0 and fold["fidelity"]["cosine_mean"] > max(0.97, r["fidelity"]["cosine_mean"])


def test_named_inputs_varying_length_and_custom_metric(tmp_path):
    rng = np.random.default_rng(0)

    def batch(length):
        return {"ids": torch.from_numpy(rng.integers(0, 40, (8, length))), "mask": torch.ones(8, length)}

    calibration = [batch(n) for n in (5, 9, 7)]
    evaluation = [batch(n) for n in (6, 11)]

    def agreement(reference, candidate):
        return {"agree": float((reference.argmax(1) == candidate.argmax(1)).mean())}

    torch.manual_seed(0)
    result = bayesq_onnx.compile(TwoInput(), calibration, evaluation=evaluation, metric=agreement,
                                 config=_config(tmp_path, method="rtn", bits=8))
    r = result.report
    assert r["headline"]["metric"] == "agree" and r["headline"]["value"] == r["fidelity"]["agree"] >= 0.8
    lo, hi = r["headline"]["ci95"]
    assert lo <= r["headline"]["value"] <= hi and r["headline"]["items"] > 0
    # the sequence axis varied across batches, so the artifact takes any length
    out = run(result.artifact.read_bytes(), {"ids": np.zeros((2, 13), np.int64), "mask": np.ones((2, 13), np.float32)})
    assert out.shape == (2, 5)


def test_api_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="calibration is empty"):
        bayesq_onnx.compile(mlp(), [], config=_config(tmp_path))
    with pytest.raises(UserError, match="inputs but forward takes"):
        bayesq_onnx.compile(mlp(), [(torch.randn(2, 64), torch.randn(2, 64))], config=_config(tmp_path))


def test_state_dict_loading(tmp_path):
    from safetensors.torch import save_file

    src, dst = mlp(), mlp()
    torch.nn.init.zeros_(dst[0].weight)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "ckpt.pt")
    load_weights(dst, tmp_path / "ckpt.pt")  # nested checkpoint, DataParallel prefix
    assert torch.equal(dst[0].weight, src[0].weight)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    load_weights(dst, tmp_path / "w.safetensors")
    other = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 10))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(UserError, match="of another shape"):
        load_weights(dst, tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable state dict"):
        load_weights(dst, tmp_path / "junk.pt")


def _invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_module_spec_with_weights_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input=rng.normal(size=(96, 64)).astype(np.float32))
    torch.manual_seed(3)
    trained = mlp()
    torch.nn.init.normal_(trained[0].weight, std=0.5)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "out"
    r = _invoke("compile", "module:user_models:mlp", "--weights", str(tmp_path / "w.pt"), "--calib",
                str(tmp_path / "calib.npz"), "--method", "rtn", "--bits", "8", "--out", str(out),
                "--latency-runs", "2", "--memory-loads", "1", "-q")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["weights"] == str(tmp_path / "w.pt")
    # the artifact holds the loaded weights, not the factory's: its outputs match the trained module
    x = rng.normal(size=(4, 64)).astype(np.float32)
    with torch.no_grad():
        want = trained(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run((out / "model.onnx").read_bytes(), {"input": x}), want, atol=0.05)


def test_module_spec_returning_a_bundle(tmp_path):
    r = _invoke("compile", "module:user_models:bundle", "--method", "rtn", "--bits", "4", "--out",
                str(tmp_path / "out"), "--latency-runs", "2", "--memory-loads", "1", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "report.json").read_text())["model"]["name"] == "user-bundle"


@pytest.mark.parametrize("spec,extra,needle", [
    ("module:user_models", [], "write module:<package.module>:<factory>"),
    ("module:no_such_pkg.models:build", [], "cannot import"),
    ("module:user_models:missing", [], "no callable"),
    ("module:user_models:broken", [], "the factory raised RuntimeError"),
    ("module:user_models:mlp", [], "needs calibration inputs"),
    ("module:user_models:mlp", ["--weights", "/nonexistent/w.pt"], "no such file"),
])
def test_module_spec_bad_input(tmp_path, spec, extra, needle):
    r = _invoke("compile", spec, *extra, "--out", str(tmp_path / "out"), "-q")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_batchnorm_is_folded_so_every_conv_weight_has_a_posterior(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32),
                              torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.BatchNorm2d(32),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(32, 10))
    for m in net.modules():  # non-trivial running statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    batches = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    result = bayesq_onnx.compile(net.eval(), batches, likelihood="categorical",
                                 config=_config(tmp_path, method="bayesq-fixed", bits=8))
    r = result.report
    assert r["model"]["batchnorm"] == "2 of 2 BatchNorm folded into their convs"
    assert r["export"]["parameters_unbound"] == [] and r["export"]["max_abs_diff"] < 1e-4
    assert all(t.get("fisher_mass", 0) > 0 for t in r["plan"]["tensors"])
    assert r["fidelity"]["cosine_mean"] > 0.999
