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
pixels of a patch, the decoder adds its output to what a plane fitted to the ring around the hole predicts
for each pixel instead of the bulk's mean shape, and the loss counts the hidden pixels only: the network
learns how a pixel differs from its neighbourhood, so a nuisance the neighbourhood shares (a drift of the
energy axis) is predicted and a local change is not.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning.pytorch as pl
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


#: the layout of the layers: a saved model of another architecture must be trained again
ARCHITECTURE = 4


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
        # the hole at half resolution, when it lies on even pixel boundaries (see decode)
        self._half_hole = None if hole is None or any(
            edge.start % 2 or edge.stop % 2 for edge in self.hole) else tuple(
            slice(edge.start // 2, edge.stop // 2) for edge in self.hole)
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

    def _hide(self, features: torch.Tensor) -> torch.Tensor:
        """The input with the hidden centre (``hole``) set to zero."""
        if self.hole is None:
            return features
        features = features.clone()
        features[..., self.hole[0], self.hole[1]] = 0.0
        return features

    def encode(self, shape: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance of the latent for normalised spectra (N, 1, E, y, x); with a
        ``hole``, from the patch without its centre."""
        features = self.encoder(self._pad(self._hide(torch.log1p(shape))))
        mean, log_variance = self.to_latent(features.flatten(1)).chunk(2, dim=1)
        return mean, log_variance.clamp(-12.0, 8.0)

    def decode(self, latent: torch.Tensor, size: tuple[int, int, int], base: torch.Tensor | None = None,
               hole_only: bool = False) -> torch.Tensor:
        """Decoder output cropped to ``size`` = (E, y, x): (N, 1 or 2, E, y, x), added to ``base`` (N, 1, E, 1, 1)
        or one per output pixel (N, 1, E, y, x; the hole's with ``hole_only``), or, when None, to the bulk's mean
        shape.
        ``hole_only``: the hidden centre's pixels only (N, C, E, hy, hx).

        The last spatial upsampling maps each pixel to its own 2 x 2 block and the layers after it mix
        energy only, so a hole on even pixel boundaries is decoded from its own quarter of the features:
        the same numbers as cropping the whole patch's output, at about a third of the decoder's work.
        """
        features = self.from_latent(latent).view(-1, *self.bottleneck_shape)
        e, y, x = size
        if hole_only and self._half_hole is not None:
            half = self.decoder[:3](features)  # up to the last spatial upsampling: half resolution
            out = self.decoder[3:](half[..., self._half_hole[0], self._half_hole[1]])[:, :, :e]
        else:
            out = self.decoder(features)[:, :, :e, :y, :x]
            if hole_only:
                out = out[..., self.hole[0], self.hole[1]]
        base = self.bulk_shape[:e].view(1, 1, e, 1, 1) if base is None else base
        return torch.cat([out[:, :1] + base, out[:, 1:]], dim=1)

    def _ring_weights(self, shape: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
        """(ring mask (y, x), weights (y * x, ring pixels), the hidden centre's rows of them (hy * hx, ring
        pixels)): the linear map from the ring's spectra to the plane fitted to them by least squares,
        evaluated at every pixel of a patch of ``shape`` (cached)."""
        key = (shape, str(device))
        cached = getattr(self, "_ring_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        ring = torch.ones(shape, dtype=torch.bool)
        ring[self.hole[0], self.hole[1]] = False
        yy, xx = torch.meshgrid(torch.arange(shape[0], dtype=torch.float64),
                                torch.arange(shape[1], dtype=torch.float64), indexing="ij")
        centre_y = (self.hole[0].start + self.hole[0].stop - 1) / 2
        centre_x = (self.hole[1].start + self.hole[1].stop - 1) / 2
        design = torch.stack([torch.ones_like(yy), yy - centre_y, xx - centre_x], dim=-1).reshape(-1, 3)
        weights = (design @ torch.linalg.pinv(design[ring.reshape(-1)])).to(device=device, dtype=torch.float32)
        hidden = weights.view(*shape, -1)[self.hole[0], self.hole[1]].reshape(-1, weights.shape[-1])
        found = (ring.to(device), weights, hidden.contiguous())
        self._ring_cache = (key, found)
        return found

    def ring_shape(self, shape: torch.Tensor, hole_only: bool = False) -> torch.Tensor | None:
        """With a ``hole``: what the ring around it predicts for every pixel of the patch (N, 1, E, y, x), or for
        the hidden centre's (``hole_only``: N, 1, E, hy, hx), in the decoder's units (log for the Poisson
        model). None without a hole.

        A plane is fitted per energy channel to the ring's normalised spectra and evaluated at each pixel,
        so that a smooth gradient across the patch (an energy drift, a thickness or composition gradient)
        is followed to each hidden pixel rather than averaged over the ring; the decoder adds its output
        to it, so the network learns how the centre differs from its neighbours. Measured against the
        ring's mean (architecture 3) in the spatial benchmark's cells (0.5 eV shifts, dose 20) under an
        uncorrected +-1 eV drift: the bulk's 95th percentile of the shift score 2.98 -> 2.12 (1.98 without
        drift), F1 on lines 0.89 -> 0.99 and single pixels 0.76 -> 0.98; without drift the same.
        """
        if self.hole is None:
            return None
        ring, weights, hidden = self._ring_weights(tuple(shape.shape[-2:]), shape.device)
        if hole_only:
            size = (self.hole[0].stop - self.hole[0].start, self.hole[1].stop - self.hole[1].start)
            fitted = (shape[..., ring] @ hidden.T).unflatten(-1, size)
        else:
            fitted = (shape[..., ring] @ weights.T).unflatten(-1, tuple(shape.shape[-2:]))
        return torch.log(fitted.clamp_min(1e-6)) if self.hparams.likelihood == "poisson" else fitted

    def forward(self, shape: torch.Tensor, sample: bool = False, hole_only: bool = False):
        """(decoded, latent mean, latent log-variance); ``hole_only``: decoded for the hidden centre only."""
        mean, log_variance = self.encode(shape)
        latent = mean + torch.randn_like(mean) * torch.exp(0.5 * log_variance) if sample else mean
        decoded = self.decode(latent, tuple(shape.shape[-3:]), self.ring_shape(shape, hole_only), hole_only=hole_only)
        return decoded, mean, log_variance

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
        shape = counts / scale.clamp_min(1e-12)
        # with a hole, the blind spot is judged on the pixels it did not see
        decoded, mean, log_variance = self(shape, sample=sample, hole_only=self.hole is not None)
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
