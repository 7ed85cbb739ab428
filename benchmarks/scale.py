"""`bayesq compile` at deployment scale: ResNet-50 and a BERT-base sequence classifier, wall time and peak
memory of the whole compile (a fresh process each; analysis and validation included).

Nothing downloads, so both networks are *randomly initialized* at their real sizes (ResNet-50: 25.6 M
parameters; BERT-base: 12 layers × 768, 110 M) and fed synthetic data of the right form: an ImageFolder
of random RGB images in ImageNet class folders, and SST-2 TSVs of pydoc sentences with seeded random
labels; the tokenizer is the BERT uncased WordPiece vocabulary that ships with all-MiniLM-L6-v2. Accuracy
figures of such runs are meaningless; time, memory, bits and sizes are what a trained model of the same
shape gives (the work does not depend on the weights' values).

    python benchmarks/scale.py                      # both, with the compile's default settings
    python benchmarks/scale.py --models bert-base -- --bits 3.0 --method gptq
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_io import markdown_table, timed_compile, write_csv  # noqa: E402

MODELS = ("resnet50", "bert-base")


def image_folder(root: Path, classes: int = 10, per_class: int = 56, seed: int = 0) -> Path:
    """Random 256 × 320 RGB PNGs in integer-named class folders (ImageNet class indices)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / str(c * 100)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    return root


def bert_base(directory: Path, seed: int = 0) -> Path:
    """A randomly initialized BERT-base (default BertConfig) binary classifier with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from bayesq_onnx.models.minilm import model_dir

    torch.manual_seed(seed)
    BertForSequenceClassification(BertConfig(num_labels=2)).eval().save_pretrained(directory)
    AutoTokenizer.from_pretrained(model_dir()).save_pretrained(directory)
    return directory


def sst2(directory: Path, n_train: int = 512, n_dev: int = 512, seed: int = 0) -> Path:
    """GLUE SST-2 layout (train.tsv, dev.tsv: ``sentence<TAB>label``) from pydoc sentences, random labels."""
    from bayesq_onnx.models.text import pydoc_sentences

    rng = np.random.default_rng(seed)
    sentences = [s.replace("\t", " ") for s in pydoc_sentences()][: n_train + n_dev]
    directory.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", sentences[:n_train]), ("dev", sentences[n_train:])):
        rows = [f"{s}\t{int(rng.integers(0, 2))}" for s in part]
        (directory / f"{name}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return directory


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scale"), help="output stem")
    ap.add_argument("compile_args", nargs="*", help="arguments for every `bayesq compile` (after --)")
    args = ap.parse_args()
    extra = args.compile_args  # none: what `bayesq compile` does by default
    rows = []
    with tempfile.TemporaryDirectory(prefix="bayesq-scale-") as tmp:
        tmp = Path(tmp)
        for name in args.models:
            if name == "resnet50":
                spec = ["torchvision:resnet50", "--data", str(image_folder(tmp / "images"))]
            else:
                spec = [f"hf:{bert_base(tmp / 'bert-base')}", "--task", "glue:sst2", "--data", str(sst2(tmp / "sst2"))]
            wall, peak_mb, rep = timed_compile([*spec, *extra], tmp / f"out-{name}")
            peak_gb = peak_mb / 1024
            sizes = rep["sizes"]
            row = {"model": name, "arguments": " ".join(extra) or "(defaults)", "wall_s": round(wall, 1),
                   "peak_rss_gb": round(peak_gb, 2), "all_in_bits": round(rep["bits"]["all_in"], 4),
                   "quantized_weights": rep["bits"]["quantized_weights"],
                   "fp32_mb": round(sizes["fp32_bytes"] / 1e6, 2), "artifact_mb": round(sizes["artifact_bytes"] / 1e6, 2),
                   "smaller_x": round(sizes["fp32_bytes"] / sizes["artifact_bytes"], 2),
                   "latency_x_fp32": round(rep["latency"]["ratio"], 2)}
            # "load <spec>" names a temporary path: one column for every model
            row.update({f"{'load' if k.startswith('load ') else k} (s)": round(v, 1)
                        for k, v in rep["timings_s"].items()})
            rows.append(row)
            print(f"done {name}: {wall:.1f} s, {peak_gb:.2f} GB", file=sys.stderr, flush=True)
    command = "python benchmarks/scale.py " + " ".join(sys.argv[1:])
    text = f"command: `{command.strip()}` (random-init weights, synthetic data: time and memory only)\n\n" + \
        markdown_table(rows)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    write_csv(rows, args.out.with_suffix(".csv"))
    plot(rows, args.out.with_suffix(".png"))
    return 0


def plot(rows: list[dict], path: Path) -> None:
    """Stacked bars: seconds per compile stage, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(k for r in rows for k in r if k.endswith(" (s)")))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.7 * len(rows)))
    left = np.zeros(len(rows))
    for stage in stages:
        v = np.array([r.get(stage, 0.0) for r in rows])
        ax.barh([r["model"] for r in rows], v, left=left, label=stage[:-4])
        left += v
    for i, r in enumerate(rows):
        ax.text(left[i], i, f"  {r['wall_s']} s wall, {r['peak_rss_gb']} GB", va="center", fontsize=8)
    ax.set_xlabel("seconds per stage (report timings)")
    ax.set_xlim(0, left.max() * 1.45)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
