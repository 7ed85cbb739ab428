"""``torchvision:<arch>``: a torchvision image classifier, its weights from ``weights`` (a state dict file),
evaluated on ``data`` (an ImageFolder dir, ImageNet-val layout) with top-1/top-5.

Nothing downloads: the architecture is built with ``weights=None`` and filled from the user's file. Without
``weights`` the model keeps a fixed random initialization, good for timing and size only; a warning says
so on stderr and in the report (``model.warning``).

Data: evaluation is a fixed sample of ``eval_size`` images of ``data``; calibration is a fixed sample
of ``calib_size`` images of ``calib`` (a dir, labels unused) or, without it, of ``data``, disjoint from
the evaluation sample (its labels then feed ``fisher="empirical"``). Preprocessing is the architecture's
standard torchvision evaluation preset (resize 256, center crop 224, ImageNet mean/std for most).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .base import ModelBundle, SourceOptions
from .imagefolder import (ImageBatches, ImageFolder, Preprocess, check_images, class_indices, decode, fixed_sample,
                          named_by_index, scan)
from .metrics import classification_metric
from .state_dict import load_weights

BATCH = 32
INPUT, OUTPUT = "images", "logits"
INIT_SEED = 0  # random initialization without --weights (fixed: same artifact every run)


def classifiers() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _check_arch(arch: str) -> str:
    names = classifiers()
    if arch in names:
        return arch
    close = difflib.get_close_matches(arch, names, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(f"torchvision:{arch} is not a torchvision image classifier; {hint}pick one of "
                    f"{len(names)}, e.g. resnet18, resnet50, mobilenet_v2, mobilenet_v3_large, efficientnet_b0, "
                    "vit_b_16 (torchvision.models.list_models(module=torchvision.models))")


class ImageClassifier(torch.nn.Module):
    """The torchvision model under an input named ``images`` (the exporter keys dynamic axes by the
    forward's argument names; torchvision's is ``x``). Its parameters are ``net.<torchvision name>``."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def _build(arch: str) -> torch.nn.Module:
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return torchvision.models.get_model(arch, weights=None).eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# ---- preprocessing and classes --------------------------------------------------------------------------

def _preset(arch: str) -> Preprocess | None:
    """The evaluation transform of the architecture's first (original) torchvision weights; building it
    downloads nothing."""
    try:
        from torchvision.models import get_model_weights

        p = next(iter(get_model_weights(arch))).transforms()
        return Preprocess(crop_size=int(p.crop_size[0]), resize_size=int(p.resize_size[0]), mean=tuple(p.mean),
                          std=tuple(p.std), interpolation=p.interpolation.value)
    except Exception:  # noqa: BLE001 - no preset: the ImageNet default below
        return None


def _preprocess_and_classes(model: torch.nn.Module, arch: str) -> tuple[Preprocess, int]:
    """The preprocessing the model runs with and its number of classes (from one forward pass: some
    classifiers end in a convolution, not a Linear). A preset whose size the architecture built with
    ``weights=None`` does not take (vit_h_14's 518) falls back to resize 256, crop 224."""
    tried = []
    for pre in dict.fromkeys(p for p in (_preset(arch), Preprocess()) if p is not None):
        try:
            with torch.inference_mode():
                out = model(torch.zeros(1, 3, pre.crop_size, pre.crop_size))
        except Exception as exc:  # noqa: BLE001 - wrong input size for this architecture
            tried.append(f"{pre.crop_size}×{pre.crop_size}: {_first_line(exc)}")
            continue
        out = out[0] if isinstance(out, (tuple, list)) else out
        if out.ndim != 2:
            raise UserError(f"torchvision:{arch} returns a {out.ndim}-d output, not class logits; "
                            "pick an image classifier")
        return pre, int(out.shape[1])
    raise UserError(f"torchvision:{arch} does not run on 3-channel images ({'; '.join(tried)}); "
                    "pick another architecture")


# ---- the bundle -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Samples:
    """The fixed image samples of one compile: evaluation from the start of one fixed shuffle of ``data``,
    calibration from its end (``calib_idx``: their indices in ``data``, whose labels feed the empirical
    Fisher) or from ``calib`` (``calib_idx`` None: no labels)."""

    data: ImageFolder
    eval_idx: np.ndarray
    eval_paths: list[Path]
    calib_paths: list[Path]
    calib_idx: np.ndarray | None
    calib_flag: str
    calib_source: str


def _sample_images(arch: str, options: SourceOptions) -> _Samples:
    """Scan ``data`` (and ``calib``), draw the fixed samples and check that every sampled image decodes."""
    if options.data is None:
        raise UserError(f"torchvision:{arch} needs `data` DIR, an ImageFolder of labelled images: one sub-folder "
                        "per class (ImageNet val: DIR/n01440764/*.JPEG …, or DIR/0/, DIR/1/ … by class index)")
    data = scan(options.data, "`data`")
    calib_folder = scan(options.calib, "`calib`", labels=False) if options.calib is not None else None
    n = len(data)
    calib_idx = None
    if calib_folder is None:
        if n < options.calib_size + 2:
            raise UserError(f"`data` {data.root} has {n} images, too few for {options.calib_size} calibration "
                            "images plus at least 2 held-out evaluation images; pass `calib` DIR (separate "
                            "calibration images) or a smaller `calib_size`")
        eval_idx = fixed_sample(n, min(options.eval_size, n - options.calib_size))
        calib_idx = fixed_sample(n, options.calib_size, from_end=True)
        calib_paths = [data.files[i] for i in calib_idx]
        calib_flag, calib_source = "`data`", f"{data.root} (disjoint from the evaluation sample)"
    else:
        eval_idx = fixed_sample(n, options.eval_size)
        calib_paths = [calib_folder.files[i] for i in fixed_sample(len(calib_folder), options.calib_size)]
        calib_flag, calib_source = "`calib`", f"{calib_folder.root} (labels unused)"
    if len(eval_idx) < 2:
        raise UserError(f"`data` {data.root} has {n} image(s); evaluation needs at least 2")
    if len(calib_paths) < 2:  # the export traces the first calibration batch; a batch of 1 fixes the batch axis
        raise UserError(f"calibration needs at least 2 images, got {len(calib_paths)}; raise `calib_size`"
                        + (f" or add images to `calib` {calib_folder.root}" if calib_folder is not None else ""))
    eval_paths = [data.files[i] for i in eval_idx]
    check_images(eval_paths, "`data`")
    check_images(calib_paths, calib_flag)
    return _Samples(data, eval_idx, eval_paths, calib_paths, calib_idx, calib_flag, calib_source)


def load(argument: str | None, options: SourceOptions) -> ModelBundle:
    arch = _check_arch(argument or "")
    s = _sample_images(arch, options)
    data = s.data

    model = _build(arch)
    if options.weights is not None:
        load_weights(model, options.weights)
        warning = None
    else:
        warning = (f"torchvision:{arch} has no `weights`: the model is randomly initialized, so its top-1/top-5 "
                   "figures are meaningless (use this run for size and timing only; pass `weights` FILE, a "
                   "state dict, for real accuracy)")
    preprocess, num_classes = _preprocess_and_classes(model, arch)
    labels = class_indices(data.classes, num_classes, f"`data` {data.root}")[data.folder]

    calibration = ImageBatches(s.calib_paths, preprocess, INPUT, BATCH, s.calib_flag).materialize()
    calibration_targets = None
    if s.calib_idx is not None:
        calib_labels = labels[s.calib_idx]
        calibration_targets = [calib_labels[i:i + BATCH] for i in range(0, len(calib_labels), BATCH)]
    evaluation = ImageBatches(s.eval_paths, preprocess, INPUT, BATCH, "`data`")  # decoded when read
    k = options.latency_batch
    latency_feed = {INPUT: decode((s.eval_paths * (k // len(s.eval_paths) + 1))[:k], preprocess, "`data`")}

    info = {"source": f"torchvision.models.get_model({arch!r}, weights=None)",
            "weights": str(options.weights) if options.weights is not None else None,
            "data": f"{data.root} ({len(data)} images in {len(data.classes)} class folders)",
            "class_mapping": ("folder names are class indices" if named_by_index(data.classes)
                              else "sorted folder order (ImageNet wnid convention)"),
            "classes": num_classes,
            "calibration": s.calib_source,
            "preprocessing": preprocess.describe(),
            "calibration_items": len(s.calib_paths), "evaluation_items": len(s.eval_paths)}
    if warning:  # the pipeline says it (and the report lists it) once every input has been checked
        info["warning"] = warning
    return ModelBundle(
        name=f"torchvision:{arch}",
        module=ImageClassifier(model).eval(),
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_axes={INPUT: {0: "batch"}},
        calibration=calibration,
        evaluation=evaluation,
        latency_feed=latency_feed,
        metric=classification_metric(labels[s.eval_idx]),
        headline="top1",
        info=info,
        likelihood="categorical",
        calibration_targets=calibration_targets,
    )
