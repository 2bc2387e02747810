"""The third paper's table: a pre-trained transformer against MoM and MLE for two-group NB estimation and tests.

For 3, 5, 10 and 50 samples per group, on held-out problems drawn over the training ranges
(``eels_ad.stats._transformer.TRAINING_RANGES``) and on the NB anchor's simulation (``../shared/anchors/negbin``:
5 + 5 samples, geometric mean log-uniform in [1, 1000], dispersion log-uniform in [0.01, 1], half null,
|LFC| uniform in [0.5, 2]): RMSE of the log fold change and of the log dispersion, FPR at 0.05 of the Wald test
(t reference) built on each estimator, power at a 5 % FPR (the threshold set on the nulls), and problems per
second on this machine, MoM, MLE and the transformer side by side in one run. edgeR's figures come from the
anchor README. Writes ``results/negbin_transformer.json`` and ``.png``.

    python benchmarks/negbin_transformer.py            # about 5 min on 2 cores
    python benchmarks/negbin_transformer.py --train    # first retrain the shipped weights (seeded)
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

from eels_ad.stats import nb_test
from eels_ad.stats._transformer import TRAINING_RANGES, simulate_problems, train_nb_transformer

RESULTS = Path(__file__).parent / "results"
ANCHOR = {"edgeR QL": {"fpr": 0.044, "power_at_5pct_fpr": 0.799, "lfc_rmse": 0.400, "per_second": 7100},
          "edgeR LRT": {"fpr": 0.050, "power_at_5pct_fpr": 0.816, "lfc_rmse": 0.400, "per_second": 7200},
          "DESeq2 Wald": {"fpr": 0.048, "power_at_5pct_fpr": 0.792, "lfc_rmse": 0.410, "per_second": 1900}}
ANCHOR_RANGES = {"mean": (1.0, 1000.0), "dispersion": (0.01, 1.0), "log_fold_change": (0.5, 2.0),
                 "size_factor_sd": 0.0, "null_fraction": 0.5}


def evaluate(problems: dict, method: str) -> dict:
    """Estimates and Wald p-values of every problem (one size-factor vector for the set: one batched call)."""
    counts, in_b = problems["counts"], problems["in_b"]
    factors = problems["size_factors"]
    tic = time.perf_counter()
    table = nb_test(counts, in_b.astype(float), factors[0], method=method)
    seconds = time.perf_counter() - tic
    lfc = table["log_fold_change"].to_numpy()
    dispersion = table["dispersion"].to_numpy()
    pvalue = table["pvalue"].to_numpy()
    null = problems["log_fold_change"] == 0
    ok = np.isfinite(lfc)
    threshold = np.nanquantile(pvalue[null], 0.05)
    return {
        "lfc_rmse": float(np.sqrt(np.mean((lfc[ok] - problems["log_fold_change"][ok]) ** 2))),
        "log_dispersion_rmse": float(np.sqrt(np.mean(
            (np.log(np.maximum(dispersion[ok], 1e-3)) - np.log(problems["dispersion"][ok])) ** 2))),
        "fpr": float(np.nanmean(pvalue[null] < 0.05)),
        "power": float(np.nanmean(pvalue[~null] < 0.05)),
        "power_at_5pct_fpr": float(np.nanmean(pvalue[~null] <= threshold)),
        "finite": float(ok.mean()),
        "per_second": counts.shape[0] / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="retrain the shipped weights first (seeded)")
    parser.add_argument("--problems", type=int, default=20000)
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the saved JSON")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((RESULTS / "negbin_transformer.json").read_text())["rows"], RESULTS / "negbin_transformer.png")
        return
    warnings.simplefilter("ignore")
    results: dict = {"training_ranges": {k: list(v) if isinstance(v, tuple) else v
                                         for k, v in TRAINING_RANGES.items()}, "anchor_edger": ANCHOR}
    if args.train:
        trained = train_nb_transformer()
        results["training"] = {k: trained[k] for k in ("loss", "seconds", "steps", "parameters")}
        print(f"trained in {trained['seconds']:.0f} s, {trained['parameters']} parameters", flush=True)
    rows = []
    for name, ranges, sizes in (("held-out", None, (3, 5, 10, 50)), ("anchor", ANCHOR_RANGES, (5,))):
        for n in sizes:
            rng = np.random.default_rng([2026, n, len(name)])
            # one size-factor vector shared by the problems of a set (as by the channels of one image): batched fits
            problems = simulate_problems(rng, args.problems, n, n, ranges=ranges, shared_size_factors=True)
            for method in ("mom", "mle", "transformer"):
                row = {"problems": name, "per_group": n, "method": method, **evaluate(problems, method)}
                rows.append(row)
                print(f"{name:8s} n={n:2d} {method:11s} LFC RMSE {row['lfc_rmse']:.3f}  log-alpha RMSE "
                      f"{row['log_dispersion_rmse']:.3f}  FPR {row['fpr']:.3f}  power@5%FPR "
                      f"{row['power_at_5pct_fpr']:.3f}  {row['per_second']:,.0f}/s", flush=True)
    results["rows"] = rows
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "negbin_transformer.json").write_text(json.dumps(results, indent=1))
    plot(rows, RESULTS / "negbin_transformer.png")
    print("wrote results/negbin_transformer.json and .png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held = [r for r in rows if r["problems"] == "held-out"]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), constrained_layout=True)
    for method, colour in (("mom", "C0"), ("mle", "C1"), ("transformer", "C2")):
        mine = [r for r in held if r["method"] == method]
        n = [r["per_group"] for r in mine]
        for ax, key in zip(axes, ("lfc_rmse", "log_dispersion_rmse", "fpr", "per_second"), strict=True):
            ax.plot(n, [r[key] for r in mine], "o-", color=colour, label=method)
            ax.set_xscale("log")
            ax.set_xticks([3, 5, 10, 50], ["3", "5", "10", "50"])
            ax.minorticks_off()
            ax.set_xlabel("samples per group")
            ax.set_title(key.replace("_", " "))
    axes[2].axhline(0.05, color="grey", ls=":")
    axes[3].set_yscale("log")
    axes[0].legend()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
