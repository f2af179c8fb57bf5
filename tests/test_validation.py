"""Wrong input is refused clearly, before the work starts (issue 10, part B).

Every class of wrong input is tried through the entry point a user calls (``mergelib.merge``,
``mergelib.apply``, ``mergelib.task_vector``, ``parse_method_spec``, the ``--param`` reader, the
analyses); each error must name what is wrong. Tensors are tiny.
"""

from __future__ import annotations

import math

import pytest
import torch

import mergelib
from mergelib.analysis import layer_info, sar_matrix
from mergelib.errors import ParameterError, ParameterValueError, StateKeyError, TensorError
from mergelib.io.merge_files import parse_parameters
from mergelib.methods import METHODS, check_method_parameters, parse_method_spec, parse_parameter_value
from mergelib.methods.common import Choice, Flag, Fraction, Integer, Number, block_layer, resolve_device
from mergelib.methods.esm import check_subspaces_argument, esm, layer_type

BLOCK = "visual.transformer.resblocks.0."
SHAPES = {
    BLOCK + "attn.in_proj_weight": (12, 4),
    BLOCK + "attn.out_proj.weight": (4, 4),
    BLOCK + "mlp.c_fc.weight": (8, 4),
    BLOCK + "mlp.c_proj.weight": (4, 8),
    BLOCK + "ln_1.weight": (4,),
    "visual.proj": (4, 3),
}


def _vectors(count: int = 2, seed: int = 0, dtype=torch.float32, shapes=SHAPES):
    generator = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=generator).to(dtype) for k, s in shapes.items()} for _ in range(count)]


# ------------------------------------------------------------------------------ 1. parameters
def _out_of_range(check) -> list:
    """Values outside a check's range (none for checks without one)."""
    if isinstance(check, Fraction):
        return [-0.5, 1.5] + ([] if check.zero_ok else [0.0]) + ([] if check.one_ok else [1.0])
    if isinstance(check, Number) and check.minimum is not None:
        return [check.minimum - 1.0] + ([check.minimum] if check.strict else [])
    if isinstance(check, Integer) and check.minimum is not None:
        return [check.minimum - 1]
    if isinstance(check, Choice):
        return ["not-a-choice"]
    return []


def _wrong_values(check) -> list:
    """A bool (where it is not the type), NaN, Inf, wrong types, and out-of-range values."""
    values = [math.nan, math.inf, -math.inf, [0.5], object()]
    if not isinstance(check, Flag):
        values.append(True)
    if isinstance(check, Flag):
        values += [1, "yes"]
    elif isinstance(check, Choice):
        values.append(3)
    elif check is not check_subspaces_argument:
        values.append("1.0")
    if isinstance(check, Integer):
        values.append(1.5)
    return values + _out_of_range(check)


CASES = [(name, param, value) for name, method in sorted(METHODS.items()) if not name.endswith("_for_test")
         for param, check in method.checks.items() for value in _wrong_values(check)]


def test_every_registered_parameter_declares_its_check():
    kinds = (Number, Integer, Fraction, Choice, Flag)
    for name, method in METHODS.items():
        if name.endswith("_for_test"):
            continue
        assert set(method.checks) == set(method.defaults), name
        for param, check in method.checks.items():
            assert isinstance(check, kinds) or check is check_subspaces_argument, (name, param, check)


@pytest.mark.parametrize("name, param, value", CASES, ids=[f"{n}-{p}-{v!r}"[:60] for n, p, v in CASES])
def test_wrong_parameter_values_are_refused_naming_the_parameter(name, param, value):
    with pytest.raises((ParameterValueError, ParameterError), match=rf"^{param}\b"):
        check_method_parameters(name, {param: value})
    # merge checks them before anything else: even before looking at the (here invalid) task vectors
    with pytest.raises((ParameterValueError, ParameterError), match=rf"^{param}\b"):
        mergelib.merge(name, [], **{param: value})


def test_the_examples_of_the_issue():
    tvs = _vectors()
    for params, message in [
        (dict(z=True), "z must be a finite number, got True"),
        (dict(z=math.inf), "z must be a finite number, got inf"),
        (dict(z=0), "z must be > 0, got 0.0"),
        (dict(rank_fraction=math.nan), r"rank_fraction must be a number in \(0, 1\], got nan"),
    ]:
        with pytest.raises(ParameterValueError, match=message):
            mergelib.merge("score", tvs, **params)
    with pytest.raises(ParameterValueError, match="alpha must be a finite number, got nan"):
        mergelib.merge("esm", tvs, alpha=math.nan, decomposition="svd")
    with pytest.raises(ParameterValueError, match="seed must be an integer, got True"):
        mergelib.merge("dare", tvs, seed=True)


def test_parameters_are_checked_without_task_vectors_and_completed_with_defaults():
    params = check_method_parameters("score", {"z": 2})
    assert params == {**METHODS["score"].defaults, "z": 2}
    with pytest.raises(ParameterError, match="merge method 'score' has no parameter"):
        check_method_parameters("score", {"zz": 2})
    with pytest.raises(ParameterValueError, match=r"density \+ gamma must be at most 1"):
        check_method_parameters("breadcrumbs", {"density": 0.9, "gamma": 0.2})


def test_a_registered_function_called_directly_checks_its_parameters_too():
    from mergelib.methods.score import score

    with pytest.raises(ParameterValueError, match="z must be a finite number, got True"):
        score(_vectors(), z=True)
    with pytest.raises(ParameterValueError, match="layer_scaling must be True or False"):
        esm(_vectors(), decomposition="svd", layer_scaling=1)


def test_registration_refuses_missing_or_wrong_checks():
    from mergelib.methods import register

    with pytest.raises(ValueError, match="checks for parameters it does not have"):
        register("bad_checks_test", paper="x", arxiv=None, equation="x", checks={"y": Flag()})(
            lambda tvs, *, device=None, x=1.0: tvs[0])
    with pytest.raises(ValueError, match=r"parameters \['x'\] need a check"):
        register("bad_checks_test", paper="x", arxiv=None, equation="x")(lambda tvs, *, device=None, x=None: tvs[0])
    with pytest.raises(ParameterValueError, match="x must be a number in"):  # the default must pass
        register("bad_checks_test", paper="x", arxiv=None, equation="x",
                 checks={"x": Fraction(zero_ok=False, one_ok=True)})(lambda tvs, *, device=None, x=2.0: tvs[0])
    assert "bad_checks_test" not in METHODS


# ------------------------------------------------------------------------- 2. values as text
@pytest.mark.parametrize("text, value", [
    ("2e0", 2.0), ("1E-3", 1e-3), (".5", 0.5), ("-1e+2", -100.0), ("1.5", 1.5), ("3", 3), ("012", 12),
    ("true", True), ("False", False), ("diagonal", "diagonal"), ("yes", "yes"), ("'true'", "true"),
    ("null", None), (" 0.2 ", 0.2),
])
def test_one_reading_of_parameter_values_written_as_text(text, value):
    parsed = parse_parameter_value(text)
    assert parsed == value and type(parsed) is type(value)
    assert parse_parameters([f"x={text}"])["x"] == parsed


@pytest.mark.parametrize("text", ["inf", "-inf", ".inf", "nan", "NaN", "Infinity"])
def test_non_finite_text_is_a_float_then_refused(text):
    assert math.isinf(parse_parameter_value(text)) or math.isnan(parse_parameter_value(text))
    with pytest.raises(ParameterValueError, match=r"method 'score\[z=.*\]': z must be a finite number"):
        parse_method_spec(f"score[z={text}]")


def test_method_specs_read_numbers_and_check_values():
    assert parse_method_spec("score[z=2e0]").params == {"z": 2.0}
    assert parse_method_spec("ties[density=1E-1, scope=per_tensor]").params == {"density": 0.1, "scope": "per_tensor"}
    with pytest.raises(ParameterValueError, match=r"method 'score\[z=true\]': z must be a finite number, got True"):
        parse_method_spec("score[z=true]")
    with pytest.raises(ParameterValueError, match="keep must be one of"):
        parse_method_spec("score[keep=3]")
    with pytest.raises(ParameterError, match="expected NAME=VALUE"):
        parse_method_spec("score[=3]")
    with pytest.raises(ParameterValueError, match="empty parameter value"):
        parse_parameters(["z="])


# ------------------------------------------------------------------------------ 3. empty inputs
@pytest.mark.parametrize("make, error, message", [
    (lambda: [{}, {}], TensorError, "task vector 0 has no tensors"),
    (lambda: [], TensorError, "empty list of task vectors"),
    (lambda: _vectors(1)[0], ParameterError, "sequence of dicts .* not a dict"),
    (lambda: torch.zeros(3), ParameterError, "sequence of dicts .* not a Tensor"),
    (lambda: [{"visual.w": torch.empty(2, 2, device="meta")}], TensorError, r"task vector 0\['visual.w'\] is a meta tensor"),
    (lambda: [{"visual.w": torch.zeros(2)}, {"visual.w": torch.empty(2, device="meta")}], TensorError,
     r"task vector 1\['visual.w'\] is a meta tensor"),
    (lambda: [{"visual.w": [1.0, 2.0]}], ParameterError, r"task vector 0\['visual.w'\] is a list, not a tensor"),
])
def test_empty_or_unusable_task_vectors(make, error, message):
    for name in ("task_arithmetic", "score"):
        with pytest.raises(error, match=message):
            mergelib.merge(name, make())


# --------------------------------------------------------------------------------- 4. key conventions
def test_esm_refuses_the_visual_modules_own_names():
    own = [{k[len("visual."):]: v for k, v in tv.items()} for tv in _vectors()]
    with pytest.raises(StateKeyError) as info:
        mergelib.merge("esm", own, decomposition="svd")
    message = str(info.value)
    assert "visual.transformer.resblocks.<i>.<layer>" in message and "attn.in_proj_weight" in message
    assert "transformer.resblocks.0.attn.in_proj_weight" in message  # what it got
    assert "'visual.' prefix" in message  # and the remedy


def test_esm_subspaces_keys_must_match_the_task_vectors():
    tvs = _vectors()
    subspaces = [{k[len("visual."):]: (torch.eye(v.shape[0]), torch.ones(v.shape[0])) for k, v in tv.items() if v.ndim == 2}
                 for tv in tvs]
    with pytest.raises(ParameterValueError, match=r"subspaces\[0\] lacks 3 ESD keys.*'visual.' prefix"):
        mergelib.merge("esm", tvs, subspaces=subspaces)


def test_analyses_refuse_names_outside_the_convention():
    own = [{k[len("visual."):]: v for k, v in tv.items()} for tv in _vectors()]
    with pytest.raises(StateKeyError, match=r"no image-encoder matrix.*transformer\.resblocks\.0.*'visual\.' prefix"):
        sar_matrix(own)
    with pytest.raises(StateKeyError, match=r"task vector 1 lacks 1 of the 1 key\(s\) needed, e.g. \['visual.proj'\]"):
        sar_matrix([_vectors(1)[0], {k: v for k, v in _vectors(1)[0].items() if k != "visual.proj"}], keys=["visual.proj"])


def test_one_block_naming_convention():
    for key, expected in [
        (BLOCK + "attn.in_proj_weight", (0, "attn.in_proj_weight")),
        ("visual.transformer.resblocks.11.mlp.c_fc.weight", (11, "mlp.c_fc.weight")),
        ("transformer.resblocks.3.mlp.c_fc.weight", None),  # open_clip's text tower (or a prefix missing)
        ("visual.proj", None),
    ]:
        assert block_layer(key) == expected
        assert layer_info(key)[0] == (expected[0] if expected else None)
        assert layer_type(key) == (expected[1] if expected else None)


# ------------------------------------------------------------------------------------- 5. apply
@pytest.fixture()
def pretrained():
    return {"visual.w": torch.zeros(2, 3), "visual.steps": torch.zeros((), dtype=torch.int64),
            "visual.h": torch.zeros(2, dtype=torch.float16)}


@pytest.mark.parametrize("vector, alpha, error, message", [
    ({"visual.w": torch.zeros(3)}, 1.0, TensorError, r"'visual.w': the update has shape \(3,\), the weight \(2, 3\)"),
    ({"visual.w": torch.zeros(1, 3)}, 1.0, TensorError, r"'visual.w': the update has shape \(1, 3\)"),
    ({"visual.w": torch.full((2, 3), math.nan)}, 1.0, TensorError, r"task vector\['visual.w'\] contains NaN or Inf"),
    ({"visual.w": torch.full((2, 3), math.inf)}, 1.0, TensorError, r"task vector\['visual.w'\] contains NaN or Inf"),
    ({"visual.w": torch.zeros(2, 3, dtype=torch.int32)}, 1.0, TensorError, r"'visual.w': the update is torch.int32"),
    ({"visual.steps": torch.ones(())}, 1.0, TensorError, r"'visual.steps': the pretrained tensor is an integer buffer"),
    ({"visual.h": torch.full((2,), 6e4)}, 2.0, TensorError, r"'visual.h': pretrained \+ alpha \* update has 2 NaN or Inf values in torch.float16"),
    ({"visual.w": torch.empty(2, 3, device="meta")}, 1.0, TensorError, r"task vector\['visual.w'\] is a meta tensor"),
    ({"w": torch.zeros(2, 3)}, 1.0, StateKeyError, r"lacks 1 of the 1 key\(s\) needed, e.g. \['w'\].*'visual.' prefix"),
    ({"visual.w": torch.zeros(2, 3)}, True, ParameterValueError, "alpha must be a finite number, got True"),
    ({"visual.w": torch.zeros(2, 3)}, math.nan, ParameterValueError, "alpha must be a finite number, got nan"),
    ({"visual.w": torch.zeros(2, 3)}, math.inf, ParameterValueError, "alpha must be a finite number, got inf"),
    ({"visual.w": torch.zeros(2, 3)}, "1", ParameterValueError, "alpha must be a finite number, got '1'"),
])
def test_apply_refuses_what_it_cannot_add(pretrained, vector, alpha, error, message):
    with pytest.raises(error, match=message):
        mergelib.apply(pretrained, vector, alpha=alpha)


def test_apply_still_adds_and_copies(pretrained):
    out = mergelib.apply(pretrained, {"visual.w": torch.ones(2, 3)}, alpha=0.5)
    assert torch.equal(out["visual.w"], torch.full((2, 3), 0.5)) and torch.equal(out["visual.steps"], pretrained["visual.steps"])


def test_task_vector_names_the_key(pretrained):
    tuned = {k: v.clone() for k, v in pretrained.items()}
    with pytest.raises(StateKeyError, match=r"fine-tuned state lacks 1 of the 3 key\(s\) needed, e.g. \['visual.h'\]"):
        mergelib.task_vector({k: v for k, v in tuned.items() if k != "visual.h"}, pretrained)
    for key, value, message in [
        ("visual.w", torch.full((2, 3), math.nan), r"fine-tuned\['visual.w'\] contains NaN or Inf"),
        ("visual.w", torch.zeros(3, 2), r"'visual.w': fine-tuned shape \(3, 2\) != pretrained \(2, 3\)"),
        ("visual.w", torch.zeros(2, 3, dtype=torch.int64), r"'visual.w': fine-tuned tensor is torch.int64"),
    ]:
        with pytest.raises(TensorError, match=message):
            mergelib.task_vector({**tuned, key: value}, pretrained)
    with pytest.raises(TensorError, match=r"pretrained\['visual.w'\] contains NaN or Inf"):
        mergelib.task_vector(tuned, {**pretrained, "visual.w": torch.full((2, 3), math.inf)})
    with pytest.raises(TensorError, match="no floating-point tensor"):
        mergelib.task_vector({"n": torch.zeros(1, dtype=torch.int64)}, {"n": torch.zeros(1, dtype=torch.int64)})


# ---------------------------------------------------------------------------------------- 6. devices
def test_devices_are_checked_up_front():
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    unavailable = [] if torch.cuda.is_available() else ["cuda", "cuda:0", torch.device("cuda")]
    unavailable += [] if torch.backends.mps.is_available() else ["mps"]
    for device in unavailable:
        with pytest.raises(ParameterValueError, match=r"is not available on this machine; valid here: auto, cpu"):
            resolve_device(device)
    for device in ["gpu", "", 3]:
        with pytest.raises(ParameterValueError, match=r"is not a device name; valid on this machine: auto, cpu"):
            resolve_device(device)
    with pytest.raises(ParameterValueError, match="device 'gpu' is not a device name"):
        mergelib.merge("task_arithmetic", _vectors(), device="gpu")


# ------------------------------------------------------------------------------------ 7. what stays
@pytest.mark.parametrize("name", sorted(n for n in METHODS if not n.endswith("_for_test")))
def test_every_method_merges_a_single_task_vector(name):
    (tv,) = _vectors(1)
    params = {"decomposition": "svd"} if name == "esm" else {}
    merged = mergelib.merge(name, [tv], **params)
    assert merged.keys() == tv.keys()
    assert all(merged[k].shape == tv[k].shape and bool(torch.isfinite(merged[k]).all()) for k in tv)
    if name in ("weight_average", "task_arithmetic", "tsv_m"):  # one task: its own update
        assert all(torch.allclose(merged[k], tv[k], atol=1e-5) for k in tv)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merges_in_float32_and_comes_back_in_its_dtype(dtype):
    tvs = _vectors(3, dtype=dtype)
    merged = mergelib.merge("score", tvs)
    assert all(v.dtype == dtype for v in merged.values())


def test_a_half_precision_result_that_overflows_is_an_error_naming_the_tensor():
    tvs = [{"visual.w": torch.full((2, 2), 6e4, dtype=torch.float16)} for _ in range(2)]
    assert torch.isfinite(mergelib.merge("weight_average", tvs)["visual.w"]).all()
    with pytest.raises(TensorError, match=r"merge method 'task_arithmetic' gave NaN or Inf for 'visual.w' \(4 values\) "
                                          r"\(the float32 result does not fit torch.float16"):
        mergelib.merge("task_arithmetic", tvs)


def test_analyses_refuse_tensors_they_cannot_compute_on():
    from mergelib.analysis import projection_statistics
    from mergelib.analysis.esd import layer_truncation_table
    from mergelib.models.essential import essential_subspaces

    tvs = _vectors()
    tvs[1]["visual.proj"] = torch.full((4, 3), math.nan)
    with pytest.raises(TensorError, match=r"task vector 1\['visual.proj'\] contains NaN or Inf"):
        sar_matrix(tvs)
    with pytest.raises(TensorError, match="the stack of task matrices contains NaN or Inf"):
        projection_statistics(torch.full((2, 3, 3), math.inf))
    images = torch.zeros(2, 3, 4, 4)
    # checked before the encoder is touched (None here)
    with pytest.raises(ParameterValueError, match=r"ranks_fraction\[1\] must be a number in \(0, 1\], got True"):
        layer_truncation_table(None, {}, {}, images, ranks_fraction=(0.5, True))
    with pytest.raises(TensorError, match="proxy_inputs contains NaN or Inf"):
        layer_truncation_table(None, {}, {}, torch.full((2, 3, 4, 4), math.nan))
    with pytest.raises(ParameterValueError, match="full_outputs must be True or False"):
        layer_truncation_table(None, {}, {}, images, full_outputs="yes")
    with pytest.raises(TensorError, match="proxy_inputs is a meta tensor"):
        essential_subspaces(None, {}, {}, torch.empty(2, 3, 4, 4, device="meta"), device="cpu")


def test_the_valid_values_are_listed_in_words():
    assert METHODS["score"].valid_values()["z"] == "a finite number > 0"
    assert METHODS["dare"].valid_values() == {
        "drop_rate": "a number in [0, 1)", "rescale": "True or False", "seed": "an integer",
        "combine": "one of 'sum', 'ties'", "ties_density": "a number in (0, 1]"}
    assert METHODS["esm"].valid_values()["subspaces"].startswith("None, or a sequence with one dict per task")
