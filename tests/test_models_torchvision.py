"""``torchvision:<arch>`` on ImageFolder data: folder scanning, class mapping, fixed samples, state dicts,
one end-to-end compile, and every bad input as one ``error:`` line with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image

from bayesq_onnx.cli import main
from bayesq_onnx.config import CompileConfig
from bayesq_onnx.errors import UserError
from bayesq_onnx.models import load_model
from bayesq_onnx.models.base import SourceOptions
from bayesq_onnx.models.imagefolder import (IMAGENET_MEAN, IMAGENET_STD, ImageBatches, Preprocess, class_indices,
                                            fixed_sample, scan)
from bayesq_onnx.models.metrics import top_k_accuracy
from bayesq_onnx.pipeline import compile_model
from helpers import run


def _write_images(folder, n, rng, size=(40, 52), ext="png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.{ext}")


@pytest.fixture
def image_folder(tmp_path):
    """12 small random images in integer-named class folders 0, 3, 7 (class indices of a 1000-class model)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for c in ("0", "3", "7"):
        _write_images(root / c, 4, rng, ext="png" if c != "3" else "jpg")
    return root


# ---- ImageFolder ----------------------------------------------------------------------------------------

def test_scan_lists_sorted_images_and_skips_the_rest(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "d"
    _write_images(root / "b", 2, rng)
    _write_images(root / "a" / "nested", 1, rng)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    _write_images(root / ".hidden", 1, rng)
    (root / "empty").mkdir()
    folder = scan(root)
    assert folder.classes == ("a", "b", "empty")
    assert [p.relative_to(root).as_posix() for p in folder.files] == [
        "a/nested/img000.png", "b/img000.png", "b/img001.png"]
    assert folder.folder.tolist() == [0, 1, 1]


def test_scan_calibration_takes_loose_images(tmp_path):
    _write_images(tmp_path / "calib", 3, np.random.default_rng(2))
    assert len(scan(tmp_path / "calib", "--calib", labels=False)) == 3
    with pytest.raises(UserError, match="must move into class folders"):
        scan(tmp_path / "calib", "--data")


def test_class_indices_conventions():
    assert class_indices(["0", "10", "9"], 1000).tolist() == [0, 10, 9]          # integers are indices
    assert class_indices(["n02", "n01", "n03"], 3).tolist() == [0, 1, 2]         # one folder per class
    with pytest.raises(UserError, match=r"name the folders by class index \(0\.\.999\).*sorted order"):
        class_indices(["cat", "dog"], 1000)
    with pytest.raises(UserError, match="'12' is not a class index"):
        class_indices(["1", "12"], 10)
    with pytest.raises(UserError, match="index 1"):
        class_indices(["01", "1"], 10)


def test_fixed_sample_is_stable_and_disjoint():
    a, b = fixed_sample(100, 30), fixed_sample(100, 70, from_end=True)
    assert np.array_equal(a, fixed_sample(100, 30)) and np.all(np.diff(a) > 0)
    assert not set(a) & set(b) and len(set(a) | set(b)) == 100
    assert np.array_equal(fixed_sample(100, 20), np.sort(np.intersect1d(a, fixed_sample(100, 20))))
    assert len(fixed_sample(5, 50)) == 5


def test_preprocess_resize_crop_normalize(tmp_path):
    image = Image.new("RGB", (300, 200), (128, 64, 255))
    x = Preprocess()(image)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    want = (np.array([128, 64, 255]) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x.mean(axis=(1, 2)), want, atol=1e-2)  # PIL resamples in 8 bits


def test_image_batches_decode_when_read(image_folder):
    paths = scan(image_folder).files
    batches = ImageBatches(paths, Preprocess(crop_size=32, resize_size=36), batch=5)
    assert len(batches) == 3
    assert [b["images"].shape[0] for b in batches] == [5, 5, 2]
    assert [b["images"].shape[0] for b in batches[1:]] == [5, 2]
    np.testing.assert_array_equal(batches[-1]["images"], batches[2]["images"])


# ---- the model source -----------------------------------------------------------------------------------

def test_load_without_weights_warns(image_folder):
    options = SourceOptions(data=image_folder, calib_size=5, eval_size=100, latency_batch=9)
    bundle = load_model("torchvision:resnet18", options)
    assert "meaningless" in bundle.info["warning"]
    assert bundle.input_names == ["images"] and bundle.output_names == ["logits"]
    assert bundle.dynamic_axes == {"images": {0: "batch"}} and bundle.likelihood == "categorical"
    assert bundle.info["calibration_items"] == 5 and bundle.info["evaluation_items"] == 7   # 12 - 5
    assert bundle.calibration[0]["images"].shape == (5, 3, 224, 224)
    calib_labels = bundle.calibration_targets[0]
    assert set(calib_labels.tolist()) <= {0, 3, 7} and calib_labels.dtype == np.int64
    assert bundle.latency_feed["images"].shape == (9, 3, 224, 224)                       # 7 repeated to 9
    assert bundle.headline == "top1" and len(bundle.evaluation) == 1 and len(bundle.evaluation.paths) == 7


def test_compile_resnet18_with_weights(image_folder, tmp_path):
    """A state dict (DataParallel-prefixed, under "state_dict") through the whole compile: the FP32 figures
    in the report are those of torchvision's model with those weights, and the artifact follows it."""
    torch.manual_seed(1)
    ref = torchvision.models.resnet18().eval()
    for m in ref.modules():   # non-trivial BatchNorm statistics, so folding them is really tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "w.pth")
    out = tmp_path / "out"
    config = CompileConfig(model="torchvision:resnet18", weights=tmp_path / "w.pth", data=image_folder, out=out,
                           method="rtn", bits=8, calib_size=4, eval_size=4, latency_runs=2,
                           memory_loads=1, latency_warmup=1,
                           latency_batch=2)
    result = compile_model(config)
    report = json.loads((out / "report.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["bits.png", "model.onnx", "report.json", "report.md"]
    assert "warning" not in report["model"] and report["model"]["weights"] == str(tmp_path / "w.pth")
    # every convolution weight is a PyTorch parameter in the graph (the pipeline folds BatchNorm first)
    assert not [n for n in report["export"]["parameters_unbound"] if n.endswith(".weight")]
    assert len(report["plan"]["tensors"]) == 21 and report["fidelity"]["items"] == 4

    bundle = load_model("torchvision:resnet18", config.source_options())
    assert [str(p) for p in bundle.evaluation.paths] == sorted(str(p) for p in bundle.evaluation.paths)
    images = np.concatenate([b["images"] for b in bundle.evaluation])
    labels = np.array([int(p.parent.name) for p in bundle.evaluation.paths])
    with torch.no_grad():
        want = ref(torch.from_numpy(images)).numpy()
        got = bundle.module(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert report["fidelity"]["top1_fp32"] == top_k_accuracy(want, labels, 1)
    q = run(result.artifact.read_bytes(), {"images": images})
    assert np.abs(q - want).max() < 0.05 * np.abs(want).max()


# ---- bad input through the CLI: one line, exit 2, nothing written ---------------------------------------

def _bad_state_dict(path):
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)


def _garbage_image(root):
    _write_images(root / "0", 3, np.random.default_rng(3))
    (root / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


@pytest.mark.parametrize("case,needle", [
    ("no-data", "needs --data DIR"),
    ("data-missing", "no such file or directory"),
    ("data-file", "is a file, not a directory"),
    ("no-class-folders", "has no class sub-folders (its 2 images must move into class folders)"),
    ("no-images", "has 2 class folders but no images"),
    ("broken-image", "cannot read image"),
    ("weights-missing", "no such file"),
    ("weights-garbage", "is not a readable state dict"),
    ("weights-mismatch", "of another shape (e.g. fc.weight (10, 512) vs (1000, 512))"),
    ("class-names", "either name the folders by class index (0..999)"),
    ("too-few", "pass --calib DIR"),
    ("calib-one", "calibration needs at least 2 images"),
    ("unknown-arch", "did you mean resnet18"),
])
def test_bad_input_is_one_line(tmp_path, image_folder, case, needle):
    data, arch, extra = image_folder, "resnet18", []
    rng = np.random.default_rng(4)
    if case == "no-data":
        data = None
    elif case == "data-missing":
        data = tmp_path / "nowhere"
    elif case == "data-file":
        data = tmp_path / "file.png"
        data.write_bytes(b"x")
    elif case == "no-class-folders":
        data = tmp_path / "flat"
        _write_images(data, 2, rng)
    elif case == "no-images":
        data = tmp_path / "empty"
        (data / "a").mkdir(parents=True)
        (data / "b").mkdir()
        (data / "b" / "readme.txt").write_text("x")
    elif case == "broken-image":
        data = tmp_path / "broken"
        _garbage_image(data)
        extra = ["--calib-size", "2"]
    elif case == "weights-missing":
        extra = ["--weights", str(tmp_path / "no.pt")]
    elif case == "weights-garbage":
        (tmp_path / "w.pt").write_bytes(b"not a checkpoint")
        extra = ["--weights", str(tmp_path / "w.pt")]
    elif case == "weights-mismatch":
        _bad_state_dict(tmp_path / "w.pt")
        extra = ["--weights", str(tmp_path / "w.pt")]
    elif case == "class-names":
        data = tmp_path / "named"
        for name in ("cat", "dog"):
            _write_images(data / name, 3, rng)
    elif case == "too-few":
        extra = ["--calib-size", "11"]
    elif case == "calib-one":
        extra = ["--calib-size", "1"]
    elif case == "unknown-arch":
        arch = "resnet19"
    out = tmp_path / "out"
    args = ["compile", f"torchvision:{arch}", "--method", "rtn", "--bits", "8", "--calib-size", "4",
            "--eval-size", "4", "--out", str(out), *extra]
    if data is not None:
        args += ["--data", str(data)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 2, result.output
    # the pipeline notes the execution provider before loading the model; every other line is the error
    lines = [ln for ln in result.stderr.strip().splitlines() if "execution provider" not in ln or "error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
