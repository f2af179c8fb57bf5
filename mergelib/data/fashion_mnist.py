"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017; MIT licence) read from its four IDX ``.gz`` files.

The files come from the Debian/Ubuntu package ``dataset-fashion-mnist`` (installed into
``/usr/share/datasets/fashion-mnist``), or from any folder named by ``MERGELIB_FASHION_MNIST``.
Parsed arrays are cached in memory, keyed by the folder, so repeated calls are free.

Every consumer draws from its own fixed region of a fixed permutation of each split
(:func:`fashion_partition`, :data:`FASHION_REGIONS`), so the domain benchmark, the pretraining pool
and the ``fashion`` task never share a source image, whatever seeds and sizes they are given:

========= ================================ ====================== ==========================
split     domain benchmark                 pretraining pool       ``fashion`` task
========= ================================ ====================== ==========================
train     [0, 24000): slot k = [4000k, ..) [24000, 50000)         [50000, 60000)
test      [0, 7500): all domains           (none)                 [7500, 10000)
========= ================================ ====================== ==========================

Each domain trains on its own slot of the train region; all domains are tested on the same draw
from the whole test region, each rendered in its own style. Seeds only choose which positions of
a region are used (and the rendering randomness).
"""

from __future__ import annotations

import gzip
import os
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from mergelib.data.imageset import stable_int

__all__ = [
    "FASHION_MNIST_CLASSES", "FASHION_REGIONS", "DatasetNotFoundError", "fashion_mnist_root",
    "load_fashion_mnist", "fashion_partition", "draw_from_region",
]

#: The ten Fashion-MNIST class names, in label order.
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "MERGELIB_FASHION_MNIST"
_FILES = {"train": "train", "test": "t10k"}  # split -> file prefix
_SIZES = {"train": 60000, "test": 10000}
#: The ``[start, end)`` positions in ``fashion_partition(split)`` reserved for each consumer.
FASHION_REGIONS = {
    "train": {"benchmark": (0, 24000), "pool": (24000, 50000), "task": (50000, 60000)},
    "test": {"benchmark": (0, 7500), "task": (7500, 10000)},
}
BENCHMARK_SLOTS = 6  # the benchmark's train region is cut into this many equal per-domain slots
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049  # IDX: 0x0803 (uint8, 3-D) and 0x0801 (uint8, 1-D)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset file is missing; the message says how to install it."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def fashion_mnist_root() -> Path:
    """``$MERGELIB_FASHION_MNIST`` if set, else ``/usr/share/datasets/fashion-mnist``."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT)


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 28, 28]`` and labels ``int64 [N]`` of ``split`` ("train" or "test").

    The arrays are cached and read-only; copy them before modifying.
    """
    if split not in _FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; valid splits: {', '.join(_FILES)}")
    return _load(str(fashion_mnist_root()), split)


@lru_cache(maxsize=4)
def _load(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = Path(root) / _FILES[split]
    images = _read_idx(Path(f"{prefix}-images-idx3-ubyte.gz"), _IMAGE_MAGIC, 3)
    labels = _read_idx(Path(f"{prefix}-labels-idx1-ubyte.gz"), _LABEL_MAGIC, 1).astype(np.int64)
    if len(images) != _SIZES[split] or len(labels) != _SIZES[split] or images.shape[1:] != (28, 28):
        raise ValueError(f"Fashion-MNIST {split}: expected {_SIZES[split]} 28x28 images and labels, "
                         f"got images {images.shape} and labels {labels.shape}")
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"Fashion-MNIST {split}: label {labels.max()} out of range")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


load_fashion_mnist.cache_clear = _load.cache_clear  # type: ignore[attr-defined]


def fashion_partition(split: str) -> np.ndarray:
    """The fixed permutation of ``split``'s indices that :data:`FASHION_REGIONS` slices.

    Seed-independent on purpose: consumers called with different seeds stay disjoint.
    """
    if split not in _SIZES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; valid splits: {', '.join(_SIZES)}")
    return np.random.default_rng(stable_int(f"mergelib/fashion-mnist/partition/{split}")).permutation(_SIZES[split])


def draw_from_region(split: str, start: int, end: int, n: int, seed: int, tag: str) -> np.ndarray:
    """``n`` distinct Fashion-MNIST indices of ``split`` from positions ``[start, end)`` of the
    partition, chosen by ``seed`` and ``tag`` (random order)."""
    capacity = end - start
    if not 1 <= n <= capacity:
        raise ValueError(f"{tag}: asked for {n} images of Fashion-MNIST {split}, but its region holds {capacity}")
    positions = start + np.random.default_rng([seed, stable_int(tag)]).choice(capacity, n, replace=False)
    return fashion_partition(split)[positions]


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    if not path.is_file():
        raise DatasetNotFoundError(
            f"Fashion-MNIST file not found: {path}\n"
            "Fix: on Debian/Ubuntu run `sudo apt-get install dataset-fashion-mnist` (`make book` does it "
            "when apt is available); otherwise download the four IDX .gz files "
            "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
            f"t10k-labels-idx1-ubyte.gz) into a folder and set {ENV_VAR} to that folder."
        )
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"corrupt or truncated Fashion-MNIST file {path}: {error}") from error
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"corrupt or truncated Fashion-MNIST file {path}: only {len(raw)} bytes")
    fields = np.frombuffer(raw[:header], dtype=">u4")
    if int(fields[0]) != magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind: magic {int(fields[0])}, expected {magic}")
    shape = tuple(int(d) for d in fields[1:])
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"corrupt or truncated Fashion-MNIST file {path}: {len(raw)} bytes, expected {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()
