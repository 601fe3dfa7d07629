"""GLUE metrics in plain numpy, reported as percentages (0-100) the way GLUE reports them.

With predictions p_i, labels y_i, i = 1..n:

    accuracy  = 100 * (1/n) * sum_i [p_i == y_i]
    f1        = 100 * 2 TP / (2 TP + FP + FN)            positive class 1; 0 when TP+FP+FN = 0
    mcc       = 100 * (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))
    pearson   = 100 * sum_i dx_i dy_i / sqrt(sum_i dx_i^2 * sum_i dy_i^2),  dx = x - mean(x)
    spearman  = pearson(rank(x), rank(y)),  tied values share the average of their ranks

For MCC (Gorodkin's multi-class form) C is the confusion matrix, t_k = sum_j C[k, j] the times
class k truly occurs, p_k = sum_i C[i, k] the times it is predicted, c = trace(C) the correct
predictions and s = n. With two classes it equals the binary
(TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)).

A correlation whose denominator is zero (constant predictions or constant labels) is undefined;
like scikit-learn's MCC, every metric here returns 0.0 then, the value of a predictor with no
skill, so that results stay finite numbers in JSON.
"""

from __future__ import annotations

import numpy as np

METRIC_NAMES = ("accuracy", "f1", "mcc", "pearson", "spearman")


def _pair(preds, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(preds).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"preds and labels differ in length: {p.size} vs {y.size}")
    if p.size == 0:
        raise ValueError("cannot compute a metric on zero examples")
    return p, y


def accuracy(preds, labels) -> float:
    """Percentage of predictions equal to their label."""
    p, y = _pair(preds, labels)
    return 100.0 * float(np.mean(p == y))


def f1(preds, labels) -> float:
    """Binary F1 of the positive class 1, in percent; 0.0 when there is no positive at all."""
    p, y = _pair(preds, labels)
    p_pos, y_pos = p == 1, y == 1
    tp = int(np.sum(p_pos & y_pos))
    fp = int(np.sum(p_pos & ~y_pos))
    fn = int(np.sum(~p_pos & y_pos))
    denom = 2 * tp + fp + fn
    return 100.0 * 2 * tp / denom if denom else 0.0


def matthews_corrcoef(preds, labels) -> float:
    """Matthews correlation (binary or multi-class), in percent; 0.0 when undefined."""
    p, y = _pair(preds, labels)
    classes, codes = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = classes.size
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (codes[: y.size], codes[y.size :]), 1.0)
    t = confusion.sum(axis=1)
    q = confusion.sum(axis=0)
    c = np.trace(confusion)
    s = float(y.size)
    cov_py = c * s - float(q @ t)
    cov_pp = s * s - float(q @ q)
    cov_yy = s * s - float(t @ t)
    if cov_pp * cov_yy == 0.0:
        return 0.0
    return 100.0 * cov_py / float(np.sqrt(cov_pp * cov_yy))


def pearson(x, y) -> float:
    """Pearson correlation in percent; 0.0 when either input is constant."""
    a, b = _pair(x, y)
    a = a.astype(np.float64) - a.mean(dtype=np.float64)
    b = b.astype(np.float64) - b.mean(dtype=np.float64)
    denom = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
    if denom == 0.0:
        return 0.0
    # Rounding can push |r| a hair past 1 for perfectly (anti)correlated inputs.
    r = float(np.clip(np.dot(a, b) / denom, -1.0, 1.0))
    return 100.0 * r


def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties given the average of the ranks they span (scipy's 'average')."""
    a = np.asarray(x).reshape(-1)
    order = np.argsort(a, kind="stable")
    inverse = np.empty(a.size, dtype=np.int64)
    inverse[order] = np.arange(a.size)
    sorted_a = a[order]
    is_new = np.concatenate([[True], sorted_a[1:] != sorted_a[:-1]])
    group = np.cumsum(is_new)[inverse]  # 1-based id of each element's tie group
    # bounds[g - 1] and bounds[g] are the 0-based start and end of group g in sorted order, so
    # its ranks are start+1 .. end and their mean is (start + 1 + end) / 2.
    bounds = np.concatenate([np.flatnonzero(is_new), [a.size]])
    return 0.5 * (bounds[group - 1] + 1 + bounds[group])


def spearman(x, y) -> float:
    """Spearman rank correlation in percent (average ranks for ties); 0.0 when undefined."""
    a, b = _pair(x, y)
    return pearson(rankdata(a), rankdata(b))


_METRIC_FNS = {
    "accuracy": accuracy,
    "f1": f1,
    "mcc": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(task, preds, labels) -> dict[str, float]:
    """The task's GLUE metrics, e.g. ``{"accuracy": 88.1, "f1": 91.2}`` for MRPC.

    `task` is a name accepted by `spikeinfer.data.get_task` or a `GlueTask`. `preds` are class
    ids, or logits of shape [n, num_labels] (arg-maxed here); for STS-B they are scores, [n] or
    [n, 1].
    """
    # Imported here because data.py is the heavier module and metrics must stay importable alone.
    from spikeinfer.data import GlueTask, get_task

    spec = task if isinstance(task, GlueTask) else get_task(task)
    p = np.asarray(preds)
    if spec.is_regression:
        p = p.reshape(-1)
    elif p.ndim == 2:
        p = p.argmax(axis=-1)
    return {name: _METRIC_FNS[name](p, labels) for name in spec.metrics}
