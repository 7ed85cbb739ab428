"""benchmarks/distill.py and benchmarks/scale.py: their synthetic inputs are what the model sources accept,
and the distillation benchmark runs end to end on digits-resnet (short training); benchmarks/kfac_scale.py
compares the two curvature forms on digits-resnet."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import distill as distill_bench  # noqa: E402
import kfac_scale  # noqa: E402
import reconstruct as reconstruct_bench  # noqa: E402
import scale  # noqa: E402

from bayesq_onnx.models.glue import get_task, read_split  # noqa: E402
from bayesq_onnx.models.imagefolder import scan  # noqa: E402


def test_scale_sst2_is_read_as_glue(tmp_path):
    d = scale.sst2(tmp_path / "sst2", n_train=40, n_dev=30)
    task = get_task("glue:sst2")
    train, dev = read_split(task, d, "train"), read_split(task, d, "dev")
    assert len(train.texts) == 40 and len(dev.texts) == 30
    assert set(train.labels) | set(dev.labels) <= {"0", "1"} and len(set(train.labels)) == 2


def test_scale_image_folder_is_an_imagenet_style_folder(tmp_path):
    folder = scan(scale.image_folder(tmp_path / "images", classes=3, per_class=2))
    assert folder.classes == ("0", "100", "200") and len(folder) == 6
    assert np.array_equal(np.bincount(folder.folder), [2, 2, 2])


def test_kfac_scale_compares_the_forms_on_digits():
    rows, timings = kfac_scale.fisher_mass_ratios("digits-resnet", 16)
    assert {"kfac_fit_s", "diag_fit_s"} <= set(timings)
    kron = [r["exact_over_kfac"] for r in rows if r["kfac_form"] == "kronecker"]
    assert rows and len(kron) == len(rows)  # every digits-resnet weight is a dense conv or the classifier
    assert all(0 < k < float("inf") for k in kron)
    # its 3×3 convs see correlated gradients at neighbouring positions: K-FAC "expand" under-estimates them
    assert max(kron) > 1.5


@pytest.mark.slow
def test_distill_benchmark_case_on_digits(tmp_path):
    """One case, both teachers: the budget does not move, 'without' is the same plan for both teachers, the
    posterior teacher on digits falls back to FP32 (the guard), and the outputs are written."""
    rows = distill_bench.run_case("digits-resnet:2.5", ["--distill-steps", "6", "--calib-size", "64",
                                                        "--eval-size", "64"], tmp_path)
    assert [r["teacher"] for r in rows] == ["posterior", "fp"]
    assert rows[0]["without"] == rows[1]["without"] and rows[0]["all_in_bits"] == rows[1]["all_in_bits"] <= 2.5
    assert rows[0]["teacher_used"] == "fp" and rows[1]["teacher_used"] == "fp"
    assert all(r["steps"] <= 6 and r["wall_s"] > 0 and "nll without" in r for r in rows)
    text = distill_bench.write_outputs(rows, tmp_path / "out" / "distill", "test")
    cols = distill_bench.table_columns(rows)
    assert "nll with" in cols and not any("fp32" in c for c in cols)
    assert text.count("\n| digits-resnet |") == 2
    with open(tmp_path / "out" / "distill.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2
    assert (tmp_path / "out" / "distill.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_reconstruct_benchmark_case_on_digits(tmp_path):
    """One case: the row without reconstruction and one with it, at the same all-in bits; the block figures
    only on the reconstructed row; the plot is written."""
    rows = reconstruct_bench.run_case("digits-resnet:3.0", ["mse"], ["--reconstruct-steps", "8", "--calib-size", "64",
                                                                     "--eval-size", "64", "--floor", "none"], tmp_path)
    assert [r["reconstruct"] for r in rows] == ["none", "mse"]
    assert rows[0]["all_in_bits"] == rows[1]["all_in_bits"] <= 3.0
    assert "blocks" not in rows[0] and rows[1]["blocks"] >= 1 and "→" in rows[1]["heldout_error"]
    reconstruct_bench.plot(rows, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("key,value,want", [("distill_s", 81.63, "81.6"), ("without", 0.94981, "0.9498"),
                                            ("budget", 2.5, "2.5"), ("budget", 3.0, "3"), ("steps", 126, "126")])
def test_distill_table_formatting(key, value, want):
    assert distill_bench._fmt(key, value) == want


@pytest.mark.slow
def test_memory_benchmark_on_digits(tmp_path, monkeypatch):
    """benchmarks/memory.py: the FP32 row, a fresh compile measured against it, and a peer that quantizes
    nothing on a conv net as a row with the reason."""
    import memory as memory_bench

    monkeypatch.setattr(sys, "argv", ["memory.py", "--model", "digits-resnet", "--targets", "size",
                                      "--peers", "ort-rtn b4 bs32 acc0", "--out", str(tmp_path)])
    memory_bench.main()
    rows = list(csv.DictReader(open(tmp_path / "memory_digits-resnet.csv")))
    assert [r["artifact"] for r in rows][0] == "fp32" and rows[1]["artifact"].startswith("bayesq size")
    assert float(rows[1]["peak MB"]) > 40 and 0.5 < float(rows[1]["peak ×FP32"]) < 2
    assert "quantized none" in rows[2]["note"]
    assert (tmp_path / "memory_digits-resnet.png").stat().st_size > 0
