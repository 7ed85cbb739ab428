"""ImageFolder data for image classifiers (ImageNet-val layout: ``DIR/<class>/<image>``), offline.

* :func:`scan` lists the images (sorted, so every run sees the same list) and the class folders.
* :func:`class_indices` maps class folders to the model's output indices: folders named by integers are
  indices (``DIR/0``, ``DIR/1``, …); otherwise one folder per class, in sorted order (ImageNet's wnid
  convention: ``n01440764`` … ``n15075141`` sort into the 1000 class indices).
* :func:`fixed_sample` draws a fixed sample (its own seed, not the compile seed).
* :class:`Preprocess` is the standard evaluation transform (resize, center crop, [0, 1], normalize).
* :class:`ImageBatches` decodes images batch by batch, when read, so a large evaluation set never sits
  in memory as float tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA_SEED = 20240601  # fixed samples of a folder do not move with --seed
LAYOUT_HINT = ("an ImageFolder is DIR/<class>/<image>, one sub-folder per class (ImageNet val: DIR/n01440764/"
               "ILSVRC2012_val_00000293.JPEG …, or folders named by class index: DIR/0/a.png, DIR/1/b.png …)")


@dataclass(frozen=True)
class ImageFolder:
    """The images under ``root``: ``files[i]`` sits in class folder ``classes[folder[i]]``."""

    root: Path
    classes: tuple[str, ...]    # sorted class-folder names (empty folders included)
    files: tuple[Path, ...]     # sorted by (class folder, path inside it)
    folder: np.ndarray          # int64 [len(files)]: index into ``classes``

    def __len__(self) -> int:
        return len(self.files)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _images_under(directory: Path) -> list[Path]:
    """Image files under ``directory`` (recursively, links followed, hidden entries skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(f))
    return found


def _check_dir(root: Path | None, flag: str) -> Path:
    if root is None:
        raise UserError(f"{flag} DIR is required; {LAYOUT_HINT}")
    root = Path(root)
    if not root.exists():
        raise UserError(f"{flag} {root} does not exist; pass an ImageFolder directory ({LAYOUT_HINT})")
    if not root.is_dir():
        raise UserError(f"{flag} {root} is a file, not a directory; pass an ImageFolder directory ({LAYOUT_HINT})")
    return root


def scan(root: Path | None, flag: str = "`data`", labels: bool = True) -> ImageFolder:
    """List the ImageFolder at ``root``; raise :class:`UserError` naming ``flag`` when it is not one.

    With ``labels=False`` (calibration images, labels unused) images directly in ``root`` are accepted too.
    """
    root = _check_dir(root, flag)
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        classes = [e.name for e in entries if not e.name.startswith(".") and e.is_dir()]
        loose = [Path(e.path) for e in entries if e.is_file() and _is_image(e.name)]
    except OSError as exc:
        raise UserError(f"{flag} {root}: cannot list it ({exc.strerror}); pass a readable directory") from exc
    if not classes and not (loose and not labels):
        where = f" (its {len(loose)} images must move into class folders)" if loose else ""
        raise UserError(f"{flag} {root} has no class sub-folders{where}; {LAYOUT_HINT}")
    files: list[Path] = [] if labels else list(loose)
    folder: list[int] = [-1] * len(files)
    for index, name in enumerate(classes):
        images = _images_under(root / name)
        files += images
        folder += [index] * len(images)
    if not files:
        raise UserError(f"{flag} {root} has {len(classes)} class folders but no images "
                        f"({', '.join(IMG_EXTENSIONS)}); {LAYOUT_HINT}")
    return ImageFolder(root, tuple(classes), tuple(files), np.asarray(folder, dtype=np.int64))


def named_by_index(classes: Sequence[str]) -> bool:
    """Whether every class folder is named by a non-negative integer (``0``, ``1``, … ``999``)."""
    return bool(classes) and all(c.isascii() and c.isdigit() for c in classes)


def class_indices(classes: Sequence[str], num_classes: int, flag: str = "`data`") -> np.ndarray:
    """The model's class index for each class folder.

    Folders all named by integers are those indices; otherwise there must be one folder per model class,
    and sorted folder order gives the index (torchvision's ImageFolder and the ImageNet wnid convention).
    """
    if named_by_index(classes):
        indices = np.asarray([int(c) for c in classes], dtype=np.int64)
        bad = [c for c in classes if int(c) >= num_classes]
        if bad:
            raise UserError(f"{flag}: class folder {bad[0]!r} is not a class index of this model (0..{num_classes - 1}); "
                            f"name folders by index below {num_classes}, or give one folder per class")
        if len(set(indices.tolist())) != len(indices):
            dup = next(c for c in classes if sum(int(o) == int(c) for o in classes) > 1)
            raise UserError(f"{flag}: two class folders name index {int(dup)} ({dup!r} and another with leading "
                            "zeros); keep one folder per index")
        return indices
    if len(classes) == num_classes:
        return np.arange(num_classes, dtype=np.int64)
    raise UserError(f"{flag} has {len(classes)} class folders but the model has {num_classes} classes; either name "
                    f"the folders by class index (0..{num_classes - 1}) or give exactly {num_classes} folders, "
                    "one per class, whose sorted order is the class order (ImageNet wnids)")


def fixed_sample(n: int, k: int, *, from_end: bool = False) -> np.ndarray:
    """``k`` of ``n`` indices, sorted: a fixed shuffle of ``range(n)`` (seed :data:`DATA_SEED`), from its
    start, or from its end with ``from_end``. A start sample and an end sample are disjoint while their
    sizes add up to at most ``n``, and neither depends on the other's size."""
    order = np.random.default_rng(DATA_SEED).permutation(n)
    if from_end:
        order = order[::-1]
    return np.sort(order[:min(k, n)])


@dataclass(frozen=True)
class Preprocess:
    """Standard evaluation transform: resize the short side to ``resize_size``, center-crop ``crop_size``,
    scale to [0, 1], normalize by ``mean``/``std`` (torchvision's ImageClassification preset)."""

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __call__(self, image) -> np.ndarray:
        import torch
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        mode = InterpolationMode(self.interpolation)
        image = F.resize(image, [self.resize_size], interpolation=mode, antialias=True)
        image = F.center_crop(image, [self.crop_size])
        t = F.pil_to_tensor(image).to(torch.float32).div_(255.0)
        return F.normalize(t, list(self.mean), list(self.std)).numpy()

    def describe(self) -> str:
        return (f"resize {self.resize_size} ({self.interpolation}), center crop {self.crop_size}, "
                f"normalize mean {list(self.mean)} std {list(self.std)}")


def _open_rgb(path: Path, flag: str):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any failure to decode is the file's fault
        raise UserError(f"{flag}: cannot read image {path} ({exc}); remove or replace the file") from exc


def check_images(paths: Sequence[Path], flag: str = "`data`") -> None:
    """Open every file's header (cheap; decoding happens later, batch by batch) so a file that is not an
    image fails now, before any compute."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, struct.error, …
            raise UserError(f"{flag}: cannot read image {path} ({exc}); remove or replace the file") from exc


def decode(paths: Sequence[Path], preprocess: Preprocess, flag: str = "`data`") -> np.ndarray:
    """float32 ``[len(paths), 3, crop, crop]``."""
    return np.stack([preprocess(_open_rgb(p, flag)) for p in paths]).astype(np.float32, copy=False)


class ImageBatches(Sequence):
    """Batches ``{input_name: float32 [B, 3, crop, crop]}`` over ``paths``, decoded when read (a list
    stand-in for :attr:`ModelBundle.evaluation`: ``len``, indexing, slicing, iteration)."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess, input_name: str = "images",
                 batch: int = 32, flag: str = "`data`"):
        self.paths, self.preprocess, self.input_name = list(paths), preprocess, input_name
        self.batch, self.flag = batch, flag

    def __len__(self) -> int:
        return (len(self.paths) + self.batch - 1) // self.batch

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk = self.paths[index * self.batch:(index + 1) * self.batch]
        return {self.input_name: decode(chunk, self.preprocess, self.flag)}

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def materialize(self) -> list[dict[str, np.ndarray]]:
        return list(self)
