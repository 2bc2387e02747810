"""Ground-truth Fe L2,3 spectrum images with injected anomalies.

The simulator builds, for every pixel, the expected counts

    t(y, x) * [ B * (E / E_ref)^-r  +  c(y, x) * F(E - dE(y, x)) ]

where ``t`` is a smooth thickness (intensity) map, the first term the power-law background, ``c`` a
smooth Fe concentration map and ``F`` the Fe L2,3 edge: two white lines (Voigt profiles: Lorentzian
lifetime broadening convolved with the Gaussian energy resolution) with a chosen L3/L2 area ratio,
on arctan continuum steps with the 2:1 statistical weights of L3 and L2. Channels integrate the
model over their width. The cube is scaled so that the mean pre-edge count per channel equals the
``dose``, then drawn with Poisson noise, or gamma-Poisson (negative-binomial) noise when
``overdispersion > 0`` (variance ``mu + overdispersion * mu**2``).

Anomalies (a chemical shift of the whole edge, a change of the L3/L2 ratio, a change of Fe
intensity) are injected in an exact fraction of pixels laid out as single pixels, blobs or a line,
and returned with their ground truth. :func:`roll_l3_window` reproduces the anomaly protocol of
Sultanov, Buban & Klie (arXiv:2412.16200): a circular roll of the L3 peak window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import xarray as xr
from scipy import ndimage, special
from scipy.interpolate import CubicSpline

from .datacube import DIMS, validate

Layout = Literal["pixels", "clusters", "line"]

DEFAULT_ENERGY = 670.0 + 0.25 * np.arange(320)
"""Default energy axis: 670 - 749.75 eV at 0.25 eV per channel (320 channels)."""

FE_L3_ONSET = 708.5
"""Energy of the Fe L3 white-line maximum in eV (Fe2+, wustite-like)."""

FE_SPIN_ORBIT = 12.9
"""L2 - L3 separation of Fe in eV."""

_OVERSAMPLE = 8


def _voigt(energy: np.ndarray, centre: float, lorentz_hwhm: float, gauss_sigma: float) -> np.ndarray:
    return special.voigt_profile(energy - centre, gauss_sigma, lorentz_hwhm)


def fe_l23_edge(
    energy: np.ndarray,
    *,
    l3: float = FE_L3_ONSET,
    spin_orbit: float = FE_SPIN_ORBIT,
    l3_l2_ratio: float = 4.0,
    white_line_area: float = 4.0,
    continuum: float = 1.0,
    l3_width: float = 0.6,
    l2_width: float = 1.0,
    energy_resolution: float = 1.0,
) -> np.ndarray:
    """Noise-free Fe L2,3 edge (no background), evaluated at the given energies.

    Parameters
    ----------
    energy
        Energies in eV.
    l3
        Position of the L3 white line in eV; L2 lies ``spin_orbit`` eV above.
    spin_orbit
        L2 - L3 separation in eV.
    l3_l2_ratio
        Ratio of the L3 to the L2 white-line areas (about 4 for Fe2+, 5 for Fe3+).
    white_line_area
        Total white-line area in units of the continuum step height x 1 eV.
    continuum
        Height of the continuum step far above the edge (2/3 from L3, 1/3 from L2).
    l3_width, l2_width
        Lorentzian half widths (lifetime broadening) of the white lines in eV.
    energy_resolution
        Full width at half maximum of the Gaussian energy resolution in eV.

    Returns
    -------
    numpy.ndarray
        The edge, same shape as ``energy``.
    """
    if l3_l2_ratio <= 0:
        raise ValueError(f"l3_l2_ratio must be > 0, got {l3_l2_ratio}")
    if energy_resolution <= 0:
        raise ValueError(f"energy_resolution must be > 0 eV, got {energy_resolution}")
    energy = np.asarray(energy, dtype=float)
    sigma = energy_resolution / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    l2 = l3 + spin_orbit
    a3 = white_line_area * l3_l2_ratio / (1.0 + l3_l2_ratio)
    a2 = white_line_area / (1.0 + l3_l2_ratio)
    step_width = np.hypot(energy_resolution, 2 * l3_width) / 2
    step = (2.0 / 3.0) * (0.5 + np.arctan((energy - l3) / step_width) / np.pi)
    step += (1.0 / 3.0) * (0.5 + np.arctan((energy - l2) / step_width) / np.pi)
    decay = np.where(energy > l3, (np.maximum(energy, l3) / l3) ** -2.0, 1.0)
    lines = a3 * _voigt(energy, l3, l3_width, sigma) + a2 * _voigt(energy, l2, l2_width, sigma)
    return continuum * step * decay + lines


def shift_spectrum(values: np.ndarray, energy: np.ndarray, shift: float) -> np.ndarray:
    """Move spectra along energy by ``shift`` eV with cubic-spline interpolation.

    The value at energy E becomes the old value at ``E - shift``. Energies that come from outside
    the axis take the nearest end value (never wrapped around, unlike a circular roll).

    Parameters
    ----------
    values
        Spectra with energy on the last axis.
    energy
        The energy axis in eV (strictly increasing).
    shift
        Shift in eV (positive: towards higher energy loss).

    Returns
    -------
    numpy.ndarray
        The shifted spectra.
    """
    energy = np.asarray(energy, dtype=float)
    if shift == 0:
        return np.array(values, dtype=float, copy=True)
    spline = CubicSpline(energy, np.asarray(values, dtype=float), axis=-1, extrapolate=False)
    source = np.clip(energy - shift, energy[0], energy[-1])
    return spline(source)


def _channel_average(profile_fine: np.ndarray) -> np.ndarray:
    return profile_fine.reshape(*profile_fine.shape[:-1], -1, _OVERSAMPLE).mean(axis=-1)


def _fine_grid(energy: np.ndarray) -> np.ndarray:
    dispersion = (energy[-1] - energy[0]) / (energy.size - 1) if energy.size > 1 else 0.25
    offsets = (np.arange(_OVERSAMPLE) + 0.5) / _OVERSAMPLE - 0.5
    return (energy[:, None] + dispersion * offsets[None, :]).ravel()


def smooth_field(
    shape: tuple[int, int], variation: float, correlation: float, rng: np.random.Generator
) -> np.ndarray:
    """A smooth positive random map with mean 1 and relative spread ``variation``.

    ``correlation`` is the correlation length as a fraction of the larger image side.
    """
    noise = rng.standard_normal(shape)
    sigma = max(correlation * max(shape), 0.5)
    field = ndimage.gaussian_filter(noise, sigma, mode="reflect")
    spread = field.std()
    field = (field - field.mean()) / spread if spread > 0 else np.zeros(shape)
    return np.clip(1.0 + variation * field, 0.05, None)


def anomaly_mask(
    shape: tuple[int, int],
    anomaly_fraction: float,
    layout: Layout = "pixels",
    *,
    cluster_radius: float = 2.0,
    seed: int | np.random.Generator = 0,
) -> np.ndarray:
    """Choose exactly ``round(anomaly_fraction * ny * nx)`` anomalous pixels.

    Parameters
    ----------
    shape
        ``(ny, nx)``.
    anomaly_fraction
        Fraction of anomalous pixels, in [0, 1].
    layout
        ``"pixels"``: scattered single pixels; ``"clusters"``: disk-shaped blobs of radius
        ``cluster_radius`` pixels at random centres; ``"line"``: a band along a random straight line
        across the image, like a grain boundary.
    cluster_radius
        Blob radius in pixels for ``"clusters"``.
    seed
        Seed or generator.

    Returns
    -------
    numpy.ndarray
        Boolean mask of shape ``shape``.
    """
    if not 0.0 <= anomaly_fraction <= 1.0:
        raise ValueError(f"anomaly fraction must be in [0, 1], got {anomaly_fraction}")
    if layout not in ("pixels", "clusters", "line"):
        raise ValueError(f"layout must be 'pixels', 'clusters' or 'line', got {layout!r}")
    rng = np.random.default_rng(seed)
    ny, nx = shape
    n_total = ny * nx
    n_anomalous = int(round(anomaly_fraction * n_total))
    mask = np.zeros(n_total, dtype=bool)
    if n_anomalous == 0:
        return mask.reshape(shape)
    yy, xx = np.mgrid[0:ny, 0:nx]
    if layout == "pixels":
        mask[rng.choice(n_total, n_anomalous, replace=False)] = True
    elif layout == "clusters":
        if cluster_radius <= 0:
            raise ValueError(f"cluster_radius must be > 0 pixels, got {cluster_radius}")
        while mask.sum() < n_anomalous:
            cy, cx = rng.uniform(0, ny), rng.uniform(0, nx)
            distance = np.hypot(yy - cy + 0.5, xx - cx + 0.5).ravel()
            inside = np.flatnonzero((distance <= cluster_radius) & ~mask)
            inside = inside[np.argsort(distance[inside], kind="stable")]
            mask[inside[: n_anomalous - int(mask.sum())]] = True
    else:  # line
        angle = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(0.3, 0.7) * ny, rng.uniform(0.3, 0.7) * nx
        distance = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)).ravel()
        distance += 1e-9 * rng.random(n_total)  # break ties at random
        mask[np.argsort(distance, kind="stable")[:n_anomalous]] = True
    return mask.reshape(shape)


def _oxygen_k_edge(energy: np.ndarray, energy_resolution: float) -> np.ndarray:
    sigma = energy_resolution / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    step = 0.5 + np.arctan((energy - 532.0) / 1.0) / np.pi
    decay = np.where(energy > 532.0, (np.maximum(energy, 532.0) / 532.0) ** -3.0, 1.0)
    peaks = 1.2 * _voigt(energy, 530.5, 0.5, sigma) + 3.0 * _voigt(energy, 540.0, 2.5, sigma)
    return step * decay + peaks


def simulate_fe_l23(
    shape: tuple[int, int] = (64, 64),
    *,
    energy: np.ndarray | None = None,
    dose: float = 200.0,
    edge_jump: float = 0.7,
    white_line_area: float = 10.0,
    l3: float = FE_L3_ONSET,
    l3_l2_ratio: float = 4.0,
    energy_resolution: float = 1.0,
    background_exponent: float = 3.0,
    thickness_variation: float = 0.2,
    concentration_variation: float = 0.05,
    correlation_length: float = 0.25,
    oxygen: bool = False,
    overdispersion: float = 0.0,
    anomaly_fraction: float = 0.01,
    layout: Layout = "pixels",
    shift: float = 1.0,
    anomaly_l3_l2_ratio: float | None = None,
    anomaly_intensity: float = 1.0,
    cluster_radius: float = 2.0,
    noise: bool = True,
    include_expected: bool = False,
    drift: float = 0.0,
    row_jitter: float = 0.0,
    low_loss: bool = False,
    spikes: float = 0.0,
    seed: int = 0,
) -> xr.Dataset:
    """Simulate an Fe L2,3 spectrum image with anomalies and their ground truth.

    Parameters
    ----------
    shape
        ``(ny, nx)`` pixels.
    energy
        Energy axis in eV (default :data:`DEFAULT_ENERGY`, 670 - 749.75 eV at 0.25 eV).
    dose
        Mean counts per channel in the pre-edge window (``l3`` - 15 to ``l3`` - 3 eV), averaged over
        the image (about 200 in the real Fe-oxide SI; 20 is low dose). Over the whole axis when the
        axis has no pre-edge channel.
    edge_jump
        Height of the Fe continuum step relative to the background just before the edge.
    white_line_area
        Area of the two white lines together, in units of the continuum step x 1 eV.
    l3, l3_l2_ratio, energy_resolution
        Bulk edge position (eV), white-line area ratio and resolution FWHM (eV); see
        :func:`fe_l23_edge`.
    background_exponent
        ``r`` of the power-law background ``E**-r``.
    thickness_variation, concentration_variation
        Relative spread of the smooth thickness map (scales everything) and of the Fe concentration
        map (scales the edge only).
    correlation_length
        Correlation length of those maps as a fraction of the image side.
    oxygen
        Add an O K edge near 532 eV (seen only when the axis reaches it).
    overdispersion
        Gamma-Poisson over-dispersion ``alpha``: variance ``mu + alpha * mu**2`` (0: pure Poisson).
    anomaly_fraction
        Exact fraction of anomalous pixels (rounded to a whole number of pixels).
    layout
        ``"pixels"``, ``"clusters"`` or ``"line"`` (see :func:`anomaly_mask`).
    shift
        Chemical shift of the whole Fe edge (onset, L3 and L2) in anomalous pixels, eV.
    anomaly_l3_l2_ratio
        L3/L2 ratio in anomalous pixels (a valence-like change); ``None`` keeps the bulk ratio.
    anomaly_intensity
        Factor on the Fe edge intensity in anomalous pixels.
    cluster_radius
        Blob radius in pixels for ``layout="clusters"``.
    noise
        Draw counts (True) or return the noise-free expectation as ``counts`` (False).
    include_expected
        Also return the noise-free expectation as ``expected``.
    drift
        Largest size (eV) of a smooth energy drift along the scan (a slow function of acquisition
        time: a ramp and a slow oscillation, so smooth down the rows and nearly constant along each
        row), moving the whole spectrum (background and edges). 0 (default): none.
    row_jitter
        Standard deviation (eV) of a further per-row drift offset (a scan line that starts at another
        energy). Drift and jitter together are returned as ``drift`` (y, x, eV).
    low_loss
        Also return the matching low-loss image ``low_loss`` (y, x, ``low_loss_energy``: -10 eV
        upwards at the core loss's dispersion and length): a zero-loss peak (Gaussian of FWHM
        ``energy_resolution``, about 2e5 electrons) and a plasmon near 22 eV whose weight follows
        the thickness, both moved by the same drift (dual EELS). ``zero_loss_drift(sim.low_loss)``
        reads it.
    spikes
        Fraction of voxels hit by an X-ray spike (a single-voxel outlier of 2 - 20 times the
        spectrum's maximum), returned as the mask ``spike`` (y, x, energy).
    seed
        Seed of every random step: the same seed gives the same cube.

    Returns
    -------
    xarray.Dataset
        ``counts`` (y, x, energy), ``anomaly`` (y, x, bool), ``shift`` (y, x, eV) and
        ``l3_l2_ratio`` (y, x); ``expected`` when asked; ``drift``, ``low_loss`` and ``spike`` when
        asked for. ``attrs`` hold every parameter. The drift, the low loss and the spikes draw from
        their own random streams: asking for them leaves everything else of the cube as it was.

    Examples
    --------
    >>> sim = simulate_fe_l23((16, 16), shift=1.0, anomaly_fraction=0.05, seed=1)
    >>> int(sim.anomaly.sum())
    13
    """
    recipe = FeL23Recipe(**{name: value for name, value in locals().items() if name != "recipe"})
    return recipe.simulate()


@dataclass(frozen=True)
class FeL23Recipe:
    """Everything that makes a simulated Fe L2,3 spectrum image: the parameters of :func:`simulate_fe_l23`.

    ``recipe.simulate()`` makes the cube; the same recipe (with its seed) makes the same cube, and
    ``recipe.attrs()`` is what the cube's ``attrs`` record. The sample cube's recipe is
    :data:`eels_ad.data.SAMPLE_RECIPE`.
    """

    shape: tuple[int, int] = (64, 64)
    energy: np.ndarray | None = None
    dose: float = 200.0
    edge_jump: float = 0.7
    white_line_area: float = 10.0
    l3: float = FE_L3_ONSET
    l3_l2_ratio: float = 4.0
    energy_resolution: float = 1.0
    background_exponent: float = 3.0
    thickness_variation: float = 0.2
    concentration_variation: float = 0.05
    correlation_length: float = 0.25
    oxygen: bool = False
    overdispersion: float = 0.0
    anomaly_fraction: float = 0.01
    layout: Layout = "pixels"
    shift: float = 1.0
    anomaly_l3_l2_ratio: float | None = None
    anomaly_intensity: float = 1.0
    cluster_radius: float = 2.0
    noise: bool = True
    include_expected: bool = False
    drift: float = 0.0
    row_jitter: float = 0.0
    low_loss: bool = False
    spikes: float = 0.0
    seed: int = 0

    def check(self) -> np.ndarray:
        """Clear errors for impossible parameters; returns the energy axis (eV)."""
        shape = self.shape
        if len(shape) != 2 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in shape):
            raise ValueError(f"shape must be (ny, nx) with positive whole sizes, got {shape}")
        if not (np.isfinite(self.dose) and self.dose > 0):
            raise ValueError(f"dose must be a finite number > 0 counts per channel, got {self.dose}")
        if not 0.0 <= self.anomaly_fraction <= 1.0:
            raise ValueError(f"anomaly_fraction must be in [0, 1], got {self.anomaly_fraction}")
        if self.layout not in ("pixels", "clusters", "line"):
            raise ValueError(f"layout must be 'pixels', 'clusters' or 'line', got {self.layout!r}")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, got {self.seed!r}")
        if self.overdispersion < 0:
            raise ValueError(f"overdispersion must be >= 0, got {self.overdispersion}")
        if self.anomaly_intensity < 0:
            raise ValueError(f"anomaly_intensity must be >= 0, got {self.anomaly_intensity}")
        for name in ("drift", "row_jitter"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number of eV >= 0, got {value}")
        if not 0.0 <= self.spikes < 1.0:
            raise ValueError(f"spikes must be a fraction of voxels in [0, 1), got {self.spikes}")
        energy = DEFAULT_ENERGY.copy() if self.energy is None else np.asarray(self.energy, dtype=float)
        if energy.ndim != 1 or energy.size < 2 or np.any(np.diff(energy) <= 0):
            raise ValueError("energy must be a strictly increasing 1-D axis of at least 2 channels (eV)")
        span = float(energy[-1] - energy[0])
        if not (np.isfinite(self.shift) and abs(self.shift) < span / 2):
            raise ValueError(f"shift must be a finite number of eV smaller in size than half the energy axis "
                             f"({span / 2:g} eV), got {self.shift}")
        if self.drift + 4 * self.row_jitter >= span / 2:
            raise ValueError(f"drift + 4 row_jitter must stay below half the energy axis ({span / 2:g} eV), "
                             f"got {self.drift} and {self.row_jitter}")
        return energy

    @property
    def anomaly_ratio(self) -> float:
        """The L3/L2 ratio of the anomalous pixels."""
        return self.l3_l2_ratio if self.anomaly_l3_l2_ratio is None else self.anomaly_l3_l2_ratio

    def _edges(self, energy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Background, bulk edge and anomalous edge per channel (averaged over a fine grid)."""
        return tuple(_channel_average(profile) for profile in self._fine_profiles(_fine_grid(energy)))

    def _dose_window(self, energy: np.ndarray) -> tuple[np.ndarray, list[float]]:
        pre_edge = (energy >= self.l3 - 15.0) & (energy <= self.l3 - 3.0)
        if not pre_edge.any():
            return np.ones_like(energy, dtype=bool), [float(energy[0]), float(energy[-1])]
        return pre_edge, [float(self.l3 - 15.0), float(self.l3 - 3.0)]

    def attrs(self, energy: np.ndarray | None = None) -> dict:
        """The recipe as NetCDF-friendly attributes (what the simulated cube records)."""
        energy = self.check() if energy is None else energy
        return {
            "simulator": "eels_ad.simulate.simulate_fe_l23",
            "seed": int(self.seed),
            "dose": float(self.dose),
            "dose_window_eV": self._dose_window(energy)[1],
            "edge_jump": float(self.edge_jump),
            "white_line_area": float(self.white_line_area),
            "l3_eV": float(self.l3),
            "l3_l2_ratio": float(self.l3_l2_ratio),
            "energy_resolution_eV": float(self.energy_resolution),
            "background_exponent": float(self.background_exponent),
            "thickness_variation": float(self.thickness_variation),
            "concentration_variation": float(self.concentration_variation),
            "oxygen": int(self.oxygen),
            "overdispersion": float(self.overdispersion),
            "anomaly_fraction": float(self.anomaly_fraction),
            "layout": self.layout,
            "shift_eV": float(self.shift),
            "anomaly_l3_l2_ratio": float(self.anomaly_ratio),
            "anomaly_intensity": float(self.anomaly_intensity),
            "noise": int(self.noise),
            "drift_eV": float(self.drift),
            "row_jitter_eV": float(self.row_jitter),
            "low_loss": int(self.low_loss),
            "spikes": float(self.spikes),
        }

    def simulate(self) -> xr.Dataset:
        """The cube and its ground truth (see :func:`simulate_fe_l23` for what it holds)."""
        energy = self.check()
        shape = tuple(self.shape)
        rng = np.random.default_rng(self.seed)
        thickness = smooth_field(shape, self.thickness_variation, self.correlation_length, rng)
        concentration = smooth_field(shape, self.concentration_variation, self.correlation_length, rng)
        anomalous = anomaly_mask(shape, self.anomaly_fraction, self.layout, cluster_radius=self.cluster_radius,
                                 seed=rng)
        drift = self.drift_map(shape)
        if drift is None:
            background, bulk_edge, anomalous_edge = self._edges(energy)
        else:
            background, bulk_edge, anomalous_edge = self._drifted_edges(energy, drift)
        edge_map = (concentration * np.where(anomalous, self.anomaly_intensity, 1.0))[..., None]
        if drift is None:
            background, bulk_edge, anomalous_edge = background[None, None], bulk_edge[None, None], \
                anomalous_edge[None, None]
        expected = thickness[..., None] * (
            background + edge_map * np.where(anomalous[..., None], anomalous_edge, bulk_edge)
        )
        pre_edge, _ = self._dose_window(energy)
        expected *= self.dose / expected[..., pre_edge].mean()
        if self.noise:
            rate = expected
            if self.overdispersion > 0:
                rate = rng.gamma(1.0 / self.overdispersion, expected * self.overdispersion)
            counts = rng.poisson(rate).astype(np.int32)
        else:
            counts = expected.astype(np.float64)
        coords = {
            "y": ("y", np.arange(shape[0]), {"units": "px"}),
            "x": ("x", np.arange(shape[1]), {"units": "px"}),
            "energy": ("energy", energy, {"units": "eV", "long_name": "energy loss"}),
        }
        data_vars = {
            "counts": (DIMS, counts, {"units": "counts", "long_name": "electron counts"}),
            "anomaly": (("y", "x"), anomalous, {"long_name": "injected anomaly (ground truth)"}),
            "shift": (("y", "x"), np.where(anomalous, self.shift, 0.0), {"units": "eV", "long_name": "edge shift"}),
            "l3_l2_ratio": (("y", "x"), np.where(anomalous, self.anomaly_ratio, self.l3_l2_ratio),
                            {"long_name": "L3/L2"}),
        }
        if self.spikes > 0:
            spike = self._spikes(counts)
            data_vars["spike"] = (DIMS, spike, {"long_name": "X-ray spike (ground truth)"})
        if self.include_expected:
            data_vars["expected"] = (DIMS, expected, {"units": "counts", "long_name": "noise-free counts"})
        if drift is not None:
            data_vars["drift"] = (("y", "x"), drift, {"units": "eV", "long_name": "energy drift (ground truth)"})
        if self.low_loss:
            low_energy, low = self._low_loss(energy, thickness, np.zeros(shape) if drift is None else drift)
            coords["low_loss_energy"] = ("low_loss_energy", low_energy, {"units": "eV", "long_name": "energy loss"})
            data_vars["low_loss"] = (("y", "x", "low_loss_energy"), low,
                                     {"units": "counts", "long_name": "low-loss electron counts"})
        return xr.Dataset(data_vars, coords=coords, attrs=self.attrs(energy))

    def _stream(self, purpose: int) -> np.random.Generator:
        """A random stream of its own (drift 1, low loss 2, spikes 3), apart from the cube's."""
        return np.random.default_rng([int(self.seed), purpose])

    def drift_map(self, shape: tuple[int, int]) -> np.ndarray | None:
        """The energy drift (y, x) in eV, or None without drift: smooth in scan time, plus row jitter."""
        if self.drift == 0 and self.row_jitter == 0:
            return None
        rng = self._stream(1)
        ny, nx = shape
        time = (np.arange(ny)[:, None] * nx + np.arange(nx)[None, :]) / (ny * nx)  # 0 .. 1 over the scan
        ramp, period, phase = rng.uniform(-1, 1), rng.uniform(0.6, 1.5), rng.uniform(0, 2 * np.pi)
        smooth = ramp * (time - 0.5) + 0.6 * np.sin(2 * np.pi * time / period + phase)
        smooth -= smooth.mean()
        largest = np.abs(smooth).max()
        smooth = self.drift * smooth / largest if largest > 0 else smooth
        jitter = self.row_jitter * rng.standard_normal(ny)[:, None]
        return smooth + jitter

    def _drifted_edges(self, energy: np.ndarray, drift: np.ndarray) -> tuple[np.ndarray, ...]:
        """Background and edges of every pixel moved by its drift: (y, x, energy) each."""
        dispersion = (energy[-1] - energy[0]) / (energy.size - 1)
        pad = int(np.ceil(np.abs(drift).max() / dispersion)) + 2
        wide = energy[0] + dispersion * np.arange(-pad, energy.size + pad)
        profiles = [np.empty(drift.shape + energy.shape) for _ in range(3)]
        recipe = FeL23Recipe(**{**{f: getattr(self, f) for f in self.__dataclass_fields__}, "energy": wide,
                                "drift": 0.0, "row_jitter": 0.0})
        fine_wide = _fine_grid(wide)
        wide_profiles = recipe._fine_profiles(fine_wide)
        fine = _fine_grid(energy)
        step = fine_wide[1] - fine_wide[0]
        for row in range(drift.shape[0]):
            position = (fine[None, :] - drift[row][:, None] - fine_wide[0]) / step
            low = np.clip(np.floor(position).astype(int), 0, fine_wide.size - 2)
            weight = position - low
            for out, profile in zip(profiles, wide_profiles, strict=True):
                out[row] = _channel_average(profile[low] * (1 - weight) + profile[low + 1] * weight)
        return tuple(profiles)

    def _fine_profiles(self, fine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Background, bulk edge and anomalous edge on a fine grid (not channel-averaged)."""
        background = (fine / (self.l3 - 5.0)) ** -self.background_exponent
        if self.oxygen:
            background = background + 0.6 * _oxygen_k_edge(fine, self.energy_resolution)
        edge = dict(l3=self.l3, white_line_area=self.white_line_area, energy_resolution=self.energy_resolution,
                    continuum=self.edge_jump)
        bulk = fe_l23_edge(fine, l3_l2_ratio=self.l3_l2_ratio, **edge)
        anomalous = shift_spectrum(fe_l23_edge(fine, l3_l2_ratio=self.anomaly_ratio, **edge), fine, self.shift)
        return background, bulk, anomalous

    def _spikes(self, counts: np.ndarray) -> np.ndarray:
        """Add X-ray spikes to ``counts`` in place; returns their mask."""
        rng = self._stream(3)
        n = int(round(self.spikes * counts.size))
        mask = np.zeros(counts.size, dtype=bool)
        mask[rng.choice(counts.size, n, replace=False)] = True
        mask = mask.reshape(counts.shape)
        peak = counts.max(axis=-1, keepdims=True)
        height = np.broadcast_to(peak, counts.shape)[mask] * rng.uniform(2, 20, n)
        counts[mask] += np.rint(height).astype(counts.dtype)
        return mask

    def _low_loss(self, energy: np.ndarray, thickness: np.ndarray, drift: np.ndarray) -> tuple[np.ndarray, ...]:
        """The low-loss axis and image: zero-loss peak and plasmon, moved by the drift, Poisson noise."""
        rng = self._stream(2)
        dispersion = (energy[-1] - energy[0]) / (energy.size - 1)
        axis = -10.0 + dispersion * np.arange(energy.size)
        fine = _fine_grid(axis)[None, None, :] - drift[..., None]
        sigma = self.energy_resolution / (2 * np.sqrt(2 * np.log(2)))
        zero_loss = np.exp(-0.5 * (fine / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
        plasmon_energy, plasmon_width = 22.0, 8.0
        loss = np.maximum(fine, 0.0)
        plasmon = (loss * plasmon_width * plasmon_energy ** 2
                   / ((loss ** 2 - plasmon_energy ** 2) ** 2 + (loss * plasmon_width) ** 2))
        plasmon /= np.pi * plasmon_energy / 2  # about unit area
        relative_thickness = 0.4 * thickness[..., None]  # t / lambda
        electrons = 2e5 * dispersion
        profile = electrons * (np.exp(-relative_thickness) * zero_loss
                               + relative_thickness * np.exp(-relative_thickness) * plasmon)
        expected = _channel_average(profile)
        low = rng.poisson(expected).astype(np.int32) if self.noise else expected
        return axis, low


def peak_energy(spectrum: np.ndarray | xr.DataArray, energy: np.ndarray | None = None,
                energy_range: tuple[float, float] | None = None) -> float:
    """Sub-channel position (eV) of the highest peak, by a parabola through its 3 top channels.

    Parameters
    ----------
    spectrum
        One spectrum; a DataArray brings its own ``energy`` coordinate.
    energy
        The energy axis when ``spectrum`` is a plain array.
    energy_range
        ``(e_min, e_max)`` in eV to search in (default: the whole axis), e.g. around L3 or L2.

    Returns
    -------
    float
        Energy of the maximum in eV.
    """
    if isinstance(spectrum, xr.DataArray):
        energy = spectrum["energy"].values
    values = np.asarray(spectrum, dtype=float)
    energy = np.asarray(energy, dtype=float)
    if values.shape != energy.shape:
        raise ValueError(f"spectrum has shape {values.shape} but energy has {energy.shape}")
    inside = (np.ones_like(energy, dtype=bool) if energy_range is None
              else (energy >= energy_range[0]) & (energy <= energy_range[1]))
    if inside.sum() < 3:
        raise ValueError(f"energy_range {energy_range} eV holds fewer than 3 channels")
    index = np.flatnonzero(inside)[np.argmax(values[inside])]
    index = int(np.clip(index, 1, energy.size - 2))
    left, centre, right = values[index - 1 : index + 2]
    curvature = left - 2 * centre + right
    offset = 0.0 if curvature == 0 else 0.5 * (left - right) / curvature
    step = energy[index + 1] - energy[index]
    return float(energy[index] + offset * step)


def roll_l3_window(
    cube: xr.DataArray,
    shift_channels: int,
    *,
    anomaly_fraction: float = 0.014,
    layout: Layout = "pixels",
    half_width: int = 20,
    peak_range: tuple[float, float] | None = None,
    seed: int = 0,
) -> xr.Dataset:
    """The anomaly protocol of Sultanov, Buban & Klie (arXiv:2412.16200).

    In a random ``anomaly_fraction`` of pixels the window of ``2 * half_width + 1`` channels centred on the
    L3 maximum of the mean spectrum is rolled circularly by ``shift_channels`` channels. Unlike a
    physical chemical shift this wraps intensity from one end of the window to the other; it is
    here to compare with the paper's numbers side by side.

    Parameters
    ----------
    cube
        A datacube (``validate`` conventions).
    shift_channels
        Roll in channels (the paper uses 0.9 to 11.4 eV).
    anomaly_fraction, layout, seed
        The anomalous pixels (see :func:`anomaly_mask`).
    half_width
        Channels on each side of the L3 maximum (the paper: 20).
    peak_range
        ``(e_min, e_max)`` eV to look for the L3 maximum (default: the whole axis).

    Returns
    -------
    xarray.Dataset
        ``counts``, ``anomaly`` and ``shift`` (eV) like :func:`simulate_fe_l23`.
    """
    cube = validate(cube, negative="allow")
    mean = cube.mean(("y", "x"))
    energy = cube["energy"].values
    inside = np.ones(energy.size, dtype=bool)
    if peak_range is not None:
        inside = (energy >= peak_range[0]) & (energy <= peak_range[1])
    peak = int(np.flatnonzero(inside)[np.argmax(mean.values[inside])])
    lo, hi = peak - half_width, peak + half_width + 1
    if lo < 0 or hi > energy.size:
        raise ValueError(
            f"the L3 window (channel {peak} +/- {half_width}) runs off the energy axis of {energy.size} channels"
        )
    mask = anomaly_mask((cube.sizes["y"], cube.sizes["x"]), anomaly_fraction, layout, seed=seed)
    counts = cube.values.copy()
    window = counts[mask, lo:hi]
    counts[mask, lo:hi] = np.roll(window, shift_channels, axis=-1)
    dispersion = (energy[-1] - energy[0]) / (energy.size - 1)
    dataset = xr.Dataset(
        {
            "counts": (DIMS, counts, dict(cube.attrs)),
            "anomaly": (("y", "x"), mask),
            "shift": (("y", "x"), np.where(mask, shift_channels * dispersion, 0.0), {"units": "eV"}),
        },
        coords={d: cube[d] for d in DIMS},
        attrs={"protocol": "circular roll of the L3 window (arXiv:2412.16200)",
               "shift_channels": int(shift_channels), "half_width": int(half_width),
               "window_eV": [float(energy[lo]), float(energy[hi - 1])], "anomaly_fraction": float(anomaly_fraction),
               "seed": int(seed)},
    )
    return dataset


def simulate_mixture(
    references: xr.DataArray,
    fraction: np.ndarray | xr.DataArray,
    *,
    energy: np.ndarray | None = None,
    dose: float = 200.0,
    edge_to_background: float = 1.5,
    background_exponent: float = 3.0,
    thickness_variation: float = 0.2,
    correlation_length: float = 0.25,
    noise: bool = True,
    seed: int = 0,
) -> xr.Dataset:
    """A spectrum image of mixtures of reference spectra (e.g. Fe2+ and Fe3+) on a power-law background.

    Each pixel holds ``t(y, x) * [B (E / E0)**-r + s * sum_k f_k R_k(E)]``: a smooth thickness map
    ``t``, the background, and the references mixed with the fractions ``f`` (summing to 1). ``s``
    puts the largest value of the mean mixture at ``edge_to_background`` times the background
    there; the cube is scaled so that the mean count per channel over the axis' first 3 eV (before
    the edge, for references that start at their pre-edge) equals ``dose``.

    Parameters
    ----------
    references
        (component, energy) reference spectra (see :func:`eels_ad.quantify.read_references`).
    fraction
        (y, x) fractions of the first reference when there are two, or (component, y, x) fractions.
    energy
        The cube's axis (eV); default the references' own.
    dose, edge_to_background, background_exponent
        Counts per channel before the edge; edge height over background; the power law's ``r``.
    thickness_variation, correlation_length
        The smooth thickness map (see :func:`smooth_field`).
    noise
        Poisson counts (True) or the noise-free expectation.
    seed
        Seed of every random step.

    Returns
    -------
    xarray.Dataset
        ``counts`` (y, x, energy) and the true ``fraction`` (component, y, x).
    """
    references = references.transpose("component", "energy")
    names = [str(c) for c in references["component"].values]
    fraction = np.asarray(getattr(fraction, "values", fraction), dtype=float)
    if fraction.ndim == 2:
        if len(names) != 2:
            raise ValueError(f"a (y, x) fraction map needs exactly 2 references, got {len(names)}")
        fraction = np.stack([fraction, 1.0 - fraction])
    if fraction.ndim != 3 or fraction.shape[0] != len(names):
        raise ValueError(f"fraction must be (y, x) or ({len(names)}, y, x), got shape {fraction.shape}")
    if np.any(fraction < 0) or not np.allclose(fraction.sum(axis=0), 1.0):
        raise ValueError("fractions must be >= 0 and sum to 1 in every pixel")
    own = np.asarray(references["energy"].values, dtype=float)
    energy = own if energy is None else np.asarray(energy, dtype=float)
    spectra = np.stack([np.interp(energy, own, row, left=row[0], right=row[-1]) for row in references.values])
    rng = np.random.default_rng(seed)
    shape = fraction.shape[1:]
    thickness = smooth_field(shape, thickness_variation, correlation_length, rng)
    background = (energy / energy[0]) ** -background_exponent
    mean_mixture = np.tensordot(fraction.mean(axis=(1, 2)), spectra, axes=1)
    peak = int(np.argmax(mean_mixture))
    scale = edge_to_background * background[peak] / mean_mixture[peak]
    mixture = np.einsum("kyx,kc->yxc", fraction, spectra)
    expected = thickness[..., None] * (background + scale * mixture)
    pre_edge = energy <= energy[0] + 3.0
    expected *= dose / expected[..., pre_edge].mean()
    counts = rng.poisson(expected).astype(np.int32) if noise else expected
    coords = {"y": ("y", np.arange(shape[0]), {"units": "px"}), "x": ("x", np.arange(shape[1]), {"units": "px"}),
              "energy": ("energy", energy, {"units": "eV", "long_name": "energy loss"}), "component": names}
    return xr.Dataset(
        {"counts": (DIMS, counts, {"units": "counts", "long_name": "electron counts"}),
         "fraction": (("component", "y", "x"), fraction, {"long_name": "true fraction of the reference"})},
        coords=coords, attrs={"simulator": "eels_ad.simulate.simulate_mixture", "seed": int(seed), "dose": float(dose)})
