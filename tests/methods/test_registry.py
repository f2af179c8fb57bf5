"""The method registry: weight averaging and task arithmetic, input validation, dtypes."""

from __future__ import annotations

import pytest
import torch

import mergelib
from mergelib.errors import ParameterError, ParameterValueError, TensorError, UnknownNameError
from mergelib.methods import METHODS, check_task_vector_list, merge, register


def _vectors(count=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [{"visual.w": torch.randn(6, 4, generator=g).to(dtype), "visual.b": torch.randn(4, generator=g).to(dtype)} for _ in range(count)]


def test_registry_records_paper_and_defaults():
    for name in ("weight_average", "task_arithmetic"):
        method = METHODS[name]
        assert method.arxiv and method.paper and method.equation and method.summary
    assert mergelib.METHODS is METHODS


def test_task_arithmetic_of_one_task_is_that_task():
    (tv,) = _vectors(1)
    merged = merge("task_arithmetic", [tv])
    assert all(torch.equal(merged[k], tv[k]) for k in tv)


def test_weight_average_is_task_arithmetic_over_t():
    tvs = _vectors(4)
    wa, ta = merge("weight_average", tvs), merge("task_arithmetic", tvs)
    for key in wa:
        torch.testing.assert_close(wa[key], ta[key] / 4)
        torch.testing.assert_close(ta[key], tvs[0][key] + tvs[1][key] + tvs[2][key] + tvs[3][key])


def test_merging_is_invariant_to_task_order_and_deterministic():
    tvs = _vectors(3)
    a = merge("weight_average", tvs)
    b = merge("weight_average", tvs[::-1])
    c = merge("weight_average", tvs)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
        assert torch.equal(a[key], c[key])


def test_apply_adds_the_merged_vector():
    tvs = _vectors(2)
    pre = {k: torch.ones_like(v) for k, v in tvs[0].items()}
    model = mergelib.apply(pre, merge("task_arithmetic", tvs), alpha=0.5)
    torch.testing.assert_close(model["visual.w"], 1 + 0.5 * (tvs[0]["visual.w"] + tvs[1]["visual.w"]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_merged_in_float32_and_returned_in_its_dtype(dtype):
    tvs = _vectors(3, dtype=dtype)
    merged = merge("weight_average", tvs)
    assert all(v.dtype == dtype for v in merged.values())
    exact = sum(tv["visual.w"].float() for tv in tvs) / 3
    assert torch.equal(merged["visual.w"], exact.to(dtype))


def test_unknown_method_and_parameter():
    with pytest.raises(UnknownNameError, match="valid merge method names: .*task_arithmetic"):
        merge("tsv_x", _vectors())
    with pytest.raises(ParameterError, match="no parameter"):
        merge("task_arithmetic", _vectors(), density=0.2)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: [], "empty"),
        (lambda: _vectors(1)[0], "sequence of dicts"),
        (lambda: [_vectors(1)[0], {"visual.w": torch.zeros(6, 4)}], "different keys"),
        (lambda: [_vectors(1)[0], {"visual.w": torch.zeros(4, 6), "visual.b": torch.zeros(4)}], "shape"),
        (lambda: [_vectors(1)[0], {"visual.w": torch.zeros(6, 4, dtype=torch.float64), "visual.b": torch.zeros(4)}], "dtype"),
        (lambda: [{"visual.w": torch.zeros(2, dtype=torch.int64)}], "floating point"),
        (lambda: [{"visual.w": torch.tensor([1.0, float("nan")])}], "NaN or Inf"),
        (lambda: [{"visual.w": torch.tensor([1.0, float("inf")])}], "NaN or Inf"),
    ],
)
def test_bad_task_vectors_get_clear_errors(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        merge("task_arithmetic", make())


def test_the_container_check_is_shared_by_merges_and_analyses():
    """check_task_vector_list: one check of the list of task vectors (mergelib.analysis.subspaces checks its layers)."""
    vectors = _vectors(2)
    assert check_task_vector_list(tuple(vectors), 2, "compare") == vectors
    with pytest.raises(ParameterError, match=r"task_vectors must be a sequence of dicts .*, not a dict"):
        check_task_vector_list(vectors[0])
    with pytest.raises(ParameterError, match="task vector 1 is a list, not a dict of tensors"):
        check_task_vector_list([vectors[0], [1.0]])
    with pytest.raises(TensorError, match="cannot merge an empty list of task vectors; give at least one"):
        check_task_vector_list([])
    with pytest.raises(TensorError, match="cannot compare an empty list of task vectors; give at least 2"):
        check_task_vector_list([], 2, "compare")
    with pytest.raises(ParameterValueError, match="need at least 2 task vectors to compare, got 1"):
        check_task_vector_list(vectors[:1], 2, "compare")


def test_registering_needs_defaults_and_unique_names():
    with pytest.raises(ValueError, match="already registered"):
        register("task_arithmetic", paper="x", arxiv=None, equation="x")(lambda tvs: tvs[0])
    with pytest.raises(ValueError, match="need defaults"):
        def method(tvs, *, rate):
            return tvs[0]
        register("needs_default_test", paper="x", arxiv=None, equation="x")(method)
    assert "needs_default_test" not in METHODS


# ----------------------------------------------------------------------------- code notes
def test_every_code_note_is_structured_and_its_switch_is_accepted():
    from mergelib.methods import CodeNote, check_method_parameters

    for name, method in METHODS.items():
        for note in method.code_notes:
            assert isinstance(note, CodeNote), (name, note)
            assert all(isinstance(text, str) and text.strip() for text in (note.topic, note.paper, note.released)), note
            assert note.switch is None or note.switch.strip(), note
            switch = note.switch_parameters()
            assert bool(switch) == (note.switch is not None), note
            assert set(switch) <= set(method.defaults), (name, note.switch)
            assert check_method_parameters(name, switch) == {**method.defaults, **switch}
            assert not switch or any(switch[key] != method.defaults[key] for key in switch), note.switch  # not the default
    switches = {note.switch for note in METHODS["score"].code_notes}
    assert {"divide_by_tasks=False", "trim_statistics='off_diagonal'", "keep='full'"} <= switches
    topics = {note.topic: note for note in METHODS["esm"].code_notes}
    tied = topics["ordering of tied eigenvalues"]
    assert "unstable sort" in tied.released and "5e-2" in tied.mergelib and "7e-6" in tied.mergelib
    assert "2e-3" in topics["task norm"].mergelib


def test_register_refuses_unstructured_notes_and_switches_it_would_refuse():
    from mergelib.methods import CodeNote

    def method(task_vectors, *, device=None, scale: float = 1.0):
        return task_vectors[0]

    bad = {
        "a string": ("plain text",),
        "an empty field": (CodeNote("topic", paper=" ", released="x"),),
        "an unknown parameter": (CodeNote("topic", paper="p", released="r", switch="sharpness=2"),),
        "a refused value": (CodeNote("topic", paper="p", released="r", switch="scale=true"),),
        "no value": (CodeNote("topic", paper="p", released="r", switch="scale"),),
        "the default": (CodeNote("topic", paper="p", released="r", switch="scale=1.0"),),
    }
    for label, notes in bad.items():
        with pytest.raises(ValueError, match="code note"):
            register("notes_for_test", paper="x", arxiv=None, equation="x", code_notes=notes)(method)
        assert "notes_for_test" not in METHODS, label
    good = (CodeNote("scale", paper="scale 2", released="scale 1", switch="scale=2.0"),)
    try:
        register("notes_for_test", paper="x", arxiv=None, equation="x", code_notes=good)(method)
        assert METHODS["notes_for_test"].code_notes == good and good[0].switch_parameters() == {"scale": 2.0}
    finally:
        METHODS.pop("notes_for_test", None)


def test_book_and_cli_render_the_code_notes():
    from mergelib.report.book import code_notes_table, method_card

    score = METHODS["score"]
    table = code_notes_table(score).splitlines()
    assert len(table) == 2 + len(score.code_notes)
    assert all(row.count(" | ") == 5 for row in table)  # pipes inside the text are escaped
    assert "`score(divide_by_tasks=False)`" in table[2] and "\\|x − μ\\|" in table[2]
    card = method_card(score)
    assert all(note.topic in card for note in score.code_notes) and "{doc}`paper_vs_code`" in card
    assert code_notes_table(METHODS["weight_average"]) == ""
