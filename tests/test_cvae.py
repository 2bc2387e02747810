import numpy as np
import pytest
import torch
import xarray as xr
from sklearn.metrics import roc_auc_score

import eels_ad
from eels_ad.detect import CVAEDetector, NotFittedError
from eels_ad.detect.cvae.data import PatchDataModule, extract_patches, patch_starts, random_dihedral
from eels_ad.detect.cvae.module import CVAE3D, gaussian_nll, poisson_nll

TINY = dict(widths=(4, 8, 8), latent_dim=4, max_epochs=2, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def small_cubes():
    energy = 690.0 + 0.5 * np.arange(64)
    bulk = eels_ad.simulate_fe_l23((12, 12), energy=energy, anomaly_fraction=0.0, seed=1)["counts"]
    test = eels_ad.simulate_fe_l23((13, 11), energy=energy, anomaly_fraction=0.05, shift=2.0, seed=2)
    return bulk, test


@pytest.mark.parametrize("likelihood,outputs", [("poisson", 1), ("gaussian", 2)])
@pytest.mark.parametrize("channels,patch", [(37, (5, 7)), (64, (8, 8)), (9, (1, 3))])
def test_shapes_through_the_network(likelihood, outputs, channels, patch):
    model = CVAE3D(n_channels=channels, patch_size=patch, latent_dim=3, widths=(4, 4, 8), likelihood=likelihood)
    shape = torch.rand(2, 1, channels, *patch) + 0.5
    decoded, mean, log_variance = model(shape)
    assert decoded.shape == (2, outputs, channels, *patch)
    assert mean.shape == log_variance.shape == (2, 3)


def test_loss_is_the_nll_it_claims():
    torch.manual_seed(0)
    counts = torch.poisson(torch.full((3, 4), 7.0))
    log_rate = torch.randn(3, 4)
    expected = -torch.distributions.Poisson(torch.exp(log_rate)).log_prob(counts)
    torch.testing.assert_close(poisson_nll(counts, log_rate), expected)
    target, mean, log_variance = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    expected = -torch.distributions.Normal(mean, torch.exp(0.5 * log_variance)).log_prob(target)
    torch.testing.assert_close(gaussian_nll(target, mean, log_variance), expected)


def test_module_loss_adds_the_kl_term():
    torch.manual_seed(1)
    model = CVAE3D(n_channels=16, patch_size=(4, 4), latent_dim=2, widths=(4, 4, 4), beta=0.0).double()
    counts = torch.poisson(torch.full((2, 1, 16, 4, 4), 20.0, dtype=torch.float64))
    scale = counts.mean(dim=2, keepdim=True)
    with torch.no_grad():
        without_kl = model.loss(counts, scale, sample=False)
        model.hparams.beta = 1.0
        with_kl = model.loss(counts, scale, sample=False)
    voxels = counts[0].numel()
    assert float(with_kl["loss"] - without_kl["loss"]) == pytest.approx(float(with_kl["kl"]) / voxels, rel=1e-9)


def test_patches_cover_odd_cubes():
    assert patch_starts(13, 5, 3) == [0, 3, 6, 8]
    assert patch_starts(4, 8, 4) == [0]
    counts = np.random.default_rng(0).poisson(5, (13, 11, 6)).astype(float)
    patches, scales, corners = extract_patches(counts, (5, 5), (3, 3))
    assert patches.shape[1:] == (1, 6, 5, 5)
    y, x = corners[-1]
    np.testing.assert_allclose(patches[-1, 0].numpy(), counts[y:y + 5, x:x + 5].transpose(2, 0, 1), rtol=1e-6)
    data = PatchDataModule(counts, patch_size=(5, 5), stride=(3, 3), val_fraction=0.25)
    data.setup()
    # validation: a strip of rows at the bottom that no training patch touches
    held_rows = np.flatnonzero(data.holdout_pixels.all(axis=1))
    assert held_rows.size and held_rows[-1] == 12 and np.all(np.diff(held_rows) == 1)
    assert not data.holdout_pixels[: held_rows[0]].any()
    cut = held_rows[0]
    assert len(data.train_set) == sum(y + 5 <= cut for y, _ in corners) >= 2
    assert len(data.val_set) == sum(y >= cut for y, _ in corners) >= 2
    train_tops = {tuple(p[0, :, 0, 0].tolist()) for p, _ in data.train_set}
    assert not train_tops & {tuple(counts[y, x].tolist()) for y, x in corners if y + 5 > cut}


def test_augmentation_turns_counts_and_scales_alike():
    patch = torch.arange(2 * 3 * 3, dtype=torch.float64).reshape(1, 1, 2, 3, 3)
    turned = [random_dihedral(patch, torch.tensor([code]))[0, 0, 0] for code in range(8)]
    # the 8 symmetries of a square are 8 different images of an asymmetric patch, and no pixel is lost
    assert len({tuple(image.flatten().tolist()) for image in turned}) == 8
    assert all(sorted(image.flatten().tolist()) == list(range(9)) for image in turned)
    torch.testing.assert_close(turned[5], patch[0, 0, 0].flip(-1).T)
    # one choice per patch, the same for counts (N, 1, E, y, x) and scales (N, 1, 1, y, x)
    counts = torch.rand(6, 1, 4, 3, 3)
    scale = counts.mean(dim=2, keepdim=True)
    choice = torch.arange(6)
    torch.testing.assert_close(random_dihedral(counts, choice).mean(dim=2, keepdim=True),
                               random_dihedral(scale, choice))
    # a non-square patch keeps its shape: mirrors only
    oblong = torch.rand(8, 1, 2, 2, 5)
    assert random_dihedral(oblong, torch.arange(8)).shape == oblong.shape
    torch.testing.assert_close(random_dihedral(oblong, torch.tensor([4] * 8)), oblong)


def test_augmentation_only_while_training():
    counts = np.random.default_rng(0).poisson(5, (16, 12, 6)).astype(float)
    data = PatchDataModule(counts, patch_size=(4, 4), stride=(2, 2), augment=True, seed=1)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert data.on_after_batch_transfer(batch, 0) is batch  # no trainer: unchanged


def test_border_pixels_scored_like_inner_ones(small_cubes):
    bulk, _ = small_cubes
    detector = CVAEDetector(patch_size=4, stride=2, score_stride=2, **TINY).fit(bulk)
    # a border pixel is covered by as many scoring patches as an inner one (the cube is mirrored)
    counts = []
    for corners, *_ in detector._patch_outputs(bulk):
        counts.extend(corners)
    margin = detector._margin()
    hits = np.zeros((12 + 2 * margin[0], 12 + 2 * margin[1]))
    for y, x in counts:
        hits[y:y + 4, x:x + 4] += 1
    inner = hits[margin[0]:-margin[0], margin[1]:-margin[1]]
    assert inner.min() == inner.max() == 4


def test_fit_score_reconstruct_on_odd_cube(small_cubes):
    bulk, test = small_cubes
    detector = CVAEDetector(patch_size=5, stride=3, **TINY).fit(bulk)
    scores = detector.score(test["counts"])
    assert scores.shape == (13, 11) and np.isfinite(scores.values).all()
    reconstruction = detector.reconstruct(test["counts"])
    assert reconstruction.dims == ("y", "x", "energy") and reconstruction.shape == (13, 11, 64)
    assert float(reconstruction.min()) > 0
    assert detector.flag(scores).dtype == bool
    assert detector.n_parameters_ < 1_000_000
    assert detector.epochs_ == len(detector.history_) == 2
    # the decoder works around the bulk's mean spectral shape (each spectrum over its mean count)
    spectra = bulk.values.reshape(-1, 64)
    mean_shape = (spectra / spectra.mean(axis=1, keepdims=True)).mean(axis=0)
    np.testing.assert_allclose(np.exp(detector.model_.bulk_shape.numpy()), mean_shape, rtol=1e-5)


@pytest.mark.parametrize("context", ["pixel", "neighbours"])
def test_scoring_in_the_channels_last_layout_gives_the_same_scores_and_puts_the_network_back(small_cubes, context):
    bulk, test = small_cubes
    detector = CVAEDetector(context=context, **TINY).fit(bulk)
    contiguous = detector.score(test["counts"]).values
    detector.MEMORY_FORMAT = torch.channels_last_3d
    np.testing.assert_allclose(detector.score(test["counts"]).values, contiguous, rtol=1e-4, atol=1e-5)
    assert all(parameter.is_contiguous() and parameter.device.type == "cpu"
               for parameter in detector.model_.parameters())


def test_short_training_lowers_the_loss(small_cubes):
    import lightning.pytorch as pl

    bulk, _ = small_cubes
    counts = bulk.transpose("y", "x", "energy").values.astype(np.float32)
    data = PatchDataModule(counts, patch_size=(4, 4), stride=(2, 2), batch_size=4, seed=0)
    data.setup()
    torch.manual_seed(0)
    model = CVAE3D(n_channels=64, patch_size=(4, 4), latent_dim=4, widths=(4, 8, 8), learning_rate=0.01)
    patches, scales = data.val_set.tensors
    saturated = float(poisson_nll(patches, torch.log(patches.clamp_min(1e-6))).mean())

    def excess_nll() -> float:  # mean NLL per voxel above the saturated model's
        with torch.no_grad():
            return float(model.loss(patches, scales, sample=False)["nll"]) - saturated

    before = excess_nll()
    trainer = pl.Trainer(max_epochs=6, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, datamodule=data)
    assert excess_nll() < 0.5 * before


def test_two_processes_need_only_trainer_arguments(small_cubes):
    # DDP on 2 CPU processes (gloo): the weights, the losses and the split come back to this process
    bulk, test = small_cubes
    detector = CVAEDetector(patch_size=4, stride=2, accelerator="cpu", devices=2, strategy="ddp_spawn", **TINY)
    detector.fit(bulk)
    assert detector.epochs_ == len(detector.history_) == 2
    assert all(np.isfinite(row["val_loss"]) and np.isfinite(row["train_loss"]) for row in detector.history_)
    assert detector.n_training_patches_ > 0 and detector.n_calibration_spectra_ > 0
    assert np.isfinite(detector.score(test["counts"]).values).all()


def test_same_seed_same_model_on_cpu(small_cubes):
    bulk, test = small_cubes
    first = CVAEDetector(patch_size=4, stride=4, seed=3, **TINY).fit(bulk).score(test["counts"])
    second = CVAEDetector(patch_size=4, stride=4, seed=3, **TINY).fit(bulk).score(test["counts"])
    other = CVAEDetector(patch_size=4, stride=4, seed=4, **TINY).fit(bulk).score(test["counts"])
    xr.testing.assert_identical(first, second)
    assert not np.allclose(first.values, other.values)


def test_save_load_gives_identical_scores(tmp_path, small_cubes):
    bulk, test = small_cubes
    detector = CVAEDetector(patch_size=4, stride=4, likelihood="gaussian", scoring="nll", **TINY).fit(bulk)
    path = detector.save(tmp_path / "cvae.nc")
    loaded = CVAEDetector.load(path)
    assert type(eels_ad.detect.load(path)) is CVAEDetector
    xr.testing.assert_identical(loaded.score(test["counts"]), detector.score(test["counts"]))
    assert loaded.get_params() == detector.get_params()
    assert loaded.epochs_ == detector.epochs_ and loaded.history_ == detector.history_
    with pytest.raises(FileExistsError):
        detector.save(path)
    (tmp_path / "junk.nc").write_text("not a model")
    with pytest.raises(ValueError, match="junk.nc: not a saved eels-ad detector"):
        CVAEDetector.load(tmp_path / "junk.nc")
    # a model saved with the earlier network layout (no 'architecture_' in its state) is refused by name
    import json

    old = xr.open_dataset(path).load()
    state = json.loads(old.attrs["state"])
    state.pop("architecture_")
    old.attrs["state"] = json.dumps(state)
    old.to_netcdf(tmp_path / "old.nc", engine="h5netcdf")
    with pytest.raises(ValueError, match=r"old.nc: this CVAE was saved with network layout 1.*train it again"):
        eels_ad.detect.load(tmp_path / "old.nc")


def test_errors_before_fit_and_on_another_energy_axis(small_cubes):
    bulk, _ = small_cubes
    with pytest.raises(NotFittedError):
        CVAEDetector().score(bulk)
    detector = CVAEDetector(patch_size=4, stride=4, **TINY).fit(bulk)
    shifted = bulk.assign_coords(energy=bulk["energy"] + 5.0)
    with pytest.raises(ValueError, match=r"695\.000 - 726\.500 eV.*690\.000 - 721\.500 eV"):
        detector.score(shifted)
    with pytest.raises(ValueError, match="likelihood must be"):
        CVAEDetector(likelihood="laplace", **TINY).fit(bulk)
    with pytest.raises(ValueError, match="training mask leaves 0 patches"):
        mask = np.zeros((12, 12), bool)
        mask[0, 0] = True
        CVAEDetector(patch_size=4, **TINY).fit(bulk, mask=mask)


def test_max_time_stops_the_training(small_cubes):
    bulk, _ = small_cubes
    settings = {**TINY, "max_epochs": 10_000}
    detector = CVAEDetector(patch_size=4, stride=2, max_time=2, **settings).fit(bulk)
    # 10,000 epochs of this cube take minutes: the clock, not max_epochs, ended it
    assert 1 <= detector.epochs_ < 10_000
    assert detector.training_seconds_ < 60  # a hang guard: the limit is 2 s, one epoch well under a second
    for bad in (0, -5, float("nan"), "1 min"):
        with pytest.raises(ValueError, match="max_time must be a positive number of seconds"):
            CVAEDetector(max_time=bad, **TINY).fit(bulk)
    with pytest.raises(ValueError, match="max_epochs must be an integer >= 1"):
        CVAEDetector(**{**TINY, "max_epochs": 0}).fit(bulk)


def test_a_cube_smaller_than_the_patch_is_mirrored(small_cubes):
    bulk, _ = small_cubes
    tiny = bulk.isel(y=slice(0, 3), x=slice(0, 5))
    detector = CVAEDetector(patch_size=8, stride=4, **TINY).fit(tiny)
    scores = detector.score(tiny)
    assert scores.shape == (3, 5) and np.isfinite(scores.values).all()
    assert detector.reconstruct(tiny).shape == (3, 5, 64)


def test_the_command_line_states_the_api_epochs():
    import inspect

    from eels_ad.cli import build_parser

    default = inspect.signature(CVAEDetector.__init__).parameters["max_epochs"].default
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    epochs = next(a for a in train._actions if a.dest == "epochs")
    assert f"max_epochs, {default};" in epochs.help


def test_neighbour_context_predicts_a_pixel_it_does_not_see(small_cubes, tmp_path):
    bulk, test = small_cubes
    detector = CVAEDetector(patch_size=6, stride=2, context="neighbours", hole_size=2, spatial=False,
                            **TINY).fit(bulk)
    cube = test["counts"]
    before = detector.reconstruct(cube).values
    # another spectral shape with the same total counts at one pixel: its prediction does not move, as its
    # own spectrum is hidden (only its total scales the prediction); pixels whose ring holds it do move. At the
    # cube's edges and corners too: the mirrored frame's pixels beyond the edge (copies of the hidden ones among
    # them) are hidden from the network as well
    for y, x in ((6, 5), (5, 6), (0, 5), (12, 0), (0, 0), (12, 10)):
        changed = cube.copy(deep=True)
        changed.values[y, x] = changed.values[y, x, ::-1]
        after = detector.reconstruct(changed).values
        np.testing.assert_allclose(after[y, x], before[y, x], rtol=1e-5, err_msg=f"pixel {(y, x)}")
        moved = ~np.isclose(after, before, rtol=1e-5).all(axis=-1)
        assert moved.sum() >= 4 and not moved[y, x]
    # the context travels with a saved model
    loaded = CVAEDetector.load(detector.save(tmp_path / "ring.nc"))
    assert loaded.context == "neighbours"
    xr.testing.assert_identical(loaded.score(cube), detector.score(cube))
    # a cube smaller than a patch is mirrored in this mode too
    tiny = cube.isel(y=slice(0, 3), x=slice(0, 2))
    assert np.isfinite(detector.score(tiny).values).all() and detector.reconstruct(tiny).shape == (3, 2, 64)


def test_neighbour_context_follows_a_drift_the_training_never_saw():
    energy = 690.0 + 0.5 * np.arange(96)
    bulk = eels_ad.simulate_fe_l23((32, 32), energy=energy, dose=20, drift=1.0, anomaly_fraction=0.0, seed=100)
    test = eels_ad.simulate_fe_l23((32, 32), energy=energy, dose=20, drift=1.0, shift=1.0, layout="pixels",
                                   anomaly_fraction=0.03, seed=7)
    truth = test["anomaly"].values.ravel()
    auc = {}
    for context in ("pixel", "neighbours"):
        detector = CVAEDetector(context=context, scoring="shift", spatial=False, progress=False, max_epochs=3,
                                seed=0).fit(bulk["counts"])
        auc[context] = roc_auc_score(truth, detector.score(test["counts"]).values.ravel())
    # the drift moves the whole edge by up to 1 eV, as much as the local shifts: a model of the pixel explains
    # a shifted pixel as drift; its neighbours carry the drift and not the local shift (measured: 0.998 / 0.756)
    assert auc["neighbours"] > 0.98, auc
    assert auc["neighbours"] > auc["pixel"] + 0.1, auc


def test_neighbour_context_second_step_leaves_shifted_blobs_out_of_their_neighbours_planes(monkeypatch):
    from scipy import ndimage

    from eels_ad.detect.spatial import pool_evidence

    kw = dict(dose=20, drift=1.0, shift=0.5)
    bulk = eels_ad.simulate_fe_l23((64, 64), anomaly_fraction=0.0, seed=100, **kw)["counts"]
    test = eels_ad.simulate_fe_l23((64, 64), anomaly_fraction=0.01, layout="clusters", seed=200, **kw)
    truth = test["anomaly"].values
    halo = ndimage.binary_dilation(truth, iterations=4) & ~truth
    detector = CVAEDetector(context="neighbours", scoring="shift", spatial=False, progress=False, max_epochs=3,
                            seed=0).fit(bulk)
    two_steps = detector.score(test["counts"]).values
    cut = detector.SUSPECT_PVALUE
    monkeypatch.setattr(CVAEDetector, "SUSPECT_PVALUE", 0.0)  # no suspect: the first step alone
    one_step = detector.score(test["counts"]).values
    suspects = pool_evidence(detector._pixel_pvalues(one_step, None)[0]) < cut  # the blobs and the bulk beside them
    far = ~ndimage.binary_dilation(truth | suspects, iterations=10)
    assert far.sum() > 1000
    # a blob in the image's corner (rows 2-5, columns 0-2): its hidden centre's ring, cut by the edges, is a quarter
    # blob, so the ring's plane made the bulk pixels beside it look shifted the other way, and the blob's own
    # pixels (in the same hidden centre) bulk-like
    assert truth[2:6, :3].sum() >= 8 and not truth[:2, :4].any()
    corner_bulk, corner_blob = truth[:4, :4] == 0, truth[:4, :4]
    # measured: the corner's bulk pixels 4.34 -> 1.09, its blob pixels 2.15 -> 7.22
    assert two_steps[:4, :4][corner_bulk].mean() < one_step[:4, :4][corner_bulk].mean() - 2.0
    assert two_steps[:4, :4][corner_blob].mean() > one_step[:4, :4][corner_blob].mean() + 2.0
    # all the blobs 5.63 -> 7.23, the bulk beside them 1.14 -> 0.78; far away nothing changes
    assert two_steps[truth].mean() > one_step[truth].mean() + 0.2, (two_steps[truth].mean(), one_step[truth].mean())
    assert two_steps[halo].mean() < one_step[halo].mean()
    np.testing.assert_allclose(two_steps[far], one_step[far])  # only the patches that saw a suspect are run again


def test_neighbour_context_bad_settings_are_named(small_cubes):
    bulk, _ = small_cubes
    with pytest.raises(ValueError, match="context must be one of"):
        CVAEDetector(context="ring", **TINY).fit(bulk)
    with pytest.raises(ValueError, match=r"hole_size \(7, 7\) must leave a ring.*\(8, 8\) \(patch_size\)"):
        CVAEDetector(context="neighbours", hole_size=7, **TINY).fit(bulk)
    with pytest.raises(ValueError, match="hole_size must be a positive int"):
        CVAEDetector(context="neighbours", hole_size=0, **TINY).fit(bulk)


@pytest.mark.parametrize("patch,hole", [((8, 8), (4, 4)), ((8, 6), (4, 2)), ((7, 8), (3, 2))])
def test_the_hidden_centre_decodes_alone_as_in_the_whole_patch(patch, hole):
    torch.manual_seed(0)
    model = CVAE3D(n_channels=40, patch_size=patch, latent_dim=3, widths=(4, 4, 8), hole=hole).eval()
    shape = torch.rand(3, 1, 40, *patch) + 0.5
    with torch.no_grad():
        whole, _, _ = model(shape)
        centre, _, _ = model(shape, hole_only=True)
    assert centre.shape == (3, 1, 40, *hole)
    torch.testing.assert_close(centre, model.crop_hole(whole), rtol=1e-5, atol=1e-6)
    # the hole's own pixels are not seen: changing them changes nothing decoded
    changed = shape.clone()
    changed[..., model.hole[0], model.hole[1]] *= 3.0
    with torch.no_grad():
        torch.testing.assert_close(model(changed, hole_only=True)[0], centre)


@pytest.mark.parametrize("likelihood", ["poisson", "gaussian"])
@pytest.mark.parametrize("patch,hole", [((8, 8), None), ((7, 5), None), ((8, 8), (4, 4)), ((7, 8), (3, 2))])
def test_the_decoder_runs_as_1d_convolutions_with_the_3d_layers_numbers(likelihood, patch, hole):
    # decode runs the 3D layers' own weights as 1D convolutions over energy, one spatial position a row: the
    # outputs and the weights' gradients are those of the nn.Sequential of 3D layers, cropped as asked (in float64,
    # where the sums' different order leaves no more than round-off)
    torch.manual_seed(1)
    model = CVAE3D(n_channels=37, patch_size=patch, latent_dim=3, widths=(4, 4, 8), likelihood=likelihood,
                   hole=hole).double()
    torch.nn.init.normal_(model.bulk_shape)
    latent = torch.randn(5, 3, dtype=torch.float64)
    weights = torch.randn(5, 2, 37, *patch, dtype=torch.float64)

    def reference():
        features = model.from_latent(latent).view(-1, *model.bottleneck_shape)
        out = model.decoder(features)[:, :, :37, :patch[0], :patch[1]]
        return torch.cat([out[:, :1] + model.bulk_shape.view(1, 1, 37, 1, 1), out[:, 1:]], dim=1)

    def gradients(output):
        model.zero_grad()
        (output * weights[:, :output.shape[1]]).sum().backward()
        return {name: parameter.grad.clone() for name, parameter in model.named_parameters()
                if name.startswith(("decoder", "from_latent"))}

    expected, decoded = reference(), model.decode(latent, (37, *patch))
    assert decoded.shape == expected.shape == (5, 1 + (likelihood == "gaussian"), 37, *patch)
    torch.testing.assert_close(decoded, expected, rtol=1e-12, atol=1e-12)
    references = gradients(reference())
    for name, grad in gradients(model.decode(latent, (37, *patch))).items():
        torch.testing.assert_close(grad, references[name], rtol=1e-10, atol=1e-10, msg=name)
    if hole is not None:  # the hidden centre alone: only the positions whose blocks reach it are decoded
        with torch.no_grad():
            torch.testing.assert_close(model.decode(latent, (37, *patch), hole_only=True), model.crop_hole(expected),
                                       rtol=1e-12, atol=1e-12)
    # a transposed convolution of another kind is refused by name, not decoded wrongly
    from eels_ad.detect.cvae.module import _upsampled_rows

    with pytest.raises(ValueError, match=r"kernel \(4, ky, kx\).*got kernel \(3, 2, 2\)"):
        _upsampled_rows(torch.zeros(2, 4, 5), torch.nn.ConvTranspose3d(4, 4, (3, 2, 2), stride=(2, 2, 2)))


@pytest.mark.parametrize("patch,hole", [((8, 8), (4, 4)), ((7, 8), (3, 2))])
def test_the_ring_predicts_a_gradient_at_each_hidden_pixel(patch, hole):
    """A spectrum that changes linearly across the patch (a drift, a thickness gradient) is followed into the
    hole pixel by pixel, not averaged: the ring's prediction is exact there, whatever the hidden pixels hold."""
    model = CVAE3D(n_channels=12, patch_size=patch, latent_dim=3, widths=(4, 4, 8), hole=hole, likelihood="gaussian")
    yy, xx = torch.meshgrid(torch.arange(patch[0], dtype=torch.float32), torch.arange(patch[1], dtype=torch.float32),
                            indexing="ij")
    energy = torch.linspace(1.0, 2.0, 12)[:, None, None]
    field = 1.0 + energy * (0.05 * yy - 0.03 * xx + 0.4)  # (E, y, x), linear in y and x per channel
    with torch.no_grad():  # the bulk's shapes: a + b * energy, and four more directions
        raw = torch.cat([torch.ones(1, 12), energy[:, 0, 0][None], torch.rand(4, 12)])
        model.ring_basis.copy_(torch.linalg.qr(raw.T)[0].T)
    shape = field.expand(2, 1, *field.shape).clone()
    shape[..., model.hole[0], model.hole[1]] = 7.0  # hidden: must not matter
    predicted = model.ring_shape(shape)
    assert predicted.shape == shape.shape
    hidden = (..., model.hole[0], model.hole[1])
    torch.testing.assert_close(predicted[hidden], field.expand_as(shape)[hidden], rtol=1e-4, atol=1e-5)
    # the ring's mean would be off by the gradient at the hole's corners
    ring_mean = shape[..., model._ring_design(patch, shape.device, shape.dtype)[0]].mean(-1)
    torch.testing.assert_close(model.ring_shape(shape, hole_only=True), predicted[hidden])
    assert (field[:, model.hole[0], model.hole[1]] - ring_mean[0, 0, :, None, None]).abs().max() > 0.02


@pytest.mark.parametrize("patch,hole", [((8, 8), (4, 4)), ((7, 8), (3, 2))])
def test_a_ring_cut_by_the_image_edge_is_fitted_from_the_pixels_inside(patch, hole):
    model = CVAE3D(n_channels=12, patch_size=patch, latent_dim=3, widths=(4, 4, 8), hole=hole,
                   likelihood="gaussian").eval()
    yy, xx = torch.meshgrid(torch.arange(patch[0], dtype=torch.float32), torch.arange(patch[1], dtype=torch.float32),
                            indexing="ij")
    energy = torch.linspace(1.0, 2.0, 12)[:, None, None]
    field = 1.0 + energy * (0.05 * yy - 0.03 * xx + 0.4)
    # the bulk's shapes: spectra a + b * energy (the field's), and four more directions
    raw = torch.cat([torch.ones(1, 12), torch.linspace(1.0, 2.0, 12)[None], torch.rand(4, 12)])
    with torch.no_grad():
        model.ring_basis.copy_(torch.linalg.qr(raw.T)[0].T)
    shape = field.expand(3, 1, *field.shape).clone() + 0.01 * torch.rand(3, 1, 12, *patch)
    seen = torch.ones(3, *patch, dtype=torch.bool)
    # all seen: the same as no mask
    exact = field.expand(3, 1, *field.shape).clone()
    torch.testing.assert_close(model.ring_shape(shape, hole_only=True, seen=seen),
                               model.ring_shape(shape, hole_only=True))
    top = model.hole[0].start
    seen[0, :top] = False  # the top of the ring beyond the edge
    seen[1, :, :model.hole[1].start] = False  # the left side
    seen[2, :top] = False
    seen[2, :, :model.hole[1].start] = False  # a corner
    with torch.no_grad():
        before = model(shape, hole_only=True, seen=seen)[0]
        changed = shape.clone()
        changed[~seen[:, None, None].expand_as(shape)] = 9.0  # what lies beyond the edge must not matter
        changed[..., model.hole[0], model.hole[1]] = 5.0  # nor the hidden pixels
        torch.testing.assert_close(model(changed, hole_only=True, seen=seen)[0], before)
    # each patch's plane is its own: a whole ring in a batch with cut ones as alone
    mixed = seen.clone()
    mixed[0] = True
    torch.testing.assert_close(model.ring_shape(shape, hole_only=True, seen=mixed)[0],
                               model.ring_shape(shape, hole_only=True)[0])
    # a linear field is still followed into the hole from the part of the ring inside
    torch.testing.assert_close(model.ring_shape(exact, hole_only=True, seen=seen),
                               exact[..., model.hole[0], model.hole[1]], rtol=1e-4, atol=1e-4)


def test_suspects_left_out_of_the_plane_only():
    """The second step's suspects leave the ring's plane (a blob there no longer pulls it) but not the encoder's
    view; placed by the same frame as the pixels beyond the edges."""
    from eels_ad.detect.cvae.detector import _beyond_edges, _patch_values

    patch, hole = (8, 8), (4, 4)
    model = CVAE3D(n_channels=12, patch_size=patch, latent_dim=3, widths=(4, 4, 8), hole=hole,
                   likelihood="gaussian").eval()
    with torch.no_grad():
        model.ring_basis.copy_(torch.linalg.qr(torch.rand(12, 6))[0].T)
    shape = 1.0 + 0.01 * torch.rand(2, 1, 12, *patch)
    left_out = torch.zeros(2, *patch, dtype=torch.bool)
    left_out[:, 6:, :3] = True  # a blob in the ring's lower left
    blob = shape.clone()
    blob[left_out[:, None, None].expand_as(shape)] *= 3.0
    with torch.no_grad():
        plane = model.ring_shape(shape, hole_only=True, seen=~left_out)
        torch.testing.assert_close(model.ring_shape(blob, hole_only=True, seen=~left_out), plane)
        assert not torch.allclose(model.ring_shape(blob, hole_only=True), plane, atol=1e-3)  # it pulled the plane
        decoded = model(blob, hole_only=True, left_out=left_out)[0]
        encoder = model.encode(blob)[0]  # the encoder saw the blob: the decoder's own part is its
        torch.testing.assert_close(decoded, model.decode(encoder, tuple(blob.shape[-3:]), plane, hole_only=True))
        assert not torch.allclose(encoder, model.encode(shape)[0])
    # a map of suspects in an image of 10 x 9, patches in the mirrored frame (2 pixels before the image):
    # a patch's pixels as the image's, nothing beyond the edges (where the scales are zero)
    suspects = np.zeros((10, 9), bool)
    suspects[0, 0] = suspects[5, 8] = True
    corners = [(0, 0), (4, 3)]
    values = _patch_values(suspects, corners, top=0, before=(2, 2), size=patch).numpy()
    assert values[0, 2, 2] and values[0].sum() == 1  # the image's corner pixel
    assert values[1, 3, 7] and values[1].sum() == 1  # (5, 8) from the patch at rows 2-9, columns 1-8
    scales = _beyond_edges(torch.ones(2, 1, 1, *patch), corners, 0, (2, 2), (10, 9))[:, 0, 0].numpy()
    assert (scales[0, :2] == 0).all() and (scales[0, :, :2] == 0).all() and (scales[1] == 1).all()


def test_the_second_step_decodes_the_first_steps_latents_again(small_cubes):
    """Suspects leave the plane only, so a hidden centre's latent in the second step is the first step's: kept
    there and decoded with the new plane, the same predictions as encoding the patch again."""
    bulk, test = small_cubes
    detector = CVAEDetector(context="neighbours", seed=0, **TINY).fit(bulk)
    cube = test["counts"].transpose("y", "x", "energy")
    ny, nx = cube.sizes["y"], cube.sizes["x"]
    latents = np.zeros((*detector._hole_frame((ny, nx))[2:4], 4), np.float32)
    first = np.concatenate([p for _, _, p, _ in detector._inpainted_bands(cube, latents=latents)])
    assert (np.abs(latents).sum(axis=-1) > 0).all()  # every hidden centre's latent kept
    blocks = np.zeros(latents.shape[:2], bool)
    blocks[::2, 1::2] = True
    left_out = np.random.default_rng(0).random((ny, nx)) < 0.2
    again = np.concatenate([p for _, _, p, _ in detector._inpainted_bands(cube, blocks=blocks, left_out=left_out,
                                                                         latents=latents, reuse_latents=True)])
    encoded = np.concatenate([p for _, _, p, _ in detector._inpainted_bands(cube, blocks=blocks,
                                                                           left_out=left_out)])
    chosen = np.isfinite(encoded[..., 0])
    assert chosen.any() and not chosen.all()
    np.testing.assert_array_equal(np.isfinite(again[..., 0]), chosen)
    np.testing.assert_allclose(again[chosen], encoded[chosen], rtol=1e-5)
    assert not np.allclose(again[chosen], first[chosen], rtol=1e-3)  # the suspects left the planes


def test_the_blind_spots_bands_are_scored_in_blocks_with_the_same_scores(monkeypatch):
    # bands are gathered until they hold MIN_ELEMENTS voxels and scored in one block (the fused kernel's size):
    # each part gets back its own scores, in order, the same as scored alone
    from eels_ad.detect import _score_kernels
    from eels_ad.detect._scores import score_spectra
    from eels_ad.detect.cvae import detector as cvae_detector

    rng = np.random.default_rng(0)
    parts = [(k, rng.poisson(5.0, (3, 4, 50)).astype(float), rng.uniform(3.0, 7.0, (3, 4, 50)).astype(np.float32))
             for k in range(7)]
    channels = np.arange(5, 45)
    monkeypatch.setattr(_score_kernels, "MIN_ELEMENTS", 2 * 3 * 4 * channels.size)  # two parts a block
    calls = []

    def counted(counts, model, scoring):
        calls.append(len(counts))
        return score_spectra(counts, model, scoring)

    monkeypatch.setattr(cvae_detector, "score_spectra", counted)
    detector = CVAEDetector()
    got = list(detector._scored_in_blocks(iter(parts), channels))
    assert calls == [24, 24, 24, 12]
    assert [key for key, _ in got] == list(range(7))
    for (_, scores), (_, counts, predicted) in zip(got, parts, strict=True):
        alone = score_spectra(counts[..., channels].reshape(-1, channels.size),
                              predicted[..., channels].reshape(-1, channels.size).astype(float), detector.scoring)
        np.testing.assert_allclose(scores, alone.reshape(3, 4), rtol=1e-9, atol=1e-9)


def test_training_patches_have_their_rings_cut_as_at_the_edges():
    from eels_ad.detect.cvae.data import cut_rings

    scales = torch.ones(4000, 1, 1, 8, 8)
    cut = cut_rings(scales, ((2, 2), (2, 2)), 0.25, torch.Generator().manual_seed(0))
    rows_cut = (cut[:, 0, 0] == 0).all(dim=2)  # (N, y): whole rows of zeros
    cols_cut = (cut[:, 0, 0] == 0).all(dim=1)
    # only whole rows or columns of the ring, from one side, at most two deep
    assert not rows_cut[:, 2:6].any() and not cols_cut[:, 2:6].any()
    assert not (rows_cut[:, :2].any(1) & rows_cut[:, 6:].any(1)).any()
    assert torch.equal((cut == 0).flatten(1).any(1), (rows_cut | cols_cut).any(1))
    share = rows_cut.any(1).float().mean().item()
    assert 0.22 < share < 0.28 and 0.22 < cols_cut.any(1).float().mean().item() < 0.28
    deep = (rows_cut[:, 1] & rows_cut[:, 0]) | (rows_cut[:, 6] & rows_cut[:, 7])
    assert 0.75 < deep.sum().item() / rows_cut.any(1).sum().item() < 0.85  # the whole ring's width 4 times in 5
    assert torch.equal(cut, cut_rings(scales, ((2, 2), (2, 2)), 0.25, torch.Generator().manual_seed(0)))
    assert torch.equal(scales, torch.ones_like(scales))  # not written into


def test_auto_context_follows_the_training_cubes_drift(tmp_path):
    import json

    energy = 690.0 + 0.5 * np.arange(96)
    chosen = {}
    for drift in (0.0, 1.0):
        bulk = eels_ad.simulate_fe_l23((40, 40), energy=energy, dose=20, drift=drift, anomaly_fraction=0.0, seed=4)
        detector = CVAEDetector(progress=False, max_epochs=1, seed=0).fit(bulk["counts"])  # context="auto"
        chosen[drift] = detector
        # the same drift measure and choice as PCA's (one rule for both detectors)
        pca = eels_ad.detect.PCADetector().fit(bulk["counts"])
        assert detector.context_ == pca.context_ and detector.drift_range_ == pytest.approx(pca.drift_range_, rel=0.2)
    assert chosen[0.0].context_ == "pixel" and chosen[0.0].drift_range_ < 0.25 and chosen[0.0]._hole() is None
    assert chosen[1.0].context_ == "neighbours" and 1.0 < chosen[1.0].drift_range_ < 3.0
    assert chosen[1.0]._hole() == (4, 4) and chosen[1.0].model_.hole is not None
    assert chosen[0.0].model_.hole is None
    # saved and loaded: the choice travels with the model
    test = eels_ad.simulate_fe_l23((24, 24), energy=energy, dose=20, drift=1.0, anomaly_fraction=0.03, seed=5)
    path = chosen[1.0].save(tmp_path / "auto.nc")
    loaded = eels_ad.detect.load(path)
    assert loaded.context_ == "neighbours" and loaded.drift_range_ == chosen[1.0].drift_range_
    xr.testing.assert_identical(loaded.score(test["counts"]), chosen[1.0].score(test["counts"]))
    # the training pixels' scores (the tail's shape) travel too: every pixel of the training cube is scored once
    fitted = chosen[1.0]
    assert fitted.calibration_scores_.size + fitted.training_scores_.size == 40 * 40
    np.testing.assert_array_equal(loaded.training_scores_, fitted.training_scores_)
    np.testing.assert_array_equal(loaded.training_strata_, fitted.training_strata_)
    # a file from before context="auto" (no context_, its context a parameter): the parameter
    old = xr.open_dataset(path).load()
    state, params = json.loads(old.attrs["state"]), json.loads(old.attrs["params"])
    del state["context_"], state["drift_range_"]
    params["context"] = "neighbours"
    old.attrs["state"], old.attrs["params"] = json.dumps(state), json.dumps(params)
    old.to_netcdf(tmp_path / "old.nc", engine="h5netcdf")
    before = eels_ad.detect.load(tmp_path / "old.nc")
    assert before.context_ == "neighbours" and before.drift_range_ is None
    xr.testing.assert_identical(before.score(test["counts"]), loaded.score(test["counts"]))
    # a hole that leaves no ring is refused before training, whichever context "auto" would choose
    with pytest.raises(ValueError, match=r"hole_size \(7, 7\) must leave a ring"):
        CVAEDetector(hole_size=7, progress=False, max_epochs=1).fit(test["counts"])



def test_the_tail_takes_its_shape_from_the_training_pixels_and_its_scale_from_the_held_out_ones():
    """A network fits its training pixels more closely than new ones: their scores are too small to calibrate
    alone, but moved onto the held-out scores' median and 95th percentile they shape the tail beyond the
    held-out scores' reach (the mass there and every p-value below it stay the held-out scores')."""
    rng = np.random.default_rng(3)
    detector = CVAEDetector()
    detector.calibration_scores_ = 1.0 + rng.gamma(20, 0.065, 512)  # new bulk pixels
    detector.training_scores_ = rng.gamma(20, 0.05, 3584)  # the training pixels, fitted more closely
    moved, strata = detector._training_tail_scores()
    assert moved.size == 3584 and (strata == 0).all()
    np.testing.assert_allclose(np.quantile(moved, [0.5, 0.95]),
                               np.quantile(detector.calibration_scores_, [0.5, 0.95]), rtol=1e-9)
    scores = np.linspace(0.5, 6.0, 400)
    with_training = detector._tails()[-1](scores)
    detector.training_scores_ = None
    detector.__dict__.pop("_tail_cache")
    held_out = detector._tails()[-1](scores)
    top = np.sort(detector.calibration_scores_)[-30]  # the tail's threshold: the 30th largest held-out score
    np.testing.assert_array_equal(with_training[scores <= top], held_out[scores <= top])
    assert not np.array_equal(with_training[scores > top + 0.2], held_out[scores > top + 0.2])
    assert np.all(np.diff(with_training) <= 0) and with_training[-1] > 0
    # with strata (the image's edge band): each stratum's training scores move onto its own held-out scores
    detector.calibration_scores_ = np.r_[rng.gamma(20, 0.065, 300), 0.5 + rng.gamma(20, 0.08, 212)]
    detector.calibration_strata_ = np.r_[np.zeros(300, np.int8), np.ones(212, np.int8)]
    detector.training_scores_ = np.r_[rng.gamma(20, 0.05, 3000), rng.gamma(20, 0.06, 584)]
    detector.training_strata_ = np.r_[np.zeros(3000, np.int8), np.ones(584, np.int8)]
    moved, strata = detector._training_tail_scores()
    for stratum in (0, 1):
        held = detector.calibration_scores_[detector.calibration_strata_ == stratum]
        np.testing.assert_allclose(np.quantile(moved[strata == stratum], [0.5, 0.95]),
                                   np.quantile(held, [0.5, 0.95]), rtol=1e-9)
    assert set(detector._tails()) == {-1, 0, 1}
    # a stratum with too few held-out scores for a scale of its own brings no training scores
    detector.calibration_strata_ = np.r_[np.zeros(400, np.int8), np.ones(112, np.int8)]
    assert (detector._training_tail_scores()[1] == 0).all()


def test_the_pixel_context_shapes_its_tail_with_a_seeded_model_null_that_travels_with_the_model(tmp_path, small_cubes,
                                                                                               monkeypatch):
    from eels_ad.detect._base import _moved, _quantile_line

    bulk, test = small_cubes
    monkeypatch.setattr(CVAEDetector, "MODEL_NULL_SPECTRA", 3000)
    detector = CVAEDetector(patch_size=4, stride=4, context="pixel", seed=3, **TINY).fit(bulk)
    null = detector.model_null_scores_
    holdout = detector.n_calibration_spectra_
    assert null.size == -(-3000 // holdout) * holdout and np.isfinite(null).all()
    # the replicates' scores are the counts' own noise about the network's expected counts: near a normal score's
    assert 0.5 < np.std(null) < 2.0
    again = CVAEDetector(patch_size=4, stride=4, context="pixel", seed=3, **TINY).fit(bulk)
    np.testing.assert_array_equal(again.model_null_scores_, null)  # seeded
    # the tail sample is the model null moved onto the held-out scores by its Q-Q line, on the squared scale
    move = _quantile_line(null, detector.calibration_scores_, detector.MODEL_NULL_FIT_RANGE)
    # training scores that follow the moved model null (this 2-epoch network's own misfit is refused, below)
    detector.training_scores_ = np.quantile(_moved(null, *move), (np.arange(2000) + 0.5) / 2000)
    assert detector._model_null() is not None
    extra, strata = detector._training_tail_scores()
    np.testing.assert_allclose(extra, _moved(null, *move))
    assert strata is None and detector._tails()[-1].__self__.outer.squared
    loaded = CVAEDetector.load(detector.save(tmp_path / "cvae.nc"))
    np.testing.assert_array_equal(loaded.model_null_scores_, null)
    xr.testing.assert_identical(loaded.score(test["counts"]), detector.score(test["counts"]))
    # a model null that does not explain the training pixels' tail (the model's misfit matters) is refused: their
    # scores shape the tail again, on the plain scale
    heavy = detector.training_scores_.copy()
    heavy[: heavy.size // 10] = np.max(extra) + 1.0
    detector.training_scores_ = heavy
    detector.__dict__.pop("_tail_cache", None)
    tail = detector._tails()[-1].__self__
    assert detector._model_null() is None and not tail.squared and (tail.outer is None or not tail.outer.squared)
    # and where they fall far short of its tail (the network reproduces its training pixels' noise)
    detector.training_scores_ = np.full(2000, np.median(extra))
    assert detector._model_null() is None
    # the blind spot's null is its prediction error, which Poisson replicates do not hold: none there
    blind = CVAEDetector(patch_size=4, stride=4, context="neighbours", hole_size=2, seed=3, **TINY).fit(bulk)
    assert blind.model_null_scores_ is None and not blind._tails()[-1].__self__.squared


def test_the_quantile_line_recovers_a_shift_and_a_scale():
    from eels_ad.detect._base import _moved, _quantile_line

    rng = np.random.default_rng(0)
    values = rng.gamma(4.0, 0.5, 20000)
    reference = 0.3 + 1.7 * rng.gamma(4.0, 0.5, 600)
    low, intercept, slope = _quantile_line(values, reference, (0.1, 0.99))
    assert slope == pytest.approx(1.7, rel=0.1) and intercept == pytest.approx(0.3, abs=0.25)
    assert np.median(_moved(values, low, intercept, slope)) == pytest.approx(np.median(reference), rel=0.05)
    assert _quantile_line(values, reference[:5], (0.1, 0.99)) is None  # too few positions for a line
    assert _quantile_line(np.ones(100), reference, (0.1, 0.99)) is None  # a sample of one value: no line
