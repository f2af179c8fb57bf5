"""Shared fixtures: a tiny pretrained CLIP and a small benchmark, made once per test session."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mergelib.experiments.miniature import SMOKE_PARAMETERS, MiniatureConfig

logging.getLogger().setLevel(logging.ERROR)  # open_clip warns at each random initialisation

TINY = SMOKE_PARAMETERS


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mergelib-cache")


@pytest.fixture(scope="session")
def tiny_config(cache_dir) -> MiniatureConfig:
    return MiniatureConfig.from_parameters(**TINY, cache_dir=str(cache_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_clip(tiny_config, cache_dir):
    from mergelib.models.pretrain import pretrained_tiny_clip

    torch.set_num_threads(2)
    clip, manifest = pretrained_tiny_clip(tiny_config.pretrain, cache_dir, progress=False)
    return clip


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist_family(raw: Path, prefix: dict[str, str], sizes: dict[str, int], seed: int = 0) -> dict[str, tuple]:
    """Random 28x28 images and labels 0..9 in the IDX files of the MNIST family under ``raw``."""
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in sizes.items():
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(raw / f"{prefix[split]}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix[split]}-labels-idx1-ubyte", labels)
        out[split] = (images, labels)
    return out
