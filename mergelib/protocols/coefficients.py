"""Choosing the merging coefficient alpha on validation data, as the released TSV, Iso and ESM code does.

``evaluate(alpha)`` returns a mapping with at least ``"absolute"`` (mean validation accuracy over
the tasks) and ``"normalized"`` (mean of accuracy / fine-tuned accuracy, see
:func:`mergelib.data.task_suites.normalized_accuracy`); other numeric entries are kept in the
record, non-numeric ones dropped. Each search calls it at most once per
alpha (results are cached, optionally across searches) and returns a :class:`CoefficientSearch`
listing every evaluated ``(alpha, metrics)`` in evaluation order and the chosen alpha.

Rules, read in the released code (not in the papers):

* **TSV** (Gargiulo et al., arXiv 2412.00081; ``AntoAndGar/task_singular_vectors``
  ``src/eval/eval.py``): TSV-M evaluates every alpha of ``numpy.linspace(0, 3, 31)[1:]``
  (0.1, ..., 3.0; numpy's values, e.g. 0.30000000000000004) with no early stop and picks the
  highest mean *normalized* validation accuracy. Task Arithmetic and others use
  ``linspace(0, 1, 11)[1:]``. TSV-C uses alpha = 1.
* **Iso** (Marczak et al., arXiv 2502.04959; ``danielm1405/iso-merging``) and the copy of the same
  loop in ESM's ``evaluate_task_vector``: the same 0.1..3.0 grid, in increasing order, with early
  stopping on the mean *absolute* validation accuracy: an alpha improves if its value is strictly
  greater than the best so far, otherwise a counter grows, and the loop stops right after the
  ``patience`` = 3rd consecutive non-improving alpha (that alpha is evaluated and kept). The pick
  is then the highest mean *normalized* validation accuracy among the evaluated alphas.
* **ESM** (Li et al., arXiv 2602.20208; ``kiddo127/ESM`` ``ESM-ViT/src/eval/eval.py``,
  ``evaluate_task_vector_search``): golden-section search on [0, 2] with
  ``ratio = (sqrt(5) - 1) / 2`` (0.6180339887..., which the notes round to 0.618), so the first
  interior points are c = b - ratio (b - a) = 0.763932... and d = a + ratio (b - a) = 1.236067...
  The endpoints are never evaluated. Each iteration compares the *absolute* values: if
  ``f(c) > f(d)`` (strictly) the bracket becomes [a, d], the old c becomes the new d and a new c
  is evaluated; otherwise (ties included) the bracket becomes [c, b], the old d becomes the new c
  and a new d is evaluated. After each iteration's evaluation the loop stops when
  ``|b - a| < tolerance`` (0.01), and runs at most ``max_iterations`` (15) iterations: so at most
  2 + 15 evaluations; on [0, 2] with tol 0.01 it stops after 12 iterations (14 evaluations).
  The final alpha is the evaluated point with the highest *normalized* accuracy
  (``find_optimal_coef`` over every evaluated alpha in ``eval_utils.perform_eval_with_merged_vector``).
* **Ties in the final pick**: the released ``find_optimal_coef`` scans the evaluated alphas in
  evaluation order and keeps a strictly greater value, so the *first* evaluated maximum wins;
  the same here.

Deviations, all at boundaries the benchmarks never reach: the released loops start the "best so
far" at 0.0 (``find_optimal_coef`` returns ``None`` when every value is <= 0, and an
accuracy of exactly 0 never counts as an improvement); here it starts at minus infinity, so any
real-valued objective works. Metrics must be finite numbers (NaN raises).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable, Mapping, MutableMapping, NamedTuple

import numpy as np

from mergelib.errors import ParameterValueError, lookup

__all__ = [
    "Evaluation", "CoefficientSearch", "grid_search", "golden_section_search", "search_alpha", "RULES",
    "TSV_GRID", "TASK_ARITHMETIC_GRID", "ISO_EARLY_STOP_PATIENCE", "GOLDEN_RATIO_CONJUGATE",
]

Metrics = Mapping[str, float]
Evaluate = Callable[[float], Metrics]

#: The grid of TSV-M and Iso as released, ``numpy.linspace(0, 3, 31)[1:]`` (0.1 ... 3.0, numpy's floats).
TSV_GRID: tuple[float, ...] = tuple(float(a) for a in np.linspace(0.0, 3.0, 31)[1:])
#: The grid of Task Arithmetic and the other baselines in the TSV code, ``numpy.linspace(0, 1, 11)[1:]``.
TASK_ARITHMETIC_GRID: tuple[float, ...] = tuple(float(a) for a in np.linspace(0.0, 1.0, 11)[1:])
#: Iso's early-stopping patience (consecutive alphas without a strictly better absolute accuracy).
ISO_EARLY_STOP_PATIENCE = 3
#: ESM's golden-section ratio, ``(sqrt(5) - 1) / 2``.
GOLDEN_RATIO_CONJUGATE = (math.sqrt(5.0) - 1.0) / 2.0


class Evaluation(NamedTuple):
    """One evaluated coefficient: ``(alpha, metrics)``."""

    alpha: float
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class CoefficientSearch:
    """Every evaluation of a search, in order, and the chosen coefficient.

    ``stopped_early``: the grid search stopped before the end of its grid. ``bracket``: the
    golden-section search's final interval (``None`` for a grid search).
    """

    method: str
    evaluations: tuple[Evaluation, ...]
    alpha: float
    select_by: str
    stopped_early: bool = False
    bracket: tuple[float, float] | None = None
    settings: Mapping[str, object] = field(default_factory=dict)

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(e.alpha for e in self.evaluations)

    @property
    def metrics(self) -> Mapping[str, float]:
        """The metrics at the chosen alpha."""
        return next(e.metrics for e in self.evaluations if e.alpha == self.alpha)

    def to_dict(self) -> dict:
        """A JSON-ready summary."""
        return {
            "method": self.method, "alpha": self.alpha, "select_by": self.select_by,
            "stopped_early": self.stopped_early, "bracket": list(self.bracket) if self.bracket else None,
            "settings": dict(self.settings),
            "evaluations": [{"alpha": e.alpha, **dict(e.metrics)} for e in self.evaluations],
        }


class _Recorder:
    """Calls ``evaluate`` at most once per alpha and records the evaluations in order."""

    def __init__(self, evaluate: Evaluate, required: Iterable[str], cache: MutableMapping[float, Metrics] | None):
        if not callable(evaluate):
            raise ParameterValueError(f"evaluate must be callable (alpha -> metrics mapping), got {evaluate!r}")
        self.evaluate, self.required = evaluate, tuple(dict.fromkeys(required))
        self.cache: MutableMapping[float, Metrics] = {} if cache is None else cache
        self.evaluations: list[Evaluation] = []
        self._seen: set[float] = set()

    def __call__(self, alpha: float) -> Metrics:
        alpha = float(alpha)
        if alpha not in self.cache:
            self.cache[alpha] = self._checked(alpha, self.evaluate(alpha))
        metrics = self.cache[alpha]
        if alpha not in self._seen:  # a point met twice is recorded once, at its first evaluation
            self._seen.add(alpha)
            self.evaluations.append(Evaluation(alpha, metrics))
        return metrics

    def _checked(self, alpha: float, metrics: object) -> Metrics:
        if not isinstance(metrics, Mapping):
            raise ParameterValueError(
                f"evaluate({alpha}) returned {type(metrics).__name__}; it must return a mapping such as "
                f"{{'absolute': ..., 'normalized': ...}}")
        missing = [k for k in self.required if k not in metrics]
        if missing:
            raise ParameterValueError(
                f"evaluate({alpha}) returned keys {sorted(map(str, metrics))} without {missing}; "
                f"the search compares or selects by {list(self.required)}")
        clean = {}
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                if key in self.required:
                    raise ParameterValueError(f"evaluate({alpha})[{key!r}] = {value!r} is not a number") from None
                continue
            if key in self.required and not math.isfinite(number):
                raise ParameterValueError(f"evaluate({alpha})[{key!r}] = {value!r} is not finite")
            clean[key] = number
        return MappingProxyType(clean)

    def best(self, key: str) -> float:
        """The first evaluated alpha with the highest ``key`` (released ``find_optimal_coef``)."""
        best_alpha, best_value = None, -math.inf
        for alpha, metrics in self.evaluations:
            if metrics[key] > best_value:
                best_alpha, best_value = alpha, metrics[key]
        assert best_alpha is not None  # at least one evaluation, finite values
        return best_alpha


def _check_key(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ParameterValueError(f"{name} must be a metric name such as 'absolute' or 'normalized', got {value!r}")
    return value


def grid_search(
    evaluate: Evaluate,
    grid: Iterable[float],
    *,
    select_by: str = "normalized",
    early_stop_patience: int | None = None,
    early_stop_by: str = "absolute",
    cache: MutableMapping[float, Metrics] | None = None,
) -> CoefficientSearch:
    """Evaluate ``grid`` in its order and pick the alpha with the highest ``select_by``.

    With ``early_stop_patience = p``, stop right after the p-th consecutive alpha whose
    ``early_stop_by`` value is not strictly greater than the best so far (Iso: p = 3, by
    "absolute"). TSV: ``grid_search(evaluate, TSV_GRID)``; Iso: ``grid_search(evaluate, TSV_GRID,
    early_stop_patience=3)``.
    """
    alphas = [float(a) for a in grid]
    if not alphas:
        raise ParameterValueError("grid must contain at least one coefficient")
    bad = [a for a in alphas if not math.isfinite(a)]
    if bad:
        raise ParameterValueError(f"grid coefficients must be finite, got {bad}")
    if len(set(alphas)) != len(alphas):
        repeated = sorted({a for a in alphas if alphas.count(a) > 1})
        raise ParameterValueError(f"grid repeats coefficients {repeated}; each alpha is evaluated once")
    if early_stop_patience is not None and (
            isinstance(early_stop_patience, bool) or not isinstance(early_stop_patience, int) or early_stop_patience < 1):
        raise ParameterValueError(f"early_stop_patience must be a positive integer or None, got {early_stop_patience!r}")
    select_by = _check_key("select_by", select_by)
    required = [select_by] + ([_check_key("early_stop_by", early_stop_by)] if early_stop_patience else [])
    record = _Recorder(evaluate, required, cache)

    best_so_far, misses, stopped_early = -math.inf, 0, False
    for position, alpha in enumerate(alphas):
        metrics = record(alpha)
        if early_stop_patience is None:
            continue
        if metrics[early_stop_by] > best_so_far:
            best_so_far, misses = metrics[early_stop_by], 0
        else:
            misses += 1
            if misses >= early_stop_patience:
                stopped_early = position < len(alphas) - 1
                break
    settings = {"grid": alphas, "early_stop_patience": early_stop_patience, "early_stop_by": early_stop_by}
    return CoefficientSearch("grid", tuple(record.evaluations), record.best(select_by), select_by,
                             stopped_early=stopped_early, settings=settings)


def golden_section_search(
    evaluate: Evaluate,
    low: float = 0.0,
    high: float = 2.0,
    *,
    ratio: float = GOLDEN_RATIO_CONJUGATE,
    max_iterations: int = 15,
    tolerance: float = 0.01,
    compare_by: str = "absolute",
    select_by: str = "normalized",
    cache: MutableMapping[float, Metrics] | None = None,
) -> CoefficientSearch:
    """ESM's golden-section search for the alpha maximising ``compare_by`` on [low, high].

    Control flow as released (see the module docstring): interior points only, strict ``>``
    (ties shrink the bracket from the left), at most ``max_iterations`` iterations of one new
    evaluation each, stop once the bracket is narrower than ``tolerance``; the returned alpha is
    the evaluated point with the highest ``select_by`` value.
    """
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ParameterValueError(f"golden_section_search needs finite low < high, got low={low}, high={high}")
    if not 0.5 < ratio < 1.0:
        raise ParameterValueError(
            f"ratio must lie in (0.5, 1) so that the interior points are ordered; got {ratio} "
            f"(ESM: (sqrt(5)-1)/2 = {GOLDEN_RATIO_CONJUGATE:.6f})")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 0:
        raise ParameterValueError(f"max_iterations must be an integer >= 0, got {max_iterations!r}")
    if not tolerance > 0:
        raise ParameterValueError(f"tolerance must be > 0, got {tolerance!r}")
    compare_by, select_by = _check_key("compare_by", compare_by), _check_key("select_by", select_by)
    record = _Recorder(evaluate, [compare_by, select_by], cache)

    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = record(c)[compare_by], record(d)[compare_by]
    for _ in range(max_iterations):
        if fc > fd:  # the maximum lies in [a, d]: drop (d, b]
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = record(c)[compare_by]
        else:  # ties included: the maximum lies in [c, b]: drop [a, c)
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = record(d)[compare_by]
        if abs(b - a) < tolerance:
            break
    settings = {"low": low, "high": high, "ratio": ratio, "max_iterations": max_iterations,
                "tolerance": tolerance, "compare_by": compare_by}
    return CoefficientSearch("golden_section", tuple(record.evaluations), record.best(select_by), select_by,
                             bracket=(a, b), settings=settings)


def _tsv(evaluate: Evaluate, **kwargs) -> CoefficientSearch:
    return grid_search(evaluate, TSV_GRID, **kwargs)


def _iso(evaluate: Evaluate, **kwargs) -> CoefficientSearch:
    return grid_search(evaluate, TSV_GRID, early_stop_patience=ISO_EARLY_STOP_PATIENCE, **kwargs)


def _esm(evaluate: Evaluate, **kwargs) -> CoefficientSearch:
    return golden_section_search(evaluate, 0.0, 2.0, **kwargs)


def _task_arithmetic(evaluate: Evaluate, **kwargs) -> CoefficientSearch:
    return grid_search(evaluate, TASK_ARITHMETIC_GRID, **kwargs)


#: The released rules by name: TSV-M grid, Iso grid with early stop, ESM golden section, and the
#: Task Arithmetic grid of the TSV code.
RULES: dict[str, Callable[..., CoefficientSearch]] = {
    "tsv": _tsv, "iso": _iso, "esm": _esm, "task_arithmetic": _task_arithmetic,
}


def search_alpha(rule: str, evaluate: Evaluate, **kwargs) -> CoefficientSearch:
    """Run the released rule ``rule`` ("tsv", "iso", "esm", "task_arithmetic") with its defaults."""
    return lookup(RULES, "coefficient rule", rule)(evaluate, **kwargs)
