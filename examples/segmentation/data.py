"""Procedural shapes: binary segmentation plus classification on tiny images, generated, never downloaded.

Each image holds one target shape of one of five classes (circle, square, triangle, cross, ring) at a random
position, scale and rotation, filled with its own texture and drawn over a textured, noisy background with clutter.
An occluding bar hides part of it in most images; occluded pixels are not in the mask. Every sample is a pure
function of ``(data_seed, split, index)``, so the train/val/test splits are fixed and identical for every run.

Labels can be scarce: with ``labelled_fraction`` below 1, only a fixed, seeded subset of the training images keeps
its mask and class (the others' are hidden: an empty mask, class -1, ``labelled`` False). A training batch is
``(image, mask, class, labelled)``; validation and test batches are ``(image, mask, class)``, every one labelled.
Which training images a run sees follows the stage's ``data`` (the module's ``stage_data``): ``"all"`` (also the
default, without a schedule) or ``"labelled"``, the labelled subset alone.
"""

from __future__ import annotations

import numbers
from functools import lru_cache
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages.errors import StageConfigError, StageProblem, did_you_mean

CLASSES = ("circle", "square", "triangle", "cross", "ring")
SPLITS = {"train": 0, "val": 1, "test": 2}
#: the values a stage's ``data`` may take with this data module (``None``, no ``data``, means ``"all"``)
TRAIN_DATA = ("all", "labelled")
_LABEL_STREAM = 3  # the random stream that picks the labelled subset, apart from the splits' 0, 1, 2


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


def labelled_indices(data_seed: int, num_train: int, labelled_fraction: float) -> torch.Tensor:
    """The sorted indices of the training images whose labels are known: ``round(labelled_fraction * num_train)``
    of them (at least one), the head of a permutation seeded by ``data_seed`` alone.

    So the subset is the same for every run and every training seed, and a larger fraction keeps the smaller one's
    images.

    Example::

        >>> labelled_indices(0, 10, 0.3).tolist() == sorted(labelled_indices(0, 10, 0.3).tolist())
        True
        >>> len(labelled_indices(0, 2048, 0.1)), len(labelled_indices(0, 10, 1.0))
        (205, 10)
        >>> set(labelled_indices(0, 100, 0.1).tolist()) <= set(labelled_indices(0, 100, 0.5).tolist())
        True
    """
    count = max(1, round(labelled_fraction * num_train))
    order = np.random.default_rng([data_seed, _LABEL_STREAM]).permutation(num_train)
    return torch.from_numpy(np.sort(order[:count]))


def labelled_train_split(
    data_seed: int, n: int, size: int, labelled_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training split as the student sees it: images, masks and classes with the labels of the images outside
    :func:`labelled_indices` hidden (empty mask, class -1), and the ``labelled`` flags ``(n,)``.

    Example::

        >>> images, masks, classes, labelled = labelled_train_split(0, 8, 16, 0.25)
        >>> int(labelled.sum()), classes[~labelled].tolist(), float(masks[~labelled].sum())
        (2, [-1, -1, -1, -1, -1, -1], 0.0)
    """
    images, masks, classes = make_split(data_seed, "train", n, size)
    labelled = torch.zeros(n, dtype=torch.bool)
    labelled[labelled_indices(data_seed, n, labelled_fraction)] = True
    hidden = ~labelled
    masks, classes = masks.clone(), classes.clone()  # make_split's tensors are cached and shared: never write to them
    masks[hidden] = 0.0
    classes[hidden] = -1
    return images, masks, classes, labelled


class ShapesDataModule(pl.LightningDataModule):
    """Fixed train/val/test splits of procedural shapes, with the labels of only a seeded share of the training
    images when ``labelled_fraction`` < 1.

    Args:
        num_train: training images.
        num_val: validation images.
        num_test: test images.
        image_size: height and width of the images.
        batch_size: batch size of every loader.
        data_seed: seed of the data (independent of ``seed_everything``, so every run sees the same images); it
            also picks the labelled subset.
        labelled_fraction: share of the training images whose mask and class are known, in (0, 1].

    Raises:
        ValueError: ``labelled_fraction`` outside (0, 1].

    Example::

        >>> ShapesDataModule(num_train=2048, labelled_fraction=0.1).num_labelled
        205
    """

    def __init__(
        self,
        num_train: int = 2048,
        num_val: int = 256,
        num_test: int = 512,
        image_size: int = 32,
        batch_size: int = 32,
        data_seed: int = 0,
        labelled_fraction: float = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(labelled_fraction, bool) or not isinstance(labelled_fraction, numbers.Real) or not (
            0 < labelled_fraction <= 1
        ):
            raise ValueError(f"Expected argument `labelled_fraction` to be in (0, 1] but got {labelled_fraction!r}")
        labelled_fraction = float(labelled_fraction)  # a numpy scalar in a checkpoint fails torch.load(weights_only)
        self.save_hyperparameters()
        self.num_classes = len(CLASSES)
        self.num_labelled = len(labelled_indices(data_seed, num_train, labelled_fraction))

    def _dataset(self, split: str, n: int) -> TensorDataset:
        return TensorDataset(*make_split(self.hparams.data_seed, split, n, self.hparams.image_size))

    def train_dataset(self, data: Optional[str] = "all") -> TensorDataset:
        """The training images of ``data`` (``"all"``, ``None`` for all, or ``"labelled"``) as
        ``(image, mask, class, labelled)`` rows."""
        h = self.hparams
        tensors = labelled_train_split(h.data_seed, h.num_train, h.image_size, h.labelled_fraction)
        if data == "labelled":
            keep = tensors[3]
            tensors = tuple(t[keep] for t in tensors)  # type: ignore[assignment]
        return TensorDataset(*tensors)

    def train_dataloader(self) -> DataLoader:
        """The training images the current stage wants: the module's ``stage_data``, ``"all"`` without one."""
        fitting = self.trainer
        data = getattr(fitting.lightning_module, "stage_data", None) if fitting is not None else None
        if fitting is not None:
            _check_stage_data(fitting, data)
        return DataLoader(self.train_dataset(data), batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("val", self.hparams.num_val), batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("test", self.hparams.num_test), batch_size=256)


def _check_stage_data(trainer: Any, current: Optional[str]) -> None:
    """Every stage's ``data`` must be one this module knows; all problems are raised together, each naming its stage,
    before the first training batch (the loader is built before it)."""
    problems = []
    for callback in trainer.callbacks:
        schedule = getattr(callback, "resolved_schedule", None)
        for index, stage in enumerate(getattr(schedule, "stages", ())):
            data = getattr(stage, "data", None)
            if data is not None and data not in TRAIN_DATA:
                problems.append(StageProblem(f"ShapesDataModule knows {list(TRAIN_DATA)}", index=index,
                                             name=stage.name, field="data", value=data,
                                             hint=did_you_mean(str(data), TRAIN_DATA)))
    if not problems and current is not None and current not in TRAIN_DATA:  # set without a schedule
        problems.append(StageProblem(f"ShapesDataModule knows {list(TRAIN_DATA)}", field="stage_data", value=current,
                                     hint=did_you_mean(str(current), TRAIN_DATA)))
    if problems:
        raise StageConfigError(problems)
