"""Bootstrap intervals, verdicts and the per-example correctness store (mergelib.analysis.stats)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from mergelib.analysis import stats
from mergelib.errors import ParameterError, ParameterValueError
from mergelib.models.evaluation import classification_metrics, classification_outcomes
from mergelib.analysis.stats import (
    MINUS,
    bootstrap_ci,
    correctness_frame,
    correctness_record,
    error_bars,
    grouped_correctness,
    indistinguishable_from_best,
    load_correctness,
    ordering_steps,
    paired_balanced_bootstrap_ci,
    paired_bootstrap_ci,
    pairwise_differences,
    save_correctness,
    verdict,
)

Z95 = 1.959963984540054


def _patterns(n: int, probabilities: tuple[float, float, float, float], rng: np.random.Generator):
    """Paired outcomes with P(both right), P(only a), P(only b), P(neither)."""
    pattern = rng.choice(4, size=n, p=probabilities)
    return np.isin(pattern, (0, 1)), np.isin(pattern, (0, 2))


# ----------------------------------------------------------------------------- the checks
def test_identical_inputs_give_a_zero_width_interval_at_zero():
    correct = np.random.default_rng(1).random(500) < 0.7
    assert tuple(paired_bootstrap_ci(correct, correct)) == (0.0, 0.0, 0.0)
    domains = {"a": correct[:200], "b": correct[200:]}
    assert tuple(paired_bootstrap_ci(domains, domains)) == (0.0, 0.0, 0.0)


def test_all_right_against_all_wrong_gives_one():
    right, wrong = np.ones(300, bool), np.zeros(300, bool)
    assert tuple(paired_bootstrap_ci(right, wrong)) == (1.0, 1.0, 1.0)
    assert tuple(paired_bootstrap_ci(wrong, right)) == (-1.0, -1.0, -1.0)
    assert tuple(bootstrap_ci(right)) == (1.0, 1.0, 1.0)


def test_width_matches_the_normal_approximation_for_independent_bernoulli_data():
    rng = np.random.default_rng(2)
    n = 2000
    a, b = rng.random(n) < 0.72, rng.random(n) < 0.68
    accuracy, low, high = bootstrap_ci(a)
    normal = 2 * Z95 * math.sqrt(accuracy * (1 - accuracy) / n)
    assert abs((high - low) / normal - 1) < 0.10
    difference, low, high = paired_bootstrap_ci(a, b)
    normal = 2 * Z95 * np.std(a.astype(float) - b.astype(float)) / math.sqrt(n)
    assert abs((high - low) / normal - 1) < 0.10
    assert difference == pytest.approx(a.mean() - b.mean(), abs=1e-12)


def test_coverage_of_a_known_difference():
    """300 paired test sets with a true difference of 5 points: the 95 % interval covers it in
    about 95 % of them (a percentile bootstrap at n = 300 under-covers slightly)."""
    rng = np.random.default_rng(3)
    truth, covered, repetitions = 0.15 - 0.10, 0, 300
    for repetition in range(repetitions):
        a, b = _patterns(300, (0.60, 0.15, 0.10, 0.15), rng)
        _, low, high = paired_bootstrap_ci(a, b, n_resamples=1000, seed=repetition)
        covered += low <= truth <= high
    assert 0.90 <= covered / repetitions <= 0.99


def test_verdict_wording_on_both_sides_of_zero():
    assert verdict(0.009, 0.004, 0.014) == "higher (+0.9 points, 95 % CI +0.4 to +1.4)"
    assert verdict(-0.006, -0.010, -0.002) == f"lower ({MINUS}0.6 points, 95 % CI {MINUS}1.0 to {MINUS}0.2)"
    assert verdict(-0.0013, -0.006, 0.003) == f"indistinguishable at this scale ({MINUS}0.1 points, 95 % CI {MINUS}0.6 to +0.3)"
    assert verdict(-0.0013, -0.006, 0.003, decimals=2) == (
        f"indistinguishable at this scale ({MINUS}0.13 points, 95 % CI {MINUS}0.60 to +0.30)")
    assert verdict(0.0, 0.0, 0.0) == "indistinguishable at this scale (0.0 points, 95 % CI 0.0 to 0.0)"
    assert "-" not in verdict(-0.02, -0.03, -0.01)  # a real minus sign, never a hyphen
    # the bound deciding "higher" is never printed as zero: more decimals when needed
    assert verdict(0.002, 0.0002, 0.004) == "higher (+0.20 points, 95 % CI +0.02 to +0.40)"
    assert verdict(0.01, 0.005, 0.02, confidence=0.9, unit="", scale=1, decimals=3) == (
        "higher (+0.010, 90 % CI +0.005 to +0.020)")
    with pytest.raises(ParameterValueError, match="low <= high"):
        verdict(0.0, 0.1, -0.1)


def test_correctness_round_trips_through_the_store(tmp_path):
    rng = np.random.default_rng(4)
    labels = {"sketch": rng.integers(0, 10, 37), "photo": rng.integers(0, 10, 64)}
    records = []
    for method, coefficient in (("score", 1.0), ("tsv_m", 0.5), ("zero-shot", float("nan"))):
        for domain, y in labels.items():
            records.append(correctness_record(rng.random(len(y)) < 0.6, y, test_set=f"fp-{domain}",
                                              method=method, coefficient=coefficient, held_out=domain))
    table = correctness_frame(records)
    provenance = {"git": {"commit": "abc"}, "seed": 7}
    path = save_correctness(tmp_path / "results.correct.npz", table, provenance)
    loaded, loaded_provenance = load_correctness(path)
    assert loaded_provenance == provenance
    assert list(loaded.columns) == list(table.columns)
    pd.testing.assert_frame_equal(loaded.drop(columns=["correct", "labels"]), table.drop(columns=["correct", "labels"]))
    for column in ("correct", "labels"):
        for saved, read in zip(table[column], loaded[column]):
            assert read.dtype == saved.dtype and np.array_equal(read, saved)
    with np.load(path) as archive:  # bit-packed: ceil(n / 8) bytes per row; one copy of each label set
        assert archive["bits"].nbytes == 3 * (math.ceil(37 / 8) + math.ceil(64 / 8))
        assert sorted(name for name in archive.files if name.startswith("labels_")) == sorted(
            f"labels_{h}" for h in set(table["labels_sha256"]))


# ----------------------------------------------------------------------------- determinism, references
def test_deterministic_for_a_seed_and_different_across_seeds():
    rng = np.random.default_rng(5)
    a, b = _patterns(400, (0.5, 0.2, 0.1, 0.2), rng)
    assert paired_bootstrap_ci(a, b, seed=11) == paired_bootstrap_ci(a, b, seed=11)
    assert bootstrap_ci(a, seed=11) == bootstrap_ci(a, seed=11)
    assert paired_bootstrap_ci(a, b, seed=11) != paired_bootstrap_ci(a, b, seed=12)
    # torch tensors and 0/1 integers are the same data
    assert paired_bootstrap_ci(torch.from_numpy(a), b.astype(int), seed=11) == paired_bootstrap_ci(a, b, seed=11)
    assert stats.accuracy(a) == bootstrap_ci(a, seed=11).estimate == pytest.approx(a.mean(), abs=1e-15)


def _index_bootstrap(correct_a, correct_b, *, resamples, seed, strata=None):
    """The literal paired bootstrap: draw indices with replacement within each stratum."""
    rng = np.random.default_rng(seed)
    strata = strata or [np.arange(len(correct_a))]
    draws = np.zeros(resamples)
    for members in strata:
        index = members[rng.integers(0, len(members), size=(resamples, len(members)))]
        draws += (correct_a[index].mean(axis=1) - correct_b[index].mean(axis=1)) / len(strata)
    return np.quantile(draws, [0.025, 0.975])


def test_count_draws_match_the_literal_index_bootstrap():
    rng = np.random.default_rng(6)
    a, b = _patterns(300, (0.55, 0.15, 0.10, 0.20), rng)
    reference = _index_bootstrap(a.astype(float), b.astype(float), resamples=4000, seed=0)
    _, low, high = paired_bootstrap_ci(a, b, n_resamples=4000)
    assert low == pytest.approx(reference[0], abs=0.01) and high == pytest.approx(reference[1], abs=0.01)


def test_mean_over_domains_is_the_mean_of_per_domain_accuracies():
    rng = np.random.default_rng(7)
    sizes = {"sketch": 80, "photo": 500, "halftone": 150}
    a = {d: rng.random(n) < p for (d, n), p in zip(sizes.items(), (0.4, 0.9, 0.6))}
    b = {d: rng.random(n) < p for (d, n), p in zip(sizes.items(), (0.5, 0.85, 0.55))}
    accuracy, low, high = bootstrap_ci(a)
    assert accuracy == pytest.approx(np.mean([v.mean() for v in a.values()]), abs=1e-12)
    assert accuracy != pytest.approx(np.concatenate(list(a.values())).mean(), abs=1e-3)  # not the pooled mean
    difference, low, high = paired_bootstrap_ci(a, b, n_resamples=4000)
    assert difference == pytest.approx(np.mean([a[d].mean() - b[d].mean() for d in sizes]), abs=1e-12)
    offsets = np.cumsum([0, *sizes.values()])
    pooled_a, pooled_b = (np.concatenate([x[d] for d in sizes]).astype(float) for x in (a, b))
    strata = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(sizes))]
    reference = _index_bootstrap(pooled_a, pooled_b, resamples=4000, seed=1, strata=strata)
    assert low == pytest.approx(reference[0], abs=0.01) and high == pytest.approx(reference[1], abs=0.01)
    # a list of per-domain arrays is the same statistic; a mapping's key order does not pair wrongly
    assert paired_bootstrap_ci(list(a.values()), list(b.values()), n_resamples=4000) == (difference, low, high)
    reordered = {d: b[d] for d in reversed(list(sizes))}
    assert paired_bootstrap_ci(a, reordered, n_resamples=4000) == (difference, low, high)
    # nested: the mean over datasets of the means over their domains
    nested = bootstrap_ci({"one": a, "two": {"x": np.ones(10, bool)}})
    assert nested.estimate == pytest.approx((accuracy + 1.0) / 2, abs=1e-12)


def test_balanced_accuracy_matches_scikit_learn_and_a_stratified_reference():
    rng = np.random.default_rng(8)
    labels = rng.choice(4, size=400, p=(0.55, 0.25, 0.15, 0.05))
    predictions_a = np.where(rng.random(400) < 0.75, labels, rng.integers(0, 4, 400))
    predictions_b = np.where(rng.random(400) < 0.65, labels, rng.integers(0, 4, 400))
    balanced, low, high = stats.balanced_bootstrap_ci(predictions_a, labels, n_resamples=4000)
    assert balanced == pytest.approx(balanced_accuracy_score(labels, predictions_a), abs=1e-12)
    assert low < balanced < high
    difference, low, high = paired_balanced_bootstrap_ci(predictions_a, predictions_b, labels, n_resamples=4000)
    assert difference == pytest.approx(balanced_accuracy_score(labels, predictions_a)
                                       - balanced_accuracy_score(labels, predictions_b), abs=1e-12)
    strata = [np.flatnonzero(labels == c) for c in range(4)]
    reference = _index_bootstrap((predictions_a == labels).astype(float), (predictions_b == labels).astype(float),
                                 resamples=4000, seed=2, strata=strata)
    assert low == pytest.approx(reference[0], abs=0.01) and high == pytest.approx(reference[1], abs=0.01)
    # per domain: the mean over domains of each domain's balanced accuracy
    by_domain = stats.balanced_bootstrap_ci({"x": predictions_a[:150], "y": predictions_a[150:]},
                                            {"x": labels[:150], "y": labels[150:]})
    expected = (balanced_accuracy_score(labels[:150], predictions_a[:150])
                + balanced_accuracy_score(labels[150:], predictions_a[150:])) / 2
    assert by_domain.estimate == pytest.approx(expected, abs=1e-12)
    # datasets with different metrics (SCORE: top-1 on PACS, balanced on FedISIC): None keeps top-1
    correct = {"pacs": {"x": predictions_a[:150] == labels[:150], "y": predictions_a[150:] == labels[150:]},
               "fedisic": {"z": predictions_a == labels}}
    mixed = bootstrap_ci(correct, labels={"pacs": None, "fedisic": {"z": labels}})
    top1 = ((predictions_a[:150] == labels[:150]).mean() + (predictions_a[150:] == labels[150:]).mean()) / 2
    assert mixed.estimate == pytest.approx((top1 + balanced_accuracy_score(labels, predictions_a)) / 2, abs=1e-12)
    with pytest.raises(ParameterValueError, match="no entry for"):
        bootstrap_ci(correct, labels={"pacs": None, "fedisic": labels})
    with pytest.raises(ParameterValueError, match="lack"):
        bootstrap_ci(correct, labels={"pacs": None, "fedisic": {"z": labels}, "extra": None})


# ----------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("call, error, message", [
    (lambda: paired_bootstrap_ci(np.ones(3), np.ones(4)), ParameterValueError, "3 examples but"),
    (lambda: bootstrap_ci(np.array([0, 1, 2])), ParameterValueError, "0/1"),
    (lambda: bootstrap_ci(np.array([0.5, 1.0])), ParameterValueError, "0/1"),
    (lambda: bootstrap_ci(np.array([], bool)), ParameterValueError, "empty"),
    (lambda: bootstrap_ci({}), ParameterValueError, "empty group"),
    (lambda: bootstrap_ci(np.ones((2, 2))), ParameterError, "1-D"),
    (lambda: bootstrap_ci(np.ones(3), confidence=95), ParameterValueError, "between 0 and 1"),
    (lambda: bootstrap_ci(np.ones(3), confidence=1.0), ParameterValueError, "between 0 and 1"),
    (lambda: bootstrap_ci(np.ones(3), n_resamples=0), ParameterValueError, "positive integer"),
    (lambda: bootstrap_ci(np.ones(3), seed=-1), ParameterValueError, "non-negative"),
    (lambda: paired_bootstrap_ci({"a": np.ones(3)}, {"b": np.ones(3)}), ParameterValueError, "same domains"),
    (lambda: bootstrap_ci(np.ones(3), labels=np.zeros(4, int)), ParameterValueError, "4 labels for 3"),
    (lambda: bootstrap_ci(np.ones(3), labels=np.zeros(3)), ParameterError, "integer class labels"),
])
def test_bad_inputs_are_refused_with_a_message(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ----------------------------------------------------------------------------- chapter helpers
def _three_methods():
    rng = np.random.default_rng(9)
    base = rng.random(3000)
    best = base < 0.80
    close = best.copy()  # 30 examples lost and 25 gained: 5 fewer right, far inside the noise
    close[np.flatnonzero(best)[:30]] = False
    close[np.flatnonzero(~best)[:25]] = True
    return {"best": best, "close": close, "worse": base < 0.70, "tied": best.copy()}


def test_indistinguishable_from_best_is_a_set_with_the_top_first():
    methods = _three_methods()
    assert indistinguishable_from_best(methods) == ["best", "tied", "close"]
    assert indistinguishable_from_best({"worse": methods["worse"]}) == ["worse"]


def test_ordering_steps_count_resolved_contradicted_and_unresolved():
    methods = _three_methods()
    ordering = ordering_steps(methods, ["close", "best", "worse", "tied"])
    assert list(ordering.steps["outcome"]) == ["unresolved", "resolved", "contradicted"]
    assert (ordering.resolved, ordering.contradicted, ordering.unresolved) == (1, 1, 1)
    assert ordering.sentence() == ("of the 3 steps of the claimed ordering, 1 is resolved in the claimed direction, "
                                   "1 is contradicted and 1 is unresolved at this scale")
    with pytest.raises(ParameterValueError, match="without correctness data"):
        ordering_steps(methods, ["best", "missing"])


def test_pairwise_table_and_error_bars_agree_with_the_single_intervals():
    methods = _three_methods()
    table = pairwise_differences(methods, reference="best")
    assert list(table["method"]) == ["close", "worse", "tied"] and set(table["versus"]) == {"best"}
    row = table.set_index("method").loc["worse"]
    assert (row["difference"], row["low"], row["high"]) == tuple(paired_bootstrap_ci(methods["worse"], methods["best"]))
    assert row["verdict"].startswith("lower (") and row["direction"] == -1
    assert len(pairwise_differences(methods)) == 6
    bars = error_bars(methods)
    assert list(bars.index) == list(methods)
    assert tuple(bars.loc["close", ["estimate", "low", "high"]]) == tuple(bootstrap_ci(methods["close"]))
    assert (bars[["below", "above"]] >= 0).all().all()


def test_grouped_correctness_pairs_only_the_same_test_examples():
    rng = np.random.default_rng(10)
    y = {"a": rng.integers(0, 3, 50), "b": rng.integers(0, 3, 70)}
    rows = [correctness_record(rng.random(len(y[d])) < 0.7, y[d], method=m, held_out=d, coefficient=1.0)
            for m in ("score", "tsv_m") for d in y]
    correct, labels = grouped_correctness(correctness_frame(rows))
    assert list(correct) == ["score", "tsv_m"] and list(correct["score"]) == ["a", "b"]
    assert np.array_equal(labels["b"], y["b"])
    paired_bootstrap_ci(correct["score"], correct["tsv_m"], labels=labels)  # balanced accuracy over domains
    other = correctness_record(np.ones(50, bool), np.roll(y["a"], 1), method="ties", held_out="a", coefficient=1.0)
    other_b = correctness_record(np.ones(70, bool), y["b"], method="ties", held_out="b", coefficient=1.0)
    with pytest.raises(ParameterValueError, match="different test examples"):
        grouped_correctness(correctness_frame(rows + [other, other_b]))
    with pytest.raises(ParameterValueError, match="several rows"):
        grouped_correctness(correctness_frame(rows + rows[:1]))
    with pytest.raises(ParameterValueError, match="no row for"):
        grouped_correctness(correctness_frame(rows[:3]))


def test_classification_outcomes_give_the_correct_vector_behind_the_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 0])
    metrics, correct = classification_outcomes(logits, labels)
    assert metrics == classification_metrics(logits, labels)
    assert correct.dtype == bool and correct.tolist() == [True, True, False, False]
    assert metrics["accuracy"] == correct.mean()


# ----------------------------------------------------------------------------- contrasts and per-domain intervals
def test_a_two_model_contrast_is_the_paired_difference():
    rng = np.random.default_rng(12)
    a, b = _patterns(800, (0.5, 0.12, 0.08, 0.3), rng)
    paired = paired_bootstrap_ci(a, b, n_resamples=8000)
    contrast = stats.contrast_bootstrap_ci({"a": a, "b": b}, {"a": 1, "b": -1}, n_resamples=8000)
    assert contrast.estimate == pytest.approx(paired.estimate, abs=1e-12)
    width = paired.high - paired.low
    assert contrast.low == pytest.approx(paired.low, abs=0.08 * width)
    assert contrast.high == pytest.approx(paired.high, abs=0.08 * width)
    assert tuple(stats.contrast_bootstrap_ci({"a": a, "b": b}, {"a": 1, "b": -1}, seed=3)) == tuple(
        stats.contrast_bootstrap_ci({"a": a, "b": b}, {"a": 1, "b": -1}, seed=3))


def test_a_contrast_of_four_models_resamples_them_jointly():
    """(a + b)/2 - (c + d)/2 on the same images, against a literal bootstrap that resamples the
    same image indices for all four models."""
    rng = np.random.default_rng(13)
    base = rng.random(600) < 0.6
    models = {name: np.where(rng.random(600) < p, ~base, base) for name, p in
              (("a", 0.05), ("b", 0.1), ("c", 0.2), ("d", 0.15))}
    weights = {"a": 0.5, "b": 0.5, "c": -0.5, "d": -0.5}
    estimate, low, high = stats.contrast_bootstrap_ci(models, weights, n_resamples=6000)
    values = sum(w * models[m].astype(float) for m, w in weights.items())
    assert estimate == pytest.approx(values.mean(), abs=1e-12)
    index = np.random.default_rng(0).integers(0, 600, size=(6000, 600))
    reference = np.quantile(values[index].mean(axis=1), [0.025, 0.975])
    assert low == pytest.approx(reference[0], abs=0.006) and high == pytest.approx(reference[1], abs=0.006)
    with pytest.raises(ParameterValueError, match="without correctness data"):
        stats.contrast_bootstrap_ci(models, {"a": 1, "e": -1})
    with pytest.raises(ParameterError):
        stats.contrast_bootstrap_ci(models, {})


def test_per_group_differences_give_each_domain_its_own_interval():
    rng = np.random.default_rng(14)
    a = {"far": np.ones(400, bool), "tied": rng.random(400) < 0.5}
    b = {"far": np.zeros(400, bool), "tied": a["tied"].copy()}
    table = stats.per_group_differences(a, b)
    assert list(table["group"]) == [("far",), ("tied",)]
    rows = {row.group[0]: row for row in table.itertuples(index=False)}
    assert rows["far"].direction == 1 and rows["far"].difference == 1.0
    assert (rows["tied"].difference, rows["tied"].low, rows["tied"].high, rows["tied"].direction) == (0.0, 0.0, 0.0, 0)
    single = paired_bootstrap_ci(a["tied"], rng.random(400) < 0.5)
    assert single.low <= single.estimate <= single.high


def test_the_unpaired_normal_interval_is_the_textbook_one():
    difference, low, high = stats.unpaired_normal_ci([0.7, 0.5], [1000, 400], [0.6, 0.5], [1000, 400])
    se = math.sqrt((0.7 * 0.3 / 1000 + 0.25 / 400) / 4 + (0.6 * 0.4 / 1000 + 0.25 / 400) / 4)
    assert difference == pytest.approx(0.05)
    assert (low, high) == pytest.approx((0.05 - Z95 * se, 0.05 + Z95 * se))
    with pytest.raises(ParameterValueError):
        stats.unpaired_normal_ci([1.5], [10], [0.5], [10])
