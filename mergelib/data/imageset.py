"""The container every generator returns: 32x32 RGB uint8 images with integer labels.

Also the small deterministic helpers the generators share (stable hashing of names into seeds,
interpolation matrices for resizing) and the re-exported :class:`~mergelib.errors.UnknownNameError`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from mergelib.errors import UnknownNameError  # one package-wide class; its str() is the plain message

__all__ = ["ImageSet", "UnknownNameError", "stable_int", "derive_seed", "unknown", "resize_matrix", "to_imageset"]

IMAGE_SIZE = 32


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with == is ambiguous
class ImageSet:
    """A labelled image set: ``images`` uint8 ``[N, 3, 32, 32]``, ``labels`` int64 ``[N]``.

    ``source_indices`` (optional, int64 ``[N]``) are the indices of the source images in their
    original dataset split (e.g. Fashion-MNIST train), so that disjointness can be checked.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classnames: tuple[str, ...]
    name: str
    source_indices: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "classnames", tuple(self.classnames))
        images, labels = self.images, self.labels
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            got = getattr(images, "dtype", type(images))
            raise ValueError(f"{self.name}: images must be a torch.uint8 tensor, got {got}")
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"{self.name}: images must have shape [N, 3, 32, 32], got {list(images.shape)}")
        check_labels(self.name, labels, self.classnames, len(images), "images")
        if self.source_indices is not None and (
            self.source_indices.dtype != torch.int64 or tuple(self.source_indices.shape) != (len(images),)
        ):
            raise ValueError(f"{self.name}: source_indices must be int64 of shape [{len(images)}]")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"ImageSet(name={self.name!r}, n={len(self)}, classes={len(self.classnames)})"

    def fingerprint(self) -> str:
        """SHA-256 of the images, labels, class names and name (stable across runs and machines)."""
        digest = hashlib.sha256()
        digest.update(self.images.contiguous().numpy().tobytes())
        # explicit little-endian so the bytes do not depend on the machine
        digest.update(self.labels.numpy().astype("<i8").tobytes())
        digest.update("\x1f".join(self.classnames).encode())
        digest.update(self.name.encode())
        return digest.hexdigest()

    def subset(self, n: int, seed: int) -> "ImageSet":
        """A deterministic random subset of ``n`` items (same name; order is random)."""
        if not 0 <= n <= len(self):
            raise ValueError(f"{self.name}: cannot take a subset of {n} from {len(self)} items")
        index = torch.from_numpy(np.random.default_rng([seed, stable_int(self.name)]).permutation(len(self))[:n])
        sources = None if self.source_indices is None else self.source_indices[index]
        return ImageSet(self.images[index], self.labels[index], self.classnames, self.name, sources)


def check_labels(name: str, labels: object, classnames: tuple[str, ...], count: int, items: str) -> None:
    """Check that ``labels`` are ``count`` int64 indices into ``classnames`` (``items``: what is labelled)."""
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.ndim != 1:
        raise ValueError(f"{name}: labels must be a 1-D torch.int64 tensor")
    if len(labels) != count:
        raise ValueError(f"{name}: {count} {items} but {len(labels)} labels")
    if not classnames or not all(isinstance(c, str) for c in classnames):
        raise ValueError(f"{name}: classnames must be a non-empty tuple of strings")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classnames)):
        raise ValueError(f"{name}: labels must lie in [0, {len(classnames)}), got [{int(labels.min())}, {int(labels.max())}]")


def stable_int(text: str) -> int:
    """A deterministic 63-bit integer from a string (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def derive_seed(*parts: object) -> int:
    """A seed derived from several parts, e.g. ``derive_seed(seed, "benchmark", "train")``."""
    return stable_int("/".join(map(str, parts)))


def unknown(kind: str, name: object, valid: Iterable[str]) -> UnknownNameError:
    return UnknownNameError(kind, name, valid)


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` bilinear interpolation matrix (pixel-centre aligned), so that a batch
    resize is two matrix products: ``R @ image @ R.T``."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (src - lo).astype(np.float32)
    matrix = np.zeros((n_out, n_in), np.float32)
    matrix[np.arange(n_out), lo] += 1 - w
    matrix[np.arange(n_out), hi] += w
    return matrix


def to_imageset(
    rgb: np.ndarray, labels: np.ndarray, classnames: tuple[str, ...], name: str, sources: np.ndarray | None = None
) -> ImageSet:
    """Wrap ``[N, 32, 32, 3]`` uint8 numpy images (channels-last, as rendered) into an ImageSet."""
    images = torch.from_numpy(np.ascontiguousarray(rgb.transpose(0, 3, 1, 2)))
    src = None if sources is None else torch.from_numpy(np.asarray(sources, dtype=np.int64))
    return ImageSet(images, torch.from_numpy(np.asarray(labels, dtype=np.int64)), classnames, name, src)
