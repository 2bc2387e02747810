"""Detection metrics against a ground-truth mask, and the evaluation grid every detector is judged by."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
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


def default_flag_metrics(detector: Any, scores: xr.DataArray, truth: xr.DataArray | np.ndarray) -> dict[str, float]:
    """:func:`detection_metrics` of a detector's own flags (``flag(scores)``), or of ``threshold_for`` when
    it has no ``flag``."""
    if hasattr(detector, "flag"):
        return detection_metrics(scores, truth, detector.flag(scores))
    return detection_metrics(scores, truth, threshold=detector.threshold_for(scores))


def _false_alarm_level(detector: Any, scores: xr.DataArray, rate: float) -> float:
    """The score at a false-alarm rate: of the bulk's scores, or in sigma on a pooled map."""
    if isinstance(scores, xr.DataArray) and scores.attrs.get("spatial") == "pooled":
        from scipy import stats

        return float(stats.norm.isf(rate))
    from .detect.threshold import false_alarm_threshold

    return false_alarm_threshold(detector.calibration_scores_, rate)


def evaluation_grid(
    detectors: dict[str, Callable[[], Any]],
    *,
    shifts: Sequence[float] = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0),
    fractions: Sequence[float] = (0.001, 0.005, 0.01, 0.05, 0.1),
    layouts: Sequence[str] = ("pixels", "clusters"),
    doses: Sequence[float] = (200.0, 20.0),
    seeds: Sequence[int] = (0, 1),
    shape: tuple[int, int] = (64, 64),
    progress: bool = False,
    **simulate_kwargs: Any,
) -> pd.DataFrame:
    """Score detectors on simulated Fe L2,3 cubes over a grid of shifts, fractions, layouts and doses.

    Each detector is trained, per dose and seed, on an anomaly-free cube drawn with another seed
    (so the training spectra are never the clean versions of the test pixels), then tested on one
    cube per (shift, fraction, layout).

    Parameters
    ----------
    detectors
        Name -> a callable returning a fresh, unfitted detector (anything with ``fit``, ``score`` and
        ``flag`` or ``threshold_for``). ``f1`` etc. are of the detector's own flags (``flag``: region-aware
        FDR flags on a pooled map are not a threshold of it).
    shifts, fractions, layouts, doses, seeds, shape
        The grid; see :func:`eels_ad.simulate.simulate_fe_l23`.
    progress
        Show a progress bar.
    simulate_kwargs
        Passed on to the simulator (e.g. ``overdispersion``).

    Returns
    -------
    pandas.DataFrame
        One row per detector and grid point: ``roc_auc``, ``average_precision``, ``f1`` (the
        detector's own threshold) and ``f1_otsu``, ``f1_gmm``, ``f1_fpr``, ``ashman_d``,
        ``n_flagged``, ``n_true``, ``fit_seconds``, ``score_seconds``.
    """
    import time

    from tqdm.auto import tqdm

    from .detect.threshold import bimodality, gmm_threshold, otsu_threshold
    from .simulate import simulate_fe_l23

    rows = []
    total = len(doses) * len(seeds) * len(detectors) * len(shifts) * len(fractions) * len(layouts)
    bar = tqdm(total=total, disable=not progress, desc="grid")
    for dose in doses:
        for seed in seeds:
            train = simulate_fe_l23(shape, dose=dose, anomaly_fraction=0.0, seed=10_000 + seed,
                                    **simulate_kwargs)["counts"]
            tests = {
                (shift, fraction, layout): simulate_fe_l23(
                    shape, dose=dose, shift=shift, anomaly_fraction=fraction, layout=layout, seed=seed,
                    **simulate_kwargs,
                )
                for shift in shifts for fraction in fractions for layout in layouts
            }
            for name, make in detectors.items():
                tic = time.perf_counter()
                detector = make().fit(train)
                fit_seconds = time.perf_counter() - tic
                for (shift, fraction, layout), test in tests.items():
                    tic = time.perf_counter()
                    scores = detector.score(test["counts"])
                    score_seconds = time.perf_counter() - tic
                    metrics = default_flag_metrics(detector, scores, test["anomaly"])
                    row = {
                        "detector": name, "dose": dose, "seed": seed, "shift_eV": shift,
                        "fraction": fraction, "layout": layout, **metrics,
                        "f1_otsu": detection_metrics(scores, test["anomaly"], threshold=otsu_threshold(scores))["f1"],
                        "f1_gmm": detection_metrics(scores, test["anomaly"], threshold=gmm_threshold(scores))["f1"],
                        "f1_fpr": detection_metrics(
                            scores, test["anomaly"], threshold=_false_alarm_level(detector, scores, 0.001))["f1"],
                        "ashman_d": bimodality(scores)["ashman_d"],
                        "fit_seconds": fit_seconds, "score_seconds": score_seconds,
                    }
                    rows.append(row)
                    bar.update()
    bar.close()
    return pd.DataFrame(rows)
