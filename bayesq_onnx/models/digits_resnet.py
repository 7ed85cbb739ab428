"""``digits-resnet``: a small ResNet trained by ``scripts/train_digits_resnet.py`` on scikit-learn's digits.

Input ``pixels``: float32 ``[B, 1, 8, 8]``, the 8×8 digit images scaled to [0, 1] (sklearn's 0..16 values / 16);
the model standardizes them with the training split's pixel mean and std (buffers shipped with the weights).
Output ``logits``: ``[B, 10]``. The data split is fixed (stratified, 25% held out, its own random_state),
the weights ship as package data (``models/data/digits_resnet.safetensors``) with a JSON record of how they
were trained and what they score.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import UserError
from .base import ModelBundle, SourceOptions
from .metrics import classification_metric

DATA_DIR = Path(__file__).parent / "data"
WEIGHTS = DATA_DIR / "digits_resnet.safetensors"
RECORD = DATA_DIR / "digits_resnet.json"
TRAIN_SCRIPT = "scripts/train_digits_resnet.py"

TEST_FRACTION = 0.25
SPLIT_SEED = 0      # random_state of the stratified train/test split
CALIB_SEED = 1      # the fixed shuffle of the train split that calibration takes its items from
CALIB_BATCH = 32
EVAL_BATCH = 64
WIDTHS = (32, 64, 128)
BLOCKS = (1, 2, 1)  # BasicBlocks per stage; stages 2 and 3 start with a stride-2 block (8×8 → 4×4 → 2×2)


class ConvBN(nn.Module):
    """Conv2d (no bias) followed by BatchNorm2d; :meth:`fold` turns it into one Conv2d with bias."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def fold(self) -> None:
        """Replace conv + BN (eval statistics) by the equivalent single conv."""
        self.conv = fuse_conv_bn_eval(self.conv.eval(), self.bn.eval())
        self.bn = nn.Identity()


class BasicBlock(nn.Module):
    """relu(BN(conv3×3(relu(BN(conv3×3(x))))) + shortcut(x)); the shortcut is a strided 1×1 ConvBN when the
    shape changes, else the identity (He et al., 2016)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = ConvBN(cin, cout, 3, stride)
        self.conv2 = ConvBN(cout, cout, 3)
        self.shortcut = ConvBN(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Conv stem, three stages of BasicBlocks, global average pooling, Linear head to 10 classes."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS, blocks: tuple[int, ...] = BLOCKS, classes: int = 10):
        super().__init__()
        self.register_buffer("pixel_mean", torch.zeros(()))
        self.register_buffer("pixel_std", torch.ones(()))
        self.stem = ConvBN(1, widths[0], 3)
        stages, cin = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem((pixels - self.pixel_mean) / self.pixel_std))
        return self.head(self.stages(x).mean(dim=(2, 3)))


def with_batchnorm_folded(model: DigitsResNet) -> DigitsResNet:
    """An eval-mode copy of ``model`` with every BatchNorm folded into its conv (the same function): the
    shipped model as it was trained and evaluated by ``scripts/train_digits_resnet.py``."""
    folded = copy.deepcopy(model).eval()
    for m in folded.modules():
        if isinstance(m, ConvBN):
            m.fold()
    return folded


@dataclass(frozen=True)
class DigitsSplit:
    """The fixed split: images float32 ``[N, 1, 8, 8]`` in [0, 1], labels int64 ``[N]``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def digits_split() -> DigitsSplit:
    """scikit-learn's 1797 digits, split stratified by label, ``TEST_FRACTION`` held out (random_state
    ``SPLIT_SEED``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=TEST_FRACTION, stratify=labels,
                                              random_state=SPLIT_SEED)
    return DigitsSplit(x_tr, y_tr, x_te, y_te)


def predict(module: nn.Module, images: np.ndarray, batch: int = EVAL_BATCH) -> np.ndarray:
    """Logits of ``module`` on ``images``, in batches of ``batch`` (the evaluation batching)."""
    with torch.inference_mode():
        return np.concatenate([module(torch.from_numpy(images[i:i + batch])).numpy()
                               for i in range(0, len(images), batch)])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_module() -> tuple[DigitsResNet, dict]:
    """The shipped model (BatchNorm folded, eval mode) and its training record; :class:`UserError` if the
    weights file is missing, does not match its record, or does not fit the architecture."""
    fix = f"reinstall bayesq-onnx (pip install -e .) or regenerate them with python {TRAIN_SCRIPT}"
    if not WEIGHTS.is_file() or not RECORD.is_file():
        raise UserError(f"digits-resnet weights not found ({WEIGHTS} and {RECORD.name}); {fix}")
    try:
        record = json.loads(RECORD.read_text())
        expected = record["weights_sha256"]
    except (ValueError, KeyError) as exc:
        raise UserError(f"digits-resnet record {RECORD} is unreadable ({exc}); {fix}") from exc
    if sha256(WEIGHTS) != expected:
        raise UserError(f"digits-resnet weights {WEIGHTS} do not match their recorded sha256; {fix}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model = DigitsResNet()
    try:
        model.load_state_dict(load_file(WEIGHTS))
    except (SafetensorError, RuntimeError) as exc:
        raise UserError(f"digits-resnet weights {WEIGHTS} do not fit the architecture "
                        f"({str(exc).splitlines()[0]}); {fix}") from exc
    return with_batchnorm_folded(model), record


def load(argument: str | None, options: SourceOptions) -> ModelBundle:
    module, record = load_module()
    split = digits_split()
    order = np.random.default_rng(CALIB_SEED).permutation(len(split.train_labels))[:options.calib_size]
    calib_x, calib_y = split.train_images[order], split.train_labels[order]
    n_eval = min(options.eval_size, len(split.test_labels))
    eval_x, eval_y = split.test_images[:n_eval], split.test_labels[:n_eval]
    latency = np.arange(options.latency_batch) % len(split.test_labels)  # repeats if the batch exceeds the split
    return ModelBundle(
        name="digits-resnet",
        module=module,
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_axes={"pixels": {0: "batch"}},
        calibration=[{"pixels": calib_x[i:i + CALIB_BATCH]} for i in range(0, len(calib_x), CALIB_BATCH)],
        evaluation=[{"pixels": eval_x[i:i + EVAL_BATCH]} for i in range(0, n_eval, EVAL_BATCH)],
        latency_feed={"pixels": split.test_images[latency]},
        metric=classification_metric(eval_y),
        headline="top1",
        info={"source": f"ResNet trained on sklearn digits by {TRAIN_SCRIPT} (BatchNorm folded)",
              "weights": str(WEIGHTS), "weights_sha256": record["weights_sha256"],
              "fp32_test_top1_recorded": record["fp32_test"]["top1"],
              "parameters": record["parameters"],
              "data": f"sklearn digits, stratified split random_state={SPLIT_SEED}: "
                      f"{len(split.train_labels)} train / {len(split.test_labels)} test",
              "calibration_items": len(calib_x), "evaluation_items": n_eval},
        likelihood="categorical",
        calibration_targets=[calib_y[i:i + CALIB_BATCH] for i in range(0, len(calib_y), CALIB_BATCH)],
    )
