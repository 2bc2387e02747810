"""Detection metrics against a ground-truth mask."""

from __future__ import annotations

import numpy as np
import xarray as xr


def detection_metrics(
    scores: xr.DataArray | np.ndarray,
    truth: xr.DataArray | np.ndarray,
    labels: xr.DataArray | np.ndarray | None = None,
    *,
    threshold: float | None = None,
) -> dict[str, float]:
    """Threshold-free and thresholded metrics of a score map against the true anomaly mask.

    Parameters
    ----------
    scores
        Anomaly scores, higher = more anomalous (any shape).
    truth
        True anomaly mask, same shape.
    labels
        Predicted labels; or give ``threshold`` (labels = scores > threshold).

    Returns
    -------
    dict
        ``roc_auc``, ``average_precision`` (NaN when truth has a single class), ``f1``, ``precision``,
        ``recall``, ``n_true``, ``n_flagged``, ``n_pixels`` and ``threshold`` (when given or carried
        by ``labels.attrs``).

    Examples
    --------
    >>> detection_metrics([0.1, 0.4, 0.35, 0.8], [False, False, True, True], threshold=0.3)["precision"]
    0.6666666666666666
    """
    from sklearn import metrics

    score_values = np.asarray(scores, dtype=float).ravel()
    true_values = np.asarray(truth).ravel()
    if true_values.dtype != bool:
        raise TypeError(f"truth must be a boolean mask, got dtype {true_values.dtype}")
    if score_values.shape != true_values.shape:
        raise ValueError(f"scores have {score_values.size} values but truth has {true_values.size}")
    if labels is None:
        if threshold is None:
            raise ValueError("give labels or a threshold")
        label_values = score_values > threshold
    else:
        if threshold is None and isinstance(labels, xr.DataArray):
            threshold = labels.attrs.get("threshold")
        label_values = np.asarray(labels).ravel().astype(bool)
        if label_values.shape != true_values.shape:
            raise ValueError(f"labels have {label_values.size} values but truth has {true_values.size}")
    both_classes = 0 < true_values.sum() < true_values.size
    result = {
        "roc_auc": float(metrics.roc_auc_score(true_values, score_values)) if both_classes else float("nan"),
        "average_precision": (
            float(metrics.average_precision_score(true_values, score_values)) if both_classes else float("nan")
        ),
        "f1": float(metrics.f1_score(true_values, label_values, zero_division=0.0)),
        "precision": float(metrics.precision_score(true_values, label_values, zero_division=0.0)),
        "recall": float(metrics.recall_score(true_values, label_values, zero_division=0.0)),
        "n_true": int(true_values.sum()),
        "n_flagged": int(label_values.sum()),
        "n_pixels": int(true_values.size),
    }
    if threshold is not None:
        result["threshold"] = float(threshold)
    return result
