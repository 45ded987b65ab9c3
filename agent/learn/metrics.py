"""Evaluation metrics for a binary outcome, in plain numpy (no scikit-learn at run time).

Sites report these on their holdout; they are tested against `sklearn.metrics` on data with ties.
"""

from __future__ import annotations

import numpy as np


def _binary(y_true: np.ndarray, other: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(other, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"y_true and {what} must be 1-D of equal length, got {y.shape} and "
                         f"{s.shape}")
    if y.size == 0:
        raise ValueError("no samples")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("y_true must hold only 0 and 1")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{what} must be finite")
    return y.astype(bool), s


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic, tied scores sharing ranks.

    NaN when only one class is present (the AUC is undefined, not 0.5).
    """
    pos, s = _binary(y_true, score, "score")
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Tie groups: each run of equal scores gets the mean of the 1-based ranks it spans.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    mean_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def accuracy(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> float:
    """Share of rows where (prob >= threshold) matches the outcome."""
    pos, p = _binary(y_true, prob, "prob")
    return float(np.mean((p >= threshold) == pos))


def log_loss(y_true: np.ndarray, prob: np.ndarray, eps: float = 1e-7) -> float:
    """Mean negative log-likelihood, probabilities clipped to [eps, 1 - eps].

    The default eps sits at float32 resolution: a float32 model saying exactly 0 or 1 costs
    about 16 nats instead of infinity.
    """
    pos, p = _binary(y_true, prob, "prob")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(np.where(pos, np.log(p), np.log1p(-p))))
