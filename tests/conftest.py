"""Shared fixtures: a tiny pretrained CLIP and a small benchmark, made once per test session."""

from __future__ import annotations

import logging
from pathlib import Path

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


def executions(log_dir: Path) -> dict[int, int]:
    """How many times each x of the ``sleep-and-square`` job kind was executed (each execution
    leaves one ``x<N>-*.run`` file in its ``log_dir``): the sweep and lock tests count reruns."""
    counts: dict[int, int] = {}
    for path in log_dir.glob("x*.run"):
        x = int(path.name[1:].split("-")[0])
        counts[x] = counts.get(x, 0) + 1
    return counts
