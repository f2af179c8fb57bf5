"""Labelled image files on disk: the form the papers' real datasets take.

An :class:`ImageFileSet` is what the registry of :mod:`mergelib.data.dg_datasets` returns
(:mod:`mergelib.data.task_suites` returns torchvision datasets, which evaluation also accepts): paths, integer labels and class names, with no pixels
read yet. It becomes a torch ``Dataset`` through ``ImageFileSet.with_transform``, which reads
each image with PIL, converts it to RGB and applies a transform (open_clip's train or validation
preprocessing). The miniature's ``ImageSet`` holds pixels in memory instead;
evaluation and fine-tuning accept either.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from mergelib.errors import MergelibError
from mergelib.data.imageset import check_labels


class DataLayoutError(MergelibError, FileNotFoundError):
    """A dataset folder does not have the layout its registry entry describes."""


@dataclass(frozen=True, eq=False)
class ImageFileSet:
    """Images as files: ``paths[i]`` has label ``labels[i]`` (an index into ``classnames``)."""

    paths: tuple[Path, ...]
    labels: torch.Tensor
    classnames: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(Path(p) for p in self.paths))
        object.__setattr__(self, "classnames", tuple(self.classnames))
        check_labels(self.name, self.labels, self.classnames, len(self.paths), "paths")

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ImageFileSet(name={self.name!r}, n={len(self)}, classes={len(self.classnames)})"

    def fingerprint(self) -> str:
        """SHA-256 of the file names (relative order kept), labels, class names and name.

        It identifies the split, not the pixels: reading every image to hash it would cost as
        much as an epoch. Files are named by their last three path components, so the same data
        under another root has the same fingerprint.
        """
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self.labels.tolist()):
            digest.update(f"{'/'.join(path.parts[-3:])}\x1e{label}\x1f".encode())
        digest.update("\x1f".join(self.classnames).encode())
        digest.update(self.name.encode())
        return digest.hexdigest()

    def missing_files(self) -> list[Path]:
        return [p for p in self.paths if not p.is_file()]

    def subset(self, n: int, seed: int) -> "ImageFileSet":
        """A deterministic random subset of ``n`` items."""
        if not 0 <= n <= len(self):
            raise ValueError(f"{self.name}: cannot take a subset of {n} from {len(self)} items")
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return ImageFileSet(tuple(self.paths[i] for i in index.tolist()), self.labels[index], self.classnames, self.name)

    def select(self, index: Sequence[int]) -> "ImageFileSet":
        index = list(index)
        return ImageFileSet(tuple(self.paths[i] for i in index), self.labels[index], self.classnames, self.name)

    def with_transform(self, transform: Callable) -> "TransformedImages":
        return TransformedImages(self, transform)


class TransformedImages(Dataset):
    """``(transform(RGB image), label)`` pairs of an :class:`ImageFileSet`."""

    def __init__(self, files: ImageFileSet, transform: Callable):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image, UnidentifiedImageError

        path = self.files.paths[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise DataLayoutError(f"{self.files.name}: cannot read image {path} ({error})") from error
        return self.transform(rgb), int(self.files.labels[index])
