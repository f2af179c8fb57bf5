"""The ablation grids of SCORE and ESM, and the tables the ablation chapter draws from them.

Everything here but :func:`shared_score_bases` is a pure function of its arguments: lists of
method specs (strings that :func:`mergelib.methods.registry.parse_method_spec` reads, e.g.
``"score[keep=diagonal]"``) and tidy result tables, as the protocols return them.

* :func:`score_ablation_specs` lists SCORE's variants by what they change: the part of the
  projected matrices that is kept, the trimming threshold (``z``, with or without the released
  ``1/T``), the trimming statistics, and the rank per task (with or without completing the
  shared basis, and the paper's ``1/D``). The released default, ``"score"``, comes first.
* :func:`esm_polarization_grid` is the 2^3 grid of ESM's three polarization levels (task,
  dimension, layer), for its activation decomposition (ESD) and, if asked, its SVD variant.
* :func:`shared_score_bases` (deprecated: the protocols use :func:`mergelib.methods.grid.merge_grid`)
  shares SVD factors between the merges made within it (the results are unchanged).
* :func:`method_means`, :func:`score_ablation_table`, :func:`merge_vs_ensemble`,
  :func:`inference_costs`, :func:`esm_ablation_table` and :func:`level_effects` turn results
  into the chapter's tables.
* Given the per-example correctness the protocols keep (:mod:`mergelib.analysis.stats`;
  :func:`domain_correctness` and :func:`multitask_correctness` select the rows a protocol
  reports), every difference they state carries its paired bootstrap interval and verdict:
  :func:`score_ablation_table` gives each variant's interval against the released SCORE and on
  how many held-out domains it is *resolved* better or worse; :func:`merge_vs_ensemble` gives
  the best merge as the set of merges not distinguishable from the top;
  :func:`level_effect_intervals` gives each ESM level's main effect with its interval.
  :func:`comparison` is the plain comparative word, for numbers without per-example data.

Means follow SCORE's reporting: per dataset, the unweighted mean over held-out domains; over
several datasets, the unweighted mean of the datasets' means.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import pandas as pd

from mergelib.analysis import stats
from mergelib.protocols.domain_generalization import ENSEMBLE, OWN_EXPERT, ZERO_SHOT
from mergelib.protocols.results import fixed_coefficient_selected
from mergelib.errors import ParameterError
from mergelib.methods import METHODS, parse_method_spec
from mergelib.methods.esm import DECOMPOSITIONS
from mergelib.methods.factors import FactorCache

#: The released SCORE and ESM, the reference row of each ablation.
SCORE_DEFAULT = "score"
ESM_DEFAULT = "esm"
#: ESM's polarization levels; each is switched by the parameter ``f"{level}_scaling"``.
ESM_LEVELS = ("task", "dimension", "layer")

#: The label given to a held-out fold when the results hold a single dataset.
SINGLE_DATASET = "all"
#: The verdict of a table row when no per-example correctness was given.
NO_INTERVAL = "no interval (no per-example correctness)"


@dataclass(frozen=True)
class Variant:
    """One row of an ablation: its group (what it changes), a readable label and the method spec.

    ``key`` names the row's results when the spec depends on the dataset (the paper's rank
    ``r / D`` needs the number of domains ``D``): :func:`tabulated` renames ``spec`` to ``key``
    so that datasets with different ``D`` average together. It defaults to the spec.
    """

    group: str
    label: str
    spec: str
    key: str = ""

    @property
    def column(self) -> str:
        """The column name of this variant's results in the tables (``key``, else ``spec``)."""
        return self.key or self.spec


#: The results name of the paper's rank ``r / D``, whatever ``D`` (see :class:`Variant`).
PAPER_RANK = "score[rank=r/D]"


#: What the summed projected matrices keep (the ``keep`` choices of :func:`mergelib.methods.score.score`).
SCORE_KEEP_VARIANTS: tuple[Variant, ...] = (
    Variant("kept part", "trimmed (SCORE, released default)", SCORE_DEFAULT),
    Variant("kept part", "diagonal only (released ours_v2)", "score[keep=diagonal]"),
    Variant("kept part", "trimmed off-diagonal only (released ours_v3)", "score[keep=off_diagonal]"),
    Variant("kept part", "full matrix, as described", "score[keep=full]"),
    Variant("kept part", "full matrix, as released (ours_v4)", "score[keep=released_full]"),
)


def _number(value: float) -> str:
    """A float written so that YAML reads it back exactly (``1.0``, ``0.5``, ``0.8333333333333334``)."""
    return repr(float(value))


def paper_rank_fraction(n_domains: int) -> float:
    """The ``rank_fraction`` that gives the paper's rank ``k = r / D`` under leave-one-domain-out.

    The released code keeps ``int(r / T)`` directions per task with ``T = D - 1`` merged models;
    the paper's text says ``1/D`` of the rank, i.e. a fraction ``T / (T + 1) = (D - 1) / D`` of
    the released ``r / T``. The fraction is rounded *up* at the twelfth decimal, so that
    ``int(fraction * r / T)`` is never one short of ``int(r / D)`` through floating-point rounding
    (``r / D`` is a fraction with denominator ``D``, far from the next integer at that precision).
    """
    if not isinstance(n_domains, int) or isinstance(n_domains, bool) or n_domains < 2:
        raise ParameterError(f"n_domains must be an integer of at least 2, got {n_domains!r}")
    return math.ceil((n_domains - 1) / n_domains * 1e12) / 1e12


def score_ablation_specs(
    z_values: Iterable[float] = (1.0, 4.0),
    rank_fractions: Iterable[float] = (0.5, 1.0),
    *,
    n_domains: int | None = None,
) -> list[Variant]:
    """SCORE's ablation grid: the released default first, then one variant per changed choice.

    Groups: ``"kept part"`` (:data:`SCORE_KEEP_VARIANTS`); ``"threshold"``: each ``z`` of
    ``z_values`` other than the default (1.96) with the released ``z sigma / T``, and
    ``z sigma`` without the ``1/T`` (the paper's text; on FedISIC and RetinaDomains, where that is
    the released rule, this variant coincides with SCORE); ``"statistics"``: mean and standard
    deviation over the off-diagonal entries only (the paper's text); ``"rank"``: each fraction of
    ``rank_fractions`` of the released ``int(r / T)`` directions with the basis *not* completed
    to ``r`` (``1.0`` is the released rank without completion), and, when ``n_domains`` is
    given, the paper's rank ``r / D`` (basis completed, as released).

    Every spec is distinct and parses; repeated values are dropped.
    """
    defaults = METHODS[SCORE_DEFAULT].defaults
    variants = list(SCORE_KEEP_VARIANTS)
    for z in z_values:
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not z > 0:
            raise ParameterError(f"z values must be positive numbers, got {z!r}")
        if float(z) != float(defaults["z"]):
            variants.append(Variant("threshold", f"z = {float(z):g}, threshold zσ/T", f"score[z={_number(z)}]"))
    variants.append(Variant("threshold", "threshold zσ, without 1/T (paper's text)", "score[divide_by_tasks=false]"))
    variants.append(Variant("statistics", "μ, σ of the off-diagonal entries only (paper's text)",
                            "score[trim_statistics=off_diagonal]"))
    for fraction in rank_fractions:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ParameterError(f"rank fractions must lie in (0, 1], got {fraction!r}")
        if float(fraction) == 1.0:
            variants.append(Variant("rank", "k = ⌊r/T⌋, basis not completed", "score[complete_basis=false]"))
        else:
            variants.append(Variant("rank", f"k = ⌊{float(fraction):g}·r/T⌋, basis not completed",
                                    f"score[rank_fraction={_number(fraction)}, complete_basis=false]"))
    if n_domains is not None:
        variants.append(Variant("rank", "k = ⌊r/D⌋ (paper's text)",
                                f"score[rank_fraction={_number(paper_rank_fraction(n_domains))}]", PAPER_RANK))
    unique, seen = [], set()
    for variant in variants:  # the first occurrence of a spec wins
        if variant.spec not in seen:
            parse_method_spec(variant.spec)
            unique.append(variant)
            seen.add(variant.spec)
    return unique


@dataclass(frozen=True)
class EsmVariant:
    """One cell of ESM's polarization grid: a decomposition and the three level switches."""

    decomposition: str
    task: bool
    dimension: bool
    layer: bool

    @property
    def switches(self) -> dict[str, bool]:
        return {level: getattr(self, level) for level in ESM_LEVELS}

    @property
    def levels(self) -> int:
        """How many of the three levels are on."""
        return sum(self.switches.values())

    @property
    def levels_label(self) -> str:
        """``"task + dimension + layer"``, ``"layer"``, ..., ``"none"``."""
        return " + ".join(level for level, on in self.switches.items() if on) or "none"

    @property
    def label(self) -> str:
        return f"{self.decomposition.upper()}: {self.levels_label}"

    @property
    def spec(self) -> str:
        """The method spec, ``"esm"`` for the released default; only non-default parameters are written."""
        params = [] if self.decomposition == "esd" else [f"decomposition={self.decomposition}"]
        params += [f"{level}_scaling=false" for level, on in self.switches.items() if not on]
        return ESM_DEFAULT if not params else f"{ESM_DEFAULT}[{', '.join(params)}]"


def esm_polarization_grid(decompositions: Sequence[str] = ("esd",), *, ends_only: Sequence[str] = ()) -> list[EsmVariant]:
    """Every on/off combination of ESM's three polarization levels (2^3 per decomposition).

    Ordered by decomposition (as given), then by the number of levels on (none first, all three
    last), then task before dimension before layer. ``("esd",)`` contains the released ESM
    (spec ``"esm"``); ``"svd"`` adds the paper's SVD-instead-of-ESD ablation, which needs no data.
    The decompositions listed in ``ends_only`` get only the two ends, no level and all three (the
    paper's SVD rows), instead of all eight cells.
    """
    for name, value in (("decompositions", decompositions), ("ends_only", ends_only)):
        if isinstance(value, str):
            raise ParameterError(f"{name} must be a list such as ['esd', 'svd'], got {value!r}")
    chosen = list(dict.fromkeys(decompositions))
    if not chosen:
        raise ParameterError("decompositions must name at least one of " + ", ".join(DECOMPOSITIONS))
    unknown = [d for d in [*chosen, *ends_only] if d not in DECOMPOSITIONS]
    if unknown:
        raise ParameterError(f"unknown ESM decomposition(s) {unknown}; choose from {list(DECOMPOSITIONS)}")
    combinations = sorted(itertools.product((False, True), repeat=len(ESM_LEVELS)),
                          key=lambda c: (sum(c), [not on for on in c]))
    ends = [c for c in combinations if sum(c) in (0, len(ESM_LEVELS))]
    return [EsmVariant(d, *combination) for d in chosen for combination in (ends if d in ends_only else combinations)]


@contextlib.contextmanager
def shared_score_bases() -> Iterator[Counter]:
    """Deprecated (kept for old notebooks): the protocols now merge through
    :func:`mergelib.methods.grid.merge_grid`, which shares the decompositions by itself.

    Within this context every SVD-based merge shares its factors through one
    :class:`mergelib.methods.factors.FactorCache` (each expert's truncated triplets, each fold's
    shared basis and projections, computed once; the merges are bitwise what they are outside).
    The yielded counts say how many of each kind were ``"<kind> computed"`` and
    ``"<kind> reused"``. Nothing is evicted before the context ends: meant for small models.
    """
    with FactorCache() as cache:
        yield cache.counts


# ----------------------------------------------------------------------------- tables
def tabulated(results: pd.DataFrame, variants: Sequence[Variant]) -> pd.DataFrame:
    """``results`` with each variant's ``method`` renamed from its spec to :attr:`Variant.column`."""
    renames = {v.spec: v.column for v in variants if v.column != v.spec}
    return results.assign(method=results["method"].replace(renames)) if renames else results


def _rows_at_coefficient_one(results: pd.DataFrame) -> pd.DataFrame:
    """The baselines (coefficient NaN) and the merges at coefficient 1, the domain protocol's rule."""
    if "coefficient" not in results:
        return results
    return results[fixed_coefficient_selected(results)]


def _with_benchmark(results: pd.DataFrame) -> pd.DataFrame:
    return results if "benchmark" in results else results.assign(benchmark=SINGLE_DATASET)


def per_domain(results: pd.DataFrame, value: str = "value") -> pd.DataFrame:
    """Held-out folds by methods: ``value`` per (benchmark, held-out domain) and method."""
    frame = _with_benchmark(_rows_at_coefficient_one(results))
    return frame.pivot_table(index=["benchmark", "held_out"], columns="method", values=value, aggfunc="mean", sort=False)


def method_means(results: pd.DataFrame, value: str = "value") -> pd.Series:
    """Per method: the mean over datasets of each dataset's mean over its held-out domains.

    ``results`` are the domain protocol's rows in the result schema (:mod:`mergelib.protocols.results`:
    ``method``, ``held_out``, ``value``, and optionally ``benchmark`` and ``coefficient``; merges
    are read at coefficient 1).
    """
    per_dataset = per_domain(results, value).groupby(level="benchmark", sort=False).mean()
    return per_dataset.mean(axis=0)


def _balanced_benchmarks(results: pd.DataFrame, value: str) -> list[str]:
    """The benchmarks whose ``value`` is balanced accuracy (their intervals resample within classes)."""
    if value == "balanced_accuracy":
        return list(dict.fromkeys(_with_benchmark(results)["benchmark"]))
    if value != "value" or "metric" not in results:
        return []
    rows = _with_benchmark(results)
    return list(dict.fromkeys(rows.loc[rows["metric"] == "balanced_accuracy", "benchmark"]))


def domain_correctness(correctness: pd.DataFrame, variants: Sequence[Variant] = (), *,
                       methods: Sequence[str] | None = None, balanced: Iterable[str] = ()) -> tuple[dict[str, Any], Any]:
    """The inputs of :mod:`mergelib.analysis.stats` for the rows the leave-one-domain-out protocol
    reports: ``(correct_by_method, labels)`` from a correctness table (the test split; the merges
    at coefficient 1 and the baselines), with the variants renamed as :func:`tabulated` does, nested
    ``{benchmark: {held_out: correct}}`` (``{held_out: correct}`` without a ``benchmark`` column),
    so that a method's statistic is the one :func:`method_means` reports. ``labels`` is ``None``
    (accuracy) unless ``balanced`` names benchmarks read in balanced accuracy (FedISIC,
    RetinaDomains)."""
    table = correctness
    if "split" in table:
        table = table[table["split"].fillna("test") == "test"]
    table = tabulated(_rows_at_coefficient_one(table), variants)
    correct, labels = stats.grouped_correctness(table, methods=methods, levels=("benchmark", "held_out"))
    balanced = set(balanced)
    if not balanced:
        return correct, None
    if "benchmark" not in table:
        raise ValueError("balanced accuracy per benchmark needs a benchmark column in the correctness table")
    return correct, {b: (labels[b] if b in balanced else None) for b in labels}


def multitask_correctness(correctness: pd.DataFrame, chosen: pd.DataFrame | None = None, *,
                          methods: Sequence[str] | None = None) -> dict[str, Any]:
    """``correct_by_method`` for the rows the multi-task protocol reports: the test split, each
    merge at the coefficient ``chosen`` on validation (the ``method`` and
    ``selected_coefficient`` columns of :func:`mergelib.protocols.multitask.select_on_validation`)
    and the baselines (coefficient empty: zero-shot, the fine-tuned experts); nested
    ``{benchmark: {task: correct}}`` or ``{task: correct}``, so that a method's statistic is its
    mean accuracy over the tasks."""
    table = correctness[correctness["split"].fillna("test") == "test"] if "split" in correctness else correctness
    if chosen is not None:
        picked = chosen.groupby("method", sort=False)["selected_coefficient"].first()
        at = table["method"].map(picked)
        table = table[(table["coefficient"].isna() & at.isna()) | (table["coefficient"] == at)]
    correct, _ = stats.grouped_correctness(table, methods=methods, levels=("benchmark", "task"))
    return correct


def score_ablation_table(
    results: pd.DataFrame, variants: Sequence[Variant], *, value: str = "value", reference: str = SCORE_DEFAULT,
    correctness: pd.DataFrame | None = None, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0,
) -> pd.DataFrame:
    """One row per variant: its mean (:func:`method_means`) and the difference from ``reference``.

    Without ``correctness``: on how many held-out folds the variant beats the reference
    (``folds better``, point estimates), and the ``verdict`` :data:`NO_INTERVAL`. With the
    protocol's ``correctness`` table (:mod:`mergelib.analysis.stats`): the paired bootstrap
    interval of the difference (``low``, ``high``, fractions like ``difference``), its
    ``verdict`` (:func:`mergelib.analysis.stats.verdict`, in points) and on how many folds the
    variant is *resolved* better or worse (the fold's own paired interval excludes zero).
    ``results`` (and the correctness table) may hold the variants under their specs or their
    :attr:`Variant.column` names.
    """
    results = tabulated(results, variants)
    folds = per_domain(results, value)
    means = method_means(results, value)
    missing = [v.column for v in variants if v.column not in folds] + ([reference] if reference not in folds else [])
    if missing:
        raise KeyError(f"no results for {missing}; the results hold {sorted(folds.columns)}")
    options = dict(confidence=confidence, n_resamples=n_resamples, seed=seed)
    correct = labels = None
    if correctness is not None:
        names = list(dict.fromkeys([reference, *(v.column for v in variants)]))
        correct, labels = domain_correctness(correctness, variants, methods=names,
                                             balanced=_balanced_benchmarks(results, value))
    rows = []
    for variant in variants:
        name = variant.column
        row = {"group": variant.group, "variant": variant.label, "spec": name, "mean": means[name],
               "difference": means[name] - means[reference]}
        if correct is None:
            row.update({"low": float("nan"), "high": float("nan"), "verdict": NO_INTERVAL,
                        "folds better": int((folds[name] > folds[reference]).sum())})
        else:
            difference, low, high = stats.paired_bootstrap_ci(correct[name], correct[reference], labels=labels, **options)
            per_fold = stats.per_group_differences(correct[name], correct[reference], labels=labels, **options)
            row.update({"low": low, "high": high, "verdict": stats.verdict(difference, low, high, confidence=confidence),
                        "folds resolved better": int((per_fold["direction"] > 0).sum()),
                        "folds resolved worse": int((per_fold["direction"] < 0).sum())})
        rows.append({**row, "folds": len(folds)})
    return pd.DataFrame(rows)


def best_method(results: pd.DataFrame, methods: Sequence[str], *, value: str = "value") -> str:
    """The method of ``methods`` with the highest :func:`method_means` (the first on ties)."""
    means = method_means(results, value)
    missing = [m for m in methods if m not in means]
    if missing:
        raise KeyError(f"no results for {missing}")
    return max(methods, key=lambda m: (means[m], -list(methods).index(m)))


class MergeVersusEnsemble(NamedTuple):
    """What :func:`merge_vs_ensemble` returns; unpacks as ``table, best, indistinguishable``."""

    table: pd.DataFrame
    #: the merge with the highest mean (the first listed on ties)
    best: str
    #: the merges not distinguishable from ``best`` (paired intervals containing zero), ``best``
    #: first; ``None`` without per-example correctness
    indistinguishable: list[str] | None


def merge_vs_ensemble(
    results: pd.DataFrame, merge_methods: Sequence[str], *, value: str = "value", reference: str = SCORE_DEFAULT,
    correctness: pd.DataFrame | None = None, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0,
) -> MergeVersusEnsemble:
    """Per held-out fold: zero-shot, ``reference`` (SCORE), the merge of ``merge_methods`` with
    the highest mean over the folds (a choice made after seeing the held-out results), the logit
    ensemble of the other experts and the held-out domain's own expert; the last row is the mean
    (:func:`method_means`).

    Returns the table, that merge's label and, with the protocol's ``correctness`` table, "the best
    merge" as it should be reported: the set of merges whose paired interval against the top one
    contains zero (:func:`mergelib.analysis.stats.indistinguishable_from_best`)."""
    best = best_method(results, merge_methods, value=value)
    columns = list(dict.fromkeys([ZERO_SHOT, reference, best, ENSEMBLE, OWN_EXPERT]))
    folds = per_domain(results, value)
    missing = [c for c in columns if c not in folds]
    if missing:
        raise KeyError(f"no results for {missing}")
    table = folds[columns].copy()
    means = method_means(results, value)[columns]
    table.loc[("mean", "mean"), :] = means.to_numpy()
    indistinguishable = None
    if correctness is not None:
        ranked = [best, *(m for m in merge_methods if m != best)]  # the top by the results' means first
        correct, labels = domain_correctness(correctness, methods=ranked, balanced=_balanced_benchmarks(results, value))
        options = dict(labels=labels, confidence=confidence, n_resamples=n_resamples, seed=seed)
        indistinguishable = [best] + [m for m in ranked[1:] if stats.direction(
            *stats.paired_bootstrap_ci(correct[m], correct[best], **options)[1:]) == 0]
    return MergeVersusEnsemble(table, best, indistinguishable)


def inference_costs(n_sources: int, encoder_parameters: int | None = None, *, bytes_per_parameter: int = 4) -> pd.DataFrame:
    """What each model costs at inference on one held-out domain, with ``n_sources`` source experts.

    A merge is one encoder like the zero-shot model; the logit ensemble runs every source expert
    (``n_sources`` forward passes per image, ``n_sources`` encoders held); the own-domain expert
    is one encoder but needs labelled training data of the target domain.
    """
    if not isinstance(n_sources, int) or n_sources < 1:
        raise ParameterError(f"n_sources must be a positive integer, got {n_sources!r}")
    rows = [(ZERO_SHOT, 1, False), ("merge", 1, False), (ENSEMBLE, n_sources, False), (OWN_EXPERT, 1, True)]
    table = pd.DataFrame([{"model": name, "forward passes per image": encoders, "encoders held": encoders,
                           "needs target-domain training data": target} for name, encoders, target in rows]).set_index("model")
    if encoder_parameters is not None:
        table["parameters held (M)"] = table["encoders held"] * encoder_parameters / 1e6
        table["weights memory (MB)"] = table["encoders held"] * encoder_parameters * bytes_per_parameter / 2**20
    return table


def esm_ablation_table(selected: pd.DataFrame, grid: Sequence[EsmVariant]) -> pd.DataFrame:
    """One row per cell of the grid, from the test rows at the coefficient chosen on validation
    (:func:`mergelib.protocols.multitask.select_on_validation`): mean accuracy and normalized accuracy over
    the tasks, the chosen coefficient, and the switches."""
    by_method = selected.groupby("method")
    missing = [v.spec for v in grid if v.spec not in by_method.groups]
    if missing:
        raise KeyError(f"no results for {missing}")
    rows = []
    for variant in grid:
        group = by_method.get_group(variant.spec)
        rows.append({"decomposition": variant.decomposition, **variant.switches, "levels": variant.levels,
                     "polarization": variant.levels_label, "spec": variant.spec,
                     "coefficient": float(group["selected_coefficient"].iloc[0]),
                     "accuracy": float(group["accuracy"].mean()),
                     "normalized": float(group["normalized_accuracy"].mean())})
    return pd.DataFrame(rows)


def level_effects(table: pd.DataFrame, value: str = "normalized") -> pd.DataFrame:
    """Main effect of each polarization level, per decomposition, over a full 2^3 grid: the mean
    of ``value`` over the four cells with the level on minus the mean over the four with it off."""
    effects = {}
    for decomposition, cells in table.groupby("decomposition", sort=False):
        if len(cells[list(ESM_LEVELS)].drop_duplicates()) != 2 ** len(ESM_LEVELS):
            raise ValueError(f"{decomposition}: level effects need all {2 ** len(ESM_LEVELS)} on/off combinations")
        effects[decomposition] = {level: cells.loc[cells[level].astype(bool), value].mean()
                                  - cells.loc[~cells[level].astype(bool), value].mean() for level in ESM_LEVELS}
    return pd.DataFrame(effects).T.rename_axis("decomposition")


def level_effect_intervals(grid: Sequence[EsmVariant], correct_by_method: dict[str, Any], *, labels: Any = None,
                           confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Each polarization level's main effect with its bootstrap interval, per decomposition whose
    2^3 cells are all in ``grid``: the mean accuracy of the four cells with the level on minus that
    of the four with it off, a contrast of eight models tested on the same examples
    (:func:`mergelib.analysis.stats.contrast_bootstrap_ci`, which resamples them jointly).
    ``correct_by_method`` is keyed by the cells' specs (:func:`multitask_correctness`). Rows:
    ``decomposition, level, effect, low, high, verdict`` (fractions; the verdict in points)."""
    rows = []
    for decomposition in dict.fromkeys(v.decomposition for v in grid):
        cells = [v for v in grid if v.decomposition == decomposition]
        if len({tuple(v.switches.values()) for v in cells}) != 2 ** len(ESM_LEVELS):
            continue
        for level in ESM_LEVELS:
            weights = {v.spec: (1 if v.switches[level] else -1) / 2 ** (len(ESM_LEVELS) - 1) for v in cells}
            effect, low, high = stats.contrast_bootstrap_ci(correct_by_method, weights, labels=labels,
                                                            confidence=confidence, n_resamples=n_resamples, seed=seed)
            rows.append({"decomposition": decomposition, "level": level, "effect": effect, "low": low, "high": high,
                         "verdict": stats.verdict(effect, low, high, confidence=confidence)})
    return pd.DataFrame(rows, columns=["decomposition", "level", "effect", "low", "high", "verdict"])


def comparison(a: float, b: float, *, decimals: int | None = None, tolerance: float = 0.0,
               words: tuple[str, str, str] = ("higher than", "lower than", "equal to")) -> str:
    """The word comparing ``a`` with ``b``: ``words[0]`` when ``a > b + tolerance``, ``words[1]``
    when ``a < b - tolerance``, else ``words[2]``. With ``decimals``, the two are first rounded as
    the prose shows them, so that two numbers printed alike are never called higher or lower.

    A comparison of point estimates only: for accuracies with per-example correctness, the
    chapters state :func:`mergelib.analysis.stats.verdict` of the paired interval instead."""
    if decimals is not None:
        a, b = round(float(a), decimals), round(float(b), decimals)
    if a > b + tolerance:
        return words[0]
    if a < b - tolerance:
        return words[1]
    return words[2]
