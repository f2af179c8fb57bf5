"""A mini multi-task suite: four 32x32 RGB classification tasks with different label spaces.

* ``fashion``: clean Fashion-MNIST (MIT licence), ``photo`` rendering, from the task regions of
  the fixed partition (train positions [50000, 60000), test [7500, 10000); see
  :mod:`mergelib.data.fashion_mnist`), so never overlapping the domain benchmark or the pool.
* ``digits``: scikit-learn's bundled ``load_digits`` (1,797 8x8 digits, UCI optdigits), upscaled.
  A fixed stratified 70/30 split gives 1,258 train and 539 test images.
* ``animals``: the 10,000 animal silhouettes bundled in the ``animal-mnist`` wheel (MIT licence),
  read from its gzipped pickles (its own loader imports TensorFlow); fixed stratified 70/30 split.
* ``textures``: random 32x32 crops (random scale, flips) of six images bundled with scikit-image
  (BSD licence, no download): train crops from the left half of each image, test crops from the
  right half, so train and test pixels never overlap.

The train/test splits are fixed (seed-independent), so a model pretrained on one seed's training
images never saw another seed's test images; ``seed`` picks which images (or crops) are drawn.
Requested sizes are capped at ``TaskSpec.max_train`` / ``max_test`` (what the split holds).
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Callable, NamedTuple

import numpy as np

from mergelib._moved import renamed
from mergelib.data.domains import render_domain
from mergelib.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_REGIONS, draw_from_region, load_fashion_mnist
from mergelib.data.imageset import ImageSet, derive_seed, resize_matrix, stable_int, to_imageset, unknown

__all__ = ["TaskSpec", "MINI_SUITE_TASKS", "make_task", "TextureCrops", "sample_texture_crops", "TEXTURE_SOURCES"]

Builder = Callable[[str, int, int], ImageSet]  # (split, n, seed) -> set


@dataclass(frozen=True)
class TaskSpec:
    name: str
    classnames: tuple[str, ...]
    description: str
    caption_templates: tuple[str, ...]  # each with one "{}" for the class name
    max_train: int
    max_test: int
    build: Builder = field(repr=False, compare=False)


def make_task(name: str, n_train: int, n_test: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """The (train, test) sets of task ``name``; sizes are capped at the task's ``max_train``/``max_test``."""
    try:
        spec = MINI_SUITE_TASKS[name]
    except (KeyError, TypeError):
        raise unknown("task", name, MINI_SUITE_TASKS) from None
    if n_train < 1 or n_test < 1:
        raise ValueError(f"task {name}: n_train and n_test must be >= 1, got {n_train}, {n_test}")
    return spec.build("train", min(n_train, spec.max_train), seed), spec.build("test", min(n_test, spec.max_test), seed)


# ----------------------------------------------------------------------------- shared helpers
def _fixed_split(labels: np.ndarray, name: str, train_fraction: float = 0.7) -> dict[str, np.ndarray]:
    """Stratified split by a seed fixed per dataset: ``round(0.7 * count)`` of every class to train."""
    rng = np.random.default_rng(stable_int(f"mergelib/split/{name}"))
    parts: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        cut = int(round(train_fraction * len(members)))
        parts["train"].append(members[:cut])
        parts["test"].append(members[cut:])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def _balanced_pick(candidates: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` of ``candidates`` with class counts as equal as possible, in random order."""
    rank = np.empty(len(candidates))
    for c in np.unique(labels[candidates]):  # random rank of every item within its class
        members = np.flatnonzero(labels[candidates] == c)
        rank[members] = rng.permutation(len(members))
    order = np.lexsort((rng.random(len(candidates)), rank))  # round-robin over classes
    return rng.permutation(candidates[order[:n]])


def _grey_to_rgb32(gray: np.ndarray) -> np.ndarray:
    """float [N, h, w] in [0, 1] -> uint8 [N, 32, 32, 3] (bilinear)."""
    rows, cols = resize_matrix(gray.shape[1], 32), resize_matrix(gray.shape[2], 32)
    x = rows @ gray.astype(np.float32) @ cols.T
    return np.repeat((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)


# ----------------------------------------------------------------------------- fashion
def _build_fashion(split: str, n: int, seed: int) -> ImageSet:
    start, end = FASHION_REGIONS[split]["task"]
    index = draw_from_region(split, start, end, n, seed, f"task/fashion/{split}")
    images, labels = load_fashion_mnist(split)
    rgb = render_domain("photo", images[index], derive_seed(seed, "task/fashion", split))
    return to_imageset(rgb, labels[index], FASHION_MNIST_CLASSES, f"fashion/{split}", index)


# ----------------------------------------------------------------------------- digits
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    labels = bunch.target.astype(np.int64)
    return bunch.images / 16.0, labels, _fixed_split(labels, "digits")


def _build_digits(split: str, n: int, seed: int) -> ImageSet:
    images, labels, splits = _digits()
    index = _balanced_pick(splits[split], labels, n, np.random.default_rng([seed, stable_int(f"task/digits/{split}")]))
    return to_imageset(_grey_to_rgb32(images[index]), labels[index], DIGIT_CLASSES, f"digits/{split}", index)


# ----------------------------------------------------------------------------- animals
# label order checked by eye against the images (alphabetical, as the package's README lists them)
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


@lru_cache(maxsize=1)
def _animals() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    folder = resources.files("animal_mnist") / "data" / "Animal_MNIST"  # no import of the package
    # the wheel's own pickles (trusted package data): a uint8 [10000, 28, 28] array and int64 labels
    with (folder / "animal_data_version_3.gz").open("rb") as raw, gzip.open(raw) as handle:
        images = np.asarray(pickle.load(handle), dtype=np.uint8)
    with (folder / "animal_label_version_3.gz").open("rb") as raw, gzip.open(raw) as handle:
        labels = np.asarray(pickle.load(handle), dtype=np.int64)
    if images.shape != (10000, 28, 28) or labels.shape != (10000,) or labels.max() != 9:
        raise ValueError(f"unexpected animal-mnist files in {folder}: {images.shape}, {labels.shape}")
    return images, labels, _fixed_split(labels, "animals")


def _build_animals(split: str, n: int, seed: int) -> ImageSet:
    images, labels, splits = _animals()
    index = _balanced_pick(splits[split], labels, n, np.random.default_rng([seed, stable_int(f"task/animals/{split}")]))
    rgb = render_domain("photo", images[index], derive_seed(seed, "task/animals", split))
    return to_imageset(rgb, labels[index], ANIMAL_CLASSES, f"animals/{split}", index)


# ----------------------------------------------------------------------------- textures
# class name -> scikit-image loader name; all bundled with the wheel (checked offline)
TEXTURE_SOURCES = {
    "grass": "grass", "brick": "brick", "gravel": "gravel", "coins": "coins",
    "stained tissue": "immunohistochemistry", "star field": "hubble_deep_field",
}
TEXTURE_CLASSES = tuple(TEXTURE_SOURCES)
_CROP_SIZES = (24, 72)  # crop side in source pixels before resizing to 32: random scale


@lru_cache(maxsize=1)
def _texture_images() -> tuple[np.ndarray, ...]:
    from skimage import data
    from skimage.color import rgb2gray

    out = []
    for loader in TEXTURE_SOURCES.values():
        image = getattr(data, loader)()
        out.append(rgb2gray(image).astype(np.float32) if image.ndim == 3 else image.astype(np.float32) / 255)
    return tuple(out)


class TextureCrops(NamedTuple):
    """Crop boxes in source-image pixels: rows ``[top, top+size)``, columns ``[left, left+size)``."""

    labels: np.ndarray
    top: np.ndarray
    left: np.ndarray
    size: np.ndarray
    flip_h: np.ndarray
    flip_v: np.ndarray


def texture_half(label: int, split: str) -> tuple[int, int]:
    """Columns ``[start, end)`` of source image ``label`` that ``split``'s crops come from."""
    width = _texture_images()[label].shape[1]
    return (0, width // 2) if split == "train" else (width // 2, width)


def sample_texture_crops(split: str, n: int, seed: int) -> TextureCrops:
    """Balanced random crop boxes of ``split``, each inside that split's half of its image."""
    rng = np.random.default_rng([seed, stable_int(f"task/textures/{split}")])
    labels = rng.permutation(np.arange(n) % len(TEXTURE_CLASSES))
    size = rng.integers(_CROP_SIZES[0], _CROP_SIZES[1] + 1, n)
    top, left = np.empty(n, np.int64), np.empty(n, np.int64)
    for c, image in enumerate(_texture_images()):
        m = labels == c
        start, end = texture_half(c, split)
        top[m] = rng.integers(0, image.shape[0] - size[m] + 1)
        left[m] = start + rng.integers(0, end - start - size[m] + 1)
    return TextureCrops(labels, top, left, size, rng.random(n) < 0.5, rng.random(n) < 0.5)


def _crop_resize(image: np.ndarray, top: np.ndarray, left: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Bilinear 32x32 resamples of boxes of ``image`` by gathering; samples stay inside each box."""
    t = (np.arange(32) + 0.5) / 32  # sample positions as fractions of the box

    def axis(start: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip(start[:, None] + t * size[:, None] - 0.5, start[:, None], (start + size - 1)[:, None])
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, (start + size - 1)[:, None])
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, wy = axis(top)
    x0, x1, wx = axis(left)
    wy, wx = wy[:, :, None], wx[:, None, :]
    g = lambda ys, xs: image[ys[:, :, None], xs[:, None, :]]  # noqa: E731  [m, 32, 32]
    return (g(y0, x0) * (1 - wx) + g(y0, x1) * wx) * (1 - wy) + (g(y1, x0) * (1 - wx) + g(y1, x1) * wx) * wy


def _build_textures(split: str, n: int, seed: int) -> ImageSet:
    crops = sample_texture_crops(split, n, seed)
    out = np.empty((n, 32, 32), np.float32)
    for c, image in enumerate(_texture_images()):
        m = crops.labels == c
        out[m] = _crop_resize(image, crops.top[m], crops.left[m], crops.size[m])
    out[crops.flip_h] = out[crops.flip_h][:, :, ::-1]
    out[crops.flip_v] = out[crops.flip_v][:, ::-1, :]
    rgb = np.repeat((np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)
    return to_imageset(rgb, crops.labels, TEXTURE_CLASSES, f"textures/{split}")


#: The mini multi-task suite of the miniature, by task name (the papers' tasks are
#: :data:`mergelib.data.task_suites.TASKS`).
MINI_SUITE_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("fashion", FASHION_MNIST_CLASSES, "Clean Fashion-MNIST clothing photos, 10 classes.",
                 ("a photo of a {}.", "an image of a {}."), 10000, 2500, _build_fashion),
        TaskSpec("digits", DIGIT_CLASSES, "scikit-learn's 8x8 handwritten digits, upscaled, 10 classes.",
                 ("a photo of the digit {}.", "an image of the number {}."), 1258, 539, _build_digits),
        TaskSpec("animals", ANIMAL_CLASSES, "Animal-MNIST silhouettes of 10 animal species.",
                 ("a silhouette of a {}.", "a photo of a {}."), 7000, 3000, _build_animals),
        TaskSpec("textures", TEXTURE_CLASSES, "Patches of six natural images (textures and microscopy/astronomy "
                 "photos) bundled with scikit-image.", ("a photo of {} texture.", "a close-up photo of {}."),
                 100_000, 100_000, _build_textures),
    )
}

__getattr__ = renamed(__name__, {"TASKS": "MINI_SUITE_TASKS"})  # the old name warns until mergelib 0.3
