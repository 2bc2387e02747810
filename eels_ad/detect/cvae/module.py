"""The 3D convolutional VAE as a LightningModule: model, negative log-likelihood loss, optimiser.

A patch of ``patch x patch`` pixels x ``E`` channels is one sample, laid out for ``Conv3d`` as
(batch, 1, energy, y, x). Every pixel's spectrum enters divided by its mean count per channel (its
``scale``), so the network learns spectral shape and thickness is handled exactly: the Poisson
rate of a voxel is ``scale * exp(decoded log-shape)``. The decoder adds its output to the bulk's
mean shape (the buffer ``bulk_shape``, set from the training spectra): it learns the deviations only,
and follows a composition somewhat beyond the training image's range (without it, bulk pixels 7 %
richer in Fe than any training pixel scored like anomalies). The encoder's strided 3D convolutions reduce
energy 8x and space 4x; a small dense layer maps that to the latent (mean, log-variance) and back,
so the model stays at about 0.14 million parameters for the default patch and 320 channels (the model of
Sultanov et al. had about 777 million, almost all in two dense layers).

With a ``hole`` (a blind spot, ``CVAEDetector(context="neighbours")``) the encoder never sees the centre
pixels of a patch, the decoder adds its output to what a plane fitted to the ring around the hole (in the
bulk's leading spectral shapes) predicts for each pixel instead of the bulk's mean shape, and the loss counts
the hidden pixels only (pixels of scale zero, beyond an image's edge, are hidden as well): the network
learns how a pixel differs from its neighbourhood, so a nuisance the neighbourhood shares (a drift of the
energy axis) is predicted and a local change is not.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

Likelihood = Literal["poisson", "gaussian"]
_LOG_2PI = math.log(2 * math.pi)


def _padded(size: int, multiple: int) -> int:
    return int(math.ceil(size / multiple) * multiple)


def poisson_nll(counts: torch.Tensor, log_rate: torch.Tensor) -> torch.Tensor:
    """Voxel-wise Poisson negative log-likelihood ``rate - y log(rate) + log(y!)``."""
    return torch.exp(log_rate) - counts * log_rate + torch.lgamma(counts + 1)


def gaussian_nll(target: torch.Tensor, mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """Voxel-wise Gaussian negative log-likelihood with a learned (per-voxel) variance."""
    return 0.5 * (_LOG_2PI + log_variance + (target - mean) ** 2 * torch.exp(-log_variance))


def _upsampled_rows(rows: torch.Tensor, layer: nn.ConvTranspose3d) -> torch.Tensor:
    """``layer`` (a transposed convolution of kernel (4, ky, kx), stride (2, ky, kx), padding (1, 0, 0)) applied to
    rows (R, C_in, E) of one spatial position each: (R * ky * kx, C_out, 2 E), the new rows in the order (row, a, b)
    of the block of ky x kx positions each row becomes.

    Output channel 2 m of the transposed convolution takes taps 1 and 3 of input channels m and m - 1, channel
    2 m + 1 taps 2 and 0 of m and m + 1: a 1D convolution of three taps whose outputs, two per input channel
    (even, odd), are interleaved.
    """
    if layer.kernel_size[0] != 4 or layer.stride != (2, *layer.kernel_size[1:]) or layer.padding != (1, 0, 0):
        raise ValueError(f"a transposed convolution of kernel (4, ky, kx), stride (2, ky, kx), padding (1, 0, 0) "
                         f"is needed, got kernel {layer.kernel_size}, stride {layer.stride}, padding {layer.padding}")
    c_in, c_out, _, ky, kx = layer.weight.shape
    taps = layer.weight.permute(3, 4, 1, 0, 2)  # (ky, kx, C_out, C_in, 4)
    zero = torch.zeros_like(taps[..., 0])
    even = torch.stack([taps[..., 3], taps[..., 1], zero], dim=-1)  # inputs m - 1, m, m + 1 -> output 2 m
    odd = torch.stack([zero, taps[..., 2], taps[..., 0]], dim=-1)  # -> output 2 m + 1
    weight = torch.stack([even, odd], dim=3).reshape(ky * kx * c_out * 2, c_in, 3)
    bias = layer.bias.view(1, 1, c_out, 1).expand(ky, kx, c_out, 2).reshape(-1)
    out = F.conv1d(rows, weight, bias, padding=1)  # (R, ky * kx * C_out * 2, E)
    count, _, energy = out.shape
    return out.view(count, ky * kx * c_out, 2, energy).transpose(2, 3).reshape(count * ky * kx, c_out, 2 * energy)


#: the bulk's spectral shapes in which the ring around a hidden centre is fitted (:meth:`CVAE3D.ring_shape`)
RING_RANK = 6

#: the layout of the layers: a saved model of another architecture must be trained again
ARCHITECTURE = 5


def hole_slices(patch_size: tuple[int, int], hole: tuple[int, int]) -> tuple[slice, slice]:
    """(rows, columns) of a patch's hidden centre of ``hole`` pixels; it must leave a ring of at least one pixel."""
    patch, hole = tuple(int(p) for p in patch_size), tuple(int(h) for h in hole)
    if not all(1 <= h <= p - 2 for p, h in zip(patch, hole, strict=True)):
        raise ValueError(f"hole_size {hole} must leave a ring of at least one pixel around it in a patch of "
                         f"{patch} (patch_size)")
    return tuple(slice((p - h) // 2, (p - h) // 2 + h) for p, h in zip(patch, hole, strict=True))


class CVAE3D(pl.LightningModule):
    """3D convolutional variational autoencoder with a Poisson or Gaussian likelihood.

    Parameters
    ----------
    n_channels
        Energy channels of a patch.
    patch_size
        ``(py, px)`` pixels of a patch (any size; padded inside to multiples of 4).
    latent_dim
        Size of the latent vector.
    widths
        Channels of the three encoder convolutions (mirrored in the decoder).
    likelihood
        ``"poisson"`` (raw counts) or ``"gaussian"`` (normalised spectra, learned variance).
    beta
        Weight of the KL term.
    learning_rate
        Adam learning rate.
    hole
        ``(hy, hx)`` pixels at the centre of every patch that the encoder never sees (a blind spot):
        the network predicts their spectra from the ring of pixels around them, and the loss counts
        those pixels only. None (default): the encoder sees the whole patch and the loss counts all of it.
    """

    def __init__(
        self,
        n_channels: int,
        patch_size: tuple[int, int] = (8, 8),
        latent_dim: int = 16,
        widths: tuple[int, int, int] = (4, 8, 16),
        likelihood: Likelihood = "poisson",
        beta: float = 1.0,
        learning_rate: float = 1e-3,
        hole: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if likelihood not in ("poisson", "gaussian"):
            raise ValueError(f"likelihood must be 'poisson' or 'gaussian', got {likelihood!r}")
        self.save_hyperparameters()
        #: (rows, columns) of the hidden centre within a patch, or None
        self.hole = None if hole is None else hole_slices(patch_size, hole)
        self.padded_shape = (_padded(n_channels, 8), _padded(patch_size[0], 4), _padded(patch_size[1], 4))
        w1, w2, w3 = widths
        self.encoder = nn.Sequential(
            nn.Conv3d(1, w1, (7, 3, 3), stride=(2, 1, 1), padding=(3, 1, 1)), nn.GELU(),
            nn.Conv3d(w1, w2, (5, 3, 3), stride=(2, 2, 2), padding=(2, 1, 1)), nn.GELU(),
            nn.Conv3d(w2, w3, (5, 3, 3), stride=(2, 2, 2), padding=(2, 1, 1)), nn.GELU(),
        )
        e, y, x = self.padded_shape
        self.bottleneck_shape = (w3, e // 8, y // 4, x // 4)
        flat = w3 * (e // 8) * (y // 4) * (x // 4)
        self.to_latent = nn.Linear(flat, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, flat)
        # the bulk's mean spectral shape (log of it for the Poisson model): the decoder adds its output to it
        self.register_buffer("bulk_shape", torch.zeros(n_channels))
        # the leading spectral shapes of the bulk's pixels (orthonormal rows, set from the training spectra): the
        # ring around a hidden centre is fitted in them (see ring_shape)
        basis = torch.zeros(RING_RANK, n_channels)
        basis[0] = n_channels ** -0.5  # a flat shape until the training spectra set them
        self.register_buffer("ring_basis", basis)
        out_channels = 2 if likelihood == "gaussian" else 1
        # upsampling: 4 taps in energy, 2 x 2 in space (each input pixel becomes its own 2 x 2 block, no
        # overlap: a quarter of the work of 4 x 4 kernels); the last convolution mixes energy channels only
        # (layout 3: its 3 x 3 spatial taps were a third of the scoring time and changed no AUC)
        self.decoder = nn.Sequential(
            nn.GELU(),
            nn.ConvTranspose3d(w3, w2, (4, 2, 2), stride=(2, 2, 2), padding=(1, 0, 0)), nn.GELU(),
            nn.ConvTranspose3d(w2, w1, (4, 2, 2), stride=(2, 2, 2), padding=(1, 0, 0)), nn.GELU(),
            nn.ConvTranspose3d(w1, w1, (4, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0)), nn.GELU(),
            nn.Conv3d(w1, out_channels, (5, 1, 1), padding=(2, 0, 0)),
        )

    # -- the network ------------------------------------------------------------------------------
    def _pad(self, tensor: torch.Tensor) -> torch.Tensor:
        e, y, x = tensor.shape[-3:]
        pe, py, px = (target - size for target, size in zip(self.padded_shape, (e, y, x), strict=True))
        if pe < 0 or py < 0 or px < 0:
            raise ValueError(f"patch of shape {(e, y, x)} is larger than the model's {self.padded_shape}")
        return F.pad(tensor, (0, px, 0, py, 0, pe), mode="replicate") if pe or py or px else tensor

    def _hide(self, features: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """The input with the hidden centre (``hole``), and the pixels not ``seen`` (N, y, x), set to zero."""
        if self.hole is None and seen is None:
            return features
        features = features.clone() if seen is None else features * seen[:, None, None].to(features.dtype)
        if self.hole is not None:
            features[..., self.hole[0], self.hole[1]] = 0.0
        return features

    def encode(self, shape: torch.Tensor, seen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance of the latent for normalised spectra (N, 1, E, y, x); with a
        ``hole``, from the patch without its centre; ``seen`` (N, y, x, bool): the pixels that are there (those
        beyond an image's edge are not)."""
        features = self.encoder(self._pad(self._hide(torch.log1p(shape), seen)))
        mean, log_variance = self.to_latent(features.flatten(1)).chunk(2, dim=1)
        return mean, log_variance.clamp(-12.0, 8.0)

    def decode(self, latent: torch.Tensor, size: tuple[int, int, int], base: torch.Tensor | None = None,
               hole_only: bool = False) -> torch.Tensor:
        """Decoder output cropped to ``size`` = (E, y, x): (N, 1 or 2, E, y, x), added to ``base`` (N, 1, E, 1, 1)
        or one per output pixel (N, 1, E, y, x; the hole's with ``hole_only``), or, when None, to the bulk's mean
        shape.
        ``hole_only``: the hidden centre's pixels only (N, C, E, hy, hx).

        After the dense layer every layer of the decoder acts on each spatial position apart: the transposed
        convolutions' spatial kernels equal their strides (each pixel becomes its own block) and the last
        convolution mixes energy only. So the decoder runs on rows of one position each, as 1D convolutions
        over energy (:func:`_upsampled_rows`), and only the positions whose block reaches the pixels asked for
        are carried on (:meth:`_decode_plan`): the same numbers as the 3D layers to float round-off, which on
        this CPU took 2.6-4.8 ms a layer for 25 whole patches where the 1D form takes 0.7-1.5 ms.
        """
        features = self.from_latent(latent).view(-1, *self.bottleneck_shape)
        n, channels, energy = features.shape[:3]
        e, y, x = size
        target = self.hole if hole_only else (slice(0, y), slice(0, x))
        keeps, order = self._decode_plan(target)
        rows = features.permute(0, 3, 4, 1, 2).reshape(n, -1, channels, energy)  # (N, positions, C, E)
        stage = 0
        for layer in self.decoder:
            if isinstance(layer, nn.ConvTranspose3d):
                if keeps[stage] is not None:
                    rows = rows[:, keeps[stage].to(rows.device)]
                stage += 1
                positions = rows.shape[1]
                rows = _upsampled_rows(rows.reshape(n * positions, *rows.shape[2:]), layer)
                rows = rows.view(n, -1, *rows.shape[1:])
            elif isinstance(layer, nn.Conv3d):
                positions = rows.shape[1]
                rows = F.conv1d(rows.reshape(n * positions, *rows.shape[2:]), layer.weight[..., 0, 0], layer.bias,
                                padding=layer.padding[0]).view(n, positions, layer.out_channels, -1)
            else:
                rows = layer(rows)
        rows = rows[:, order.to(rows.device)]  # the pixels asked for, in raster order
        height, width = (edge.stop - edge.start for edge in target)
        out = rows.view(n, height, width, *rows.shape[2:]).permute(0, 3, 4, 1, 2)[:, :, :e]
        base = self.bulk_shape[:e].view(1, 1, e, 1, 1) if base is None else base
        return torch.cat([out[:, :1] + base, out[:, 1:]], dim=1)

    def _decode_plan(self, target: tuple[slice, slice]) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """For the decoder's output pixels ``target`` (rows, columns of the padded patch): the positions to keep
        before each transposed convolution (None: all) and, at the end, the order that puts the pixels asked for
        in raster order (cached)."""
        key = tuple((edge.start, edge.stop) for edge in target)
        cache = self.__dict__.setdefault("_plans", {})
        if key in cache:
            return cache[key]
        steps = [layer.kernel_size[1:] for layer in self.decoder if isinstance(layer, nn.ConvTranspose3d)]
        factor = [math.prod(step[i] for step in steps) for i in range(2)]
        ys, xs = (grid.ravel() for grid in np.meshgrid(*(np.arange(size) for size in self.bottleneck_shape[2:]),
                                                       indexing="ij"))
        (r0, r1), (c0, c1) = key
        keeps = []
        for step in [*steps, (1, 1)]:
            # the positions whose block of output pixels (factor x factor) meets the target
            keep = (ys * factor[0] < r1) & ((ys + 1) * factor[0] > r0) & (xs * factor[1] < c1) & \
                ((xs + 1) * factor[1] > c0)
            keeps.append(None if keep.all() else torch.from_numpy(np.flatnonzero(keep)))
            ys, xs = ys[keep], xs[keep]
            # each position becomes a block of step[0] x step[1] positions, in the order (position, a, b)
            ys = (ys[:, None, None] * step[0] + np.arange(step[0])[:, None] + 0 * np.arange(step[1])).ravel()
            xs = (xs[:, None, None] * step[1] + 0 * np.arange(step[0])[:, None] + np.arange(step[1])).ravel()
            factor = [f // s for f, s in zip(factor, step, strict=True)]
        final = keeps.pop()
        final = np.arange(ys.size) if final is None else final.numpy()
        order = final[np.lexsort((xs, ys))]  # ys, xs here are of the kept pixels (the last step is 1 x 1)
        if order.size != (r1 - r0) * (c1 - c0):  # pragma: no cover - a decoder whose blocks overlap
            raise RuntimeError(f"the decoder's output does not tile the pixels {key}")
        cache[key] = (keeps, torch.from_numpy(order))
        return cache[key]

    def _ring_design(self, shape: tuple[int, int], device: torch.device,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(ring mask (y, x), the plane's design (y, x, 3): 1 and the offsets from the hole's centre) of a patch of
        ``shape`` (cached)."""
        key = (shape, str(device), dtype)
        cached = getattr(self, "_ring_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        ring = torch.ones(shape, dtype=torch.bool)
        ring[self.hole[0], self.hole[1]] = False
        yy, xx = torch.meshgrid(torch.arange(shape[0], dtype=dtype), torch.arange(shape[1], dtype=dtype),
                                indexing="ij")
        centre_y = (self.hole[0].start + self.hole[0].stop - 1) / 2
        centre_x = (self.hole[1].start + self.hole[1].stop - 1) / 2
        design = torch.stack([torch.ones_like(yy), yy - centre_y, xx - centre_x], dim=-1)
        found = (ring.to(device), design.to(device))
        self._ring_cache = (key, found)
        return found

    def ring_shape(self, shape: torch.Tensor, hole_only: bool = False,
                   seen: torch.Tensor | None = None) -> torch.Tensor | None:
        """With a ``hole``: what the ring around it predicts for every pixel of the patch (N, 1, E, y, x), or for
        the hidden centre's (``hole_only``: N, 1, E, hy, hx), in the decoder's units (log for the Poisson
        model). None without a hole. ``seen`` (N, y, x, bool): the ring's pixels to use (those beyond an image's
        edge are not; None: all).

        The ring's spectra are reduced to their coefficients on the bulk's leading spectral shapes
        (``ring_basis``: :data:`RING_RANK` orthonormal shapes, set from the training spectra), a plane is fitted
        by least squares to each coefficient over the ring's pixels (3 x 3 normal equations per patch) and
        evaluated at each pixel, and its coefficients are turned back into spectra: a smooth gradient across
        the patch (an energy drift, a thickness or composition gradient) is followed to each hidden pixel rather
        than averaged over the ring; the decoder adds its output to it, so the network learns how the centre
        differs from its neighbours. Architecture 5: the plane was fitted per energy channel (architecture 4;
        against the ring's mean in 3: under an uncorrected +-1 eV drift the bulk's 95th percentile of the shift
        score 2.98 -> 2.12, F1 on lines 0.89 -> 0.99), which carries each channel's counting noise into the hole;
        at the image's edges, where the ring is cut and the plane extrapolates, several-fold (the outermost row's
        mean score 2.6 against 1.1 inside). In the bulk's shapes, under the same drift (0.5 eV shifts at dose 20,
        ``benchmarks/spatial.py``): F1 at 5 % FDR blobs / line / pixels 0.906 / 0.960 / 0.958 -> 0.928 / 0.972 /
        0.984, ROC AUC of single pixels 0.994 -> 0.998, realised FDR 0.033 -> 0.067 (150 bulk-only cubes).
        """
        if self.hole is None:
            return None
        ring, design = self._ring_design(tuple(shape.shape[-2:]), shape.device, shape.dtype)
        weight = ring.expand(shape.shape[0], *ring.shape) if seen is None else seen & ring
        weight = weight.to(shape.dtype).flatten(1)  # (N, y * x)
        flat = design.reshape(-1, 3)
        basis = self.ring_basis[:, :shape.shape[2]].to(shape.dtype)  # (k, E)
        coefficients = torch.einsum("nep,ke->nkp", shape[:, 0].flatten(2), basis)  # (N, k, y * x)
        normal = torch.einsum("np,pa,pb->nab", weight, flat, flat)
        normal = normal + 1e-6 * torch.eye(3, dtype=shape.dtype, device=shape.device)  # a ring cut to one line
        moments = torch.einsum("np,pa,nkp->nka", weight, flat, coefficients)
        plane = torch.linalg.solve(normal[:, None], moments[..., None])[..., 0]  # (N, k, 3)
        at = design[self.hole[0], self.hole[1]] if hole_only else design
        fitted = torch.einsum("yxa,nka,ke->neyx", at, plane, basis)[:, None]
        return torch.log(fitted.clamp_min(1e-6)) if self.hparams.likelihood == "poisson" else fitted

    def forward(self, shape: torch.Tensor, sample: bool = False, hole_only: bool = False,
                seen: torch.Tensor | None = None, left_out: torch.Tensor | None = None):
        """(decoded, latent mean, latent log-variance); ``hole_only``: decoded for the hidden centre only;
        ``seen`` (N, y, x, bool): the pixels there (None: all), the others hidden from the encoder and the ring's
        plane alike; ``left_out`` (N, y, x, bool): pixels left out of the ring's plane only (suspects that the
        encoder still sees, as it learnt scattered gaps nowhere)."""
        mean, log_variance = self.encode(shape, seen)
        latent = mean + torch.randn_like(mean) * torch.exp(0.5 * log_variance) if sample else mean
        return self.predict(latent, shape, hole_only, seen, left_out), mean, log_variance

    def predict(self, latent: torch.Tensor, shape: torch.Tensor, hole_only: bool = False,
                seen: torch.Tensor | None = None, left_out: torch.Tensor | None = None) -> torch.Tensor:
        """The decoded output of ``latent`` (N, latent_dim) for the patches ``shape``, the ring's plane added (as
        :meth:`forward`, whose second half it is: a latent kept from an earlier pass over the same patches is not
        encoded again)."""
        in_plane = seen
        if left_out is not None:
            in_plane = ~left_out if seen is None else seen & ~left_out
        return self.decode(latent, tuple(shape.shape[-3:]), self.ring_shape(shape, hole_only, in_plane),
                           hole_only=hole_only)

    @staticmethod
    def seen_of(scale: torch.Tensor) -> torch.Tensor | None:
        """The pixels (N, y, x) of patches whose ``scale`` (N, 1, 1, y, x) is above zero: a scale of zero marks
        a pixel beyond the image's edge. None where all are."""
        seen = scale[:, 0, 0] > 0
        return None if bool(seen.all()) else seen

    @staticmethod
    def shape_of(counts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Spectra divided by their scale (pixels of scale zero, beyond the edge: zero)."""
        return torch.where(scale > 0, counts / scale.clamp_min(1e-12), torch.zeros((), dtype=counts.dtype,
                                                                                   device=counts.device))

    def crop_hole(self, tensor: torch.Tensor) -> torch.Tensor:
        """The hidden centre's pixels of a (..., y, x) tensor (the tensor itself without a hole)."""
        return tensor if self.hole is None else tensor[..., self.hole[0], self.hole[1]]

    # -- the likelihood ---------------------------------------------------------------------------
    def voxel_nll(self, counts: torch.Tensor, scale: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of every voxel (N, 1, E, y, x) given the decoder output."""
        if self.hparams.likelihood == "poisson":
            log_rate = torch.log(scale.clamp_min(1e-12)) + decoded[:, :1].clamp(-30.0, 30.0)
            return poisson_nll(counts, log_rate)
        target = counts / scale.clamp_min(1e-12)
        return gaussian_nll(target, decoded[:, :1], decoded[:, 1:2].clamp(-15.0, 10.0))

    def expected_counts(self, scale: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        """The model's mean counts of every voxel."""
        if self.hparams.likelihood == "poisson":
            return scale * torch.exp(decoded[:, :1].clamp(-30.0, 30.0))
        return scale * decoded[:, :1]

    def loss(self, counts: torch.Tensor, scale: torch.Tensor, sample: bool = True) -> dict[str, torch.Tensor]:
        """The loss of a batch; ring pixels of ``scale`` zero are taken as beyond an image's edge (training
        patches with their ring so cut teach the network the edges: ``edge_share`` of
        :class:`~eels_ad.detect.cvae.data.PatchDataModule`)."""
        shape = self.shape_of(counts, scale)
        # with a hole, the blind spot is judged on the pixels it did not see
        decoded, mean, log_variance = self(shape, sample=sample, hole_only=self.hole is not None,
                                           seen=self.seen_of(scale))
        voxel_nll = self.voxel_nll(self.crop_hole(counts), self.crop_hole(scale), decoded)
        nll = voxel_nll.sum(dim=(1, 2, 3, 4))
        kl = -0.5 * (1 + log_variance - mean**2 - torch.exp(log_variance)).sum(dim=1)
        voxels = voxel_nll[0].numel()
        total = (nll + self.hparams.beta * kl).mean() / voxels
        return {"loss": total, "nll": nll.mean() / voxels, "kl": kl.mean()}

    # -- Lightning --------------------------------------------------------------------------------
    def training_step(self, batch, batch_index):
        terms = self.loss(*batch, sample=True)
        self.log_dict({f"train_{k}": v for k, v in terms.items()}, prog_bar=False, on_epoch=True, on_step=False,
                      sync_dist=True)
        return terms["loss"]

    def validation_step(self, batch, batch_index):
        terms = self.loss(*batch, sample=False)
        self.log("val_loss", terms["loss"], prog_bar=True, on_epoch=True, sync_dist=True)
        self.log("val_nll", terms["nll"], on_epoch=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)
