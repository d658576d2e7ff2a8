"""Image classification data: scikit-learn's bundled digits (the default, no download) or a
folder of class sub-folders (users' own images, read with PIL).

Both become an :class:`ImageSet` (labels in memory, pixels read on demand as float32
``[n, channels, size, size]`` in [0, 1]). :func:`split` holds out a fixed fraction,
:func:`sample_indices` draws training samples as a pure function of (seed, step, micro,
dp rank, dp size), and :class:`ImageData` is what a recipe hands the training loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from mptk.config.schema import DataConfig, DataSource, RunConfig
from mptk.data.order import Place, global_samples

SPLIT_SEED = 0
"""Seed of the held-out split: fixed, so every run (any ``train.seed``) evaluates the same images."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""File endings read as images in an image folder (case-insensitive)."""


# ---------------------------------------------------------------------------------------
# Image sets
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageSet:
    """Images addressed by index: labels in memory, pixels read on demand."""

    labels: np.ndarray
    """int64 class index per image."""
    classes: tuple[str, ...]
    """Class names; label ``i`` is ``classes[i]``."""
    read: Callable[[np.ndarray], np.ndarray]
    """Indices -> float32 pixels ``[n, channels, size, size]`` in [0, 1]."""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> ImageSet:
        """The images at ``indices`` (re-numbered from 0)."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageSet(labels=self.labels[indices], classes=self.classes,
                        read=lambda i: self.read(indices[np.asarray(i, dtype=np.int64)]))

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """``images`` float32 ``[n, c, h, w]`` and ``labels`` int64 ``[n]``."""
        indices = np.asarray(indices, dtype=np.int64)
        return {"images": torch.from_numpy(np.ascontiguousarray(self.read(indices))),
                "labels": torch.from_numpy(self.labels[indices].copy())}


def fit(pixels: np.ndarray, size: int, channels: int) -> np.ndarray:
    """``[n, c, h, w]`` pixels resized to ``size`` (bilinear) with ``channels`` channels."""
    out = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    if out.shape[-1] != size or out.shape[-2] != size:
        out = torch.nn.functional.interpolate(out, size=(size, size), mode="bilinear",
                                              align_corners=False)
    if out.shape[1] != channels:
        out = out.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    return out.contiguous().numpy()


def digits(size: int = 8, channels: int = 1) -> ImageSet:
    """scikit-learn's 1,797 8x8 handwritten digits (ships with the package)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = fit(bunch.images[:, None].astype(np.float32) / 16.0, size, channels)
    return ImageSet(labels=bunch.target.astype(np.int64),
                    classes=tuple(str(c) for c in bunch.target_names),
                    read=lambda i: pixels[i])


def class_names(root: str | Path) -> list[str]:
    """Sub-folder names of ``root`` (one class each), sorted; hidden folders skipped."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"data.image_root={str(root)!r} is not a folder; give a folder "
                                f"with one sub-folder of images per class")
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image as float32 ``[channels, size, size]`` in [0, 1] (PIL, bilinear resize)."""
    from PIL import Image

    with Image.open(path) as img:
        # Pillow sets its BILINEAR alias at import time, which its annotations do not show
        small = img.convert("L" if channels == 1 else "RGB").resize(
            (size, size), Image.BILINEAR)  # type: ignore[attr-defined]
        arr = np.asarray(small, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(np.broadcast_to(arr, (channels, size, size)))


def image_folder(root: str | Path, size: int, channels: int) -> ImageSet:
    """``root/<class>/<image>``: classes are the sorted sub-folder names."""
    classes = class_names(root)
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = image_files(Path(root).expanduser() / name)
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise ValueError(f"data.image_root={str(root)!r} has no images in class sub-folders "
                         f"(looked for {', '.join(IMAGE_SUFFIXES)})")
    return ImageSet(labels=np.asarray(labels, dtype=np.int64), classes=tuple(classes),
                    read=lambda i: np.stack([read_image(paths[j], size, channels) for j in i]))


def load(cfg: DataConfig, size: int, channels: int) -> ImageSet:
    """The configured image source."""
    if cfg.source is DataSource.digits:
        return digits(size, channels)
    if cfg.source is DataSource.image_folder:
        return image_folder(cfg.image_root, size, channels)
    raise ValueError(f"data.source={cfg.source.value} is not an image source; "
                     f"use data.source=digits or data.source=image_folder")


# ---------------------------------------------------------------------------------------
# Split and sampling
# ---------------------------------------------------------------------------------------


def split(n: int, fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, held-out) indices: a seeded random ``fraction`` of ``n`` held out."""
    if n < 2:
        raise ValueError(f"need at least 2 images to hold one out, got {n}")
    held_n = min(n - 1, max(1, round(n * fraction)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[held_n:]), np.sort(perm[:held_n])


@lru_cache(maxsize=8)
def epoch_permutation(seed: int, n: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def sample_indices(seed: int, n: int, step: int, micro: int, micro_batch_size: int,
                   grad_acc: int, dp_rank: int, dp_size: int) -> np.ndarray:
    """Training images of one micro-batch on one dp rank (a pure function of its arguments).

    Global sample ``g`` is ``perm(g // n)[g % n]``; step ``s`` covers global samples
    ``s*G .. s*G+G-1`` (G = global batch) whatever the dp / grad-acc split.
    """
    samples = global_samples(step, micro, micro_batch_size, grad_acc, dp_rank, dp_size)
    epochs, pos = np.divmod(np.array(samples), n)
    return np.array([epoch_permutation(seed, n, int(e))[p] for e, p in zip(epochs, pos)],
                    dtype=np.int64)


def eval_shards(n: int, batches: int, dp_rank: int, dp_size: int) -> list[np.ndarray]:
    """The whole held-out split in ``batches`` micro-batches per dp rank, each image once.

    Rank ``r`` takes images ``r, r + dp, ...``; every rank gets the same number of batches
    (ZeRO-3 gathers parameters in each forward), fewer when the split is tiny.
    """
    if n < dp_size:
        raise ValueError(f"held-out split has {n} images, fewer than dp({dp_size}); "
                         f"raise data.heldout_fraction")
    count = max(1, min(batches, n // dp_size))
    return np.array_split(np.arange(dp_rank, n, dp_size), count)


# ---------------------------------------------------------------------------------------
# What the loop sees
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class ImageData:
    """Image batches for one data-parallel rank (identical on its tp peers)."""

    train: ImageSet
    heldout: ImageSet
    seed: int
    place: Place

    @classmethod
    def prepare(cls, cfg: RunConfig, layout, size: int, channels: int,
                num_classes: int, log=print) -> ImageData:
        """Load the configured images, split them and bind to this rank's dp place."""
        images = load(cfg.data, size, channels)
        check_classes(images, num_classes)
        train, held = split(len(images), cfg.data.heldout_fraction)
        log(f"{cfg.data.source.value}: {len(images)} images, {len(images.classes)} classes "
            f"-> {len(train)} train / {len(held)} held-out")
        return cls(train=images.subset(train), heldout=images.subset(held),
                   seed=cfg.train.seed, place=Place.of(cfg, layout))

    def batch(self, step: int, micro: int) -> dict:
        p = self.place
        return self.train.batch(sample_indices(self.seed, len(self.train), step, micro,
                                               p.micro_batch_size, p.grad_acc, p.dp_rank,
                                               p.dp_size))

    def eval_batches(self) -> list[dict]:
        p = self.place
        shards = eval_shards(len(self.heldout), p.eval_batches, p.dp_rank, p.dp_size)
        return [self.heldout.batch(idx) for idx in shards]


def check_classes(images: ImageSet, num_classes: int) -> None:
    """The model's output layer must match the data's class count."""
    if len(images.classes) != num_classes:
        raise ValueError(f"model.num_classes({num_classes}) != {len(images.classes)} classes "
                         f"in the data; set model.num_classes={len(images.classes)}")
