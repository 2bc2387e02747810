"""CVAEDetector: the user-facing 3D-CVAE anomaly detector (Sultanov, Buban & Klie, arXiv:2412.16200)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from ..._lightning import quiet_lightning
from ...datacube import DatacubeReadError, cluster_client, cluster_compute, is_lazy
from .. import _score_kernels
from .._base import FIT_CONTEXTS, BaseDetector
from .._scores import SCORES, score_spectra
from ..spatial import pool_evidence
from ..threshold import ThresholdMethod
from .data import PatchDataModule, extract_patches, patch_starts, pixel_scale
from .module import ARCHITECTURE, CVAE3D, RING_RANK, Likelihood, hole_slices


def _centre_weights(patch: tuple[int, int]) -> np.ndarray:
    """(py, px) tent weights: 1 at a patch's centre, falling linearly to 1 / side at its edge pixels."""
    def tent(n: int) -> np.ndarray:
        position = np.arange(n) + 0.5
        return np.minimum(position, n - position) / (n / 2)

    return np.outer(tent(patch[0]), tent(patch[1]))


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _read_history(metrics_csv: Path) -> list[dict[str, float]]:
    """Per-epoch losses from Lightning's CSV log (rank 0 writes it, also under DDP): one dict per epoch."""
    import csv

    if not metrics_csv.is_file():
        return []
    epochs: dict[int, dict[str, float]] = {}
    with open(metrics_csv, newline="") as table:
        for row in csv.DictReader(table):
            epoch = int(float(row.pop("epoch")))
            row.pop("step", None)
            epochs.setdefault(epoch, {"epoch": epoch}).update({k: float(v) for k, v in row.items() if v != ""})
    return [epochs[epoch] for epoch in sorted(epochs)]


class CVAEDetector(BaseDetector):
    """3D convolutional VAE trained on bulk patches; pixels it cannot reconstruct are anomalous.

    The model (:class:`~eels_ad.detect.cvae.module.CVAE3D`) sees patches of ``patch_size`` pixels x
    all fitted energy channels, so a pixel is judged with its neighbours. Scores come from the
    posterior mean (no sampling) and are averaged over every patch that covers a pixel; the cube is
    mirrored by half a patch at its edges first, so border pixels are judged mid-patch too.

    Parameters
    ----------
    patch_size, stride
        Patch side and the step between training patches, in pixels (an int or a (y, x) pair). A cube
        smaller than a patch is mirrored (reflected at its edges) up to the patch's size, for training
        and scoring alike; the scores keep the cube's own size.
    context
        ``"auto"`` (default): as :class:`~eels_ad.detect.PCADetector`'s, ``"neighbours"`` when the training
        cube's smooth energy drift spans more than :attr:`AUTO_DRIFT_EV` (edge shifts of a seeded sample of
        :attr:`DRIFT_SAMPLE` training spectra, the drift separated from local shifts by a robust fit), else
        ``"pixel"``, decided before training; the choice is ``context_`` (saved with the model). An image too
        small for whole neighbourhoods (:attr:`AUTO_MIN_WHOLE_RINGS`, half a patch from each edge) keeps
        ``"pixel"``.
        ``"pixel"``: the network sees the whole patch and reconstructs it, each pixel included.
        ``"neighbours"``: a blind spot. The centre ``hole_size`` pixels of every patch are hidden from the
        encoder; the decoder predicts them as a plane fitted to the normalised spectra of the ring of pixels
        around the hole (in the bulk's leading spectral shapes,
        :meth:`~eels_ad.detect.cvae.module.CVAE3D.ring_shape`), evaluated at each hidden pixel, plus a learned
        correction, scaled by each pixel's own total counts, and the loss counts the hidden pixels only. At the
        image's edges the ring's part beyond the edge is hidden too (the network was trained on patches with their
        rings so cut), so no mirror image of a hidden pixel reaches it. To score a cube the hidden centres tile it
        (patches step by the hole's size; ``score_stride`` is not used), so each pixel is judged once, by what its
        neighbourhood predicts; once calibrated, the pixels whose pooled evidence is strong are left out of their
        neighbours' planes and those neighbours predicted again (:attr:`SUSPECT_PVALUE`). A smooth nuisance that
        moves the whole neighbourhood (an uncorrected energy drift, a thickness gradient) is predicted; a local
        change is not. Measured on uncorrected +-1 eV drift with
        another drift pattern in training (``benchmarks/README.md``, spatial table): it lifts the CVAE's ROC AUC
        for local 0.5 eV shifts from 0.50-0.73 to 0.98 or more. Without drift it matches the pixel context within
        0.005 (shift scoring). The counterpart of :class:`~eels_ad.detect.PCADetector`'s ``context``.
    hole_size
        Side of the hidden centre with ``context="neighbours"`` (an int or a (y, x) pair; default half the
        patch, which leaves a ring of 2 pixels in the default 8-pixel patch). It must leave a ring of at
        least one pixel. A smaller hole is a wider ring (less blurred by a neighbouring anomaly) but more
        patches to score: a 2-pixel hole in the 8-pixel patch scored 3.5x slower than the default (measured
        with the layout-2 network).
    score_stride
        Step between the patches that score a cube (default 8, the default patch: patches side by side on
        the cube mirrored by half a patch; None: ``stride``; at most the patch's side, which a larger value
        becomes). Where patches overlap, each one's
        reconstruction counts with a tent-shaped weight, highest at its centre. Measured side by side
        (``benchmarks/README.md``): steps 2, 4 and 8 gave the same ROC AUC to 3 decimals on 8 cells, and
        again on the 6 cells of the spatial benchmark (session 8); step 8 scores about 2.6x faster than
        step 4.
    latent_dim, widths
        Latent size and the channels of the three 3D convolutions (default (4, 8, 16), with the energy-only
        last convolution of layout 3: per-pixel ROC AUC within 0.001 of layout 2's (8, 16, 32) on the 12
        shift cells of the spatial benchmark (both contexts), scoring about 2x faster).
    likelihood
        ``"poisson"``: Poisson NLL of the raw counts (default); ``"gaussian"``: Gaussian NLL of the
        normalised spectra with a learned per-voxel variance.
    beta
        Weight of the KL term.
    max_time
        Stop training after this many seconds (passed to Lightning's ``Trainer``), whatever
        ``max_epochs`` says; None: no limit. The best model so far (validation loss) is kept.
    learning_rate, batch_size, max_epochs, patience, val_fraction
        Training: Adam, early stopping on the validation loss after ``patience`` epochs (defaults 12 epochs
        of batches of 32: measured side by side against 25 of 16, the same ROC AUC to 3 decimals on 8
        cells at half the training time; ``benchmarks/README.md``). The
        validation patches are a strip of ``val_fraction`` of the rows that no training patch
        touches; its pixels' scores calibrate the threshold (``calibration_scores_``).
    augment
        Train on randomly mirrored and turned patches (see
        :class:`~eels_ad.detect.cvae.data.PatchDataModule`).
    accelerator, devices, strategy, precision
        Passed to the Lightning ``Trainer`` (``"auto"``: a GPU when there is one, else the CPU;
        ``precision=None``: 16-bit mixed on a GPU, 32-bit on the CPU). Several GPUs: e.g.
        ``devices=4, strategy="ddp"``.
    energy_range, scoring, score_range, threshold, fdr, false_alarm_rate, spatial, empirical_null
        As for :class:`~eels_ad.detect.PCADetector` (default ``scoring="shift+deviance"``, as PCA's: on 0.5 eV
        shifts at dose 20 without drift ROC AUC 0.998-1.000 against 0.85-0.97 with ``"deviance"``, the default
        before session 15; ``benchmarks/README.md``); ``scoring`` can also be ``"nll"``, the model's own mean
        negative log-likelihood per channel. The held-out strip's scores calibrate the
        p-values of ``threshold="fdr"`` and of the spatial step.
    seed
        Seed of the initial weights, the split and the batches: same seed, same model on the CPU.
    progress
        Show Lightning's progress bar.
    checkpoint_dir
        Keep Lightning's checkpoints there (default: a temporary folder, removed after training).

    Attributes
    ----------
    model_ : CVAE3D
        The trained network (best validation loss), in evaluation mode.
    history_ : list of dict
        Losses per epoch.
    context_ : str
        The context in use: ``context``, or what ``"auto"`` chose.
    drift_range_ : float or None
        With ``context="auto"``: the span (eV) of the training cube's smooth energy drift that chose it.
    n_parameters_ : int
    epochs_ : int
        Epochs trained (fewer than ``max_epochs`` when early stopping ended the training).
    training_seconds_ : float
    n_calibration_spectra_ : int
        Pixels of the held-out strip (see ``val_fraction``) whose scores, in ``calibration_scores_``,
        set the false-alarm part of the threshold.
    training_scores_ : ndarray
        Scores of the other (training) pixels. Moved onto the held-out scores' median and 95th percentile
        they shape the p-values' tail beyond the strip's 30 largest scores, where the strip alone (512 scores
        at 64 x 64) can only extrapolate; the p-values below and the tail's mass stay the strip's
        (:class:`~eels_ad.detect.spatial.UpperTail`'s ``tail_sample``). Measured on 150 bulk-only cubes:
        realised FDR 0.027 without drift and 0.033 under a +-1 eV drift (0.013 and 0.020 from the strip
        alone; ``benchmarks/README.md``, session 16). Used so with the blind spot (``context="neighbours"``); in the
        pixel context ``model_null_scores_`` shape the tail instead.
    model_null_scores_ : ndarray or None
        In the pixel context: the scores of Poisson replicates of the network's own expected counts of the
        held-out pixels, scored against them (:attr:`MODEL_NULL_SPECTRA` spectra, seeded). Moved onto the
        held-out scores by a line through their Q-Q plot they shape the p-values' tail beyond the strip's reach,
        on the squared scale of a normal score (``BaseDetector._training_tail_scores``). In the pixel context the
        network sees the pixel it predicts, so its null is mostly the counts' own noise, which this sample holds
        out to 1e-5; the blind spot's null is mostly its prediction error, which it does not. None otherwise.

    Examples
    --------
    >>> import eels_ad
    >>> from eels_ad.detect import CVAEDetector
    >>> bulk = eels_ad.simulate_fe_l23((16, 16), anomaly_fraction=0.0, seed=1)["counts"]
    >>> detector = CVAEDetector(max_epochs=1, progress=False).fit(bulk)
    >>> detector.score(bulk).shape
    (16, 16)
    """

    _SCORINGS = (*SCORES, "nll")
    #: spectra of the model null (``model_null_scores_``), whatever the size of the held-out strip: 32,768 drawn
    #: and scored in 1.2 s on 2 cores (320 channels). A Pareto tail fitted to the top 2.5 % of them (800 scores)
    #: holds its shape; the realised FDR over 6 training cubes was 0.020-0.100 (mean 0.050) with them, 0.007-0.027
    #: (mean 0.022) with the training pixels' scores (benchmarks/README.md, session 20)
    MODEL_NULL_SPECTRA = 32768
    #: training spectra (seeded) whose edge shifts measure the drift for ``context="auto"``
    DRIFT_SAMPLE = 4000
    #: spectra scored at a time against their reconstructions when a lazy cube is scored in bands of rows
    SCORE_PIXELS = 1024
    #: patches per batch when scoring (and, with ``context="neighbours"``, about the patches of a band of rows);
    #: small batches stay in the CPU's cache
    SCORE_BATCH = 64
    #: at most this many voxels (patches x pixels x channels) per scoring batch (8 patches of 8 x 8 pixels at 1,024
    #: channels), so that the network's activations do not grow with the channels. Measured on 2 cores, a lazy
    #: 256 x 256 x 1024 cube: batches of 8 patches 15.6 s and a peak of 242 MiB above the loaded model, of 20
    #: 17.1 s and 364 MiB; at 64 x 64 x 320, batches of 16 to 64 patches score at the same speed within noise
    SCORE_VOXELS = 8 * 64 * 1024
    #: memory layout of the network at inference. Measured side by side on 2 CPU cores (64 x 64 x 320, best of 3,
    #: spectra/s; pixel context / blind spot on the simulator's default cube / blind spot under a +-1 eV drift,
    #: session 19): contiguous 26,100 / 10,600 / 12,700, channels-last 23,000 / 9,400 / 11,200.
    #: ``torch.channels_last_3d`` is the other choice (``benchmarks/cvae.py --speed-only`` times both)
    MEMORY_FORMAT = torch.contiguous_format

    def __init__(
        self,
        *,
        patch_size: int | tuple[int, int] = 8,
        stride: int | tuple[int, int] = 4,
        context: str = "auto",
        hole_size: int | tuple[int, int] | None = None,
        score_stride: int | tuple[int, int] | None = 8,
        latent_dim: int = 16,
        widths: tuple[int, int, int] = (4, 8, 16),
        likelihood: Likelihood = "poisson",
        beta: float = 1.0,
        learning_rate: float = 1e-3,
        batch_size: int = 32,
        max_epochs: int = 12,
        max_time: float | None = None,
        patience: int = 6,
        val_fraction: float = 0.15,
        augment: bool = True,
        accelerator: str = "auto",
        devices: int | str = "auto",
        strategy: str = "auto",
        precision: str | None = None,
        energy_range: tuple[float, float] | None = None,
        scoring: str = "shift+deviance",
        score_range: tuple[float, float] | None = None,
        threshold: ThresholdMethod | float = "fdr",
        fdr: float = 0.05,
        false_alarm_rate: float = 0.001,
        spatial: bool = True,
        empirical_null: bool = True,
        seed: int = 0,
        progress: bool = True,
        checkpoint_dir: str | None = None,
    ) -> None:
        self.energy_range = energy_range
        self.scoring = scoring
        self.score_range = score_range
        self.threshold = threshold
        self.fdr = fdr
        self.false_alarm_rate = false_alarm_rate
        self.spatial = spatial
        self.empirical_null = empirical_null
        self.patch_size = patch_size
        self.stride = stride
        self.context = context
        self.hole_size = hole_size
        self.score_stride = score_stride
        self.latent_dim = latent_dim
        self.widths = widths
        self.likelihood = likelihood
        self.beta = beta
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.max_time = max_time
        self.patience = patience
        self.val_fraction = val_fraction
        self.augment = augment
        self.accelerator = accelerator
        self.devices = devices
        self.strategy = strategy
        self.precision = precision
        self.seed = seed
        self.progress = progress
        self.checkpoint_dir = checkpoint_dir

    @property
    def epochs_(self) -> int:
        """Epochs trained (fewer than ``max_epochs`` when early stopping ended the training)."""
        return len(self.history_)

    # -- training ---------------------------------------------------------------------------------
    def _trainer_kwargs(self) -> dict[str, Any]:
        on_gpu = torch.cuda.is_available() and self.accelerator in ("auto", "gpu", "cuda")
        precision = self.precision or ("16-mixed" if on_gpu else "32-true")
        return dict(accelerator=self.accelerator, devices=self.devices, strategy=self.strategy, precision=precision,
                    max_epochs=self.max_epochs, max_time=None if self.max_time is None else
                    {"seconds": float(self.max_time)}, deterministic=not on_gpu, enable_progress_bar=self.progress,
                    enable_model_summary=False, log_every_n_steps=1)

    def _check_params(self) -> None:
        super()._check_params()
        if self.max_time is not None and not (isinstance(self.max_time, (int, float, np.number))
                                              and np.isfinite(self.max_time) and self.max_time > 0):
            raise ValueError(f"max_time must be a positive number of seconds or None, got {self.max_time!r}")
        if not (isinstance(self.max_epochs, (int, np.integer)) and self.max_epochs >= 1):
            raise ValueError(f"max_epochs must be an integer >= 1, got {self.max_epochs!r}")
        if self.context not in FIT_CONTEXTS:
            raise ValueError(f"context must be one of {FIT_CONTEXTS}, got {self.context!r}")
        if self.context != "pixel":
            self._hole_size()  # checked here, before any training

    def _hole_size(self) -> tuple[int, int]:
        """(hy, hx) pixels hidden at each patch's centre with the neighbour context (checked)."""
        patch = _pair(self.patch_size, "patch_size")
        hole = tuple(max(1, side // 2) for side in patch) if self.hole_size is None else \
            _pair(self.hole_size, "hole_size")
        hole_slices(patch, hole)
        return hole

    def _hole(self) -> tuple[int, int] | None:
        """(hy, hx) pixels hidden at each patch's centre when the context in use is ``"neighbours"``, else None."""
        return self._hole_size() if self._context() == "neighbours" else None

    def _context_reach(self) -> int:
        """Half a patch: how far a pixel's neighbourhood (the ring around the hidden centre) reaches."""
        return max(_pair(self.patch_size, "patch_size")) // 2

    def _fit(self, cube: xr.DataArray, mask: np.ndarray | None, energy: np.ndarray) -> np.ndarray | None:
        import lightning.pytorch as pl
        from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
        from lightning.pytorch.loggers import CSVLogger

        if self.likelihood not in ("poisson", "gaussian"):
            raise ValueError(f"likelihood must be 'poisson' or 'gaussian', got {self.likelihood!r}")
        patch, stride = _pair(self.patch_size, "patch_size"), _pair(self.stride, "stride")
        counts = np.asarray(cube.transpose("y", "x", "energy").values, dtype=np.float32)
        sample_pixels = np.empty(0, dtype=np.int64)
        if self.context == "auto":  # the training cube's smooth drift, from a seeded sample of its training spectra
            pixels = np.flatnonzero(np.ones(counts.shape[:2], bool) if mask is None else np.asarray(mask, bool))
            sample_pixels = np.sort(np.random.default_rng(self.seed).choice(
                pixels, min(self.DRIFT_SAMPLE, pixels.size), replace=False))
        self.context_, self.drift_range_ = self._resolved_context(
            counts.reshape(-1, energy.size)[sample_pixels], sample_pixels, energy, counts.shape[:2])
        pl.seed_everything(self.seed, workers=True, verbose=False)
        data = PatchDataModule(counts, mask, patch_size=patch, stride=stride, batch_size=self.batch_size,
                               val_fraction=self.val_fraction, augment=self.augment, hole=self._hole(),
                               seed=self.seed)
        data.setup("fit")  # here, not only in DDP worker processes: the split is needed below
        model = CVAE3D(n_channels=energy.size, patch_size=patch, latent_dim=self.latent_dim,
                       widths=tuple(self.widths), likelihood=self.likelihood, beta=self.beta,
                       learning_rate=self.learning_rate, hole=self._hole())
        bulk = counts if mask is None else counts[mask]
        shape = (bulk / pixel_scale(bulk)[..., None]).reshape(-1, energy.size).mean(axis=0)
        bulk_shape = np.log(np.maximum(shape, 1e-6)) if self.likelihood == "poisson" else shape
        with torch.no_grad():
            model.bulk_shape.copy_(torch.as_tensor(bulk_shape, dtype=torch.float32))
            model.ring_basis.copy_(torch.as_tensor(_leading_shapes(bulk, RING_RANK, self.seed), dtype=torch.float32))
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="eels-ad-cvae-") as scratch, quiet_lightning(not self.progress):
            directory = self.checkpoint_dir or os.path.join(scratch, "checkpoints")
            checkpoint = ModelCheckpoint(dirpath=directory, monitor="val_loss", save_top_k=1, filename="best")
            stopping = EarlyStopping(monitor="val_loss", patience=self.patience)
            # the CSV logger writes the losses to a scratch folder (nothing leaves the machine); it is how
            # they come back from DDP worker processes
            log = CSVLogger(save_dir=os.path.join(scratch, "log"), name="history", version=0)
            trainer = pl.Trainer(callbacks=[checkpoint, stopping], default_root_dir=directory, logger=log,
                                 **self._trainer_kwargs())
            trainer.fit(model, datamodule=data)
            if checkpoint.best_model_path:
                state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
                model.load_state_dict(state)
            self.history_ = _read_history(Path(log.log_dir) / "metrics.csv")
        self.training_seconds_ = time.perf_counter() - started
        self.model_ = model.to("cpu").eval()
        self.n_parameters_ = int(sum(p.numel() for p in model.parameters()))
        self.n_training_patches_ = len(data.train_set)
        # calibrate the threshold on the held-out strip: the model fits its training pixels more closely
        # than new ones, and a false-alarm rate set on them let 2-10 bulk pixels of every test cube through
        holdout = data.holdout_pixels
        self.n_calibration_spectra_ = int(holdout.sum())
        if not holdout.any():
            return None
        self.model_null_scores_ = self._model_null_scores(cube, holdout, energy)
        return holdout.ravel() if mask is None else holdout[mask]

    def _model_null_scores(self, cube: xr.DataArray, holdout: np.ndarray, energy: np.ndarray) -> np.ndarray | None:
        """``model_null_scores_``: in the pixel context, the scores of Poisson replicates of the network's
        expected counts of the ``holdout`` pixels (y, x), against those counts; None for the blind spot and
        ``scoring="nll"``."""
        if self._hole() is not None or self.scoring == "nll":
            return None
        channels = self._score_channels(energy)
        expected = self._reconstruct_array(cube)[holdout][:, channels].astype(np.float64)
        rng = np.random.default_rng(self.seed)
        replicates = -(-self.MODEL_NULL_SPECTRA // expected.shape[0])
        return np.concatenate([score_spectra(rng.poisson(expected).astype(np.float64), expected, self.scoring)
                               for _ in range(replicates)])

    # -- inference --------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        wants_gpu = self.accelerator in ("auto", "gpu", "cuda")
        return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")

    @contextlib.contextmanager
    def _network_on(self, device: torch.device):
        """The network on ``device``, in the layout :attr:`MEMORY_FORMAT`, while in the block; on the CPU and
        contiguous after it. Moved only where it is not so already: a move walks every layer (0.5 ms, as long as
        the network takes for a few patches), and the blind spot runs it once per band of rows."""
        moved = device.type != "cpu"
        laid_out = self.MEMORY_FORMAT != torch.contiguous_format
        if moved:
            self.model_.to(device)
        if laid_out:
            self.model_.to(memory_format=self.MEMORY_FORMAT)
        try:
            yield self.model_
        finally:
            if laid_out:
                self.model_.to(memory_format=torch.contiguous_format)
            if moved:
                self.model_.to("cpu")

    def _score_step(self) -> tuple[int, int]:
        """The step between scoring patches: ``score_stride`` (or ``stride``), at most the patch's side, as a
        larger step would leave pixels that no patch covers."""
        patch = _pair(self.patch_size, "patch_size")
        step = _pair(self.stride if self.score_stride is None else self.score_stride, "score_stride")
        return min(step[0], patch[0]), min(step[1], patch[1])

    def _score_batch(self, n_channels: int) -> int:
        """Patches per scoring batch: :attr:`SCORE_BATCH`, fewer where a batch would exceed :attr:`SCORE_VOXELS`."""
        patch = _pair(self.patch_size, "patch_size")
        return int(max(1, min(self.SCORE_BATCH, self.SCORE_VOXELS // (patch[0] * patch[1] * max(n_channels, 1)))))

    def _margin(self) -> tuple[int, int]:
        """Pixels mirrored onto each side before scoring, so that border pixels sit mid-patch too."""
        patch = _pair(self.patch_size, "patch_size")
        return patch[0] // 2, patch[1] // 2

    #: the pooled p-value (the spatial step's, :func:`~eels_ad.detect.spatial.pool_evidence`, of the first step's
    #: scores) below which a pixel is a suspect, left out of the ring planes that predict its neighbours
    SUSPECT_PVALUE = 0.01

    def _inpainted_scores(self, cube: xr.DataArray, channels: np.ndarray) -> np.ndarray:
        """Scores with ``context="neighbours"``, in two steps once calibrated (not for ``scoring="nll"``).

        A ring that holds anomalous pixels predicts its centre wrongly: the pixels of a shifted blob are half
        explained by the blob around them, and the bulk beside it looks shifted the other way. So the first
        step's scores are pooled as by the spatial step, the pixels whose pooled p-value falls below
        :attr:`SUSPECT_PVALUE` are left out of the ring's plane (the encoder still sees them), and the hidden
        centres whose patches held at least :attr:`MIN_SUSPECTS_SEEN` of them are predicted again (only those
        patches; in this process from the first step's latents, decoded with the new plane, as the encoder's
        input has not changed: 64 x 64 x 320 under a drift 6,300-6,600 -> 7,400-7,500 spectra/s, before the decoder
        ran as 1D convolutions). A blob's own
        pixels, their rings half blob, score weakly one by one (p 0.01-0.5 at dose 20 for 0.5 eV) but strongly
        pooled; suspects by their own p-values (< 0.001, replaced by their first-step predictions) left a blob at
        an image's corner in its neighbours' cut ring (under a +-1 eV drift, F1 on blobs at 5 % FDR 0.928 against
        0.996 so, ``benchmarks/spatial.py``).
        """
        nll = self.scoring == "nll"
        ny, nx = cube.sizes["y"], cube.sizes["x"]
        scores = np.empty((ny, nx))
        client = cluster_client() if is_lazy(cube) else None
        second = not nll and getattr(self, "calibration_scores_", None) is not None
        # the first step's latents, for the second step in this process (a few floats per hidden centre)
        latents = np.zeros((*self._hole_frame((ny, nx))[2:4], self.model_.to_latent.out_features // 2),
                           np.float32) if second and client is None else None
        # a lazy cube while a dask.distributed client is current: the bands over the cluster's workers
        steps = self._first_step(self._inpainted_bands(cube, nll=nll, latents=latents), channels, nll) \
            if client is None else self._first_step_on_cluster(client, cube, channels)
        for rows, band_scores in steps:
            scores[rows] = band_scores
        if not second:
            return scores
        vacuum = np.asarray(cube["vacuum"].values, dtype=bool) if "vacuum" in cube.coords else None
        # suspects against the whole map's null: a stratum's own (a band of 512 pixels at 64 x 64) takes in part of
        # a blob at the image's corner, which then stayed in its neighbours' cut rings
        pooled = pool_evidence(self._pixel_pvalues(scores, vacuum, null_per_stratum=False)[0],
                               mask=None if vacuum is None else ~vacuum)
        suspect = np.nan_to_num(pooled, nan=1.0) < self.SUSPECT_PVALUE
        blocks = self._blocks_seeing(*np.nonzero(suspect), (ny, nx))
        if not blocks.any():
            return scores
        # the second step where the first ran: over the cluster's workers for a lazy cube while a client is current
        steps = self._second_step(self._inpainted_bands(cube, blocks=blocks, left_out=suspect, latents=latents,
                                                        reuse_latents=True), channels) \
            if client is None else self._second_step_on_cluster(client, cube, blocks, suspect, channels)
        for rows, again, band_scores in steps:
            scores[rows][again] = band_scores
        return scores

    def _scored_in_blocks(self, parts, channels: np.ndarray):
        """Yield (key, scores (...)) of parts (key, counts (..., E), predicted (..., E)), scored together in blocks
        of at least :data:`~eels_ad.detect._score_kernels.MIN_ELEMENTS` voxels (of the scored ``channels``), the
        size from which the fused score kernel runs. A band of the blind spot holds :attr:`SCORE_BATCH` patches
        (1,024 spectra, 330,000 voxels at 320 channels); scored alone, when a band held 16 patches, the bands spent
        16 % of the scoring time in the array versions. Each spectrum is scored alone: the blocks change no
        score."""
        held, size = [], 0
        for key, counts, predicted in parts:
            held.append((key, counts, predicted))
            size += int(np.prod(counts.shape[:-1])) * channels.size
            if size >= _score_kernels.MIN_ELEMENTS:
                yield from self._scored_block(held, channels)
                held, size = [], 0
        if held:
            yield from self._scored_block(held, channels)

    def _scored_block(self, held: list, channels: np.ndarray):
        """(key, scores) of each held part, the parts scored in one call (:meth:`_scored_in_blocks`)."""
        e = held[0][1].shape[-1]
        counts = np.concatenate([part.reshape(-1, e)[:, channels] for _, part, _ in held])
        predicted = np.concatenate([part.reshape(-1, e)[:, channels] for _, _, part in held]).astype(np.float64)
        scores = score_spectra(counts, predicted, self.scoring)
        start = 0
        for key, part, _ in held:
            stop = start + int(np.prod(part.shape[:-1]))
            yield key, scores[start:stop].reshape(part.shape[:-1])
            start = stop

    #: suspects a patch must hold (outside its centre) for its centre to be predicted again
    MIN_SUSPECTS_SEEN = 2

    def _blocks_seeing(self, ys: np.ndarray, xs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(hidden centres down, across) bool: the centres whose patch holds at least :attr:`MIN_SUSPECTS_SEEN`
        of the pixels (ys, xs) outside the centre itself."""
        patch, hole = _pair(self.patch_size, "patch_size"), self._hole()
        before = [(p - h) // 2 for p, h in zip(patch, hole, strict=True)]
        counts = [-(-size // h) for size, h in zip(shape, hole, strict=True)]
        seen = np.zeros(counts, dtype=int)  # suspects in each centre's patch, outside the centre
        for y, x in zip(ys, xs, strict=True):
            spans = []
            for v, p, h, b, n in zip((y, x), patch, hole, before, counts, strict=True):
                # a centre k's patch spans k h - b .. k h - b + p - 1 (in cube pixels)
                low, high = max(0, -(-(v + b - p + 1) // h)), min(n - 1, (v + b) // h)
                spans.append(range(low, high + 1))
            own = (y // hole[0], x // hole[1])  # hidden there: it changes nothing in its own centre's patch
            for by in spans[0]:
                for bx in spans[1]:
                    if (by, bx) != own:
                        seen[by, bx] += 1
        # one suspect among a ring's pixels (48 for the default 8 x 8 patch, 4 x 4 centre) barely moves the
        # prediction, and lone suspects would make nearly every patch run twice: from two on
        return seen >= self.MIN_SUSPECTS_SEEN

    @torch.inference_mode()
    def _patch_outputs(self, cube: xr.DataArray, nll: bool = False):
        """Yield (corners, counts, expected counts, voxel NLL) per batch of patches, as numpy.

        The cube is mirrored by half a patch on every side first; corners are in that padded frame.
        """
        patch = _pair(self.patch_size, "patch_size")
        stride = self._score_step()
        counts = np.asarray(cube.transpose("y", "x", "energy").values, dtype=np.float32)
        my, mx = self._margin()
        counts = np.pad(counts, ((my, my), (mx, mx), (0, 0)), mode="symmetric")
        device = self._device()
        with self._network_on(device):
            yield from self._run_patches(*extract_patches(counts, patch, stride), device,
                                         self._score_batch(counts.shape[-1]), nll)

    def _run_patches(self, patches: torch.Tensor, scales: torch.Tensor, corners: list, device: torch.device,
                     batch_size: int, nll: bool, hole_only: bool = False, left_out: torch.Tensor | None = None,
                     latents: torch.Tensor | None = None, kept: list | None = None):
        """Yield (corners, counts, expected counts, voxel NLL or None) per batch of patches, as numpy;
        ``hole_only``: of each patch's hidden centre only; ``left_out`` (patches, y, x; bool): pixels left out
        of the rings' planes; ``latents`` (patches, latent_dim): the patches' latents from an earlier pass (the
        encoder is not run); ``kept``: a list that receives each batch's latents (numpy).

        The caller holds the network on ``device`` (:meth:`_network_on`); the patches go in the layout
        :attr:`MEMORY_FORMAT` (the same numbers to float round-off in either).
        """
        model = self.model_
        for start in range(0, len(patches), batch_size):
            block = patches[start:start + batch_size].to(device)
            scale = scales[start:start + batch_size].to(device)
            shape = model.shape_of(block, scale).contiguous(memory_format=self.MEMORY_FORMAT)
            left = None if left_out is None else left_out[start:start + batch_size].to(device)
            if latents is None:
                decoded, latent, _ = model(shape, sample=False, hole_only=hole_only, seen=model.seen_of(scale),
                                           left_out=left)
                if kept is not None:
                    kept.append(latent.float().cpu().numpy())
            else:
                decoded = model.predict(latents[start:start + batch_size].to(device), shape, hole_only,
                                        model.seen_of(scale), left)
            if hole_only:
                block, scale = model.crop_hole(block), model.crop_hole(scale)
            expected = model.expected_counts(scale, decoded)
            voxel_nll = model.voxel_nll(block, scale, decoded) if nll else None
            yield (corners[start:start + batch_size], block.cpu().numpy()[:, 0],
                   expected.float().cpu().numpy()[:, 0],
                   None if voxel_nll is None else voxel_nll.float().cpu().numpy()[:, 0])

    def _accumulate(self, cube: xr.DataArray, per_patch) -> np.ndarray:
        """Average a per-patch, per-pixel quantity (N, [E,] py, px) over the patches covering each pixel.

        Each patch counts with a tent-shaped weight, highest at its centre: a pixel is judged mostly by
        the patches in which it sits mid-patch, where the network sees its neighbours on every side.
        """
        patch = _pair(self.patch_size, "patch_size")
        my, mx = self._margin()
        ny, nx = cube.sizes["y"], cube.sizes["x"]
        total, covered = None, np.zeros((max(ny + 2 * my, patch[0]), max(nx + 2 * mx, patch[1])))
        weight = _centre_weights(patch)
        for corners, values in per_patch:
            for (y, x), value in zip(corners, values, strict=True):
                if total is None:
                    total = np.zeros(value.shape[:-2] + covered.shape)
                total[..., y:y + patch[0], x:x + patch[1]] += value * weight
                covered[y:y + patch[0], x:x + patch[1]] += weight
        return (total / covered)[..., my:my + ny, mx:mx + nx]

    STRATA_SHARE_TAIL = True
    TAIL_FROM_TRAINING = True
    STRATA_FROM_TRAINING = True
    NULL_PER_STRATUM = True

    def _strata(self, shape: tuple[int, int]) -> np.ndarray | None:
        """With ``context="neighbours"``: the pixels whose patch reaches past the image's edge (its ring is cut;
        under a drift their null is heavier) apart from those inside (0): 1 past the top or bottom edge only, 2
        past the left or right edge (corners too). Under a +-1 eV drift the bulk's median / 95th / 99th
        percentile of the score is 0.93 / 2.30 / 2.95 inside, 0.94 / 2.34 / 3.02 at the top and bottom, 0.99 /
        2.44 / 3.13 at the left and right edges and 1.04 / 2.55 / 3.41 in the corners (30 bulk-only cubes).

        Each stratum is moved onto the inside's location and scale (median and 95th percentile), and one tail is
        fitted to them all (the parts are too small for tails of their own). The inside's location and scale
        come from the held-out strip; each stratum's relative to the inside's from the training and held-out
        pixels together (:attr:`STRATA_FROM_TRAINING`): the strip, the image's last rows, holds few pixels of the
        left and right edges (64 at 64 x 64), and its bottom edge is one sample of one drift. The training
        pixels' scores, moved onto each stratum's held-out scale, also shape the tail beyond the strip's reach
        (:meth:`_training_tail_scores`). A detector calibrated with one edge stratum (saved before session 18)
        keeps it."""
        if self._hole() is None:
            return None
        _, hole, rows_of, cols_of, pad = self._hole_frame(shape)
        cut = []
        for size, h, n, (before, after) in zip(shape, hole, (rows_of, cols_of), pad[:2], strict=True):
            block = np.arange(size) // h
            cut.append(((block == 0) & (before > 0)) | ((block == n - 1) & (after > 0)))
        fitted = [getattr(self, name, None) for name in ("calibration_strata_", "training_strata_")]
        if any(strata is not None for strata in fitted) and \
                not any(strata is not None and np.any(strata == 2) for strata in fitted):
            return (cut[0][:, None] | cut[1][None, :]).astype(np.int8)  # one edge stratum
        return np.where(cut[1][None, :], 2, np.where(cut[0][:, None], 1, 0)).astype(np.int8)

    def _hole_frame(self, shape: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], int, int, tuple]:
        """(patch, hole, hidden centres down, across, padding) of the frame that :meth:`_inpainted_bands` tiles."""
        patch, hole = _pair(self.patch_size, "patch_size"), self._hole()
        rows_of, cols_of = (-(-size // h) for size, h in zip(shape, hole, strict=True))
        before = [(p - h) // 2 for p, h in zip(patch, hole, strict=True)]
        after = [p - h - b + n * h - size for p, h, b, n, size in
                 zip(patch, hole, before, (rows_of, cols_of), shape, strict=True)]
        return patch, hole, rows_of, cols_of, ((before[0], after[0]), (before[1], after[1]), (0, 0))

    def _band_rows(self, cols_of: int) -> int:
        """Rows of hidden centres per band: about :attr:`SCORE_BATCH` patches, run through the network in batches
        of :meth:`_score_batch` (a band's own work, reading, cutting and placing its patches, is paid per band: at
        64 x 64 x 320 bands of 1 row of 16 centres scored 10,800-11,600 spectra/s, of 3 rows 11,900-13,200)."""
        return max(1, self.SCORE_BATCH // cols_of)

    def _inpainted_bands(self, cube: xr.DataArray, nll: bool = False, blocks: np.ndarray | None = None,
                         left_out: np.ndarray | None = None, latents: np.ndarray | None = None,
                         reuse_latents: bool = False):
        """With ``context="neighbours"``: yield (cube rows, counts, predicted counts, mean voxel NLL or None)
        band by band, each pixel predicted once, by the patch whose hidden centre it is in.

        The hidden centres tile the cube: patches step by the hole's size over the cube mirrored by the
        ring's width, so every pixel is hidden in exactly one patch and judged by the ring around it.
        Lazy cubes are read a band of rows at a time (the same numbers). ``blocks`` (hidden centres down,
        across; bool): predict only those (the others NaN; bands without one are not read).

        At the cube's edges the mirror frame's pixels beyond the edge (among them copies of the hidden pixels,
        which made the blind spot partial there: shifted blobs at the edges z 2.8 against 4.9 inside) are
        hidden from the network and its ring's plane (:func:`_beyond_edges`): the hidden centre is predicted
        from the ring's pixels inside the image. ``left_out`` (y, x; bool): pixels left out of the rings' planes
        (the second step's suspects). ``latents`` (hidden centres down, across, latent_dim): filled with each
        patch's latent, or with ``reuse_latents`` read from there instead of encoding the patch again (the second
        step's patches are the first step's, suspects left out of the plane only: the same latents).
        """
        padded = self._hole_padded(cube)
        read = (lambda start, stop: _read_padded(padded, start, stop, cube)) if is_lazy(cube) else \
            (lambda start, stop: padded[start:stop])
        channels = self._score_channels(cube["energy"].values) if nll else None
        shape = (cube.sizes["y"], cube.sizes["x"], cube.sizes["energy"])
        yield from self._predicted_bands(read, shape, nll, channels, blocks, (0, self._hole_frame(shape[:2])[2]),
                                         left_out, latents, reuse_latents)

    def _hole_padded(self, cube: xr.DataArray):
        """The cube in :meth:`_hole_frame`'s mirrored frame (a dask array for a lazy cube, else float32)."""
        import dask.array as da

        pad = self._hole_frame((cube.sizes["y"], cube.sizes["x"]))[4]
        data = cube.transpose("y", "x", "energy").data
        return da.pad(data, pad, mode="symmetric") if is_lazy(cube) else \
            np.pad(np.asarray(data, dtype=np.float32), pad, mode="symmetric")

    @torch.inference_mode()
    def _predicted_bands(self, read: Callable[[int, int], np.ndarray], shape: tuple[int, int, int], nll: bool,
                         channels: np.ndarray | None, blocks: np.ndarray | None, centre_rows: tuple[int, int],
                         left_out: np.ndarray | None = None, latents: np.ndarray | None = None,
                         reuse_latents: bool = False):
        """:meth:`_inpainted_bands` of the rows of hidden centres ``centre_rows`` of a cube of ``shape`` (y, x,
        energy), the padded frame's rows read by ``read(start, stop)``."""
        ny, nx, ne = shape
        patch, hole, rows_of, cols_of, pad = self._hole_frame((ny, nx))
        (before_y, _), (before_x, _), _ = pad
        device = self._device()
        band_rows = self._band_rows(cols_of)
        with self._network_on(device):
            for first in range(centre_rows[0], centre_rows[1], band_rows):
                last = min(centre_rows[1], first + band_rows)
                if blocks is not None and not blocks[first:last].any():
                    continue
                top, bottom = first * hole[0], (last - 1) * hole[0] + patch[0]
                band = np.asarray(read(top, bottom), dtype=np.float32)
                predicted = np.full(((last - first) * hole[0], cols_of * hole[1], band.shape[-1]), np.nan,
                                    np.float32)
                voxel = np.full(predicted.shape[:2], np.nan) if nll else None
                patches, scales, corners = extract_patches(band, patch, hole)
                if blocks is not None:
                    wanted = [i for i, (y, x) in enumerate(corners) if blocks[first + y // hole[0], x // hole[1]]]
                    patches, scales, corners = patches[wanted], scales[wanted], [corners[i] for i in wanted]
                scales = _beyond_edges(scales, corners, top, (before_y, before_x), (ny, nx))
                left = None if left_out is None else _patch_values(left_out, corners, top, (before_y, before_x),
                                                                    patch)
                centres = [(first + y // hole[0], x // hole[1]) for y, x in corners]
                known = kept = None
                if latents is not None and reuse_latents:
                    known = torch.from_numpy(np.stack([latents[centre] for centre in centres]))
                elif latents is not None:
                    kept = []
                outputs = self._run_patches(patches, scales, corners, device, self._score_batch(band.shape[-1]),
                                            nll, hole_only=True, left_out=left, latents=known, kept=kept)
                for batch_corners, _, expected, voxel_nll in outputs:  # (N, E, hy, hx): the hidden centres
                    for index, (y, x) in enumerate(batch_corners):
                        target = (slice(y, y + hole[0]), slice(x, x + hole[1]))
                        predicted[target] = np.moveaxis(expected[index], 0, -1)
                        if nll:
                            voxel[target] = voxel_nll[index][channels].mean(axis=0)
                if kept:
                    for centre, latent in zip(centres, np.concatenate(kept), strict=True):
                        latents[centre] = latent
                cube_rows = slice(first * hole[0], min(ny, last * hole[0]))
                height = cube_rows.stop - cube_rows.start
                counts = band[before_y:before_y + height, before_x:before_x + nx]
                yield (cube_rows, np.asarray(counts, dtype=np.float64), predicted[:height, :nx],
                       None if voxel is None else voxel[:height, :nx])

    def _first_step(self, parts, channels: np.ndarray, nll: bool = False):
        """Per band of :meth:`_inpainted_bands`' output: (cube rows, scores); the bands scored in blocks
        (:meth:`_scored_in_blocks`), or with ``nll`` the network's own mean voxel NLL, scored already."""
        if nll:
            yield from ((rows, voxel_nll) for rows, _, _, voxel_nll in parts)
            return
        yield from self._scored_in_blocks(((rows, counts, predicted) for rows, counts, predicted, _ in parts),
                                          channels)

    def _second_step(self, parts, channels: np.ndarray):
        """Per band of :meth:`_inpainted_bands`' output with ``blocks`` given: (cube rows, the pixels predicted
        again (bool, rows x nx), their scores); scored in blocks (:meth:`_scored_in_blocks`)."""
        def again():
            for rows, counts, predicted, _ in parts:
                chosen = np.isfinite(predicted[..., 0])
                if chosen.any():
                    yield (rows, chosen), counts[chosen], predicted[chosen]

        for (rows, chosen), scores in self._scored_in_blocks(again(), channels):
            yield rows, chosen, scores

    def _second_step_on_cluster(self, client, cube: xr.DataArray, blocks: np.ndarray, left_out: np.ndarray,
                                channels: np.ndarray):
        """:meth:`_second_step` of a lazy cube over the cluster: a task per band that holds a hidden centre to
        predict again, reading its rows of the cube's mirrored frame on a worker."""
        import dask

        shape = (cube.sizes["y"], cube.sizes["x"], cube.sizes["energy"])
        patch, hole, rows_of, cols_of, _ = self._hole_frame(shape[:2])
        padded = self._hole_padded(cube)
        scorer = client.scatter(self, broadcast=True)
        suspects = client.scatter(left_out, broadcast=True)
        band_rows = self._band_rows(cols_of)
        tasks = []
        for first in range(0, rows_of, band_rows):
            last = min(rows_of, first + band_rows)
            if not blocks[first:last].any():
                continue
            top, bottom = first * hole[0], (last - 1) * hole[0] + patch[0]
            tasks.append(dask.delayed(_second_step_task, pure=True)(scorer, padded[top:bottom], top, shape, blocks,
                                                                    suspects, channels, (first, last)))
        for parts in cluster_compute(client, tasks, cube):
            yield from parts

    def _first_step_on_cluster(self, client, cube: xr.DataArray, channels: np.ndarray):
        """:meth:`_first_step` of a lazy cube over the cluster: a task per band of hidden centres, reading its
        rows of the mirrored frame on a worker and sending back its scores."""
        import dask

        shape = (cube.sizes["y"], cube.sizes["x"], cube.sizes["energy"])
        patch, hole, rows_of, cols_of, _ = self._hole_frame(shape[:2])
        padded = self._hole_padded(cube)
        nll = self.scoring == "nll"
        voxel_channels = self._score_channels(cube["energy"].values) if nll else None
        scorer = client.scatter(self, broadcast=True)
        band_rows = self._band_rows(cols_of)
        tasks = []
        for first in range(0, rows_of, band_rows):
            last = min(rows_of, first + band_rows)
            top, bottom = first * hole[0], (last - 1) * hole[0] + patch[0]
            tasks.append(dask.delayed(_first_step_task, pure=True)(scorer, padded[top:bottom], top, shape, nll,
                                                                   voxel_channels, channels, (first, last)))
        for parts in cluster_compute(client, tasks, cube):
            yield from parts

    def _reconstruct_array(self, cube: xr.DataArray) -> np.ndarray:
        """The model's expected counts of every voxel, averaged over the patches covering each pixel
        (``context="neighbours"``: each pixel as its ring of neighbours predicts it)."""
        if self._hole() is not None:
            return np.concatenate([predicted for _, _, predicted, _ in self._inpainted_bands(cube)])
        mean = self._accumulate(cube, ((corners, expected) for corners, _, expected, _ in self._patch_outputs(cube)))
        return np.moveaxis(mean, 0, -1)

    def _score_array(self, cube: xr.DataArray) -> np.ndarray:
        """Scores of each pixel's spectrum against its reconstruction (the same one ``reconstruct`` gives).

        ``scoring="nll"`` instead averages the model's own per-voxel negative log-likelihood over the
        patches that cover a pixel.
        """
        channels = self._score_channels(cube["energy"].values)
        if self._hole() is not None:
            return self._inpainted_scores(cube, channels)
        if is_lazy(cube):
            return self._score_in_bands(cube, channels)
        if self.scoring == "nll":
            return self._accumulate(cube, ((corners, nll[:, channels].mean(axis=1))
                                           for corners, _, _, nll in self._patch_outputs(cube, nll=True)))
        model = self._reconstruct_array(cube)
        counts = np.asarray(cube.transpose("y", "x", "energy").values, dtype=np.float64)
        e = counts.shape[-1]
        scores = score_spectra(counts.reshape(-1, e)[:, channels], model.reshape(-1, e)[:, channels], self.scoring)
        return scores.reshape(counts.shape[:2])

    def _score_in_bands(self, cube: xr.DataArray, channels: np.ndarray) -> np.ndarray:
        """Scores of a lazy cube, reading it a band of rows at a time; the same patches, weights and scores
        as the in-memory path (up to float round-off), with only ~two patch heights of rows in memory.

        The cube is mirrored by half a patch (lazily), the patch corners are those of the whole cube, and
        the rows of corners are run in order: once a row of corners is done, every padded row above the
        next one is covered by all its patches, so it is averaged, scored and let go. While a
        dask.distributed client is current (:func:`~eels_ad.datacube.cluster_client`) the padded rows are
        split over the cluster instead, a part per chunk of the cube's rows: each task reads its rows and
        those of the patches that reach into them, runs the network and sends back its rows' scores.
        """
        import dask.array as da

        patch = _pair(self.patch_size, "patch_size")
        my, mx = self._margin()
        ny, nx = cube.sizes["y"], cube.sizes["x"]
        padded = da.pad(cube.transpose("y", "x", "energy").data, ((my, my), (mx, mx), (0, 0)), mode="symmetric")
        height, width = padded.shape[:2]
        if height < patch[0] or width < patch[1]:  # smaller than a patch: small enough to score in memory
            return self._score_array(cube.load())
        client = cluster_client()
        if client is None:
            _, scores = self._score_padded_rows(lambda start, stop: _read_padded(padded, start, stop, cube),
                                                padded.shape, channels, (0, height))
            return scores
        import dask

        starts = patch_starts(height, patch[0], self._score_step()[0])
        edges = sorted({0, height, *(my + int(edge) for edge in np.cumsum(cube.chunks[0])[:-1])})
        scorer = client.scatter(self, broadcast=True)
        tasks = []
        for r0, r1 in zip(edges[:-1], edges[1:], strict=True):
            # the padded rows of the patches that reach into rows r0:r1
            needed = [y0 for y0 in starts if y0 + patch[0] > r0 and y0 < r1]
            low, high = needed[0], needed[-1] + patch[0]
            tasks.append(dask.delayed(_score_rows_task, pure=True)(scorer, padded[low:high], low, padded.shape,
                                                                   channels, (r0, r1)))
        scores = np.empty((ny, nx))
        for rows, part in cluster_compute(client, tasks, cube):
            scores[rows] = part
        return scores

    @torch.inference_mode()
    def _score_padded_rows(self, read: Callable[[int, int], np.ndarray], padded_shape: tuple[int, ...],
                           channels: np.ndarray, rows: tuple[int, int]) -> tuple[slice, np.ndarray]:
        """(cube rows, their scores) of the padded rows ``rows`` (of the cube mirrored by half a patch), read
        by ``read(start, stop)`` in order; see :meth:`_score_in_bands`."""
        patch = _pair(self.patch_size, "patch_size")
        stride = self._score_step()
        my, mx = self._margin()
        height, width, ne = padded_shape
        ny, nx = height - 2 * my, width - 2 * mx
        first, last = rows
        row_starts = [y0 for y0 in patch_starts(height, patch[0], stride[0]) if y0 + patch[0] > first and y0 < last]
        weight = _centre_weights(patch)
        device = self._device()
        with self._network_on(device):
            nll = self.scoring == "nll"
            cube_rows = slice(max(first - my, 0), max(min(last - my, ny), 0))
            scores = np.empty((cube_rows.stop - cube_rows.start, nx))
            window, window_start = np.empty((0, width, ne), np.float32), row_starts[0]  # padded rows held
            depth = 1 if nll else ne
            total = np.zeros((0, width, depth))  # (rows, x, channels): a finished row's mean is one contiguous block
            covered = np.zeros((0, width))
            done = row_starts[0]  # padded rows finished
            for k, y0 in enumerate(row_starts):
                # read the rows this row of corners needs, drop those finished
                stop = y0 + patch[0]
                held_stop = window_start + window.shape[0]
                if stop > held_stop:
                    new = read(held_stop, stop)
                    window = np.concatenate([window, new])
                    total = np.concatenate([total, np.zeros((new.shape[0], width, depth))])
                    covered = np.concatenate([covered, np.zeros((new.shape[0], width))])
                band = window[y0 - window_start:stop - window_start]
                # one row of corners: the band is a patch high, its corners those of the whole cube in this row
                outputs = self._run_patches(*extract_patches(band, patch, (patch[0], stride[1])), device,
                                            self._score_batch(ne), nll)
                for corners, _, expected, voxel_nll in outputs:
                    value = voxel_nll[:, channels].mean(axis=1, keepdims=True) if nll else expected
                    for (_, x), v in zip(corners, value, strict=True):
                        total[y0 - window_start:stop - window_start, x:x + patch[1]] += np.moveaxis(v, 0, -1) * \
                            weight[..., None]
                        covered[y0 - window_start:stop - window_start, x:x + patch[1]] += weight
                # padded rows above the next row of corners are final: score the cube rows among them (those in
                # ``rows``), a row at a time (the float64 copies and the score's arrays stay a row of spectra)
                # (later corners start at or past ``last``)
                final = row_starts[k + 1] if k + 1 < len(row_starts) else height
                for padded_row in range(max(done, first), min(final, last)):
                    cube_row = padded_row - my
                    if not 0 <= cube_row < ny:
                        continue
                    held = padded_row - window_start
                    mean = total[held, mx:mx + nx] / covered[held, mx:mx + nx, None]
                    out = cube_row - cube_rows.start
                    if nll:
                        scores[out] = mean[:, 0]
                        continue
                    counts = window[held, mx:mx + nx]
                    for start in range(0, nx, self.SCORE_PIXELS):
                        block = slice(start, start + self.SCORE_PIXELS)
                        scores[out, block] = score_spectra(counts[block][:, channels], mean[block][:, channels],
                                                           self.scoring)
                done = final
                keep = done - window_start
                window, total, covered = window[keep:], total[keep:], covered[keep:]
                window_start = done
        return cube_rows, scores

    # -- persistence ------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        weights = {f"model_.{name}": value.detach().cpu().numpy() for name, value in self.model_.state_dict().items()}
        return {**weights, "architecture_": ARCHITECTURE, "history_": self.history_, "context_": self.context_,
                "drift_range_": self.drift_range_,
                "n_parameters_": self.n_parameters_, "training_seconds_": self.training_seconds_,
                "n_calibration_spectra_": self.n_calibration_spectra_, "n_training_patches_": self.n_training_patches_}

    def _set_state(self, state: dict[str, Any]) -> None:
        architecture = int(state.pop("architecture_", 1))
        if architecture != ARCHITECTURE:
            raise ValueError(f"this CVAE was saved with network layout {architecture}, this eels-ad builds layout "
                             f"{ARCHITECTURE}: train it again (eels-ad train --model cvae)")
        weights = {name.removeprefix("model_."): torch.as_tensor(np.asarray(state.pop(name)))
                   for name in [k for k in state if k.startswith("model_.")]}
        # files written before context="auto" hold no context_: the context asked for
        self.context_, self.drift_range_ = state.pop("context_", None) or self.context, state.pop("drift_range_", None)
        self.model_ = CVAE3D(n_channels=self.energy_.size, patch_size=_pair(self.patch_size, "patch_size"),
                             latent_dim=self.latent_dim, widths=tuple(self.widths), likelihood=self.likelihood,
                             beta=self.beta, learning_rate=self.learning_rate, hole=self._hole())
        self.model_.load_state_dict(weights)
        self.model_.eval()
        for name, value in state.items():
            setattr(self, name, value)


def _read_padded(padded, start: int, stop: int, cube: xr.DataArray) -> np.ndarray:
    """Rows ``start:stop`` of the lazily mirrored cube, as float32; a failed read names the file and rows."""
    try:
        return np.asarray(padded[start:stop].compute(), dtype=np.float32)
    except (OSError, RuntimeError, KeyError, EOFError) as error:
        raise DatacubeReadError(cube.attrs.get("source_file", "the lazy datacube"),
                                f"rows near {start}-{stop - 1} (mirrored frame) cannot be read: the file is truncated "
                                f"or damaged there ({type(error).__name__}: {error})") from error


def _score_rows_task(detector: CVAEDetector, band: np.ndarray, first_row: int, padded_shape: tuple[int, ...],
                     channels: np.ndarray, rows: tuple[int, int]) -> tuple[slice, np.ndarray]:
    """A cluster task of :meth:`CVAEDetector._score_in_bands`: ``band`` holds the padded rows from ``first_row``."""
    band = np.asarray(band, dtype=np.float32)
    return detector._score_padded_rows(lambda start, stop: band[start - first_row:stop - first_row], padded_shape,
                                       channels, rows)


def _leading_shapes(bulk: np.ndarray, rank: int, seed: int, sample: int = 4000) -> np.ndarray:
    """(rank, channels): the leading right singular vectors of a seeded sample of the bulk's spectra, each divided by
    its pixel scale (orthonormal rows; zero rows beyond the sample's rank)."""
    spectra = bulk.reshape(-1, bulk.shape[-1])
    chosen = np.sort(np.random.default_rng(seed).choice(len(spectra), min(sample, len(spectra)), replace=False))
    picked = spectra[chosen]
    shapes = picked / pixel_scale(picked)[:, None]
    found = np.linalg.svd(shapes.astype(np.float64), full_matrices=False)[2][:rank]
    return np.vstack([found, np.zeros((rank - len(found), bulk.shape[-1]))])


def _patch_pixels(corners: list, top: int, before: tuple[int, int], size: tuple[int, int]):
    """(rows (N, py), columns (N, px)) in image pixels of patches of ``size`` whose ``corners`` are in a band of the
    mirrored frame from its row ``top``, whose image starts at ``before`` (rows, columns)."""
    rows = top + np.array([y for y, _ in corners])[:, None] + np.arange(size[0]) - before[0]
    cols = np.array([x for _, x in corners])[:, None] + np.arange(size[1]) - before[1]
    return rows, cols


def _beyond_edges(scales: torch.Tensor, corners: list, top: int, before: tuple[int, int],
                  shape: tuple[int, int]) -> torch.Tensor:
    """Patch scales (N, 1, 1, py, px) with those of the pixels beyond the image's edges set to zero (the network
    sees no mirror copy there: :meth:`~eels_ad.detect.cvae.module.CVAE3D.seen_of`); the patches are placed as in
    :func:`_patch_pixels` in an image of ``shape`` (rows, columns)."""
    rows, cols = _patch_pixels(corners, top, before, scales.shape[-2:])
    inside = ((rows >= 0) & (rows < shape[0]))[:, :, None] & ((cols >= 0) & (cols < shape[1]))[:, None, :]
    if inside.all():
        return scales
    return scales * torch.from_numpy(inside)[:, None, None].to(scales.dtype)


def _patch_values(pixels: np.ndarray, corners: list, top: int, before: tuple[int, int],
                  size: tuple[int, int]) -> torch.Tensor:
    """(N, py, px) bool: an image's (rows, columns) bool map ``pixels`` in each patch placed as in
    :func:`_patch_pixels` (False beyond the image's edges)."""
    rows, cols = _patch_pixels(corners, top, before, size)
    ok_rows, ok_cols = (rows >= 0) & (rows < pixels.shape[0]), (cols >= 0) & (cols < pixels.shape[1])
    values = pixels[np.clip(rows, 0, pixels.shape[0] - 1)[:, :, None],
                    np.clip(cols, 0, pixels.shape[1] - 1)[:, None, :]]
    return torch.from_numpy(values & ok_rows[:, :, None] & ok_cols[:, None, :])


def _second_step_task(detector: CVAEDetector, band: np.ndarray, top: int, shape: tuple[int, int, int],
                      blocks: np.ndarray, left_out: np.ndarray, channels: np.ndarray,
                      centre_rows: tuple[int, int]) -> list:
    """A cluster task of :meth:`CVAEDetector._second_step_on_cluster`: ``band`` holds the cube's mirrored frame's
    rows from ``top``; ``left_out`` is the image's map of suspects."""
    band = np.asarray(band, dtype=np.float32)
    parts = detector._predicted_bands(lambda start, stop: band[start - top:stop - top], shape, False, None, blocks,
                                      centre_rows, left_out)
    return list(detector._second_step(parts, channels))


def _first_step_task(detector: CVAEDetector, band: np.ndarray, top: int, shape: tuple[int, int, int], nll: bool,
                     voxel_channels: np.ndarray | None, channels: np.ndarray, centre_rows: tuple[int, int]) -> list:
    """A cluster task of :meth:`CVAEDetector._first_step_on_cluster`: ``band`` holds the mirrored frame's rows
    from ``top``."""
    band = np.asarray(band, dtype=np.float32)
    parts = detector._predicted_bands(lambda start, stop: band[start - top:stop - top], shape, nll, voxel_channels,
                                      None, centre_rows)
    return list(detector._first_step(parts, channels, nll))
