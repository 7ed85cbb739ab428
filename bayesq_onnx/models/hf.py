"""``hf:<dir>``: a local transformers model with its tokenizer (offline; nothing downloads).

* A sequence classifier (``*ForSequenceClassification``) with ``task`` glue:<name> and ``data`` DIR: GLUE TSVs
  (:mod:`.glue`), calibration sampled from ``train.tsv``, evaluation from the dev file, the task's official
  metric. Output: the logits (one score for STS-B, regression).
* A plain encoder (``BertModel`` and relatives), without ``task``: sentence embeddings pooled as its
  ``modules.json`` says (default: mean-pooled, normalized), embedding fidelity on the built-in corpus or the
  user's ``calib`` / ``data`` text files, exactly as ``minilm`` (:func:`.minilm.embedding_bundle`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from . import glue
from .base import Batch, ModelBundle, SourceOptions
from .minilm import BATCH, MAX_LENGTH, embedding_bundle

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")


class SequenceClassifier(torch.nn.Module):
    """``(input_ids, attention_mask) -> logits``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class PairSequenceClassifier(torch.nn.Module):
    """``(input_ids, attention_mask, token_type_ids) -> logits``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def load(argument: str | None, options: SourceOptions) -> ModelBundle:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # load warnings become our own one-line errors
    try:
        return _load(argument, options)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


def _load(argument: str | None, options: SourceOptions) -> ModelBundle:
    path = _check_dir(argument)
    if options.weights is not None:
        raise UserError(f"hf:{argument} takes its weights from the dir; drop `weights`")
    config = _config(path)
    tokenizer = _tokenizer(path)
    architectures = list(getattr(config, "architectures", None) or [])
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    if options.task:
        task = glue.get_task(options.task)
        if not classifier:
            kind = architectures[0] if architectures else config.model_type
            raise UserError(f"hf:{argument} holds a {kind}, not a sequence classifier; pass a model fine-tuned on "
                            f"glue:{task.name} (saved with save_pretrained), or drop `task` for embedding "
                            "fidelity (on your own text with `data` FILE.txt or .jsonl)")
        if options.calib is not None:
            raise UserError(f"hf:{argument} with `task` glue:{task.name} calibrates on the train.tsv in `data`; "
                            "drop `calib`")
        return _classifier_bundle(path, config, tokenizer, task, options)
    if classifier:
        raise UserError(f"hf:{argument} is a sequence classifier ({architectures[0]}); pass `task` glue:<name> "
                        f"and `data` DIR (the GLUE task's TSVs); tasks: {glue.task_names()}")
    if options.data is not None and Path(options.data).is_dir():
        raise UserError(f"hf:{argument} is an encoder: `data` must be a .txt or .jsonl file of texts, not a "
                        "directory (GLUE task dirs are for sequence classifiers, with `task`)")
    return _encoder_bundle(path, config, tokenizer, options)


# ---- checks -------------------------------------------------------------------------------------------

def _check_dir(argument: str | None) -> Path:
    if not argument:
        raise UserError("model 'hf' needs a directory: hf:<dir> (saved with save_pretrained)")
    path = Path(argument).expanduser()
    if not path.is_dir():
        raise UserError(f"hf:{argument}: no such directory; pass a local transformers model dir "
                        "(config.json, weights and tokenizer files, as save_pretrained writes them)")
    if not (path / "config.json").is_file():
        raise UserError(f"hf:{argument}: no config.json in {path}; pass the dir model.save_pretrained() wrote")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise UserError(f"hf:{argument}: no weights in {path} (expected model.safetensors or pytorch_model.bin); "
                        "save the model there with save_pretrained()")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"hf:{argument}: no tokenizer in {path} (expected tokenizer.json or vocab.txt and "
                        "tokenizer_config.json); save it there with tokenizer.save_pretrained()")
    return path


def _config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"hf:{path}: cannot read config.json ({_first_line(exc)}); pass a transformers model "
                        "dir") from exc


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"hf:{path}: cannot load its tokenizer ({_first_line(exc)}); save the model's tokenizer "
                        "there with tokenizer.save_pretrained()") from exc
    if not callable(tok):
        raise UserError(f"hf:{path}: the tokenizer files did not load as a tokenizer; save the model's tokenizer "
                        "there with tokenizer.save_pretrained()")
    if tok.pad_token is None:
        raise UserError(f"hf:{path}: its tokenizer has no padding token, which batching needs; set one "
                        "(tokenizer.pad_token = ...) and save it there with tokenizer.save_pretrained()")
    return tok


def _model(auto, path: Path, ignore_missing: tuple[str, ...] = ()):
    try:
        model, info = auto.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise UserError(f"hf:{path}: cannot load the weights ({_first_line(exc)}); pass the dir "
                        "save_pretrained() wrote") from exc
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(ignore_missing)]
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"hf:{path}: the weights lack {shown}, which would be random; pass a complete "
                        "checkpoint (saved with save_pretrained)")
    return model.eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---- sequence classifier on a GLUE task ---------------------------------------------------------------

def _classifier_bundle(path: Path, config, tokenizer, task: glue.GlueTask, options: SourceOptions) -> ModelBundle:
    from transformers import AutoModelForSequenceClassification

    # data first: a missing or malformed TSV fails before the (slow) weight load; missing files before bad ones
    for split in ("train", "dev"):
        glue.split_path(task, options.data, split)
    train = glue.read_split(task, options.data, "train")
    dev = glue.read_split(task, options.data, "dev")
    if config.num_labels != task.num_labels:
        want = "1 (a regression head)" if task.regression else str(task.num_labels)
        raise UserError(f"hf:{path} has {config.num_labels} output label(s) but glue:{task.name} needs {want}; "
                        "pass a model fine-tuned on that task, or the `task` it was fine-tuned on")
    mapping, mapping_from = glue.label_order(task, getattr(config, "label2id", None))
    train_y = glue.encode_labels(task, train, mapping)
    dev_y = glue.encode_labels(task, dev, mapping)
    model = _model(AutoModelForSequenceClassification, path)

    calib_idx = glue.sample(len(train), options.calib_size, options.seed)
    eval_idx = glue.sample(len(dev), options.eval_size, 0)
    calibration, calib_targets = _batches(tokenizer, [train.texts[i] for i in calib_idx], train_y[calib_idx],
                                          task.regression)
    evaluation, eval_targets = _batches(tokenizer, [dev.texts[i] for i in eval_idx], dev_y[eval_idx],
                                        task.regression)
    input_names = list(calibration[0])
    module = (PairSequenceClassifier if "token_type_ids" in input_names else SequenceClassifier)(model).eval()
    info = {
        "source": str(path), "architecture": (config.architectures or [type(model).__name__])[0],
        "model_type": config.model_type, "task": f"glue:{task.name}", "data": str(Path(options.data)),
        "train_file": train.path.name, "dev_file": dev.path.name,
        "train_items": len(train), "dev_items": len(dev),
        "calibration_items": len(calib_idx), "evaluation_items": len(eval_idx),
        "labels": "regression (score 0-5)" if task.regression else dict(mapping) or "as in the files",
        "label_order": mapping_from if mapping else "glue", "metrics": list(task.metrics),
        "max_length": MAX_LENGTH,
    }
    if train.skipped or dev.skipped:
        info["skipped_rows"] = {"train": train.skipped, "dev": dev.skipped}
    if len(eval_idx) < len(dev):
        info["evaluation_note"] = f"a fixed sample of {len(eval_idx)} of the {len(dev)} dev items (not the full dev set)"
    return ModelBundle(
        name=f"hf:{path.name}",
        module=module,
        input_names=input_names,
        output_names=["logits"],
        dynamic_axes={n: {0: "batch", 1: "sequence"} for n in input_names},
        calibration=calibration,
        evaluation=evaluation,
        latency_feed=_latency_feed(tokenizer, [dev.texts[i] for i in eval_idx], input_names, options),
        metric=glue.glue_metric(task, np.concatenate(eval_targets).reshape(-1)),
        headline=task.headline,
        info=info,
        likelihood="gaussian" if task.regression else "categorical",
        calibration_targets=calib_targets,
    )


def _encode(tokenizer, texts: list[tuple[str, ...]], **kw):
    first = [t[0] for t in texts]
    second = [t[1] for t in texts] if texts and len(texts[0]) > 1 else None
    return tokenizer(first, second, truncation=True, max_length=kw.pop("max_length", MAX_LENGTH), **kw)


def _batches(tokenizer, texts: list[tuple[str, ...]], labels: np.ndarray,
             regression: bool) -> tuple[list[Batch], list[np.ndarray]]:
    """Tokenized batches of ``BATCH`` items sorted by token count (little padding), with their targets:
    int64 class ids ``[B]``, or float32 scores ``[B, 1]`` shaped like the regression output."""
    lengths = [len(ids) for ids in _encode(tokenizer, texts)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    batches, targets = [], []
    for start in range(0, len(order), BATCH):
        idx = order[start:start + BATCH]
        enc = _encode(tokenizer, [texts[i] for i in idx], padding=True, return_tensors="np")
        batches.append({k: np.asarray(enc[k]).astype(np.int64)
                        for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc})
        y = labels[idx]
        targets.append(y.astype(np.float32).reshape(-1, 1) if regression else y.astype(np.int64))
    return batches, targets


def _latency_feed(tokenizer, texts: list[tuple[str, ...]], input_names: list[str], options: SourceOptions) -> Batch:
    """``latency_batch`` items padded (or truncated) to ``latency_seq`` tokens."""
    reps = 1 + options.latency_batch // max(len(texts), 1)
    enc = _encode(tokenizer, (texts * reps)[:options.latency_batch], padding="max_length",
                  max_length=options.latency_seq, return_tensors="np")
    return {k: np.asarray(enc[k]).astype(np.int64) for k in input_names}


# ---- plain encoder: embedding fidelity, as minilm -----------------------------------------------------

def _encoder_bundle(path: Path, config, tokenizer, options: SourceOptions) -> ModelBundle:
    from transformers import AutoModel

    bundle = embedding_bundle(f"hf:{path.name}", path, tokenizer,
                              lambda: _model(AutoModel, path, ignore_missing=("pooler.",)),  # the pooler is unused
                              options, {"source": str(path), "model_type": config.model_type,
                                        "task": "embedding fidelity"})
    bundle.info["architecture"] = (config.architectures or [type(bundle.module.encoder).__name__])[0]
    return bundle
