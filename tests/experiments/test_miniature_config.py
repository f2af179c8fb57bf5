"""Run parameters (papermill's): types, names and ranges are checked with clear messages."""

from __future__ import annotations

import pytest

from mergelib.errors import ParameterError, UnknownNameError
from mergelib.experiments.miniature import MiniatureConfig


def test_loose_values_are_coerced():
    config = MiniatureConfig.from_parameters(domains=["photo", "sketch"], coefficients=[1, 0.5], epochs=2)
    assert config.domains == ("photo", "sketch") and config.coefficients == (1.0, 0.5)
    assert config.finetune.epochs == 2 and config.pretrain.seed == config.seed


@pytest.mark.parametrize(
    "params, message",
    [
        ({"epochs": "three"}, "'epochs' must be int, got str 'three'"),
        ({"epochs": 2.5}, "'epochs' must be int"),
        ({"epochs": True}, "'epochs' must be int"),
        ({"seed": None}, "'seed' must be int"),
        ({"domains": "photo"}, "at least two domains"),  # one name is a one-element list, not five letters
        ({"domains": 3}, r"'domains\[0\]' must be str"),
        ({"methods": ["task_arithmetic", 3]}, r"'methods\[1\]' must be str"),
        ({"coefficients": ["1.0"]}, r"'coefficients\[0\]' must be float"),
        ({"epoch": 3}, "unknown parameter.*valid parameters: .*epochs"),
        ({"epochs": 0}, "'epochs' must be at least 1"),
        ({"n_test": 7501}, "parameter n_test=7501 is too large.*use n_test <= 7500"),
        ({"n_train": 4001}, "parameter n_train=4001 is too large.*use n_train <= 4000"),
        ({"domains": ["photo"]}, "at least two domains"),
    ],
)
def test_wrong_parameters_are_named(params, message):
    with pytest.raises(ParameterError, match=message):
        MiniatureConfig.from_parameters(**params)


@pytest.mark.parametrize(
    "params, kind, valid",
    [
        ({"backbone": "ViT-Z"}, "backbone", "tiny-clip"),
        ({"domains": ["photo", "cubism"]}, "domain", "halftone"),
        ({"methods": ["ties_typo"]}, "merge method", "task_arithmetic"),
    ],
)
def test_unknown_names_list_the_valid_ones(params, kind, valid):
    with pytest.raises(UnknownNameError) as info:
        MiniatureConfig.from_parameters(**params)
    assert f"unknown {kind}" in str(info.value) and valid in str(info.value)


def test_a_single_name_given_for_a_list_is_a_one_element_list():
    config = MiniatureConfig.from_parameters(methods="score", sweep_methods="score", coefficients=1)
    assert config.methods == ("score",) and config.sweep_methods == ("score",) and config.coefficients == (1.0,)


def test_the_default_run_covers_every_registered_method():
    from mergelib.methods import METHODS
    from mergelib.experiments.miniature import ALL_METHODS

    assert sorted(ALL_METHODS) == sorted(METHODS) and MiniatureConfig().methods == ALL_METHODS


def test_method_specs_are_checked_before_anything_runs():
    config = MiniatureConfig.from_parameters(methods=["score", "score[keep=diagonal]"], sweep_methods=["score"])
    assert config.methods == ("score", "score[keep=diagonal]")
    with pytest.raises(ParameterError, match="has no parameter"):
        MiniatureConfig.from_parameters(methods=["score[kep=diagonal]"])
    with pytest.raises(ParameterError, match="must also be listed in 'methods'"):
        MiniatureConfig.from_parameters(methods=["score"], sweep_methods=["tsv_m"])

