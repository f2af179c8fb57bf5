"""Alpha selection: ESM's golden-section search and the TSV/Iso grids, against independent re-implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mergelib.protocols.coefficients import (
    GOLDEN_RATIO_CONJUGATE, ISO_EARLY_STOP_PATIENCE, TASK_ARITHMETIC_GRID, TSV_GRID, CoefficientSearch,
    golden_section_search, grid_search, search_alpha,
)
from mergelib.errors import ParameterValueError, UnknownNameError


class Counting:
    """``evaluate`` wrapper that records every call."""

    def __init__(self, absolute, normalized=None):
        self.absolute, self.normalized, self.calls = absolute, normalized or absolute, []

    def __call__(self, alpha):
        self.calls.append(alpha)
        return {"absolute": self.absolute(alpha), "normalized": self.normalized(alpha)}


def reference_golden(f, a=0.0, b=2.0, tol=0.01, max_iter=15):
    """Straightforward transcription of the released loop: a list of evaluated points (no cache),
    each a (alpha, f(alpha)) pair; returns the points and the final bracket."""
    r = (5 ** 0.5 - 1) / 2
    points = []

    def ev(x):
        points.append((x, f(x)))
        return points[-1][1]

    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = ev(c), ev(d)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        if fc > fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = ev(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = ev(d)
        if abs(b - a) < tol:
            break
    return points, (a, b)


FUNCTIONS = {
    "peak 0.37": lambda x: -(x - 0.37) ** 2,
    "peak 1.0": lambda x: 1 - abs(x - 1.0),
    "peak 1.93": lambda x: -((x - 1.93) ** 4),
    "peak at 0": lambda x: -x,
    "flat": lambda x: 0.5,
    "bimodal": lambda x: math.sin(7 * x) + 0.1 * x,
    "plateau": lambda x: min(0.8, 1.5 * x),
}


@pytest.mark.parametrize("optimum", [0.05, 0.37, 1.0, 1.61, 1.95])
def test_golden_section_finds_the_maximum_of_concave_functions(optimum):
    evaluate = Counting(lambda x: -(x - optimum) ** 2)
    result = golden_section_search(evaluate)
    assert abs(result.alpha - optimum) < 0.01
    assert result.bracket[1] - result.bracket[0] < 0.01 and result.bracket[0] <= optimum <= result.bracket[1]
    assert len(evaluate.calls) == len(set(evaluate.calls)) == len(result.evaluations)
    assert list(result.alphas) == evaluate.calls
    assert len(result.evaluations) == 14  # 2 initial points + 12 iterations to get the bracket below 0.01
    assert 0.0 not in result.alphas and 2.0 not in result.alphas  # endpoints are never evaluated


def test_golden_section_starts_at_the_released_interior_points_and_is_deterministic():
    first = golden_section_search(Counting(FUNCTIONS["bimodal"]))
    second = golden_section_search(Counting(FUNCTIONS["bimodal"]))
    assert first.alphas[:2] == pytest.approx((0.7639320225, 1.2360679775))
    assert first == second
    assert GOLDEN_RATIO_CONJUGATE == pytest.approx(0.6180339887)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("bounds, tol, max_iter", [((0.0, 2.0), 0.01, 15), ((0.5, 3.0), 0.05, 4), ((-1.0, 1.0), 1e-4, 15)])
def test_golden_section_matches_a_straightforward_reimplementation(name, bounds, tol, max_iter):
    f = FUNCTIONS[name]
    points, bracket = reference_golden(f, *bounds, tol=tol, max_iter=max_iter)
    result = golden_section_search(Counting(f), *bounds, tolerance=tol, max_iterations=max_iter)
    unique = list(dict.fromkeys(x for x, _ in points))
    assert list(result.alphas) == unique
    assert result.bracket == bracket
    best_value = max(v for _, v in points)
    assert result.alpha == next(x for x, v in points if v == best_value)  # first evaluated maximum


def test_ties_move_the_bracket_right_and_keep_the_first_maximum():
    result = golden_section_search(Counting(FUNCTIONS["flat"]))
    interior = list(result.alphas)
    assert interior == sorted(interior)  # every comparison is a tie: a moves right each time
    assert result.alpha == interior[0]
    assert result.bracket[1] == 2.0


def test_golden_section_compares_absolute_but_picks_by_normalized():
    evaluate = Counting(absolute=lambda x: -(x - 0.5) ** 2, normalized=lambda x: -(x - 1.5) ** 2)
    result = golden_section_search(evaluate)
    by_normalized = max(result.evaluations, key=lambda e: e.metrics["normalized"]).alpha
    by_absolute = max(result.evaluations, key=lambda e: e.metrics["absolute"]).alpha
    assert result.alpha == by_normalized != by_absolute
    assert abs(by_absolute - 0.5) < 0.01  # the bracket followed the absolute key
    assert result.metrics["normalized"] == max(e.metrics["normalized"] for e in result.evaluations)
    swapped = golden_section_search(evaluate, compare_by="normalized", select_by="normalized")
    assert abs(swapped.alpha - 1.5) < 0.01


def test_cache_is_shared_between_searches():
    evaluate, cache = Counting(FUNCTIONS["peak 0.37"]), {}
    first = golden_section_search(evaluate, cache=cache)
    calls = len(evaluate.calls)
    second = golden_section_search(evaluate, cache=cache)
    assert len(evaluate.calls) == calls and second == first
    grid_search(evaluate, [first.alphas[0], 0.25], cache=cache)
    assert evaluate.calls[calls:] == [0.25]


def test_tsv_grid_is_the_released_linspace():
    assert TSV_GRID == tuple(float(x) for x in np.linspace(0, 3, 31)[1:])
    assert len(TSV_GRID) == 30 and TSV_GRID[0] == 0.1 and TSV_GRID[-1] == 3.0
    assert TASK_ARITHMETIC_GRID == tuple(float(x) for x in np.linspace(0, 1, 11)[1:])


def test_grid_search_without_early_stop_evaluates_everything_and_picks_normalized():
    evaluate = Counting(absolute=lambda x: -(x - 0.5) ** 2, normalized=lambda x: -(x - 2.0) ** 2)
    result = grid_search(evaluate, TSV_GRID)
    assert evaluate.calls == list(TSV_GRID) and not result.stopped_early
    assert result.alpha == pytest.approx(2.0) and result.select_by == "normalized"


def test_early_stopping_stops_exactly_after_patience_non_improvements():
    absolute = {0.1: 0.5, 0.2: 0.6, 0.3: 0.55, 0.4: 0.6, 0.5: 0.59, 0.6: 0.9, 0.7: 0.95}
    normalized = {0.1: 0.9, 0.2: 0.1, 0.3: 0.2, 0.4: 0.3, 0.5: 0.4, 0.6: 0.5, 0.7: 0.6}
    evaluate = Counting(absolute.__getitem__, normalized.__getitem__)
    result = grid_search(evaluate, list(absolute), early_stop_patience=3)
    # 0.3 misses, 0.4 ties (not strictly better: a miss), 0.5 misses -> stop after 0.5
    assert evaluate.calls == [0.1, 0.2, 0.3, 0.4, 0.5] and result.stopped_early
    assert result.alpha == 0.1  # selected by normalized among the evaluated alphas
    evaluate = Counting(absolute.__getitem__, normalized.__getitem__)
    assert grid_search(evaluate, list(absolute), early_stop_patience=4).alphas == tuple(absolute)
    evaluate = Counting(lambda x: 1.0 - x)  # never improves after the first
    assert grid_search(evaluate, TSV_GRID, early_stop_patience=2).alphas == TSV_GRID[:3]


def test_released_rules_by_name():
    evaluate = Counting(lambda x: -abs(x - 1.2))
    iso = search_alpha("iso", evaluate)
    assert iso == grid_search(Counting(lambda x: -abs(x - 1.2)), TSV_GRID, early_stop_patience=ISO_EARLY_STOP_PATIENCE)
    assert iso.alphas[-1] == pytest.approx(1.5) and iso.alpha == pytest.approx(1.2)
    assert search_alpha("tsv", evaluate).alphas == TSV_GRID
    assert search_alpha("esm", evaluate).settings["low"] == 0.0
    with pytest.raises(UnknownNameError, match="valid coefficient rule names"):
        search_alpha("ties", evaluate)


def test_result_summary_is_json_ready():
    import json

    result = golden_section_search(Counting(FUNCTIONS["peak 1.0"]), max_iterations=2)
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["alpha"] == result.alpha and len(summary["evaluations"]) == 4
    assert isinstance(result, CoefficientSearch) and summary["method"] == "golden_section"


@pytest.mark.parametrize("call, message", [
    (lambda e: golden_section_search(e, 1.0, 1.0), "low < high"),
    (lambda e: golden_section_search(e, 2.0, 0.0), "low < high"),
    (lambda e: golden_section_search(e, ratio=0.4), "ratio"),
    (lambda e: golden_section_search(e, tolerance=0.0), "tolerance"),
    (lambda e: golden_section_search(e, max_iterations=-1), "max_iterations"),
    (lambda e: grid_search(e, []), "at least one"),
    (lambda e: grid_search(e, [0.1, 0.1]), "repeats"),
    (lambda e: grid_search(e, [0.1, float("nan")]), "finite"),
    (lambda e: grid_search(e, [0.1], early_stop_patience=0), "early_stop_patience"),
])
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ParameterValueError, match=message):
        call(Counting(lambda x: x))


def test_bad_evaluate_results_raise_clear_errors():
    with pytest.raises(ParameterValueError, match=r"without \['normalized'\]"):
        grid_search(lambda a: {"absolute": a}, [0.5])
    with pytest.raises(ParameterValueError, match=r"without \['absolute'\]"):
        golden_section_search(lambda a: {"normalized": a})
    with pytest.raises(ParameterValueError, match="must return a mapping"):
        grid_search(lambda a: a, [0.5])
    with pytest.raises(ParameterValueError, match="not finite"):
        grid_search(lambda a: {"absolute": a, "normalized": float("nan")}, [0.5])
    with pytest.raises(ParameterValueError, match="evaluate must be callable"):
        grid_search(None, [0.5])
