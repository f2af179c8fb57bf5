"""Bootstrap intervals over test examples, the verdicts the book states from them, and the
per-example correctness store they are computed from.

**Statistics.** Every accuracy the book reports is a *mean of per-stratum accuracies*:

* one test set: ``acc = (1/n) sum_i c_i`` with ``c_i = 1`` when example ``i`` is right;
* the mean over held-out domains (SCORE's reporting) is the unweighted mean of the per-domain
  accuracies, and over several datasets the mean of the datasets' means;
* balanced accuracy (FedISIC, RetinaDomains; scikit-learn's definition) is the unweighted mean
  over the classes present in the labels of the per-class recall, i.e. the accuracy of the
  examples of that class.

So a statistic is ``S = sum_s w_s * mean(c[s])`` over strata ``s`` with weights ``w_s`` summing
to one. The data say which: a 1-D array of 0/1 values is one stratum; a mapping
``{name: data}`` or a list/tuple of arrays is the unweighted mean of its members (nested freely:
``{dataset: {domain: correct}}`` is the mean over datasets of the mean over domains); with
``labels`` (the same structure, integer class labels) each leaf is split into its classes, which
gives balanced accuracy.

**Bootstrap.** A percentile bootstrap over examples, *stratified*: each resample draws, within
every stratum, ``n_s`` of its examples with replacement, and recomputes ``S``. For balanced
accuracy the strata are the classes, so class sizes stay those of the test set (a plain resample
can lose a rare class, which changes what balanced accuracy averages over); for a mean over
domains, each domain keeps its size. The interval is the ``(1 - confidence)/2`` and
``(1 + confidence)/2`` quantiles of the ``n_resamples`` values of ``S``.

A *paired* comparison resamples the same example indices for both models and takes
``D = S_a - S_b``. Both statistics depend on a resample only through counts, so the draws are
made on the counts, exactly (no approximation): a stratum's resampled number of right answers
is ``Binomial(n_s, p_s)``, and for a pair, the numbers of examples that only ``a`` gets right
(``n10``) and only ``b`` gets right (``n01``) are ``Multinomial(n_s; n10/n_s, n01/n_s, rest)``
(drawn as two binomials), with ``D_s = (N10 - N01) / n_s``. This is the distribution of drawing
``n_s`` indices with replacement (the tests check it against that literal computation) at a
cost independent of ``n``. Everything is deterministic for a given ``seed`` (``numpy.random.default_rng``); every
comparison of the helpers below uses ``seed`` afresh, so a table's interval for ``(a, b)`` is
the one :func:`paired_bootstrap_ci` gives for ``(a, b)``.

Where more than two models enter one number (a main effect of a 2^3 grid: four cells with a
level on against four with it off), :func:`contrast_bootstrap_ci` resamples the examples
jointly for all of them, drawing the counts of the examples' correctness *patterns* (which
models got it right) from their multinomial. :func:`per_group_differences` gives the paired
interval of each held-out domain or task alone. Numbers stored without per-example correctness
get, at most, :func:`unpaired_normal_ci`, the normal approximation for independent test sets.

**Verdicts.** :func:`verdict` writes the book's sentence from a paired interval: "higher" when
it lies above zero, "lower" below, "indistinguishable at this scale" when it contains zero.
:func:`indistinguishable_from_best`, :func:`ordering_steps`, :func:`pairwise_differences` and
:func:`error_bars` build on it for the chapters.

**Store.** :func:`correctness_record` keeps, for one evaluation, which test examples the model
got right, with the labels, their hash (``labels_sha256``) and optionally the test set's
fingerprint; :func:`save_correctness` writes a table of such records bit-packed into one
``.npz`` beside the tidy results, with provenance, and :func:`load_correctness` reads it back
exactly. :func:`grouped_correctness` turns a table into the inputs of the functions above,
refusing to pair models evaluated on different test sets.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd

from mergelib.errors import ParameterError, ParameterValueError

#: The minus sign of the book's numbers (U+2212), never a hyphen.
MINUS = "\u2212"
#: The words of :func:`verdict` for an interval above zero, below zero, and containing zero.
VERDICT_WORDS = ("higher", "lower", "indistinguishable at this scale")
#: The outcomes of a step of :func:`ordering_steps`.
RESOLVED, CONTRADICTED, UNRESOLVED = "resolved", "contradicted", "unresolved"

#: Version tag of the correctness store (:func:`save_correctness`).
STORE_FORMAT = "mergelib-correctness/1"
#: Columns of a correctness table that are data, not keys.
DATA_COLUMNS = ("n", "labels_sha256", "correct", "labels")


class Interval(NamedTuple):
    """A point estimate and its bootstrap interval (a fraction, e.g. an accuracy or a difference);
    unpacks as ``estimate, low, high``."""

    estimate: float
    low: float
    high: float


# ----------------------------------------------------------------------------- input checks
def _check_options(confidence: float, n_resamples: int, seed: int) -> None:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ParameterValueError(f"confidence must be a number strictly between 0 and 1 (e.g. 0.95), got {confidence!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ParameterValueError(f"n_resamples must be a positive integer (e.g. 2000), got {n_resamples!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParameterValueError(f"seed must be a non-negative integer, got {seed!r}")


def _where(name: str, path: tuple) -> str:
    return name + "".join(f"[{key!r}]" for key in path)


def _correct_vector(values: Any, where: str) -> np.ndarray:
    """``values`` as a 1-D boolean array, after checking they are non-empty booleans or 0/1."""
    array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    if array.ndim != 1:
        raise ParameterError(f"{where} must be a 1-D array of per-example correctness, got shape {array.shape}")
    if array.size == 0:
        raise ParameterValueError(f"{where} is empty: a bootstrap needs at least one test example")
    if array.dtype == bool:
        return array
    if array.dtype.kind not in "iuf" or not np.all((array == 0) | (array == 1)):
        raise ParameterValueError(f"{where} must hold booleans or 0/1 values (right/wrong per example), "
                                  f"got dtype {array.dtype} with values such as {array[:5].tolist()}")
    return array.astype(bool)


def _label_vector(values: Any, where: str, n: int) -> np.ndarray:
    array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ParameterError(f"{where} must be a 1-D array of integer class labels, got dtype {array.dtype}, shape {array.shape}")
    if len(array) != n:
        raise ParameterValueError(f"{where} has {len(array)} labels for {n} examples; give one label per example")
    return array.astype(np.int64)


def _is_group_sequence(node: Any) -> bool:
    return (isinstance(node, (list, tuple)) and len(node) > 0
            and all(isinstance(child, Mapping) or np.ndim(child) >= 1 for child in node))


def _leaves(data: Any, name: str) -> list[tuple[tuple, float, Any]]:
    """``(path, weight, leaf)`` of every leaf of ``data``; each level averages its members equally."""
    found: list[tuple[tuple, float, Any]] = []

    def walk(node: Any, path: tuple, weight: float) -> None:
        if isinstance(node, Mapping) or _is_group_sequence(node):
            items = list(node.items()) if isinstance(node, Mapping) else list(enumerate(node))
            if not items:
                raise ParameterValueError(f"{_where(name, path)} is an empty group: give at least one domain or task")
            for key, child in items:
                walk(child, path + (key,), weight / len(items))
        else:
            found.append((path, weight, node))

    walk(data, (), 1.0)
    return found


def _strata(data: Any, name: str, labels: Any = None) -> dict[tuple, tuple[float, np.ndarray, np.ndarray | None]]:
    """``{path: (weight, correct, labels or None)}`` of the leaves of ``data`` (in order).

    ``labels`` mirrors ``data``; a ``None`` in it, at a leaf or at a group, means plain accuracy
    for everything below (e.g. ``{"pacs": None, "fedisic": {domain: labels}}``: top-1 on PACS,
    balanced accuracy on FedISIC, as SCORE reports them)."""
    label_leaves = {} if labels is None else {path: leaf for path, _, leaf in _leaves(labels, "labels")}
    used = set()
    strata = {}
    for path, weight, leaf in _leaves(data, name):
        correct = _correct_vector(leaf, _where(name, path))
        leaf_labels = None
        if labels is not None:
            prefix = next((path[:i] for i in range(len(path), -1, -1) if path[:i] in label_leaves), None)
            if prefix is None or (prefix != path and label_leaves[prefix] is not None):
                raise ParameterValueError(f"labels have no entry for {_where(name, path)}; give labels with the "
                                          f"same structure (same keys, same order of lists) as the correctness data, "
                                          f"or None where plain accuracy is meant")
            used.add(prefix)
            if label_leaves[prefix] is not None:
                leaf_labels = _label_vector(label_leaves[prefix], _where("labels", path), len(correct))
        strata[path] = (weight, correct, leaf_labels)
    unused = set(label_leaves) - used
    if unused:
        raise ParameterValueError(f"labels have entries the correctness data lack: {sorted(map(str, unused))}")
    return strata


def _classes(weight: float, arrays: Sequence[np.ndarray], labels: np.ndarray | None) -> list[tuple[float, list[np.ndarray]]]:
    """Split one leaf into its class strata (balanced accuracy) or keep it whole."""
    if labels is None:
        return [(weight, list(arrays))]
    classes = np.unique(labels)
    return [(weight / len(classes), [array[labels == c] for array in arrays]) for c in classes]


def _quantiles(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


# ----------------------------------------------------------------------------- intervals
def accuracy(correct: Any, *, labels: Any = None) -> float:
    """The statistic alone, ``S = sum_s w_s * k_s / n_s`` (``k_s`` right of ``n_s``): accuracy,
    the mean over domains, or with ``labels`` balanced accuracy (structures as in
    :func:`bootstrap_ci`, whose estimate it equals exactly)."""
    return sum(w * int(c.sum()) / len(c) for w, c in _single_strata(correct, labels))


def _single_strata(correct: Any, labels: Any) -> Iterator[tuple[float, np.ndarray]]:
    """``(w_s, correctness of stratum s)`` for one model, classes split out when ``labels``."""
    for weight, vector, leaf_labels in _strata(correct, "correct", labels).values():
        for w, (c,) in _classes(weight, [vector], leaf_labels):
            yield w, c


def bootstrap_ci(correct: Any, *, labels: Any = None, confidence: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0) -> Interval:
    """A model's accuracy ``S = sum_s w_s * k_s / n_s`` and its percentile bootstrap interval.

    Args:
        correct: per-example correctness (booleans or 0/1): a 1-D array, or a mapping / list of
            such arrays (their unweighted mean, e.g. over held-out domains), nested freely.
        labels: class labels in the same structure: then the statistic is balanced accuracy
            (mean over the classes present of the per-class recall), resampled within classes;
            ``None`` in place of a leaf or a group keeps plain accuracy there.
        confidence, n_resamples, seed: the interval's level, the number of resamples and the
            seed of ``numpy.random.default_rng``.

    Each resample draws a stratum's number right as ``Binomial(n_s, k_s / n_s)``, the count of
    right answers among ``n_s`` examples drawn with replacement. Returns ``Interval(accuracy,
    low, high)`` as fractions.
    """
    _check_options(confidence, n_resamples, seed)
    rng = np.random.default_rng(seed)
    estimate, draws = 0.0, np.zeros(n_resamples)
    for w, c in _single_strata(correct, labels):
        n, k = len(c), int(c.sum())
        estimate += w * k / n
        draws += w * rng.binomial(n, k / n, size=n_resamples) / n
    return Interval(estimate, *_quantiles(draws, confidence))


def paired_bootstrap_ci(correct_a: Any, correct_b: Any, *, labels: Any = None, confidence: float = 0.95,
                        n_resamples: int = 2000, seed: int = 0) -> Interval:
    """The difference ``D = S_a - S_b`` of two models' accuracies on the same examples, with a
    paired percentile bootstrap (the same resampled examples for both).

    ``correct_a`` and ``correct_b`` have the same structure (a 1-D array, or mappings with the
    same keys / lists of the same length, nested; arrays of equal lengths, example ``i`` of ``a``
    being example ``i`` of ``b``); ``labels``, ``confidence``, ``n_resamples`` and ``seed`` as in
    :func:`bootstrap_ci` (``labels``: balanced accuracy). Per stratum,
    ``D_s = (n10 - n01) / n_s`` with ``n10`` the examples only ``a`` gets right and ``n01`` those
    only ``b`` gets right; a resample draws ``(N10, N01, rest) ~ Multinomial(n_s; n10/n_s,
    n01/n_s, rest)``, as ``N10 ~ Binomial(n_s, n10/n_s)`` then ``N01 ~ Binomial(n_s - N10,
    n01/(n_s - n10))`` (a stratum without discordant examples adds nothing). Returns ``Interval(difference, low, high)`` as fractions (a difference of
    0.009 is 0.9 points).
    """
    _check_options(confidence, n_resamples, seed)
    strata_a = _strata(correct_a, "correct_a", labels)
    strata_b = _strata(correct_b, "correct_b", labels)
    if set(strata_a) != set(strata_b):
        only_a = sorted(map(str, set(strata_a) - set(strata_b)))
        only_b = sorted(map(str, set(strata_b) - set(strata_a)))
        raise ParameterValueError(f"correct_a and correct_b must have the same domains/tasks to be paired; "
                                  f"only in a: {only_a}, only in b: {only_b}")
    rng = np.random.default_rng(seed)
    estimate, draws = 0.0, np.zeros(n_resamples)
    for path, (weight, a, leaf_labels) in strata_a.items():
        b = strata_b[path][1]
        if len(a) != len(b):
            raise ParameterValueError(f"{_where('correct_a', path)} has {len(a)} examples but {_where('correct_b', path)} "
                                      f"has {len(b)}: paired comparisons need the same test examples, in the same order")
        for w, (sa, sb) in _classes(weight, [a, b], leaf_labels):
            n = len(sa)
            only_a, only_b = int(np.sum(sa & ~sb)), int(np.sum(~sa & sb))
            estimate += w * (only_a - only_b) / n
            if only_a == only_b == 0:  # no example on which they differ: D_s = 0 in every resample
                continue
            resampled_a = rng.binomial(n, only_a / n, size=n_resamples)
            resampled_b = rng.binomial(n - resampled_a, only_b / (n - only_a)) if only_b else 0
            draws += w * (resampled_a - resampled_b) / n
    return Interval(estimate, *_quantiles(draws, confidence))


def balanced_bootstrap_ci(predictions: Any, labels: Any, **options: Any) -> Interval:
    """Balanced accuracy of ``predictions`` against ``labels`` (1-D arrays, or the same
    structures as :func:`bootstrap_ci`) with its interval: :func:`bootstrap_ci` of
    ``predictions == labels`` with ``labels``, i.e. resampled within each class."""
    return bootstrap_ci(_equal(predictions, labels), labels=labels, **options)


def paired_balanced_bootstrap_ci(predictions_a: Any, predictions_b: Any, labels: Any, **options: Any) -> Interval:
    """The difference of two models' balanced accuracies on the same examples, paired and
    resampled within each class (:func:`paired_bootstrap_ci` with ``labels``)."""
    return paired_bootstrap_ci(_equal(predictions_a, labels), _equal(predictions_b, labels), labels=labels, **options)


def contrast_bootstrap_ci(correct_by_method: Mapping[str, Any], weights: Mapping[str, float], *, labels: Any = None,
                          confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> Interval:
    """A linear contrast ``C = sum_m weights[m] * S_m`` of several models' accuracies on the same
    examples, with a bootstrap that resamples the examples *jointly* for every model.

    ``weights`` ``{method: w}`` (e.g. ``{a: 1, b: -1}`` for the difference of
    :func:`paired_bootstrap_ci`; ``+1/4`` for the four cells of a 2^3 grid with a level on and
    ``-1/4`` for the four with it off, a main effect). Every method of ``weights`` must have the
    structure of the others (as for :func:`paired_bootstrap_ci`); ``labels`` gives balanced
    accuracy. Per stratum, each example has a *pattern* (which models got it right); the contrast
    depends on a resample only through the counts of the patterns, so a resample draws them as
    ``Multinomial(n_s; observed pattern frequencies)``, exactly the distribution of drawing
    ``n_s`` indices with replacement. Resampling the models separately would ignore that they were
    tested on the same images (and give too narrow an interval when their errors are correlated).
    Returns ``Interval(contrast, low, high)`` as fractions.
    """
    _check_options(confidence, n_resamples, seed)
    if not isinstance(weights, Mapping) or not weights:
        raise ParameterError("weights must be a non-empty mapping {method: weight}, e.g. {'a': 1, 'b': -1}")
    methods = _check_methods(weights, _statistics(correct_by_method), "weights")
    coefficients = np.array([float(weights[m]) for m in methods])
    if not np.all(np.isfinite(coefficients)):
        raise ParameterValueError(f"weights must be finite numbers, got {dict(weights)}")
    strata = [_strata(correct_by_method[m], f"correct_by_method[{m!r}]", labels) for m in methods]
    if any(set(s) != set(strata[0]) for s in strata[1:]):
        raise ParameterValueError(f"the methods {methods} must have the same domains/tasks to be compared on the same "
                                  f"examples")
    rng = np.random.default_rng(seed)
    estimate, draws = 0.0, np.zeros(n_resamples)
    for path, (weight, _, leaf_labels) in strata[0].items():
        vectors = [s[path][1] for s in strata]
        if len({len(v) for v in vectors}) > 1:
            raise ParameterValueError(f"{_where('correct', path)} has {[len(v) for v in vectors]} examples for "
                                      f"{methods}: a contrast needs the same test examples, in the same order")
        for w, arrays in _classes(weight, vectors, leaf_labels):
            n = len(arrays[0])
            patterns, counts = np.unique(np.stack(arrays, axis=1), axis=0, return_counts=True)
            values = patterns.astype(float) @ coefficients  # the contrast of one example of each pattern
            estimate += w * float(counts @ values) / n
            if np.all(values == values[0]):  # every resample gives the same value
                draws += w * values[0]
                continue
            draws += w * (rng.multinomial(n, counts / n, size=n_resamples) @ values) / n
    return Interval(estimate, *_quantiles(draws, confidence))


def per_group_differences(correct_a: Any, correct_b: Any, *, labels: Any = None, confidence: float = 0.95,
                          n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """:func:`paired_bootstrap_ci` of ``a - b`` on each leaf (held-out domain, task) alone: one row
    per leaf with ``group`` (the path of keys, e.g. ``("sketch",)``), ``difference``, ``low``,
    ``high`` and ``direction`` (+1, -1, 0): on how many domains a difference is *resolved*, not
    merely positive."""
    _check_options(confidence, n_resamples, seed)
    leaves_a = {path: leaf for path, _, leaf in _leaves(correct_a, "correct_a")}
    leaves_b = {path: leaf for path, _, leaf in _leaves(correct_b, "correct_b")}
    if set(leaves_a) != set(leaves_b):
        raise ParameterValueError("correct_a and correct_b must have the same domains/tasks to be paired")
    label_leaves = None if labels is None else {path: leaf for path, _, leaf in _leaves(labels, "labels")}
    rows = []
    for path, leaf in leaves_a.items():
        leaf_labels = None
        if label_leaves is not None:
            prefix = next((path[:i] for i in range(len(path), -1, -1) if path[:i] in label_leaves), None)
            leaf_labels = None if prefix is None or prefix != path else label_leaves[path]
        difference, low, high = paired_bootstrap_ci(leaf, leaves_b[path], labels=leaf_labels, confidence=confidence,
                                                    n_resamples=n_resamples, seed=seed)
        rows.append({"group": path, "difference": difference, "low": low, "high": high,
                     "direction": direction(low, high)})
    return pd.DataFrame(rows, columns=["group", "difference", "low", "high", "direction"])


def unpaired_normal_ci(accuracies_a: Sequence[float], sizes_a: Sequence[int], accuracies_b: Sequence[float],
                       sizes_b: Sequence[int], *, confidence: float = 0.95) -> Interval:
    """The difference of two means of per-domain accuracies, ``mean(accuracies_a) -
    mean(accuracies_b)``, with the normal approximation for *independent* test sets:
    ``se^2 = (sum_d p_ad (1 - p_ad) / n_ad + sum_d p_bd (1 - p_bd) / n_bd) / D^2`` (``D`` domains
    on each side).

    Only for numbers stored without per-example correctness (a study that kept accuracies only,
    the expert-by-domain matrix), where no paired interval can be computed. On the same test
    images, and with the models' errors positively correlated as they are in practice, the paired
    interval is narrower: this one is then conservative (it resolves fewer differences).
    """
    _check_options(confidence, 1, 0)
    sides = []
    for name, values, sizes in (("a", accuracies_a, sizes_a), ("b", accuracies_b, sizes_b)):
        p, n = np.asarray(values, dtype=float), np.asarray(sizes, dtype=float)
        if p.ndim != 1 or p.size == 0 or p.shape != n.shape:
            raise ParameterValueError(f"accuracies_{name} and sizes_{name} must be non-empty lists of the same length")
        if not np.all((p >= 0) & (p <= 1)) or not np.all(n >= 1):
            raise ParameterValueError(f"accuracies_{name} must be fractions in [0, 1] and sizes_{name} positive counts")
        sides.append((p, n))
    (pa, na), (pb, nb) = sides
    difference = float(pa.mean() - pb.mean())
    se = math.sqrt(float(np.sum(pa * (1 - pa) / na)) / len(pa) ** 2 + float(np.sum(pb * (1 - pb) / nb)) / len(pb) ** 2)
    z = _normal_quantile((1 + confidence) / 2)
    return Interval(difference, difference - z * se, difference + z * se)


def _normal_quantile(q: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(q)


def _equal(predictions: Any, labels: Any) -> Any:
    """``predictions == labels`` leaf by leaf, in the structure of ``labels``."""
    label_leaves = _leaves(labels, "labels")
    prediction_leaves = {path: leaf for path, _, leaf in _leaves(predictions, "predictions")}
    if set(prediction_leaves) != {path for path, _, _ in label_leaves}:
        raise ParameterValueError("predictions and labels must have the same structure (same domains/tasks)")
    equal = {}
    for path, _, leaf in label_leaves:
        truth = _label_vector(leaf, _where("labels", path), len(np.asarray(leaf)))
        guess = _label_vector(prediction_leaves[path], _where("predictions", path), len(truth))
        equal[path] = guess == truth
    return _rebuild(labels, equal)


def _rebuild(template: Any, leaves: Mapping[tuple, Any], path: tuple = ()) -> Any:
    """``template``'s structure with each leaf replaced by ``leaves[path]``."""
    if isinstance(template, Mapping):
        return {key: _rebuild(child, leaves, path + (key,)) for key, child in template.items()}
    if _is_group_sequence(template):
        return [_rebuild(child, leaves, path + (i,)) for i, child in enumerate(template)]
    return leaves[path]


# ----------------------------------------------------------------------------- verdicts
def direction(low: float, high: float) -> int:
    """``+1`` when the interval ``[low, high]`` lies above zero, ``-1`` below, ``0`` when it
    contains zero (the difference is not resolved at this sample size)."""
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ParameterValueError(f"an interval needs finite bounds with low <= high, got [{low!r}, {high!r}]")
    return 1 if low > 0 else -1 if high < 0 else 0


def signed(value: float, decimals: int = 1) -> str:
    """``value`` with an explicit sign, a real minus sign (U+2212), and no sign on a zero:
    ``+0.9``, ``−0.6``, ``0.0``."""
    text = f"{abs(value):.{decimals}f}"
    if float(text) == 0:
        return text
    return ("+" if value > 0 else MINUS) + text


def verdict(difference: float, low: float, high: float, *, confidence: float = 0.95, scale: float = 100,
            unit: str = "points", decimals: int | None = None, words: tuple[str, str, str] = VERDICT_WORDS) -> str:
    """The book's sentence for a paired interval, e.g. ``"higher (+0.9 points, 95 % CI +0.4 to
    +1.4)"``, ``"lower (−0.6 points, 95 % CI −1.0 to −0.2)"`` or ``"indistinguishable at this
    scale (−0.1 points, 95 % CI −0.6 to +0.3)"``.

    The word is ``words[0]`` when ``low > 0``, ``words[1]`` when ``high < 0``, else ``words[2]``
    (decided on the unrounded interval). Numbers are ``value * scale`` (``scale=100``: fractions
    to percentage points) with ``decimals`` digits; by default one, or more where needed so that
    the bound that decides "higher" or "lower" never prints as zero (at most six).
    """
    side = direction(low, high)
    if not math.isfinite(difference):
        raise ParameterValueError(f"difference must be a finite number, got {difference!r}")
    if decimals is None:
        decimals = 1
        deciding = low if side > 0 else high if side < 0 else None
        while deciding is not None and float(f"{abs(deciding * scale):.{decimals}f}") == 0 and decimals < 6:
            decimals += 1
    elif isinstance(decimals, bool) or not isinstance(decimals, int) or decimals < 0:
        raise ParameterValueError(f"decimals must be a non-negative integer or None, got {decimals!r}")
    word = words[0] if side > 0 else words[1] if side < 0 else words[2]
    unit_text = f" {unit}" if unit else ""
    return (f"{word} ({signed(difference * scale, decimals)}{unit_text}, {confidence * 100:g} % CI "
            f"{signed(low * scale, decimals)} to {signed(high * scale, decimals)})")


def _statistics(correct_by_method: Mapping[str, Any]) -> list[str]:
    if not isinstance(correct_by_method, Mapping) or not correct_by_method:
        raise ParameterError("correct_by_method must be a non-empty mapping {method: per-example correctness}")
    return list(correct_by_method)


def _check_methods(methods: Iterable[str], available: Sequence[str], what: str) -> list[str]:
    methods = list(methods)
    missing = [m for m in methods if m not in available]
    if missing:
        raise ParameterValueError(f"{what} names methods without correctness data: {missing}; the data hold {list(available)}")
    return methods


def error_bars(correct_by_method: Mapping[str, Any], *, labels: Any = None, confidence: float = 0.95,
               n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per method (index, in the given order): ``estimate, low, high`` (:func:`bootstrap_ci`)
    and ``below = estimate - low``, ``above = high - estimate`` (clipped at 0), ready for
    ``ax.bar(t.index, t.estimate, yerr=t[["below", "above"]].T.to_numpy())``."""
    rows = []
    for method in _statistics(correct_by_method):
        estimate, low, high = bootstrap_ci(correct_by_method[method], labels=labels, confidence=confidence,
                                           n_resamples=n_resamples, seed=seed)
        rows.append({"method": method, "estimate": estimate, "low": low, "high": high,
                     "below": max(0.0, estimate - low), "above": max(0.0, high - estimate)})
    return pd.DataFrame(rows).set_index("method")


def pairwise_differences(correct_by_method: Mapping[str, Any], *, reference: str | None = None,
                         pairs: Iterable[tuple[str, str]] | None = None, labels: Any = None,
                         confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """A tidy table of paired differences: one row per ``(method, versus)`` with both estimates,
    ``difference`` (method minus versus), ``low``, ``high``, ``direction`` (+1, -1, 0 as in
    :func:`direction`) and ``verdict`` (:func:`verdict`, in points).

    The pairs: ``pairs`` if given; else each other method against ``reference``; else every
    unordered pair, in the order of ``correct_by_method``. Fractions throughout.
    """
    methods = _statistics(correct_by_method)
    if pairs is not None:
        pairs = [tuple(p) for p in pairs]
        _check_methods([m for p in pairs for m in p], methods, "pairs")
    elif reference is not None:
        _check_methods([reference], methods, "reference")
        pairs = [(m, reference) for m in methods if m != reference]
    else:
        pairs = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1:]]
    options = dict(labels=labels, confidence=confidence, n_resamples=n_resamples, seed=seed)
    estimates = {m: accuracy(correct_by_method[m], labels=labels) for m in dict.fromkeys(m for p in pairs for m in p)}
    rows = []
    for a, b in pairs:
        difference, low, high = paired_bootstrap_ci(correct_by_method[a], correct_by_method[b], **options)
        rows.append({"method": a, "versus": b, "estimate": estimates[a], "versus_estimate": estimates[b],
                     "difference": difference, "low": low, "high": high, "direction": direction(low, high),
                     "verdict": verdict(difference, low, high, confidence=confidence)})
    return pd.DataFrame(rows, columns=["method", "versus", "estimate", "versus_estimate", "difference", "low", "high",
                                       "direction", "verdict"])


def indistinguishable_from_best(correct_by_method: Mapping[str, Any], *, labels: Any = None, confidence: float = 0.95,
                                n_resamples: int = 2000, seed: int = 0) -> list[str]:
    """"The best method" as a set: the method with the highest estimate (the first on ties, as
    :func:`mergelib.experiments.ablations.best_method`) and every method whose paired interval against it
    contains zero. Ordered by estimate, best first (ties in the given order)."""
    methods = _statistics(correct_by_method)
    options = dict(labels=labels, confidence=confidence, n_resamples=n_resamples, seed=seed)
    estimates = {m: accuracy(correct_by_method[m], labels=labels) for m in methods}
    ranked = sorted(methods, key=lambda m: (-estimates[m], methods.index(m)))
    top = ranked[0]
    kept = [top]
    for method in ranked[1:]:
        _, low, high = paired_bootstrap_ci(correct_by_method[method], correct_by_method[top], **options)
        if direction(low, high) == 0:
            kept.append(method)
    return kept


@dataclass(frozen=True)
class Ordering:
    """The steps of a claimed ordering (:func:`ordering_steps`): one row per consecutive pair."""

    steps: pd.DataFrame

    def count(self, outcome: str) -> int:
        return int((self.steps["outcome"] == outcome).sum())

    @property
    def resolved(self) -> int:
        return self.count(RESOLVED)

    @property
    def contradicted(self) -> int:
        return self.count(CONTRADICTED)

    @property
    def unresolved(self) -> int:
        return self.count(UNRESOLVED)

    def sentence(self) -> str:
        """E.g. "of the 3 steps of the claimed ordering, 1 is resolved in the claimed direction,
        0 are contradicted and 2 are unresolved at this scale"."""
        def counted(k: int) -> str:
            return f"{k} {'is' if k == 1 else 'are'}"
        total = len(self.steps)
        return (f"of the {total} step{'' if total == 1 else 's'} of the claimed ordering, {counted(self.resolved)} "
                f"resolved in the claimed direction, {counted(self.contradicted)} contradicted and "
                f"{counted(self.unresolved)} unresolved at this scale")


def ordering_steps(correct_by_method: Mapping[str, Any], order: Sequence[str], *, labels: Any = None,
                   confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> Ordering:
    """Check a claimed ordering ``order`` (best first, e.g. a paper's ranking of SCORE's variants)
    step by step: for each consecutive pair ``(order[i], order[i+1])`` the paired interval of
    ``order[i] - order[i+1]`` is ``resolved`` (above zero: the claimed direction),
    ``contradicted`` (below zero) or ``unresolved`` (contains zero)."""
    methods = _statistics(correct_by_method)
    order = _check_methods(order, methods, "order")
    if len(order) < 2 or len(set(order)) != len(order):
        raise ParameterValueError(f"order must list at least two distinct methods, best first; got {order}")
    table = pairwise_differences(correct_by_method, pairs=list(zip(order, order[1:])), labels=labels,
                                 confidence=confidence, n_resamples=n_resamples, seed=seed)
    outcome = table["direction"].map({1: RESOLVED, -1: CONTRADICTED, 0: UNRESOLVED})
    steps = table.rename(columns={"method": "claimed_higher", "versus": "claimed_lower"}).assign(outcome=outcome)
    return Ordering(steps)


# ----------------------------------------------------------------------------- the store
def labels_hash(labels: Any) -> str:
    """SHA-256 of the labels as little-endian int64 (so the hash does not depend on the machine or
    the dtype they came in). Two evaluations are paired only when these agree."""
    array = _label_vector(labels, "labels", len(np.asarray(labels)))
    return hashlib.sha256(array.astype("<i8").tobytes()).hexdigest()


def correctness_record(correct: Any, labels: Any, *, test_set: str | None = None, **keys: Any) -> dict[str, Any]:
    """One row of a correctness table: the ``keys`` (e.g. ``method``, ``coefficient``,
    ``held_out`` or ``task``, ``split``; JSON scalars), ``test_set`` (the test set's
    ``fingerprint()``, when it has one; it identifies the images, which labels alone do not),
    ``n``, ``labels_sha256``, ``correct`` (bool ``[n]``) and ``labels`` (int64 ``[n]``)."""
    clash = [k for k in keys if k in DATA_COLUMNS or k == "test_set"]
    if clash:
        raise ParameterValueError(f"{clash} are columns of the correctness table itself; rename these keys")
    correct = _correct_vector(correct, "correct")
    labels = _label_vector(labels, "labels", len(correct))
    record = {key: _scalar(value, key) for key, value in keys.items()}
    if test_set is not None:
        record["test_set"] = str(test_set)
    return {**record, "n": len(correct), "labels_sha256": labels_hash(labels), "correct": correct, "labels": labels}


def _scalar(value: Any, key: str) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if value is not None and not isinstance(value, (str, int, float, bool)):
        raise ParameterValueError(f"key {key!r} must be a string, number, boolean or None, got {type(value).__name__}")
    return value


def correctness_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The table of :func:`correctness_record` rows (checked), one row per evaluation."""
    frame = pd.DataFrame(list(records))
    _check_frame(frame)
    return frame


def _check_frame(frame: pd.DataFrame) -> None:
    missing = [c for c in DATA_COLUMNS if c not in frame]
    if missing:
        raise ParameterValueError(f"a correctness table needs the columns {list(DATA_COLUMNS)} (build its rows with "
                                  f"correctness_record); missing: {missing}")
    for i, row in enumerate(frame[list(DATA_COLUMNS)].itertuples(index=False)):
        correct = _correct_vector(row.correct, f"row {i}: correct")
        labels = _label_vector(row.labels, f"row {i}: labels", len(correct))
        if row.n != len(correct):
            raise ParameterValueError(f"row {i}: n = {row.n} but {len(correct)} correctness values")
        if row.labels_sha256 != labels_hash(labels):
            raise ParameterValueError(f"row {i}: labels_sha256 does not match its labels (rebuild it with correctness_record)")


def save_correctness(path: str | Path, table: pd.DataFrame, provenance: Mapping[str, Any]) -> Path:
    """Write a correctness table to ``path`` (``.npz``, atomically), with ``provenance``.

    The file holds: ``format`` (:data:`STORE_FORMAT`); ``rows``, the key columns with ``n``,
    ``labels_sha256`` (and ``test_set``) as JSON records; ``bits``, each row's correctness packed
    with ``numpy.packbits`` (``ceil(n/8)`` bytes, concatenated; ``offsets[i]:offsets[i+1]`` is row
    ``i``'s); one ``labels_<sha256>`` int64 array per distinct label set; ``provenance`` as JSON.
    Nothing is pickled: :func:`load_correctness` reads it with ``allow_pickle=False``.
    """
    from mergelib.io.checkpoints import atomic_write

    _check_frame(table)
    keys = [c for c in table.columns if c not in ("correct", "labels")]
    records = [{k: _scalar(v, k) for k, v in zip(keys, row)} for row in table[keys].itertuples(index=False)]
    packed = [np.packbits(_correct_vector(c, "correct")) for c in table["correct"]]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in packed])]).astype(np.int64)
    labels = {f"labels_{h}": np.asarray(v, dtype="<i8") for h, v in zip(table["labels_sha256"], table["labels"])}
    arrays = {"format": np.array(STORE_FORMAT), "columns": np.array(json.dumps(list(table.columns))),
              "rows": np.array(json.dumps(records)), "provenance": np.array(json.dumps(dict(provenance), default=str)),
              "bits": np.concatenate(packed) if packed else np.zeros(0, np.uint8), "offsets": offsets, **labels}
    path = Path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file handle: numpy would append ".npz" to a bare name
            np.savez_compressed(handle, **arrays)

    atomic_write(path, write)
    return path


def load_correctness(path: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a table written by :func:`save_correctness`: ``(table, provenance)``, identical to
    what was saved (rows sharing a label set share one labels array). Each row's labels are
    checked against its ``labels_sha256``."""
    with np.load(Path(path), allow_pickle=False) as archive:
        if "format" not in archive or str(archive["format"]) != STORE_FORMAT:
            raise ParameterValueError(f"{path} is not a correctness store of format {STORE_FORMAT}")
        columns = json.loads(str(archive["columns"]))
        records = json.loads(str(archive["rows"]))
        provenance = json.loads(str(archive["provenance"]))
        bits, offsets = archive["bits"], archive["offsets"]
        labels = {name[len("labels_"):]: archive[name].astype(np.int64) for name in archive.files if name.startswith("labels_")}
    for i, record in enumerate(records):
        record["correct"] = np.unpackbits(bits[offsets[i]:offsets[i + 1]], count=record["n"]).astype(bool)
        record["labels"] = labels[record["labels_sha256"]]
    table = pd.DataFrame(records, columns=columns)
    _check_frame(table)
    return table, provenance


def grouped_correctness(table: pd.DataFrame, *, methods: Sequence[str] | None = None,
                        levels: Sequence[str] = ("dataset", "held_out", "task"),
                        method_column: str = "method") -> tuple[dict[str, Any], Any]:
    """The inputs of the functions above from a correctness table: ``(correct_by_method, labels)``
    with ``correct_by_method[m]`` nested ``{level value: ...}`` over the ``levels`` the table has
    (in that order; e.g. ``{dataset: {held_out: correct}}``) and ``labels`` in the same structure.

    The table must hold one row per (method, levels): filter it first, e.g. to the merges at
    coefficient 1 and the baselines (coefficient NaN), or to ``split == "test"``. Every method
    must have every group, and within a group every row the same ``labels_sha256`` (and
    ``test_set``, when recorded): models evaluated on different examples are never paired.
    Pass ``labels`` on for balanced accuracy, with ``None`` in place of the datasets reported
    in top-1 (``labels["pacs"] = None``), or do not pass it for accuracy everywhere.
    """
    _check_frame(table)
    present = [level for level in levels if level in table]
    chosen = list(dict.fromkeys(table[method_column])) if methods is None else list(methods)
    frame = table[table[method_column].isin(chosen)]
    duplicated = frame.duplicated([method_column, *present])
    if duplicated.any():
        example = frame.loc[duplicated, [method_column, *present]].iloc[0].to_dict()
        raise ParameterValueError(f"several rows for {example}: filter the table to one row per method and "
                                  f"{present or 'table'} (e.g. one coefficient, one split)")
    groups = list(dict.fromkeys(frame[present].itertuples(index=False, name=None))) if present else [()]
    identity = ["labels_sha256"] + (["test_set"] if "test_set" in frame else [])
    correct: dict[str, dict] = {m: {} for m in chosen}
    labels: dict = {}
    for group in groups:
        rows = frame[(frame[present] == pd.Series(group, index=present)).all(axis=1)] if present else frame
        lacking = [m for m in chosen if m not in set(rows[method_column])]
        if lacking:
            raise ParameterValueError(f"methods {lacking} have no row for {dict(zip(present, group))}; every method "
                                      f"must be evaluated on every group to be compared")
        if len(rows[identity].astype(str).drop_duplicates()) > 1:
            raise ParameterValueError(f"the rows for {dict(zip(present, group))} were evaluated on different test "
                                      f"examples ({', '.join(identity)} differ); they cannot be paired")
        for _, row in rows.iterrows():
            _nest(correct[row[method_column]], group, row["correct"])
        _nest(labels, group, rows.iloc[0]["labels"])
    if not present:
        return {m: correct[m][()] for m in chosen}, labels[()]
    return correct, labels


def _nest(tree: dict, group: tuple, value: Any) -> None:
    if not group:
        tree[()] = value
        return
    for key in group[:-1]:
        tree = tree.setdefault(key, {})
    tree[group[-1]] = value
