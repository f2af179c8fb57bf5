"""Shared fixtures: a tiny pretrained CLIP and a small benchmark, made once per test session."""

from __future__ import annotations

import logging

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

