"""Negative-binomial two-group tests: accuracy, calibration and throughput, next to statsmodels.

The simulation of ../shared/anchors/negbin/README.md (where edgeR, DESeq2 and statsmodels were
measured on this machine kind): NB2 counts, equal size factors, geometric mean of the two groups
log-uniform in [1, 1000], dispersion log-uniform in [0.01, 1], half null, half with |LFC| uniform
in [0.5, 2] (natural log), group A = m exp(-LFC/2), group B = m exp(+LFC/2).

Writes benchmarks/results/negbin.json. Usage: python benchmarks/negbin.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

from eels_ad.stats import nb_test

RESULTS = Path(__file__).resolve().parent / "results"
ANCHOR = {  # ../shared/anchors/negbin/README.md, 5 + 5 samples, 20 000 problems
    "edgeR QL": {"fpr": 0.044, "power": 0.787, "power_at_5pct_fpr": 0.799, "rmse_lfc": 0.400, "per_s": 7100},
    "edgeR LRT": {"fpr": 0.050, "power": 0.815, "power_at_5pct_fpr": 0.816, "rmse_lfc": 0.400, "per_s": 7200},
    "DESeq2 Wald": {"fpr": 0.048, "power": 0.788, "power_at_5pct_fpr": 0.792, "rmse_lfc": 0.410, "per_s": 1900},
    "statsmodels NB2 Wald": {"fpr": 0.086, "power": 0.770, "power_at_5pct_fpr": 0.723, "rmse_lfc": 0.412,
                             "per_s": 173},
}


def simulate(n_problems: int, n_per_group: int, seed: int):
    rng = np.random.default_rng(seed)
    mean = np.exp(rng.uniform(0, np.log(1000), n_problems))
    alpha = np.exp(rng.uniform(np.log(0.01), 0, n_problems))
    null = np.arange(n_problems) < n_problems // 2
    lfc = np.where(null, 0.0, rng.uniform(0.5, 2.0, n_problems) * rng.choice([-1, 1], n_problems))
    groups = np.r_[np.zeros(n_per_group), np.ones(n_per_group)]
    mu = mean[:, None] * np.exp(np.where(groups[None, :] == 0, -0.5, 0.5) * lfc[:, None])
    r = 1.0 / alpha[:, None]
    counts = rng.poisson(rng.gamma(r, mu / r))
    return counts, groups, lfc, alpha, null


def accuracy(table, lfc, alpha, null) -> dict:
    pvalues = table["pvalue"].to_numpy()
    estimate = table["log_fold_change"].to_numpy()
    dispersion = table["dispersion"].to_numpy()
    finite = np.isfinite(pvalues)
    threshold = np.nanquantile(pvalues[null], 0.05)
    positive = np.isfinite(dispersion) & (dispersion > 1e-6)
    return {
        "fpr": float(np.mean(pvalues[null & finite] < 0.05)),
        "power": float(np.mean(pvalues[~null & finite] < 0.05)),
        "power_at_5pct_fpr": float(np.mean(pvalues[~null & finite] < threshold)),
        "rmse_lfc": float(np.sqrt(np.nanmean((estimate - lfc) ** 2))),
        "rmse_log_dispersion": float(np.sqrt(np.mean((np.log(dispersion[positive]) - np.log(alpha[positive])) ** 2))),
        "dispersion_at_zero": float(np.mean(np.isfinite(dispersion) & ~positive)),
        "finite": float(finite.mean()),
    }


def statsmodels_rate(counts, groups, n_problems: int) -> float:
    from statsmodels.discrete.discrete_model import NegativeBinomial

    design = np.column_stack([np.ones(groups.size), groups])
    started = time.perf_counter()
    for feature in range(n_problems):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                NegativeBinomial(counts[feature], design, loglike_method="nb2").fit(disp=0, maxiter=100)
            except Exception:  # noqa: BLE001  (statsmodels raises on some problems; it still costs time)
                pass
    return n_problems / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    n_accuracy = 2000 if args.quick else 20_000
    n_speed = {"mom": 100_000 if args.quick else 1_000_000, "mle": 20_000 if args.quick else 200_000}
    n_statsmodels = 50 if args.quick else 300
    variants = [("mom", "wald", "t", False), ("mom", "wald", "normal", False), ("mle", "wald", "t", False),
                ("mle", "wald", "normal", False), ("mle", "lrt", "t", False), ("mle", "lrt", "normal", False),
                ("mle", "wald", "t", True)]

    results: dict = {"anchor_5_plus_5": ANCHOR, "accuracy": [], "throughput": {}}
    for n_per_group in (3, 5, 10):
        counts, groups, lfc, alpha, null = simulate(n_accuracy, n_per_group, seed=n_per_group)
        for method, test, distribution, shrink in variants:
            table = nb_test(counts, groups, method=method, test=test, null_distribution=distribution, shrink=shrink)
            row = {"n_per_group": n_per_group, "method": method, "test": test, "null_distribution": distribution,
                   "shrink": shrink, **accuracy(table, lfc, alpha, null)}
            results["accuracy"].append(row)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    nb_test(*simulate(100, 5, seed=1)[:2], method="mle", backend="torch")  # import torch before timing
    for label, method, backend in (("mom", "mom", "numpy"), ("mle", "mle", "numpy"), ("mle_torch_cpu", "mle", "torch")):
        counts, groups, *_ = simulate(n_speed[method], 5, seed=99)
        seconds = []
        for _ in range(3 if method == "mom" else 1):  # MoM takes ~1 s: the median of 3 (a busy machine is noisy)
            started = time.perf_counter()
            nb_test(counts, groups, method=method, backend=backend)
            seconds.append(time.perf_counter() - started)
        rate = n_speed[method] / float(np.median(seconds))
        results["throughput"][label] = {"problems": n_speed[method], "per_s": rate,
                                        "per_s_best": n_speed[method] / min(seconds), "runs": len(seconds)}
    counts, groups, *_ = simulate(n_statsmodels, 5, seed=99)
    sm_rate = statsmodels_rate(counts, groups, n_statsmodels)
    results["throughput"]["statsmodels_one_by_one"] = {"problems": n_statsmodels, "per_s": sm_rate}
    for method in ("mom", "mle", "mle_torch_cpu"):
        results["throughput"][method]["times_statsmodels"] = results["throughput"][method]["per_s"] / sm_rate
    print(json.dumps(results["throughput"], indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    name = "negbin_quick.json" if args.quick else "negbin.json"
    (args.out / name).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
