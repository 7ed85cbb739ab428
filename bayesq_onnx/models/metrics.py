"""Task metrics on model outputs (pure numpy/scipy): what a quantized classifier keeps of the FP32 one."""

from __future__ import annotations

import inspect
from typing import Callable

import numpy as np
from scipy.special import log_softmax


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of items whose label is among the ``k`` largest logits."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean −log softmax(logits)[label]."""
    logp = log_softmax(logits.astype(np.float64), axis=1)
    return float(-logp[np.arange(len(labels)), labels].mean())


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE = Σ_b (n_b / n)·|accuracy_b − confidence_b| over ``bins`` equal-width confidence bins,
    confidence = max softmax probability (Guo et al., 2017)."""
    prob = np.exp(log_softmax(logits.astype(np.float64), axis=1))
    conf, pred = prob.max(axis=1), prob.argmax(axis=1)
    correct = (pred == labels).astype(np.float64)
    # bin b holds conf in (b/bins, (b+1)/bins]; conf > 0 always
    index = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    acc = np.bincount(index, weights=correct, minlength=bins)
    cf = np.bincount(index, weights=conf, minlength=bins)
    return float(np.abs(acc - cf).sum() / len(labels))


def classification_metric(labels: np.ndarray) -> Callable[..., dict]:
    """Metric for a classifier with true ``labels``: the candidate's top-1/top-5/NLL/ECE, the FP32
    reference's, the top-1 drop in points, and argmax agreement between the two models. ``rows``: the
    items the arrays were drawn with (their labels are ``labels[rows]``), as :func:`bootstrap_interval` passes."""
    all_labels = np.asarray(labels, dtype=np.int64)

    def metric(reference: np.ndarray, candidate: np.ndarray, rows: np.ndarray | None = None) -> dict:
        labels = all_labels if rows is None else all_labels[rows]
        out = {"items": int(len(labels))}
        for tag, logits in (("", candidate), ("_fp32", reference)):
            out[f"top1{tag}"] = top_k_accuracy(logits, labels, 1)
            if logits.shape[1] > 5:
                out[f"top5{tag}"] = top_k_accuracy(logits, labels, 5)
            out[f"nll{tag}"] = negative_log_likelihood(logits, labels)
            out[f"ece{tag}"] = expected_calibration_error(logits, labels)
        out["top1_drop_points"] = 100.0 * (out["top1_fp32"] - out["top1"])
        out["agreement"] = float((reference.argmax(1) == candidate.argmax(1)).mean())
        out.update(agreement_beyond_ties(reference, candidate))
        return out

    return metric


def output_fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Fidelity of any model output to the FP32 one, item by item (rows of the first axis, flattened):
    cosine (mean, 5th percentile), relative L2 error ‖c − r‖ / ‖r‖ over all items, max |c − r|, and for
    2-D outputs the argmax agreement (meaningful when the output is class scores)."""
    r = reference.reshape(len(reference), -1).astype(np.float64)
    c = candidate.reshape(len(candidate), -1).astype(np.float64)
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
    cos = np.where(norms > 0, np.sum(r * c, axis=1) / np.maximum(norms, 1e-300), 1.0)
    out = {"cosine_mean": float(cos.mean()), "cosine_p5": float(np.percentile(cos, 5)),
           "relative_l2": float(np.linalg.norm(c - r) / max(np.linalg.norm(r), 1e-300)),
           "max_abs_diff": float(np.abs(c - r).max()), "items": int(len(r))}
    if reference.ndim == 2 and reference.shape[1] > 1:
        out["argmax_agreement"] = float((reference.argmax(1) == candidate.argmax(1)).mean())
    return out


def classifier_fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How much of a classifier's FP32 behaviour the candidate keeps, without labels (logits ``[items,
    classes]``): ``top1_agreement`` (argmax equal; the headline), ``top5_overlap`` (mean |top-5 ∩ top-5| / 5),
    ``kl_mean`` / ``kl_p95`` (KL(softmax FP32 ‖ softmax candidate) per item, nats: mean and 95th percentile)
    and the logits' cosine (mean, 5th percentile)."""
    r = reference.reshape(len(reference), -1).astype(np.float64)
    c = candidate.reshape(len(candidate), -1).astype(np.float64)
    kl = kl_divergence(r, c)
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
    cos = np.where(norms > 0, np.sum(r * c, axis=1) / np.maximum(norms, 1e-300), 1.0)
    out = {"top1_agreement": float((r.argmax(1) == c.argmax(1)).mean()),
           "confident_agreement": agreement_beyond_ties(r, c)["confident_agreement"],
           "kl_mean": float(kl.mean()), "kl_p95": float(np.percentile(kl, 95)),
           "logit_cosine_mean": float(cos.mean()), "logit_cosine_p5": float(np.percentile(cos, 5)),
           "items": int(len(r))}
    k = min(5, r.shape[1])
    if k > 1:
        top_r = np.argpartition(-r, k - 1, axis=1)[:, :k]
        top_c = np.argpartition(-c, k - 1, axis=1)[:, :k]
        out[f"top{k}_overlap"] = float((top_r[:, :, None] == top_c[:, None, :]).any(2).sum(1).mean() / k)
    return out


def kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) ‖ softmax(candidate)) per row of logits (last axis the classes), nats, ≥ 0."""
    r = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    c = candidate.reshape(-1, candidate.shape[-1]).astype(np.float64)
    logp_r, logp_c = log_softmax(r, axis=1), log_softmax(c, axis=1)
    return np.sum(np.exp(logp_r) * (logp_r - logp_c), axis=1).clip(min=0.0)


CONFIDENT_MARGIN = 1.0  # logits: FP32's top-1 minus its top-2 (odds of at least e : 1 between them)


def agreement_beyond_ties(reference: np.ndarray, candidate: np.ndarray, margin: float = CONFIDENT_MARGIN) -> dict:
    """What a classifier keeps beyond the near-ties: argmax agreement over the rows (items, or items ×
    positions: every axis but the last, the classes) where FP32's top-1 logit exceeds its top-2 by at least
    ``margin`` (``confident_agreement``, over ``confident_items`` rows; with none, over all rows), and the
    mean KL(FP32 ‖ candidate) over all rows (``kl_mean``, nats)."""
    classes = reference.shape[-1]
    r = reference.reshape(-1, classes)
    c = candidate.reshape(-1, classes)
    if classes > 1:
        top2 = np.partition(r, classes - 2, axis=1)[:, -2:]
        confident = (top2[:, 1] - top2[:, 0]) >= margin
    else:
        confident = np.zeros(len(r), bool)
    rows = confident if confident.any() else np.ones(len(r), bool)
    return {"confident_agreement": float((r[rows].argmax(1) == c[rows].argmax(1)).mean()),
            "confident_items": int(confident.sum()), "kl_mean": float(kl_divergence(r, c).mean())}


def takes_rows_argument(metric: Callable) -> bool:
    """Whether ``metric`` takes ``rows=`` (the items the arrays hold: a metric with per-item data of its own)."""
    try:
        return "rows" in inspect.signature(metric).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False


def bootstrap_interval(metric: Callable[..., dict], reference: np.ndarray, candidate: np.ndarray, key: str,
                       samples: int = 200, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(reference, candidate)[key]`` over items: ``samples``
    resamples of the n items with replacement, the (1 ± level)/2 quantiles of the metric on them.

    A metric that holds per-item data of its own (labels) takes ``rows=`` (the resampled item indices);
    any other sees only the resampled arrays.
    """
    takes_rows = takes_rows_argument(metric)
    rng = np.random.default_rng(seed)
    n = len(reference)
    values = np.empty(samples)
    for i in range(samples):
        rows = rng.integers(0, n, n)
        extra = {"rows": rows} if takes_rows else {}
        values[i] = metric(reference[rows], candidate[rows], **extra)[key]
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
