"""A pre-trained set transformer that estimates two-group negative-binomial parameters (Svensson 2025).

The network reads one feature's counts as a set of samples (count, group, size factor) and returns the two
group means and the dispersion, having learned to invert the NB model on simulated problems. It is
permutation-invariant within each group (a transformer encoder without positions, then means over each
group), and it also reads the method-of-moments statistics of the feature, so it learns corrections to
them. It was trained with :func:`train_nb_transformer` over the ranges of :data:`TRAINING_RANGES` for 2 to
:data:`MAX_PER_GROUP` samples per group; the weights ship with the package (``nb_transformer.npz``) and
nothing is downloaded.

References
----------
V. Svensson, "Negative binomial regression and inference using a pre-trained transformer",
arXiv:2508.04111 (2025).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

#: the most and fewest samples per group the network was trained for
MAX_PER_GROUP = 50
MIN_PER_GROUP = 2
#: the problems it learned from: geometric mean of the two group means (counts per unit size factor), NB2
#: dispersion, |natural-log fold change| (half the problems have none), the spread of log size factors
TRAINING_RANGES: dict[str, tuple[float, float] | float] = {
    "mean": (0.5, 5000.0), "dispersion": (1e-3, 3.0), "log_fold_change": (0.0, 3.0), "size_factor_sd": 0.3,
    "null_fraction": 0.5,
}
WEIGHTS = Path(__file__).with_name("nb_transformer.npz")
_PSEUDO = 0.5
_N_TOKEN = 5
_N_CONTEXT = 6


def _moments(counts: np.ndarray, in_b: np.ndarray, factors: np.ndarray) -> dict[str, np.ndarray]:
    """Pooled rate, the groups' log rates relative to it, and the moment dispersion (features first).

    ``factors``: (samples,) for all features, or (features, samples).
    """
    total = counts.sum(1) + _PSEUDO
    rate = total / factors.sum(-1)
    stats = {"log_rate": np.log(rate)}
    numerator = np.zeros(counts.shape[0])
    denominator = np.zeros(counts.shape[0])
    for name, members in (("a", ~in_b), ("b", in_b)):
        s = factors[..., members]
        y = counts[:, members]
        mean = (y.sum(1) + _PSEUDO / 2) / s.sum(-1)
        stats[f"log_{name}"] = np.log(mean / rate)
        fitted = mean[:, None] * s
        n = members.sum()
        numerator += ((y - fitted) ** 2 * n / max(n - 1, 1) - fitted).sum(1)
        denominator += (fitted ** 2).sum(1)
    stats["log_dispersion"] = np.log(np.clip(numerator / np.maximum(denominator, 1e-300), 0.0, 1e4) + 1e-3)
    return stats


def features(counts: np.ndarray, in_b: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The network's inputs: tokens (features, samples, 5) and context (features, 6), float32.

    ``factors``: size factors (samples,), or (features, samples) when they differ feature by feature.

    Tokens: the count over its expectation under one pooled rate, the group, the centred log size
    factor, ``log1p(count) / 5``, the pooled log rate / 5. Context: log group sizes / 4, the groups' moment
    log rates relative to the pooled one, the moment log dispersion, the pooled log rate / 5.
    """
    counts = np.asarray(counts, dtype=np.float64)
    stats = _moments(counts, in_b, factors)
    n_features, n_samples = counts.shape
    log_s = np.log(factors)
    expected = np.exp(stats["log_rate"])[:, None] * factors
    tokens = np.empty((n_features, n_samples, _N_TOKEN), dtype=np.float32)
    tokens[..., 0] = counts / expected
    tokens[..., 1] = in_b[None, :]
    tokens[..., 2] = log_s - log_s.mean(-1, keepdims=True)
    tokens[..., 3] = np.log1p(counts) / 5
    tokens[..., 4] = stats["log_rate"][:, None] / 5
    context = np.stack([np.full(n_features, np.log((~in_b).sum()) / 4), np.full(n_features, np.log(in_b.sum()) / 4),
                        stats["log_a"], stats["log_b"], stats["log_dispersion"], stats["log_rate"] / 5],
                       axis=1).astype(np.float32)
    return tokens, context


def _network(width: int = 32, heads: int = 4, layers: int = 2):
    import torch
    from torch import nn

    class NBSetTransformer(nn.Module):
        """Samples -> embedding -> self-attention (no positions) -> means over each group -> 3 numbers."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Sequential(nn.Linear(_N_TOKEN, width), nn.GELU(), nn.Linear(width, width))
            layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True,
                                               activation="gelu")
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Sequential(nn.Linear(3 * width + _N_CONTEXT, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                                      nn.Linear(64, 3))

        def forward(self, tokens: torch.Tensor, context: torch.Tensor, in_b: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(self.embed(tokens))
            pooled = [hidden[:, ~in_b].mean(1), hidden[:, in_b].mean(1), hidden.amax(1)]
            # corrections to the moment estimates: (log rate a, log rate b) relative to the pooled one, log alpha
            return context[:, 2:5] + self.head(torch.cat([*pooled, context], dim=1))

    return NBSetTransformer()


def simulate_problems(rng: np.random.Generator, n_problems: int, n_a: int, n_b: int, *,
                      ranges: dict | None = None, shared_size_factors: bool = False) -> dict[str, np.ndarray]:
    """Two-group NB2 problems drawn over ``ranges`` (default :data:`TRAINING_RANGES`), with their truth.

    ``shared_size_factors``: one size-factor vector for every problem (as the features of one data set
    share their samples), rather than one per problem.

    Returns ``counts`` (problems, n_a + n_b), ``in_b`` (samples,), ``size_factors`` (problems, samples),
    ``log_mean_a``, ``log_mean_b``, ``log_fold_change`` and ``dispersion`` (problems,).
    """
    r = {**TRAINING_RANGES, **(ranges or {})}
    low, high = r["mean"]
    log_mean = rng.uniform(np.log(low), np.log(high), n_problems)
    lfc = rng.uniform(*r["log_fold_change"], n_problems) * rng.choice([-1.0, 1.0], n_problems)
    lfc[rng.uniform(size=n_problems) < r["null_fraction"]] = 0.0
    d_low, d_high = r["dispersion"]
    alpha = np.exp(rng.uniform(np.log(d_low), np.log(d_high), n_problems))
    in_b = np.r_[np.zeros(n_a, bool), np.ones(n_b, bool)]
    factors = np.exp(r["size_factor_sd"] * rng.standard_normal((1 if shared_size_factors else n_problems, n_a + n_b)))
    factors = np.repeat(factors, n_problems, axis=0) if shared_size_factors else factors
    factors /= np.exp(np.log(factors).mean(1, keepdims=True))
    log_a, log_b = log_mean - lfc / 2, log_mean + lfc / 2
    mu = factors * np.exp(np.where(in_b[None, :], log_b[:, None], log_a[:, None]))
    rate = rng.gamma(1.0 / alpha[:, None], alpha[:, None] * mu)
    return {"counts": rng.poisson(rate).astype(np.float64), "in_b": in_b, "size_factors": factors,
            "log_mean_a": log_a, "log_mean_b": log_b, "log_fold_change": lfc, "dispersion": alpha}


def _targets(problems: dict, log_rate: np.ndarray) -> np.ndarray:
    return np.stack([problems["log_mean_a"] - log_rate, problems["log_mean_b"] - log_rate,
                     np.log(problems["dispersion"])], axis=1).astype(np.float32)


def _problem_features(problems: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens, context and targets of simulated problems (size factors differ problem by problem)."""
    tokens, context = features(problems["counts"], problems["in_b"], problems["size_factors"])
    return tokens, context, _targets(problems, context[:, 5].astype(np.float64) * 5)


def train_nb_transformer(path: str | os.PathLike | None = WEIGHTS, *, steps: int = 3000, batch: int = 256,
                         seed: int = 0, learning_rate: float = 2e-3, progress: bool = False) -> dict:
    """Train the estimator on simulated problems (seeded, on the CPU: minutes) and save its weights.

    Each step draws ``batch`` problems of one pair of group sizes (2 to :data:`MAX_PER_GROUP` each) over
    :data:`TRAINING_RANGES` and minimises the squared error of the two log group means and the log
    dispersion (Lightning, Adam, cosine schedule). Same seed, same weights.

    Parameters
    ----------
    path
        Where to write the weights (``.npz``; default: the package's own file); None: do not write.
    steps, batch, seed, learning_rate, progress
        Training.

    Returns
    -------
    dict
        ``state``: the weights (name -> float32 array), ``loss``: the mean loss of the last 100 steps,
        ``seconds``, ``steps``, ``parameters``.
    """
    import time

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from .._lightning import quiet_lightning

    class Problems(IterableDataset):
        def __iter__(self):
            rng = np.random.default_rng([seed, 1])
            for _ in range(steps):
                n_a, n_b = (int(v) for v in rng.integers(MIN_PER_GROUP, MAX_PER_GROUP + 1, 2))
                problems = simulate_problems(rng, batch, n_a, n_b)
                tokens, context, targets = _problem_features(problems)
                yield (torch.from_numpy(tokens), torch.from_numpy(context), torch.from_numpy(problems["in_b"]),
                       torch.from_numpy(targets))

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _network()
            self.losses: list[float] = []

        def training_step(self, item, index):
            tokens, context, in_b, targets = item
            loss = torch.mean((self.net(tokens, context, in_b) - targets) ** 2)
            self.losses.append(float(loss))
            return loss

        def configure_optimizers(self):
            optimiser = torch.optim.Adam(self.parameters(), lr=learning_rate)
            return [optimiser], [torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)]

    pl.seed_everything(seed, verbose=False)
    module = Module()
    tic = time.perf_counter()
    with quiet_lightning(not progress):
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=progress, enable_model_summary=False, deterministic=True)
        trainer.fit(module, DataLoader(Problems(), batch_size=None))
    state = {name: value.detach().cpu().numpy().astype(np.float32) for name, value in module.net.state_dict().items()}
    if path is not None:
        from ..io import atomic_path

        with atomic_path(path, overwrite=True) as temporary:
            with open(temporary, "wb") as handle:
                np.savez_compressed(handle, **state)
    return {"state": state, "loss": float(np.mean(module.losses[-100:])), "seconds": time.perf_counter() - tic,
            "steps": steps, "parameters": int(sum(v.size for v in state.values()))}


def load_network(state: dict[str, np.ndarray] | None = None):
    """The network with the shipped weights (or those of ``state``), in evaluation mode."""
    import torch

    if state is None:
        if not WEIGHTS.is_file():
            raise FileNotFoundError(f"{WEIGHTS}: the NB transformer's weights are missing from the package; "
                                    "train_nb_transformer() writes them")
        with np.load(WEIGHTS) as stored:
            state = {name: stored[name] for name in stored.files}
    network = _network()
    network.load_state_dict({name: torch.from_numpy(np.asarray(value)) for name, value in state.items()})
    return network.eval()


@functools.lru_cache(maxsize=1)
def _shipped_network():
    """The network with the shipped weights, read once per process."""
    return load_network()


def check_group_sizes(in_b: np.ndarray) -> None:
    """A ValueError unless both groups have 2 to :data:`MAX_PER_GROUP` samples (what the network learned)."""
    for name, n in (("first", int((~in_b).sum())), ("second", int(in_b.sum()))):
        if not MIN_PER_GROUP <= n <= MAX_PER_GROUP:
            raise ValueError(f"method='transformer' was trained for {MIN_PER_GROUP} to {MAX_PER_GROUP} samples per "
                             f"group; the {name} group has {n}: use method='mom' or 'mle'")


def estimate(counts: np.ndarray, in_b: np.ndarray, factors: np.ndarray, *, network=None,
             batch: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log group means (a, b) and dispersions of every feature: the network's estimates.

    ``factors``: size factors (samples,), or (features, samples). Raises a ValueError when a group has
    fewer than 2 or more than :data:`MAX_PER_GROUP` samples.
    """
    import torch

    check_group_sizes(in_b)
    if network is None:
        network = _shipped_network()
    out = np.empty((counts.shape[0], 3))
    mask = torch.from_numpy(np.asarray(in_b, dtype=bool))
    with torch.inference_mode():
        for start in range(0, counts.shape[0], batch):
            block = slice(start, start + batch)
            tokens, context = features(counts[block], in_b, factors[block] if np.ndim(factors) == 2 else factors)
            prediction = network(torch.from_numpy(tokens), torch.from_numpy(context), mask).double().numpy()
            log_rate = context[:, 5].astype(np.float64) * 5
            out[start:start + batch] = prediction + np.c_[log_rate, log_rate, np.zeros(len(context))]
    return out[:, 0], out[:, 1], np.exp(out[:, 2])
