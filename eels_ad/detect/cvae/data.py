"""Patches of a spectrum image for the 3D-CVAE, as a LightningDataModule."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .module import hole_slices


def patch_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start indices of patches along one axis: every ``stride``, and one flush with the far end."""
    if size <= patch:
        return [0]
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def pad_to_patch(counts: np.ndarray, patch: tuple[int, int]) -> np.ndarray:
    """Reflect-pad (y, x, E) counts so that each spatial side is at least the patch side."""
    pad_y, pad_x = max(0, patch[0] - counts.shape[0]), max(0, patch[1] - counts.shape[1])
    if pad_y or pad_x:
        counts = np.pad(counts, ((0, pad_y), (0, pad_x), (0, 0)), mode="symmetric")
    return counts


def pixel_scale(counts: np.ndarray) -> np.ndarray:
    """Mean count per channel of every pixel (y, x), at least 1e-3: the Poisson exposure of a spectrum."""
    return np.maximum(counts.mean(axis=-1), 1e-3)


def extract_patches(counts: np.ndarray, patch: tuple[int, int], stride: tuple[int, int]):
    """All patches of a (y, x, E) array as tensors (N, 1, E, py, px) with their scales and corners."""
    counts = pad_to_patch(counts, patch)
    scale = pixel_scale(counts)
    corners = [(y, x) for y in patch_starts(counts.shape[0], patch[0], stride[0])
               for x in patch_starts(counts.shape[1], patch[1], stride[1])]
    blocks = np.stack([counts[y:y + patch[0], x:x + patch[1]] for y, x in corners])  # N, py, px, E
    scales = np.stack([scale[y:y + patch[0], x:x + patch[1]] for y, x in corners])
    counts_t = torch.from_numpy(np.ascontiguousarray(blocks.transpose(0, 3, 1, 2)[:, None], dtype=np.float32))
    scale_t = torch.from_numpy(np.ascontiguousarray(scales[:, None, None], dtype=np.float32))
    return counts_t, scale_t, corners


def random_dihedral(patches: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Mirror and turn each patch (N, ..., py, px) by one of the 8 symmetries of a square, ``choice`` (N,) in 0-7.

    Bit 0 mirrors x, bit 1 mirrors y, bit 2 swaps y and x (skipped for non-square patches, whose 4
    symmetries are the mirrors). The same ``choice`` turns a batch of counts and its per-pixel scales alike.
    """
    out = patches.clone()
    square = patches.shape[-1] == patches.shape[-2]
    for index in range(len(patches)):
        code, patch = int(choice[index]), patches[index]
        if code & 1 and patch.shape[-1] > 1:
            patch = patch.flip(-1)
        if code & 2 and patch.shape[-2] > 1:
            patch = patch.flip(-2)
        if code & 4 and square:
            patch = patch.transpose(-1, -2)
        out[index] = patch
    return out


def cut_rings(scales: torch.Tensor, ring: tuple[tuple[int, int], tuple[int, int]], share: float,
              generator: torch.Generator) -> torch.Tensor:
    """Scales (N, 1, 1, py, px) with the rows or columns of some patches' rings set to zero: as if beyond an
    image's edge (:meth:`~eels_ad.detect.cvae.module.CVAE3D.seen_of`).

    Along each axis a patch is cut with probability ``share``, on one side or the other alike, by the ring's
    whole width on that side (``ring`` = ((above, below), (left, right)) pixels) four times in five, else by
    fewer pixels: what a patch whose hidden centre lies at an image's edge or corner sees when scored.
    """
    scales = scales.clone()
    n = scales.shape[0]
    for axis, (before, after) in enumerate(ring):
        cut = torch.rand(n, generator=generator) < share
        low = torch.rand(n, generator=generator) < 0.5
        whole = torch.rand(n, generator=generator) < 0.8
        partial = torch.rand(n, generator=generator)
        for index in torch.nonzero(cut).flatten().tolist():
            width = before if low[index] else after
            depth = width if whole[index] or width < 2 else 1 + int(partial[index] * (width - 1))
            edge = slice(0, depth) if low[index] else slice(scales.shape[-2 + axis] - depth, None)
            if axis == 0:
                scales[index, ..., edge, :] = 0.0
            else:
                scales[index, ..., edge] = 0.0
    return scales


class PatchDataModule(pl.LightningDataModule):
    """Overlapping patches of the bulk pixels of a spectrum image, split into training and validation.

    Parameters
    ----------
    counts
        Counts (y, x, E).
    mask
        (y, x) bulk pixels to learn from; a patch is used when all its pixels are in the mask.
        None: every pixel.
    patch_size, stride
        Patch side and step in pixels, (py, px) each.
    batch_size
        Patches per batch.
    val_fraction
        Share of the rows held out for validation (early stopping) and for calibrating the threshold:
        a strip at the bottom of the image whose patches never train the model, and that no training
        patch overlaps, so its pixels are as new to the model as a test cube's. When the strip would
        hold fewer than 2 patches (a small bulk mask), a random share of the patches instead.
    augment
        Show each training patch in a random one of its 8 mirror images and quarter turns (4 when the
        patch is not square) every epoch: a bulk region has no preferred direction, and one image gives
        only a few hundred patches. It is there for real images with oriented features (a grain
        boundary, a scan distortion) that a small training set would otherwise tie to one direction;
        on the simulated grid it changed nothing measurable (``benchmarks/README.md``).
    hole
        ``(hy, hx)`` pixels hidden at each patch's centre (a blind-spot model), or None.
    edge_share
        With a ``hole``: along each axis, the share of training patches whose ring is cut on one side (its
        pixels' scales set to zero, :func:`cut_rings`), so that the network learns to predict a hidden centre at
        an image's edge from the part of its ring inside the image (scoring hides the pixels beyond the edge
        alike, rather than showing the network their mirror copies, which hold the hidden pixels themselves).
    seed
        Seed of the split, the shuffling, the augmentation and the cut rings.

    Attributes
    ----------
    holdout_pixels : ndarray of bool (y, x)
        The pixels no training patch covers (all False after a random split), set by ``setup``.
    """

    def __init__(self, counts: np.ndarray, mask: np.ndarray | None = None, *, patch_size=(8, 8), stride=(4, 4),
                 batch_size: int = 16, val_fraction: float = 0.15, augment: bool = True,
                 hole: tuple[int, int] | None = None, edge_share: float = 0.25, seed: int = 0) -> None:
        super().__init__()
        self.counts = np.asarray(counts, dtype=np.float32)
        self.mask = mask
        self.patch_size = tuple(patch_size)
        self.stride = tuple(stride)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.augment = augment
        self.hole = hole
        self.edge_share = edge_share
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        patches, scales, corners = extract_patches(self.counts, self.patch_size, self.stride)
        ny, nx = self.counts.shape[:2]
        keep = np.ones(len(corners), dtype=bool)
        if self.mask is not None:
            mask = pad_to_patch(np.asarray(self.mask)[..., None], self.patch_size)[..., 0]
            keep = np.array([mask[y:y + self.patch_size[0], x:x + self.patch_size[1]].all() for y, x in corners])
            if keep.sum() < 2:
                raise ValueError(
                    f"the training mask leaves {int(keep.sum())} patches of {self.patch_size} pixels wholly in the "
                    "bulk; use a smaller patch_size or a larger bulk region"
                )
        rows = np.array([y for y, _ in corners])
        # the validation strip: patches starting at or below `cut`; training patches must end above it
        cut = min(int(round((1.0 - self.val_fraction) * ny / self.stride[0])) * self.stride[0], int(rows.max()))
        val = keep & (rows >= cut)
        train = keep & (rows + self.patch_size[0] <= cut)
        self.holdout_pixels = np.zeros((ny, nx), dtype=bool)
        if self.val_fraction > 0 and val.sum() >= 2 and train.sum() >= 2:
            self.holdout_pixels[cut:] = True
        else:  # too few patches for a strip: a random share of them
            indices = np.flatnonzero(keep)
            order = np.random.default_rng(self.seed).permutation(indices)
            n_val = int(round(self.val_fraction * len(order))) if len(order) >= 4 else 0
            val, train = np.zeros_like(keep), np.zeros_like(keep)
            val[order[:n_val]], train[order[n_val:]] = True, True
            if not n_val:
                val = train
        if self.mask is not None:
            self.holdout_pixels &= np.asarray(self.mask, dtype=bool)
        train_index, val_index = torch.from_numpy(np.flatnonzero(train)), torch.from_numpy(np.flatnonzero(val))
        self.train_set = TensorDataset(patches[train_index], scales[train_index])
        self.val_set = TensorDataset(patches[val_index], scales[val_index])

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is None or not self.trainer.training:
            return batch
        if self.augment:
            if not hasattr(self, "_augment_generator"):
                self._augment_generator = torch.Generator().manual_seed(self.seed + 1)
            choice = torch.randint(0, 8, (len(batch[0]),), generator=self._augment_generator)
            batch = tuple(random_dihedral(tensor, choice) for tensor in batch)
        if self.hole is not None and self.edge_share > 0:
            if not hasattr(self, "_edge_generator"):
                self._edge_generator = torch.Generator().manual_seed(self.seed + 2)
            ring = tuple((edge.start, p - edge.stop) for p, edge in zip(self.patch_size,
                                                                        hole_slices(self.patch_size, self.hole),
                                                                        strict=True))
            counts, scales = batch
            batch = counts, cut_rings(scales, ring, self.edge_share, self._edge_generator).to(scales.device)
        return batch

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
