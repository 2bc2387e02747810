"""PCA of the bulk spectra, with Keenan-Kotula Poisson noise normalisation: the baseline detector."""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import numpy as np
from scipy import linalg

from .._threads import pool
from ..datacube import channel_index, cluster_client, fold_rows, is_lazy, work_parts
from ._base import FIT_CONTEXTS, RING_EXCLUSION_PVALUE, SpectrumDetector
from ._scores import score_spectra
from .spatial import ring_prediction
from .threshold import ThresholdMethod

#: inner and outer radius (pixels) of the ring of neighbours that predicts a hidden pixel
NEIGHBOUR_RING: tuple[float, float] = (2.5, 5.0)


def _add_moments_and_lists(a: tuple, b: tuple) -> tuple:
    """The sum of two blocks' moments, and their lists of sample spectra joined (row order)."""
    return _add_moments(a[0], b[0]), a[1] + b[1]


def _add_moments(a: tuple, b: tuple) -> tuple:
    """The sum of two blocks' (channel sums, total counts, cross products)."""
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _accumulate_moments(total: tuple, part: tuple) -> tuple:
    """:func:`_add_moments` into ``total`` (the local fold's own arrays): the cross products held once."""
    channel_sum, counts, cross = total
    channel_sum += part[0]
    cross += part[2]
    return channel_sum, counts + part[1], cross


def _accumulate_moments_and_lists(total: tuple, part: tuple) -> tuple:
    """:func:`_add_moments_and_lists` into ``total``: the moments accumulated in place, the lists joined."""
    total[1].extend(part[1])
    return _accumulate_moments(total[0], part[0]), total[1]


def _cross_products(scaled: np.ndarray) -> np.ndarray:
    """``scaled.T @ scaled``, split over Python threads by rows where a fold has cores to spare
    (:func:`~eels_ad.datacube.work_parts`: on 2 cores, BLAS has one beside the chunk reader, both while it has
    nothing in flight; measured at 128 x 128 x 1024, the robust fit 1.30 -> 1.22 s, medians of 10 alternating)."""
    parts = min(work_parts(), scaled.shape[0] // 256)
    if parts <= 1:
        return scaled.T @ scaled
    bounds = np.linspace(0, scaled.shape[0], parts + 1).astype(int)
    blocks = [scaled[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    products = list(pool(parts).map(lambda block: block.T @ block, blocks))
    total = products[0]
    for product in products[1:]:
        total += product
    return total


#: subspace iterations of :func:`_leading_eigenpairs`' approximate path
SUBSPACE_ITERATIONS: int = 16


def _leading_eigenpairs(gram: np.ndarray, wanted: int, exact: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The ``wanted`` largest eigenvalues (ascending) and their vectors of a symmetric matrix.

    Exact: LAPACK's subset driver (~4x faster than the whole decomposition at 1024 channels). Otherwise
    :data:`SUBSPACE_ITERATIONS` block power iterations of a seeded basis 10 wider than ``wanted``, then
    Rayleigh-Ritz: the eigenpairs well above the rest (the bulk's components, hundreds of times the noise) to
    rounding, those within the noise only roughly, for a tenth of the time.

    In one BLAS thread: at 1,024 channels LAPACK's driver took 0.09 s so, and 0.07 s with two threads when
    rested but 0.12-0.17 s right after other BLAS work (as in a fit: PCA's robust fit 1.25 -> 1.17 s at 128 x
    128 x 1024).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        return _eigenpairs(gram, wanted, exact)


def _eigenpairs(gram: np.ndarray, wanted: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
    n = gram.shape[0]
    if exact or 4 * (wanted + 10) > n:
        return linalg.eigh(gram, subset_by_index=[n - wanted, n - 1], driver="evr", overwrite_a=True,
                           check_finite=False)
    basis = np.random.default_rng(0).standard_normal((n, wanted + 10))
    for _ in range(SUBSPACE_ITERATIONS):
        basis, _ = np.linalg.qr(gram @ basis)
    values, vectors = np.linalg.eigh(basis.T @ gram @ basis)
    return values[-wanted:], basis @ vectors[:, -wanted:]


class PCADetector(SpectrumDetector):
    """Anomalies are spectra the principal components of the bulk cannot reconstruct.

    With ``poisson_normalize=True`` (default) the unfolded spectra X (pixels x channels) are
    weighted as Keenan & Kotula do (and HyperSpy's ``decomposition(normalize_poissonian_noise=True)``):
    divided by sqrt(g_i h_j), g the pixel totals and h the channel totals, scaled so that Poisson noise
    has unit variance, without centring; a spectrum is projected in that space and rescaled. With
    ``poisson_normalize=False`` it is plain centred, unweighted PCA.

    The fit accumulates the channels x channels cross-product matrix over chunks of pixels, so a cube
    larger than memory (a dask-backed DataArray) is fitted exactly with one chunk in memory at a time.

    Parameters
    ----------
    n_components
        Number of components, or ``"auto"``: the components whose eigenvalue rises above the
        Marchenko-Pastur edge of pure noise, ``sigma**2 (1 + sqrt(channels / pixels))**2`` times
        ``1 + auto_margin`` (``sigma**2`` = 1 after Poisson normalisation, the mean count otherwise),
        at most ``max_components``.
    poisson_normalize
        Keenan-Kotula weighting (True) or plain centred PCA (False).
    energy_range
        ``(e_min, e_max)`` eV of the channels to model (default: all).
    scoring
        ``"deviance"`` (mean Poisson deviance), ``"residual"`` (RMS Pearson residual),
        ``"correlation"`` (1 - Pearson r, as Sultanov et al.), ``"shift"`` (``|z|`` of an energy shift of
        the edge, :func:`~eels_ad.detect.edge_shift_z`: far more sensitive to chemical shifts at low dose,
        blind to changes that do not move the edge) or ``"shift+deviance"`` (the larger of that ``|z|`` and
        the deviance standardised by its exact Poisson moments, :func:`~eels_ad.detect.shift_or_deviance`:
        a shift found with the shift test's power, a new peak with most of the deviance's; the default:
        0.5 eV shifts at dose 20 in blobs, a line and single pixels at ROC AUC 0.999-1.000 against
        0.87-0.98 for the deviance, 4 % of bulk-only cubes flagged at the nominal 5 %; benchmarks/README.md).
    score_range
        ``(e_min, e_max)`` eV of the channels that enter the score (default: the fitted ones).
    threshold
        ``"fdr"`` (default: flag at the false-discovery rate ``fdr`` on calibrated p-values, see
        :meth:`~eels_ad.detect.BaseDetector.flag`), ``"auto"`` (the larger of the GMM crossing and the
        ``false_alarm_rate`` quantile of the training scores), ``"otsu"``, ``"gmm"``, ``"fpr"`` or a number;
        see :func:`~eels_ad.detect.choose_threshold`.
    fdr
        The false-discovery rate of ``threshold="fdr"`` (default 5 %).
    false_alarm_rate
        For ``threshold="fpr"`` and ``"auto"``.
    spatial
        Pool each pixel's evidence with its neighbourhood's (default True; :mod:`eels_ad.detect.spatial`):
        ``score`` then maps the pooled evidence in sigma, and ``flag`` is region-aware. False: every
        pixel judged alone.
    empirical_null
        Re-standardise each map's per-pixel p-values to its own null before pooling and flagging (default
        True; :func:`~eels_ad.detect.spatial.empirical_null`): a normal fitted to their normal scores
        below the theoretical null's discoveries (so that the anomalies that stand out do not widen it),
        shrunk towards the theoretical null by the fit's own noise, gives the null's centre and spread,
        stored in the pooled map's attrs (``null_centre``,
        ``null_spread``); the pooled p-values likewise (``pooled_null_centre``, ``pooled_null_spread``),
        as a nuisance with spatial structure pools into false regions. It corrects the centre and spread
        of a nuisance the calibration did not see, not the shape of its tail: under an uncorrected drift
        with another pattern than in training
        (``context="neighbours"``, 8 bulk-only 48 x 48 cubes), the share of p < 0.05 went from 0.007-0.092
        to 0.048-0.090, and the per-pixel flags of three 64 x 64 cells from F1 0.00-0.45 to 0.79-0.99.
        It assumes most pixels are bulk (at least three quarters).
        False: the p-values as the calibration scores give them.
    context
        ``"auto"`` (default): ``"neighbours"`` when the training cube's smooth energy drift spans more than
        :attr:`AUTO_DRIFT_EV` (measured when fitting from the spectra the first pass samples:
        stored as ``drift_range_``), else ``"pixel"``; the choice is
        ``context_``; an image too small for neighbourhoods (:attr:`AUTO_MIN_WHOLE_RINGS`) keeps ``"pixel"``
        (``drift_range_`` None). Measured on 64 x 64 Fe L2,3 cubes at dose 20: a drift of +-0.1 eV spans 0.22-0.24 eV
        (pixel), +-0.25 eV 0.52-0.54 (neighbours), none 0.06. Under a +-1 eV drift the pixel context's AUC
        for 0.5 eV local shifts is 0.55-0.62, the neighbours' 0.998-1.000 (``benchmarks/spatial.py``); without
        drift the pixel context flags fewer bulk pixels.
        ``"pixel"``: each spectrum is reconstructed from its own projection on the components.
        ``"neighbours"``: from the mean component scores of the pixels 3 to 5 pixels away, the pixel
        itself hidden, rescaled to its counts: what the neighbourhood predicts (at the image's edges a
        plane through the ring's scores, extrapolated to the pixel, rather than a mean that would sit
        inside the image; vacuum pixels take no part). A smooth nuisance (an
        uncorrected energy drift, thickness) is then predicted, while a local change (a chemical shift
        of a few pixels) is not explained away by components that learned the drift.
    max_components, auto_margin
        For ``n_components="auto"``.
    robust
        Train on a cube that may hold anomalies: after the fit, drop the training spectra whose
        component scores are outliers (robust Mahalanobis distance of a minimum covariance
        determinant fit to a seeded sample of 500 spectra, reweighted once, above the
        ``robust_quantile`` of chi-squared) and fit again without them: one step (:attr:`TRIM_ROUNDS`),
        one more pass over the cube, the moments less the dropped spectra. A few anomalous pixels
        otherwise get a component of their own and are reconstructed well. (Measured on a 96 x 96 cube
        with 3 % shifted blobs: the same AUC, F1 and bulk calibration as 4 rounds; MCD on 500 spectra
        5x faster than on 1,500, the same flags.)
    robust_quantile
        For ``robust``.
    chunk_pixels
        Pixels per chunk when fitting and scoring (default 1024: a few MB per chunk at 1024 channels,
        which stays in cache and scores 25 % faster than 8192; a lazy cube is read in whole chunks of rows).

    Attributes
    ----------
    components_ : ndarray (n_components, channels)
        Principal axes in the (weighted) channel space.
    explained_variance_ratio_ : ndarray
        Fraction of the (weighted) variance of each leading component: those that can be kept and one more
        (``max_components + 1`` with ``n_components="auto"``, else ``n_components + 1``).
    eigenvalues_ : ndarray
        Their eigenvalues (variances), largest first.
    n_components_ : int
        Number of components kept.
    n_trimmed_ : int
        Training spectra left out as outliers by ``robust`` (0 otherwise).
    context_ : str
        The context in use: ``context``, or what ``"auto"`` chose.
    drift_range_ : float or None
        With ``context="auto"``: the span (eV) of the training cube's smooth energy drift that chose it.
    channel_weights_ : ndarray (channels,)
        sqrt of the mean bulk spectrum (Poisson) or ones.
    mean_ : ndarray (channels,)
        Mean bulk spectrum (zeros when ``poisson_normalize``: no centring).
    energy_ : ndarray
        The fitted energy axis in eV.
    calibration_scores_ : ndarray
        Scores of training spectra kept (after ``robust`` trimming): they calibrate the threshold. With the
        pixel context, a seeded sample of at most :attr:`CALIBRATION_SAMPLE` (held from the first pass, so
        that calibrating needs no pass of its own); with the neighbour context, all of them.
    noise_edge_ : float
        With ``n_components="auto"``: the eigenvalue a component had to exceed.

    Examples
    --------
    >>> import eels_ad
    >>> from eels_ad.detect import PCADetector
    >>> bulk = eels_ad.simulate_fe_l23((24, 24), anomaly_fraction=0.0, seed=1)["counts"]
    >>> test = eels_ad.simulate_fe_l23((24, 24), anomaly_fraction=0.02, shift=1.0, seed=2)
    >>> det = PCADetector(n_components=3).fit(bulk)
    >>> scores = det.score(test["counts"])
    >>> bool(scores.where(test.anomaly).min() > scores.where(~test.anomaly).median())
    True
    """

    def __init__(
        self,
        n_components: int | str = "auto",
        *,
        poisson_normalize: bool = True,
        energy_range: tuple[float, float] | None = None,
        scoring: str = "shift+deviance",
        score_range: tuple[float, float] | None = None,
        threshold: ThresholdMethod | float = "fdr",
        fdr: float = 0.05,
        false_alarm_rate: float = 0.001,
        spatial: bool = True,
        empirical_null: bool = True,
        max_components: int = 20,
        auto_margin: float = 0.1,
        robust: bool = False,
        robust_quantile: float = 0.999,
        chunk_pixels: int = 1024,
        context: str = "auto",
    ) -> None:
        self.energy_range = energy_range
        self.scoring = scoring
        self.score_range = score_range
        self.threshold = threshold
        self.fdr = fdr
        self.false_alarm_rate = false_alarm_rate
        self.spatial = spatial
        self.empirical_null = empirical_null
        self.chunk_pixels = chunk_pixels
        self.n_components = n_components
        self.poisson_normalize = poisson_normalize
        self.max_components = max_components
        self.auto_margin = auto_margin
        self.robust = robust
        self.robust_quantile = robust_quantile
        self.context = context

    def _check_params(self) -> None:
        super()._check_params()
        if self.context not in FIT_CONTEXTS:
            raise ValueError(f"context must be one of {FIT_CONTEXTS}, got {self.context!r}")

    def _fit(self, cube, mask: np.ndarray | None, energy: np.ndarray) -> np.ndarray | None:
        """One pass for the moments and a seeded sample of spectra; robust: one pass per trimming round.

        Each pass is a :func:`~eels_ad.datacube.fold_rows` over the cube's rows (split over the cluster
        where a dask.distributed client is current). A round finds the outliers with the robust fit to
        the component scores of part of the sample and returns the spectra newly dropped, so the next
        components come from the moments less those spectra without reading the cube again (trimming
        is monotone: a dropped spectrum stays out). With the pixel context the sample's kept spectra,
        scored by the final model, calibrate the p-values (``fit`` needs no pass of its own): at most
        :attr:`CALIBRATION_SAMPLE` of them, all of a smaller training set. Returns the mask of the
        training spectra kept (robust), else None.
        """
        cube = cube.transpose("y", "x", "energy")
        ny, nx = cube.sizes["y"], cube.sizes["x"]
        training = np.ones((ny, nx), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        pixels = np.flatnonzero(training.ravel())  # the training spectra, in pixel order
        n_train = pixels.size
        self._sample_scores = None
        rng = np.random.default_rng(0)
        size = min(self.CALIBRATION_SAMPLE, n_train)
        sample_pixels = pixels[np.sort(rng.choice(n_train, size, replace=False))]

        def first_pass(rows: slice, spectra: np.ndarray, rows_training: np.ndarray):
            kept = rows_training.ravel()
            low = rows.start * nx
            inside = sample_pixels[(sample_pixels >= low) & (sample_pixels < rows.stop * nx)]
            return (self._moments([spectra if kept.all() else spectra[kept]]),
                    [spectra[inside - low].astype(np.float32)])

        moments, parts = fold_rows(cube, first_pass, _add_moments_and_lists, work_pixels=self.chunk_pixels,
                                   rows_wanted=training.any(axis=1), row_data=training,
                                   accumulate=_accumulate_moments_and_lists)
        sample = np.concatenate(parts)
        del parts
        self._components_from(moments, energy, n_train, exact=not self.robust)  # robust: a second fit follows
        self.n_trimmed_ = 0
        context = None
        keep = training.copy()  # (y, x): training spectra not trimmed
        limit = self.TRIMMED_HELD
        # the robust fit's spectra: a seeded part of the sample
        judged = sample[np.sort(rng.permutation(size)[:min(self.MCD_SAMPLE, size)])]
        for trim_round in range(self.TRIM_ROUNDS if self.robust else 0):
            # beside the main thread, which meanwhile starts the trimming pass and waits for its first chunk: the
            # robust fit, then the drift that context="auto" measures (it needs only the sample) while the pass
            # waits on the chunk reader (0.06 s and 0.13 s of a 1.3 s fit at 128 x 128 x 1024); the drift only for
            # images of at most SIDE_DRIFT_PIXELS, as its model spans every pixel (~100 MiB at 512 x 512, held
            # beside the pass's chunks) for a small share of a large cube's fit (1.4 of 45 s at 512 x 512 x 1024)
            robust = pool(1, "side").submit(self._robust_fit, self._features(self._coefficients(judged)))
            if context is None and ny * nx <= self.SIDE_DRIFT_PIXELS:
                context = pool(1, "side").submit(self._resolved_context, sample, sample_pixels, energy, (ny, nx))
            if is_lazy(cube) and cluster_client() is not None:  # the cluster's tasks carry the fit, not a future
                robust = robust.result()

            def trim_pass(rows: slice, spectra: np.ndarray, rows_keep: np.ndarray, robust=robust):
                location, precision, cut = robust if isinstance(robust, tuple) else robust.result()
                kept = np.flatnonzero(rows_keep.ravel())
                centred = self._features(self._coefficients(spectra[kept])) - location
                # trimming is monotone: a spectrum once dropped stays out (the components without it may no
                # longer see it as an outlier, which would make the rounds oscillate)
                dropped = kept[np.einsum("ij,jk,ik->i", centred, precision, centred) > cut]
                return dropped + rows.start * nx, spectra[dropped].astype(np.float32)

            def gather(a, b):
                held = None if a[1] is None or b[1] is None or a[0].size + b[0].size > limit else \
                    np.concatenate([a[1], b[1]])
                return np.concatenate([a[0], b[0]]), held

            dropped, held = fold_rows(cube, trim_pass, gather, work_pixels=self.chunk_pixels,
                                      rows_wanted=keep.any(axis=1), row_data=keep)
            if dropped.size == 0:
                if trim_round == 0:  # the first round's components are approximate: not kept
                    self._components_from(moments, energy, n_train)
                break
            now_dropped = np.zeros_like(keep)
            now_dropped.ravel()[dropped] = True
            if held is None or dropped.size > limit:  # too many to hold: their moments from a pass over their rows
                del held
                removed = fold_rows(cube, lambda rows, spectra, chosen: self._moments([spectra[chosen.ravel()]]),
                                    _add_moments, work_pixels=self.chunk_pixels, rows_wanted=now_dropped.any(axis=1),
                                    row_data=now_dropped, accumulate=_accumulate_moments)
            else:
                removed = self._moments(self._work_blocks_of(held))
                del held
            # dropped now: their moments subtracted
            moments = tuple(m - k for m, k in zip(moments, removed, strict=True))
            keep &= ~now_dropped
            self._components_from(moments, energy, int(keep.sum()))
            self.n_trimmed_ = int(n_train - keep.sum())
        self.context_, self.drift_range_ = context.result() if context is not None else \
            self._resolved_context(sample, sample_pixels, energy, (ny, nx))
        if self.context_ == "pixel":  # the kept sample's scores, a work block at a time
            kept = sample[keep.ravel()[sample_pixels]]
            channels = channel_index(self._score_channels(energy))
            scores = []
            for spectra in self._work_blocks_of(kept):
                model = self._reconstruct_spectra(spectra)
                scores.append(score_spectra(spectra[:, channels], model[:, channels], self.scoring))
            self._sample_scores = np.concatenate(scores) if scores else np.empty(0)
        return keep.ravel()[pixels] if self.robust else None

    def _context_reach(self) -> int:
        """Pixels from a pixel to the far side of its ring of neighbours (``context="auto"``'s size test)."""
        return int(np.ceil(NEIGHBOUR_RING[1]))

    def _work_blocks_of(self, held: np.ndarray) -> Iterator[np.ndarray]:
        """Spectra held as float32 (the sample, trimmed ones), as float64 a work block at a time."""
        step = max(self.chunk_pixels, 1)
        return (held[first:first + step].astype(np.float64) for first in range(0, held.shape[0], step))

    #: images of at most this many pixels have their drift estimate (``context="auto"``) made beside the trimming
    #: pass; larger ones after it, so that its model of every pixel is not held beside the pass's chunks
    SIDE_DRIFT_PIXELS = 256 * 256
    #: spectra drawn (seeded) for the robust fit of the component scores (minimum covariance determinant)
    MCD_SAMPLE = 500
    #: trimming rounds at most, each a pass over the cube (1: one step, as MCD's reweighting step)
    TRIM_ROUNDS = 1
    #: spectra newly trimmed in a round that come back with it (float32) at most; beyond, their moments come from a
    #: pass over their rows
    TRIMMED_HELD = 4000
    #: training spectra (seeded) held from the first pass, as float32: the robust fit's sample comes from them, and
    #: with the pixel context their scores calibrate the p-values
    CALIBRATION_SAMPLE = 4000

    def _features(self, coefficients: np.ndarray) -> np.ndarray:
        """The component scores that outliers are judged on: the first Poisson component (the mean spectrum
        times thickness) left out."""
        return coefficients[:, 1:] if self.poisson_normalize and coefficients.shape[1] > 1 else coefficients

    def _robust_fit(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """(location, precision, cut) of the sample's component scores: MCD, then one reweighting step."""
        from scipy import stats
        from sklearn.covariance import MinCovDet

        dims = features.shape[1]
        mcd = MinCovDet(random_state=0).fit(features)
        inside = mcd.mahalanobis(features) <= stats.chi2.ppf(0.975, dims)
        location = features[inside].mean(axis=0)
        covariance = np.atleast_2d(np.cov(features[inside] - location, rowvar=False))
        # consistency of the covariance of a chi-squared-truncated normal sample
        scale = stats.chi2.cdf(stats.chi2.ppf(0.975, dims), dims + 2) / 0.975
        return location, np.linalg.pinv(covariance) * scale, float(stats.chi2.ppf(self.robust_quantile, dims))

    def _moments(self, blocks) -> tuple[np.ndarray, float, np.ndarray]:
        """(channel sums, total counts, cross-product matrix) of the spectra of ``blocks``, Poisson-scaled when
        normalising (spectra dropped by trimming are taken out by subtracting their moments).

        Double precision throughout: single-precision cross products about each block's mean measured 1.5x
        faster per block at 1,024 channels (0.2 s of PCA's 2 s at 128 x 128 x 1024) but left scores ~2e-5
        apart between a lazy cube and the same cube in memory (their work blocks differ), where double
        precision keeps them within 1e-9.
        """
        channel_sum, total, gram = 0.0, 0.0, 0.0
        for spectra in blocks:
            if self.poisson_normalize:
                pixel_totals = np.maximum(spectra.sum(axis=1, keepdims=True), 1e-12)
                scaled = spectra / np.sqrt(pixel_totals)
            else:
                scaled = spectra
            block_sums = spectra.sum(axis=0)
            channel_sum = channel_sum + block_sums
            total = total + float(block_sums.sum())  # from the channel sums: one pass over the spectra fewer
            part = _cross_products(scaled)
            del scaled
            if isinstance(gram, np.ndarray):
                gram += part  # in place: the channels x channels matrix is not held twice
            else:
                gram = part
        return np.asarray(channel_sum, dtype=float), float(total), np.asarray(gram, dtype=float)

    def _coefficients(self, spectra: np.ndarray) -> np.ndarray:
        """Component scores of spectra, per unit pixel weight."""
        analysis, _, offset = self._projectors()
        coefficients = spectra @ analysis
        coefficients -= offset
        if self.poisson_normalize:
            coefficients /= np.sqrt(np.maximum(spectra.sum(axis=1, keepdims=True), 1e-12))
        return coefficients

    def _projectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(channels x components, components x channels, components): the components divided and multiplied by
        the channel weights, and the mean's coefficients, so that ``((x - mean) / w) @ V.T = x @ A - offset`` and
        ``(c @ V) * w = c @ S``: a spectrum goes to its coefficients and back by two thin products, without
        temporaries of the spectra's size (kept until the components change)."""
        cached = getattr(self, "_projector_cache", None)
        if cached is None or cached[0] is not self.components_ or cached[1] is not self.channel_weights_ \
                or cached[2] is not self.mean_:
            analysis = self.components_.T / self.channel_weights_[:, None]
            cached = (self.components_, self.channel_weights_, self.mean_, analysis,
                      self.components_ * self.channel_weights_, self.mean_ @ analysis)
            self._projector_cache = cached
        return cached[3:]

    def _components_from(self, moments: tuple[np.ndarray, float, np.ndarray], energy: np.ndarray,
                         n_train: int, exact: bool = True) -> None:
        """Components, eigenvalues and weights from the moments. ``exact=False`` (the components that only judge
        which spectra robust trimming leaves out): the leading eigenpairs by a few seeded subspace iterations
        instead of LAPACK (:func:`_leading_eigenpairs`)."""
        if not (self.n_components == "auto" or (isinstance(self.n_components, (int, np.integer))
                                                and self.n_components >= 1)):
            raise ValueError(f"n_components must be a positive integer or 'auto', got {self.n_components!r}")
        channel_sum, total, cross = moments
        n_channels = energy.size
        mean_spectrum = channel_sum / n_train
        if self.poisson_normalize:
            if total <= 0:
                raise ValueError("the training spectra hold no counts: Poisson normalisation needs counts")
            # weights such that x_ij / (sqrt(g_i) w_j) has unit Poisson variance: mu_ij ~ g_i h_j / T
            channel_weights = np.sqrt(np.maximum(channel_sum / total, 1e-12))
            mean = np.zeros(n_channels)
            gram = cross / channel_weights[:, None]  # one channels x channels array, scaled in place
            gram /= channel_weights
        else:
            channel_weights = np.ones(n_channels)
            mean = mean_spectrum
            gram = np.outer(mean, -n_train * mean)
            gram += cross
        gram /= n_train
        if self.n_components != "auto" and int(self.n_components) > min(n_channels, n_train):
            raise ValueError(
                f"n_components={int(self.n_components)} exceeds min(channels, training spectra) = "
                f"{min(n_channels, n_train)}"
            )
        # only the leading eigenpairs (one more than can be kept, to show where the noise starts): LAPACK's
        # subset driver is ~4x faster than the whole decomposition at 1024 channels; the variance ratios come
        # from the trace
        wanted = min(n_channels, (self.max_components if self.n_components == "auto" else int(self.n_components)) + 1)
        total_variance = float(np.trace(gram))
        eigenvalues, eigenvectors = _leading_eigenpairs(gram, wanted, exact)
        del gram
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues = np.maximum(eigenvalues[order], 0.0)
        if self.n_components == "auto":
            noise_variance = 1.0 if self.poisson_normalize else max(float(mean_spectrum.mean()), 1e-12)
            edge = noise_variance * (1 + np.sqrt(n_channels / n_train)) ** 2 * (1 + self.auto_margin)
            above = int(np.sum(eigenvalues > edge))
            n_keep = int(np.clip(above, 1, self.max_components))
            self.noise_edge_ = float(edge)
            if above > self.max_components:
                import warnings

                warnings.warn(
                    f"PCADetector: more than {self.max_components} components rise above the noise edge but "
                    f"max_components={self.max_components} keeps {n_keep}. With Poisson normalisation this usually "
                    "means the counts are not electron counts (a detector gain: run eels_ad.prepare.prepare first) "
                    "or the image holds more than one material; raise max_components or set n_components",
                    UserWarning, stacklevel=4)
        else:
            n_keep = int(self.n_components)
        self.eigenvalues_ = eigenvalues
        self.explained_variance_ratio_ = eigenvalues / total_variance if total_variance > 0 else eigenvalues
        self.components_ = eigenvectors[:, order[:n_keep]].T.copy()
        self.n_components_ = n_keep
        self.channel_weights_ = channel_weights
        self.mean_ = mean

    def _reconstruct_spectra(self, spectra: np.ndarray) -> np.ndarray:
        # a pixel's own weight sqrt(g_i) cancels in projection then rescaling, so each spectrum is
        # reconstructed from itself alone (scores never depend on the rest of the cube)
        analysis, synthesis, offset = self._projectors()
        coefficients = spectra @ analysis
        coefficients -= offset
        projected = coefficients @ synthesis
        if not self.poisson_normalize:  # centred PCA (Poisson normalisation does not centre: mean_ is 0)
            projected += self.mean_
        return projected

    def _own_coefficients(self, cube) -> np.ndarray:
        """(y, x, components): each pixel's own component scores (one pass over the cube)."""
        ny, nx = cube.sizes["y"], cube.sizes["x"]
        coefficients = np.empty((ny, nx, self.n_components_))
        parts = fold_rows(cube, lambda rows, spectra, _: [(rows, self._coefficients(spectra))], operator.add,
                          work_pixels=self.chunk_pixels)
        for rows, part in parts:
            coefficients[rows] = part.reshape(-1, nx, self.n_components_)
        return coefficients

    def _neighbour_coefficients(self, cube, coefficients: np.ndarray | None = None,
                                exclude: np.ndarray | None = None) -> np.ndarray:
        """(y, x, components): each pixel's component scores predicted from its ring of neighbours.

        The ring's mean inside the image; at edges and corners a local plane through the ring's scores
        (:func:`~eels_ad.detect.spatial.ring_prediction`), so that a gradient is not read as a change.
        Vacuum pixels, and ``exclude`` (y, x) where given, do not predict others.
        """
        if coefficients is None:
            coefficients = self._own_coefficients(cube)
        valid = ~np.asarray(cube["vacuum"].values, dtype=bool) if "vacuum" in cube.coords else \
            np.ones(coefficients.shape[:2], dtype=bool)
        if exclude is not None:
            valid = valid & ~exclude
        predicted = ring_prediction(coefficients, *NEIGHBOUR_RING, valid=valid)
        # a pixel whose whole ring is left out keeps its own scores (it is itself vacuum or an island)
        return np.where(np.isfinite(predicted), predicted, coefficients)

    def _score_array(self, cube) -> np.ndarray:
        """Scores chunk by chunk; with ``context="neighbours"`` in two steps once fitted.

        A ring that holds anomalous pixels predicts its centre wrongly: the bulk pixels beside a shifted
        blob look shifted the other way (a halo of false flags) and the blob's own edge pixels are
        half explained by the blob. So the pixels whose p-value falls below :data:`RING_EXCLUSION_PVALUE`
        are left out of the rings, and the pixels whose rings held any of them are scored again
        (their rows are read once more).
        """
        if self._context() != "neighbours":
            return super()._score_array(cube)
        cube = cube.transpose("y", "x", "energy")
        own = self._own_coefficients(cube)
        context = self._neighbour_coefficients(cube, own)
        scores = self._rows_scores(cube, context)
        if getattr(self, "calibration_scores_", None) is None:  # fitting: these scores are the calibration
            return scores
        vacuum = np.asarray(cube["vacuum"].values, dtype=bool) if "vacuum" in cube.coords else None
        suspect = self._pixel_pvalues(scores, vacuum)[0] < RING_EXCLUSION_PVALUE
        if not suspect.any():
            return scores
        refined = self._neighbour_coefficients(cube, own, exclude=suspect)
        changed = np.any(refined != context, axis=-1)
        # the changed pixels' new contexts (NaN elsewhere: not scored again)
        again = np.where(changed[..., None], refined, np.nan)
        return self._rows_scores(cube, again, rows_wanted=changed.any(axis=1), scores=scores)

    def _predicted_spectra(self, spectra: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
        """Spectra from component scores (per unit pixel weight), rescaled to each spectrum's counts."""
        model = coefficients @ self._projectors()[1]
        if self.poisson_normalize:
            model *= np.sqrt(np.maximum(spectra.sum(axis=1, keepdims=True), 1e-12))
        else:
            model += self.mean_
        return model

    def _strata(self, shape: tuple[int, int]) -> np.ndarray | None:
        """With ``context="neighbours"``: 1 in the band along the image's edges where the ring is cut (a plane
        extrapolates it: under a curved drift its null tail is heavier, measured P(z > 3) 0.0022-0.0024
        against 0.0006-0.0008 inside), 0 inside; each calibrated by its own training pixels."""
        if self._context() != "neighbours":
            return None
        ny, nx = shape
        yy, xx = np.ogrid[:ny, :nx]
        border = np.minimum(np.minimum(yy, ny - 1 - yy), np.minimum(xx, nx - 1 - xx))
        return (border < NEIGHBOUR_RING[1]).astype(np.int8)

    def _model_context(self, cube) -> np.ndarray | None:
        """With ``context="neighbours"``: the (y, x, components) mean scores of each pixel's ring."""
        return self._neighbour_coefficients(cube) if self._context() == "neighbours" else None

    def _rows_model(self, spectra: np.ndarray, rows: slice, context: np.ndarray | None) -> np.ndarray:
        """Per-spectrum models (``context="pixel"``), or each pixel predicted by its ring of neighbours."""
        if context is None:
            return self._reconstruct_spectra(spectra)
        return self._predicted_spectra(spectra, context[rows].reshape(spectra.shape[0], -1))

    def _state(self) -> dict[str, Any]:
        state = {
            "components_": self.components_, "channel_weights_": self.channel_weights_, "mean_": self.mean_,
            "eigenvalues_": self.eigenvalues_, "explained_variance_ratio_": self.explained_variance_ratio_,
            "n_trimmed_": self.n_trimmed_, "context_": self.context_, "drift_range_": self.drift_range_,
        }
        if hasattr(self, "noise_edge_"):
            state["noise_edge_"] = self.noise_edge_
        return state

    def _set_state(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, np.asarray(value) if isinstance(value, np.ndarray) else value)
        self.n_components_ = int(self.components_.shape[0])
        if getattr(self, "context_", None) is None:  # files written before context="auto": the context asked for
            self.context_, self.drift_range_ = self.context, None
