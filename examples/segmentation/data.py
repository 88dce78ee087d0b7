"""Procedural shapes: binary segmentation plus classification on tiny images, generated, never downloaded.

Each image holds one target shape of one of five classes (circle, square, triangle, cross, ring) at a random
position, scale and rotation, filled with its own texture and drawn over a textured, noisy background with clutter.
An occluding bar hides part of it in most images; occluded pixels are not in the mask. Every sample is a pure
function of ``(data_seed, split, index)``, so the train/val/test splits are fixed and identical for every run.
"""

from __future__ import annotations

from functools import lru_cache

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

CLASSES = ("circle", "square", "triangle", "cross", "ring")
SPLITS = {"train": 0, "val": 1, "test": 2}


def _grating(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, low: float, high: float) -> np.ndarray:
    """A random sinusoidal texture in [-1, 1]."""
    freq = rng.uniform(low, high)
    angle = rng.uniform(0, np.pi)
    phase = rng.uniform(0, 2 * np.pi)
    return np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)


def _shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, rot: float) -> np.ndarray:
    """The boolean mask of a shape of class ``kind`` centred at (cy, cx) with radius ``r``, rotated by ``rot``."""
    dy, dx = yy - cy, xx - cx
    u = np.cos(rot) * dx + np.sin(rot) * dy
    v = -np.sin(rot) * dx + np.cos(rot) * dy
    dist = np.hypot(u, v)
    if kind == 0:  # circle
        return dist <= r
    if kind == 1:  # square
        side = r * 0.85
        return (np.abs(u) <= side) & (np.abs(v) <= side)
    if kind == 2:  # triangle (equilateral, pointing along -v)
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = rot + np.pi / 2 + 2 * np.pi * k / 3
            inside &= (np.cos(a) * dx + np.sin(a) * dy) <= r * 0.55
        return inside
    if kind == 3:  # cross
        arm = max(r * 0.33, 1.2)
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    # ring
    return (dist <= r) & (dist >= r * 0.55)


def make_sample(data_seed: int, split: int, index: int, size: int = 32) -> tuple[np.ndarray, np.ndarray, int]:
    """One image ``(3, size, size)`` float32, its mask ``(size, size)`` float32 and its class, deterministically."""
    rng = np.random.default_rng([data_seed, split, index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # textured background: two gratings mixed into random colours, plus low-frequency shading
    t1 = _grating(rng, yy, xx, 0.3, 1.4)
    t2 = _grating(rng, yy, xx, 0.1, 0.5)
    base = rng.uniform(-0.6, 0.6, (3, 1, 1))
    c1, c2 = rng.uniform(-0.35, 0.35, (2, 3, 1, 1))
    image = base + c1 * t1 + c2 * t2
    # clutter: small blobs of random colours (never in the mask)
    for _ in range(rng.integers(0, 3)):
        blob = _shape_mask(int(rng.integers(0, 5)), yy, xx, rng.uniform(0, size), rng.uniform(0, size),
                           rng.uniform(1.5, 3.0), rng.uniform(0, np.pi))
        image = np.where(blob, rng.uniform(-1, 1, (3, 1, 1)), image)
    # the target shape: its own colour (contrasting with the background) and texture, varied scale and place
    kind = int(rng.integers(0, len(CLASSES)))
    r = rng.uniform(0.2, 0.42) * size
    cy, cx = rng.uniform(0.3 * size, 0.7 * size, 2)
    mask = _shape_mask(kind, yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi))
    colour = rng.uniform(-1, 1, (3, 1, 1))
    while np.abs(colour - base).max() < 0.7:
        colour = rng.uniform(-1, 1, (3, 1, 1))
    fill = colour + rng.uniform(0.1, 0.3) * _grating(rng, yy, xx, 0.5, 1.6)
    image = np.where(mask, fill, image)
    # occlusion: a textured bar in front of the shape in half of the images
    if rng.random() < 0.5:
        angle = rng.uniform(0, np.pi)
        offset = rng.uniform(-0.6, 0.6) * r
        width = rng.uniform(0.08, 0.18) * size
        d = np.cos(angle) * (xx - cx) + np.sin(angle) * (yy - cy) - offset
        bar = np.abs(d) <= width / 2
        image = np.where(bar, base + rng.uniform(-0.5, 0.5, (3, 1, 1)) + 0.3 * _grating(rng, yy, xx, 0.8, 2.0),
                         image)
        mask = mask & ~bar
    image = image + rng.normal(0.0, rng.uniform(0.05, 0.2), image.shape)
    return image.astype(np.float32), mask.astype(np.float32), kind


@lru_cache(maxsize=8)
def make_split(data_seed: int, split: str, n: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` samples of a split as tensors: images ``(n, 3, H, W)``, masks ``(n, 1, H, W)``, classes ``(n,)``.

    Cached, so several runs in one process (``lightning-stages compare``) share the generated data.
    """
    samples = [make_sample(data_seed, SPLITS[split], i, size) for i in range(n)]
    images = torch.from_numpy(np.stack([s[0] for s in samples]))
    masks = torch.from_numpy(np.stack([s[1] for s in samples]))[:, None]
    labels = torch.tensor([s[2] for s in samples], dtype=torch.long)
    return images, masks, labels


class ShapesDataModule(pl.LightningDataModule):
    """Fixed train/val/test splits of procedural shapes.

    Args:
        num_train: training images.
        num_val: validation images.
        num_test: test images.
        image_size: height and width of the images.
        batch_size: batch size of every loader.
        data_seed: seed of the data (independent of ``seed_everything``, so every run sees the same images).
    """

    def __init__(
        self,
        num_train: int = 2048,
        num_val: int = 256,
        num_test: int = 512,
        image_size: int = 32,
        batch_size: int = 32,
        data_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_classes = len(CLASSES)

    def _dataset(self, split: str, n: int) -> TensorDataset:
        return TensorDataset(*make_split(self.hparams.data_seed, split, n, self.hparams.image_size))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("train", self.hparams.num_train), batch_size=self.hparams.batch_size,
                          shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("val", self.hparams.num_val), batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("test", self.hparams.num_test), batch_size=256)
