import warnings

import numpy as np
import pytest

import eels_ad
from eels_ad.reconstruct import (
    WaveletBasis,
    blur,
    denoise_cube,
    l1_prox,
    onb_prox,
    rdp_prox,
    rdp_ti_prox,
    scan_mask,
    spiral_tap,
    tv_prox,
)
from eels_ad.reconstruct.penalties import tv_value

ANCHOR_SETTINGS = dict(max_iter=100, min_iter=50, tol=1e-8, stop="step")


@pytest.fixture(scope="module")
def phantom(shared_dir):
    from scipy import io

    data = io.loadmat(shared_dir / "anchors" / "spiraltap" / "phantom128.mat")
    forward, adjoint = blur(data["blur"], method="direct")
    return data["f"].astype(float), data["y"].astype(float), forward, adjoint


@pytest.mark.shared
@pytest.mark.parametrize("penalty,tau,expected,iterations", [("tv", 3.0e-6, 24.41, 67), ("rdp", 2.0, 24.83, 50),
                                                                  ("rdp-ti", 0.6, 25.97, 57)])
def test_reproduces_the_reference_phantom_demo(phantom, penalty, tau, expected, iterations):
    truth, counts, forward, adjoint = phantom
    result = spiral_tap(counts, forward, adjoint, tau=tau, penalty=penalty, truth=truth, **ANCHOR_SETTINGS)
    assert result.recon_error[0] == pytest.approx(0.4389, abs=5e-4)  # the reference's initialisation
    assert 100 * result.recon_error[-1] == pytest.approx(expected, abs=0.2)
    assert abs(result.iterations - iterations) <= 2


@pytest.mark.shared
@pytest.mark.slow
def test_reproduces_the_reference_phantom_onb_demo(phantom):
    truth, counts, forward, adjoint = phantom
    result = spiral_tap(counts, forward, adjoint, tau=1e-5, penalty="onb", truth=truth,
                        **{**ANCHOR_SETTINGS, "tol": 1e-6})
    assert 100 * result.recon_error[-1] == pytest.approx(26.66, abs=0.2)


def test_objective_decreases_and_history_is_recorded():
    rng = np.random.default_rng(0)
    truth = np.zeros((32, 32))
    truth[8:20, 10:24] = 30.0
    counts = rng.poisson(truth + 1.0)
    result = spiral_tap(counts, tau=0.2, penalty="tv", truth=truth, max_iter=30, min_iter=30, stop="iterations")
    assert result.iterations == 30
    assert result.objective.shape == result.times.shape == result.recon_error.shape == (31,)
    assert result.objective[-1] < result.objective[0]
    assert result.recon_error[-1] < 0.8 * result.recon_error[0]
    assert np.all(result.x >= 0)


def test_canonical_recovers_spikes_in_compressed_sensing():
    """A small version of the reference's 1-D demo: sparse spikes, random Bernoulli {0, 1/m} rows."""
    from scipy import sparse

    rng = np.random.default_rng(1)
    n, m, spikes = 4000, 1600, 40
    truth = np.zeros(n)
    truth[rng.choice(n, spikes, replace=False)] = 1e5
    matrix = sparse.random(m, n, density=4e-3, random_state=2, data_rvs=lambda k: np.full(k, 1.0 / m)).tocsr()
    counts = rng.poisson(matrix @ truth)
    result = spiral_tap(counts, lambda x: matrix @ x, lambda v: matrix.T @ v, tau=1e-6, penalty="canonical",
                        truth=truth, max_iter=100, tol=1e-8)
    assert result.recon_error[-1] < 0.2
    assert np.count_nonzero(result.x > 1e3) <= 3 * spikes


def test_duality_gap_certifies_the_l1_solution():
    from scipy import sparse

    rng = np.random.default_rng(1)
    n, m = 2000, 800
    truth = np.zeros(n)
    truth[rng.choice(n, 20, replace=False)] = 1e5
    matrix = sparse.random(m, n, density=8e-3, random_state=3, data_rvs=lambda k: np.full(k, 1.0 / m)).tocsr()
    counts = rng.poisson(matrix @ truth)
    operators = (lambda x: matrix @ x), (lambda v: matrix.T @ v)
    result = spiral_tap(counts, *operators, tau=1e-6, penalty="canonical", stop="gap", tol=1e-4, max_iter=500)
    assert result.converged and result.duality_gap[-1] <= 1e-4 * abs(result.objective[-1])
    assert np.all(result.duality_gap >= 0) and result.duality_gap[-1] < 1e-2 * result.duality_gap[0]
    best = spiral_tap(counts, *operators, tau=1e-6, penalty="canonical", stop="iterations", max_iter=1500)
    assert 0 <= result.objective[-1] - best.objective[-1] <= result.duality_gap[-1]  # the certificate holds
    with pytest.raises(ValueError, match="duality-gap"):
        spiral_tap(counts, *operators, tau=1e-6, penalty="tv", stop="gap")


def test_prox_operators():
    rng = np.random.default_rng(2)
    step = rng.normal(1.0, 2.0, (16, 16))
    np.testing.assert_allclose(l1_prox(step, 0.5), np.maximum(step - 0.5, 0))
    for prox in (tv_prox, onb_prox, rdp_prox, rdp_ti_prox):
        assert np.all(prox(step, 0.3) >= -1e-12)
    # no regularisation: the projection on x >= 0
    np.testing.assert_allclose(tv_prox(step, 0.0), np.maximum(step, 0))
    np.testing.assert_allclose(onb_prox(step, 0.0), np.maximum(step, 0), atol=1e-9)
    # (with negative entries the reference's RDP cost, which it keeps, merges some of them: not a projection)
    np.testing.assert_allclose(rdp_prox(np.abs(step), 0.0), np.abs(step))
    # a constant image is a fixed point; huge lam merges everything into one cell at the mean
    np.testing.assert_allclose(tv_prox(np.full((8, 8), 3.0), 1.0), 3.0)
    np.testing.assert_allclose(rdp_prox(np.abs(step), 1e9), np.abs(step).mean())
    # RDP pads a non-power-of-two image and crops back
    assert rdp_prox(np.abs(step[:12, :10]), 1.0).shape == (12, 10)
    with pytest.raises(ValueError, match="2-D images"):
        rdp_prox(np.ones((4, 4, 4)), 1.0)


def test_rdp_ti_is_the_average_of_rdp_over_every_shift():
    rng = np.random.default_rng(5)
    step = rng.normal(0.0, 3.0, (16, 16))
    step[:8, 4:12] += 10.0
    lam = 5.0
    # with no bound, the reference's single-pixel cost (lam whatever the value) equals rdp_prox's
    spun = np.mean([np.roll(rdp_prox(np.roll(step, (dy, dx), (0, 1)), lam, lower=-np.inf), (-dy, -dx), (0, 1))
                    for dy in range(16) for dx in range(16)], axis=0)
    np.testing.assert_allclose(rdp_ti_prox(step, lam, lower=-np.inf), spun, atol=1e-10)
    assert not np.allclose(spun, rdp_prox(step, lam, lower=-np.inf))  # the shifts matter
    assert rdp_ti_prox(np.abs(step[:12, :10]), 1.0).shape == (12, 10)
    np.testing.assert_allclose(rdp_ti_prox(np.abs(step), 1e9), np.abs(step).mean())


def test_tv_prox_in_3d_with_spectral_weight():
    rng = np.random.default_rng(3)
    cube = rng.poisson(20.0, (8, 8, 32)).astype(float)
    smooth_all = tv_prox(cube, 2.0)
    spatial_only = tv_prox(cube, 2.0, weights=(1.0, 1.0, 0.0))
    # with the energy weight off, the spectral roughness stays
    roughness = lambda x: np.abs(np.diff(x, axis=2)).mean()  # noqa: E731
    assert roughness(smooth_all) < roughness(spatial_only)
    with pytest.raises(ValueError, match="TV weights"):
        tv_prox(cube, 1.0, weights=(1.0, 1.0))




@pytest.mark.parametrize("shape, weights, options", [
    ((9, 7, 33), (1.0, 1.0, 1.0), {}),
    ((9, 1, 33), (1.0, 1.0, 0.5), {}),                           # an axis of length 1
    ((5, 6, 7), (1.0, 0.0, 2.0), dict(lower=0.1, upper=1.5)),   # an axis switched off, both bounds
    ((12, 10, 40), (1.0, 1.0, 1.0), dict(tol=1e-3, n_iter=200)),  # the early stop
])
def test_tv_prox_fused_kernels_equal_the_array_loop(monkeypatch, shape, weights, options):
    import torch

    from eels_ad.reconstruct import _tv_kernels

    assert _tv_kernels.available()
    rng = np.random.default_rng(7)
    step = rng.random(shape) * 3.0
    fused = tv_prox(step, 0.4, weights=weights, **options)
    fused32 = tv_prox(torch.from_numpy(step.astype(np.float32)), 0.4, weights=weights, **options)
    fused_value = tv_value(step, weights)
    workspace = {}
    for _ in range(2):  # the buffers kept from one call to the next give the same result
        np.testing.assert_array_equal(tv_prox(step, 0.4, weights=weights, workspace=workspace, **options), fused)
    monkeypatch.setattr(_tv_kernels, "available", lambda: False)
    loop = tv_prox(step, 0.4, weights=weights, **options)
    loop32 = tv_prox(torch.from_numpy(step.astype(np.float32)), 0.4, weights=weights, **options)
    assert fused_value == pytest.approx(tv_value(step, weights), rel=1e-12)
    assert not np.allclose(loop, step.clip(options.get("lower", 0.0), options.get("upper", np.inf)))  # it smoothed
    np.testing.assert_allclose(fused, loop, rtol=0, atol=1e-12)
    assert isinstance(fused32, torch.Tensor) and fused32.dtype == torch.float32
    np.testing.assert_allclose(fused32.numpy(), loop32.numpy(), rtol=0, atol=1e-5)
def test_haar_basis_is_orthonormal():
    rng = np.random.default_rng(4)
    for shape in ((32, 32), (8, 16, 32)):
        basis = WaveletBasis(shape)
        x = rng.normal(size=shape)
        coefficients, layout = basis.analysis(x)
        assert np.sum(coefficients**2) == pytest.approx(np.sum(x**2))
        np.testing.assert_allclose(basis.synthesis(coefficients, layout), x, atol=1e-12)


def test_bad_input_and_zero_counts():
    with pytest.raises(ValueError, match="negative"):
        spiral_tap(np.array([1.0, -2.0]), tau=1.0)
    with pytest.raises(ValueError, match="NaN"):
        spiral_tap(np.array([1.0, np.nan]), tau=1.0)
    with pytest.raises(ValueError, match="tau must be"):
        spiral_tap(np.ones(4), tau=-1.0)
    with pytest.raises(ValueError, match="penalty must be one of"):
        spiral_tap(np.ones(4), tau=1.0, penalty="l2")
    with pytest.raises(ValueError, match="give both A and AT"):
        spiral_tap(np.ones(4), A=lambda x: x, tau=1.0)
    matrix = np.ones((3, 5))
    with pytest.raises(ValueError, match="shape"):
        spiral_tap(np.ones(4), lambda x: matrix @ x, lambda v: matrix.T @ v, tau=1.0)
    zeros = spiral_tap(np.zeros((8, 8)), tau=1.0, penalty="tv")
    assert not zeros.x.any() and zeros.iterations == 0


def test_denoise_cube_keeps_coords_and_lowers_the_error():
    sim = eels_ad.simulate_fe_l23((16, 16), dose=2.0, anomaly_fraction=0.0, include_expected=True, seed=5)
    cube, truth = sim["counts"], sim["expected"]
    clean = denoise_cube(cube, truth=truth)  # tau chosen from the data
    assert clean.dims == cube.dims and np.array_equal(clean["energy"], cube["energy"])
    assert clean.attrs["tau"] in clean.attrs["tau_candidates"]
    raw_error = float(np.linalg.norm(cube.values - truth.values) / np.linalg.norm(truth.values))
    assert clean.attrs["relative_error"] < 0.25 * raw_error
    # penalising the intensity relative to the mean spectrum beats penalising the counts themselves
    absolute = [denoise_cube(cube, tau=tau, reference=None, truth=truth).attrs["relative_error"]
                for tau in (0.1, 0.3, 1)]
    assert clean.attrs["relative_error"] < min(absolute)
    with pytest.raises(ValueError, match="broadcast"):
        denoise_cube(cube, tau=1.0, reference=np.ones(7))


def test_denoise_cube_chooses_tau_on_a_central_region_and_runs_fixed_steps(monkeypatch):
    from eels_ad.reconstruct import spiral

    sim = eels_ad.simulate_fe_l23((70, 67), energy=np.linspace(690, 740, 24), dose=3.0, anomaly_fraction=0.0,
                                  seed=3)
    cube = sim["counts"]
    seen, solved = [], []
    select, solve = spiral.select_tau, spiral.spiral_tap
    monkeypatch.setattr(spiral, "select_tau", lambda y, *args, **kw: seen.append(y.shape) or select(y, *args, **kw))
    monkeypatch.setattr(spiral, "spiral_tap", lambda y, *args, **kw: solved.append(y.shape) or solve(y, *args, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fixed number of steps by default: no "not converged" warning
        chosen = denoise_cube(cube, max_iter=3, n_iter=5)
    assert seen == [(64, 64, 24)]  # the candidates were tried on 64 x 64 pixels, not 70 x 67
    # one solve per candidate tried, then the whole cube's: the region is not solved again with the chosen weight
    assert solved == [(64, 64, 24)] * len(chosen.attrs["tau_candidates"]) + [(70, 67, 24)]
    assert len(chosen.attrs["tau_candidates"]) >= spiral.TAU_CANDIDATES
    assert chosen.attrs["tau_chosen_on"] == "central region y=3:67, x=1:65" and chosen.attrs["iterations"] == 3
    # the same weight as choosing on that region alone with the whole cube's mean spectrum as reference
    region = denoise_cube(cube.isel(y=slice(3, 67), x=slice(1, 65)), reference=cube.mean(("y", "x")).values,
                          max_iter=3, n_iter=5)
    assert chosen.attrs["tau"] == region.attrs["tau"]
    np.testing.assert_allclose(chosen.attrs["tau_held_out_loss"], region.attrs["tau_held_out_loss"], rtol=1e-9)
    # a stopping rule asked for by its tolerance: the step rule, and the warning when max_iter comes first
    with pytest.warns(UserWarning, match="not converged"):
        ruled = denoise_cube(cube.isel(y=slice(0, 8), x=slice(0, 8)), tau=1.0, tol=1e-12, max_iter=3, n_iter=5)
    assert ruled.attrs["converged"] == 0


def test_tau_region_of_a_sparse_scan_grows_until_it_holds_scanned_pixels(monkeypatch):
    from eels_ad.reconstruct import spiral

    rng = np.random.default_rng(4)
    visited = rng.random((140, 140)) < 0.02  # ~390 scanned pixels, ~80 of them in the central 64 x 64
    sim = eels_ad.simulate_fe_l23((140, 140), energy=np.linspace(690, 740, 12), dose=20.0, anomaly_fraction=0.0,
                                  seed=4)
    seen = []
    select = spiral.select_tau
    monkeypatch.setattr(spiral, "select_tau", lambda y, *args, **kw: seen.append(y.shape) or select(y, *args, **kw))
    chosen = denoise_cube(sim["counts"].where(visited[..., None], 0), visited=visited, max_iter=2, n_iter=3)
    assert seen == [(128, 128, 12)] and chosen.attrs["tau_chosen_on"] == "central region y=6:134, x=6:134"
    assert visited[6:134, 6:134].sum() >= spiral.TAU_MIN_VISITED > visited[38:102, 38:102].sum()
    # a lazy cube's region stops at 4 x 64 pixels: a scan that visits none of them is a clear error
    corner = np.zeros((600, 600), bool)
    corner[:20, :20] = True
    with pytest.raises(ValueError, match="central 256 x 256 pixels, where the scan visited no pixel"):
        spiral._tau_region((600, 600), 64, corner, largest=256)


def test_denoise_cube_fills_a_subsampled_scan():
    sim = eels_ad.simulate_fe_l23((16, 16), dose=50.0, anomaly_fraction=0.0, include_expected=True, seed=6)
    visited = np.random.default_rng(0).random((16, 16)) < 0.25
    observed = sim["counts"].where(visited[..., None], 0).astype(int)
    filled = denoise_cube(observed, penalty="tv", visited=visited, truth=sim["expected"], max_iter=40)
    unvisited_error = np.abs(filled.values[~visited] - sim["expected"].values[~visited]).mean()
    assert unvisited_error < 0.1 * sim["expected"].values.mean()
    # the weight chosen by Poisson thinning is within 25 % of the best of a sweep
    errors = [denoise_cube(observed, penalty="tv", tau=tau, visited=visited, truth=sim["expected"],
                           max_iter=40).attrs["relative_error"] for tau in (0.1, 0.3, 1.0, 3.0, 10.0)]
    assert filled.attrs["relative_error"] < 1.25 * min(errors)
    forward, adjoint = scan_mask(visited)
    assert np.all(forward(np.ones((16, 16, 3)))[~visited] == 0)
    with pytest.raises(ValueError, match="visited no pixel"):
        denoise_cube(observed, tau=1.0, visited=np.zeros((16, 16), bool))


@pytest.mark.parametrize("method", ["direct", "fft"])
@pytest.mark.parametrize("kernel_shape", [(5, 5), (4, 3), (2, 6), (3, 4, 2), (1, 1, 7)])
def test_blur_matches_scipy_and_its_adjoint_is_exact(method, kernel_shape):
    from scipy import signal

    rng = np.random.default_rng(7)
    kernel = rng.random(kernel_shape)
    shape = (20, 17, 9)[: len(kernel_shape)]
    x, y = rng.random(shape), rng.random(shape)
    forward, adjoint = blur(kernel, method=method)
    np.testing.assert_allclose(forward(x), signal.convolve(x, kernel, mode="same"), atol=1e-12)
    assert np.sum(forward(x) * y) == pytest.approx(np.sum(x * adjoint(y)), rel=1e-12)
    with pytest.raises(ValueError, match="dimensions"):
        forward(np.ones((4,) * (len(kernel_shape) + 1)))


@pytest.mark.parametrize("penalty", ["tv", "canonical", "onb"])
def test_torch_backend_runs_the_same_algorithm(penalty):
    import torch

    rng = np.random.default_rng(8)
    truth = np.full((8, 8, 16), 5.0)
    truth[2:6, 3:7] = 20.0
    counts = rng.poisson(truth)
    visited = rng.random((8, 8)) < 0.6
    operators = scan_mask(visited)
    reference = spiral_tap(counts * visited[..., None], *operators, tau=0.5, penalty=penalty, max_iter=15)
    double = spiral_tap(counts * visited[..., None], *operators, tau=0.5, penalty=penalty, max_iter=15,
                        backend="torch", device="cpu", dtype=np.float64)
    single = spiral_tap(counts * visited[..., None], *operators, tau=0.5, penalty=penalty, max_iter=15,
                        backend="torch", device="cpu")
    assert double.iterations == reference.iterations
    np.testing.assert_allclose(double.x, reference.x, rtol=1e-9, atol=1e-9 * reference.x.max())
    np.testing.assert_allclose(single.x, reference.x, atol=1e-3 * reference.x.max())
    assert isinstance(single.x, np.ndarray)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            spiral_tap(counts, tau=0.5, backend="torch", device="cuda")
    with pytest.raises(ValueError, match="backend"):
        spiral_tap(counts, tau=0.5, backend="jax")
