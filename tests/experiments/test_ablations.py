"""The ablation grids (SCORE's variants, ESM's polarization levels) and the ablation tables."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mergelib.analysis import stats
from mergelib.experiments.ablations import (
    ESM_DEFAULT,
    ESM_LEVELS,
    PAPER_RANK,
    SCORE_DEFAULT,
    SCORE_KEEP_VARIANTS,
    comparison,
    domain_correctness,
    esm_ablation_table,
    esm_polarization_grid,
    inference_costs,
    level_effect_intervals,
    level_effects,
    merge_vs_ensemble,
    method_means,
    multitask_correctness,
    paper_rank_fraction,
    score_ablation_specs,
    score_ablation_table,
    shared_score_bases,
    tabulated,
)
from mergelib.protocols.domain_generalization import ENSEMBLE, OWN_EXPERT, ZERO_SHOT
from mergelib.errors import ParameterError
from mergelib.methods import merge, parse_method_spec
from mergelib.methods.score import KEEP_CHOICES


def _task_vectors(tasks: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    keys = {"visual.transformer.resblocks.0.attn.in_proj_weight": (24, 8),
            "visual.transformer.resblocks.0.attn.out_proj.weight": (8, 8),
            "visual.transformer.resblocks.0.mlp.c_fc.weight": (16, 8),
            "visual.transformer.resblocks.0.mlp.c_proj.weight": (8, 16),
            "visual.transformer.resblocks.1.mlp.c_fc.weight": (16, 8),
            "visual.transformer.resblocks.0.ln_1.bias": (8,)}
    return [{k: torch.randn(shape, generator=generator, dtype=torch.float64) for k, shape in keys.items()}
            for _ in range(tasks)]


# ----------------------------------------------------------------------------- SCORE's grid
def test_score_specs_parse_are_distinct_and_start_with_the_released_default():
    variants = score_ablation_specs(z_values=[0.5, 1.96, 4.0], rank_fractions=[0.25, 1.0], n_domains=6)
    specs = [v.spec for v in variants]
    assert specs[0] == SCORE_DEFAULT
    assert len(set(specs)) == len(specs) and len({v.label for v in variants}) == len(variants)
    parsed = [parse_method_spec(s) for s in specs]
    assert {p.name for p in parsed} == {"score"}
    # the default z (1.96) would duplicate "score": it is not listed again
    assert [p.params["z"] for p in parsed if "z" in p.params] == [0.5, 4.0]
    # every keep choice of the method is covered, each exactly once
    keeps = [p.params.get("keep", "trimmed") for p, v in zip(parsed, variants) if v.group == "kept part"]
    assert sorted(keeps) == sorted(KEEP_CHOICES)
    assert {v.group for v in variants} == {"kept part", "threshold", "statistics", "rank"}
    by_spec = {v.spec: parse_method_spec(v.spec).params for v in variants}
    assert by_spec["score[complete_basis=false]"] == {"complete_basis": False}  # rank fraction 1, no completion
    assert by_spec["score[divide_by_tasks=false]"] == {"divide_by_tasks": False}
    assert {"trim_statistics": "off_diagonal"} in by_spec.values()


def test_score_specs_drop_repeats_and_reject_bad_values():
    once = score_ablation_specs(z_values=[1.0], rank_fractions=[0.5])
    twice = score_ablation_specs(z_values=[1.0, 1.0], rank_fractions=[0.5, 0.5])
    assert once == twice
    assert not any("rank_fraction=0.8" in v.spec for v in once)  # the paper's rank only with n_domains
    for bad in (dict(z_values=[0.0]), dict(z_values=[-1.0]), dict(rank_fractions=[0.0]), dict(rank_fractions=[1.5]),
                dict(n_domains=1)):
        with pytest.raises(ParameterError):
            score_ablation_specs(**bad)


def test_paper_rank_fraction_gives_r_over_d_under_leave_one_out():
    for domains in range(2, 16):
        fraction = paper_rank_fraction(domains)
        assert fraction == pytest.approx((domains - 1) / domains, abs=1e-11)
        for rank in range(1, 2049):  # the released k = int(fraction * r / T) with T = D - 1
            assert int(fraction * rank / (domains - 1)) == rank // domains, (domains, rank)


def test_every_score_variant_merges_and_the_kept_parts_differ():
    vectors = _task_vectors()
    merged = {v.spec: merge(v.spec.partition("[")[0], vectors, **parse_method_spec(v.spec).params)
              for v in score_ablation_specs(n_domains=4)}
    key = "visual.transformer.resblocks.0.attn.out_proj.weight"
    keeps = [v.spec for v in SCORE_KEEP_VARIANTS]
    for a, b in itertools.combinations(keeps, 2):
        assert not torch.allclose(merged[a][key], merged[b][key]), (a, b)
    # "full" on a square layer whose basis is complete is task arithmetic (the sum) on that layer
    torch.testing.assert_close(merged["score[keep=full]"][key], sum(v[key] for v in vectors))


def test_shared_bases_give_the_same_merges_and_compute_each_basis_once():
    import mergelib.methods.score as score_module

    vectors = _task_vectors(tasks=3, seed=2)
    specs = [v.spec for v in score_ablation_specs(z_values=[1.0], rank_fractions=[0.5])]
    alone = {s: merge("score", vectors, **parse_method_spec(s).params) for s in specs}
    original = score_module.score_basis
    with shared_score_bases() as counts:
        assert score_module.score_basis is original  # no monkeypatch: a factor cache
        shared = {s: merge("score", vectors, **parse_method_spec(s).params) for s in specs}
        other = merge("score", _task_vectors(tasks=3, seed=3))  # new inputs: new factors, not stale ones
    for spec in specs:
        for key in alone[spec]:
            assert torch.equal(alone[spec][key], shared[spec][key]), (spec, key)
    matrices = sum(v.ndim == 2 for v in vectors[0].values())
    ranks = len({parse_method_spec(s).params.get("rank_fraction", 1.0) for s in specs})
    # each rank's polar factors once for the shared inputs and once for the new ones; each expert's
    # spectrum once for every rank (methods.factors), for the shared inputs and for the new ones
    assert counts["polars computed"] == matrices * (ranks + 1)
    assert counts["triplets computed"] == matrices * 3 * 2
    expected = merge("score", _task_vectors(tasks=3, seed=3))
    assert all(torch.equal(other[k], expected[k]) for k in other)


# ----------------------------------------------------------------------------- ESM's grid
def test_esm_grid_has_the_eight_combinations_including_the_released_default():
    grid = esm_polarization_grid()
    assert len(grid) == 8 == len({v.spec for v in grid}) == len({v.label for v in grid})
    assert {tuple(v.switches.values()) for v in grid} == set(itertools.product((False, True), repeat=3))
    assert grid[0].levels == 0 and grid[-1].levels == 3 and grid[-1].spec == ESM_DEFAULT
    for variant in grid:
        spec = parse_method_spec(variant.spec)
        assert spec.name == "esm"
        assert {level: spec.params.get(f"{level}_scaling", True) for level in ESM_LEVELS} == variant.switches
        assert spec.params.get("decomposition", "esd") == "esd"


def test_esm_grid_with_svd_doubles_it_and_rejects_unknown_decompositions():
    grid = esm_polarization_grid(["esd", "svd"])
    assert len({v.spec for v in grid}) == 16
    svd = [v for v in grid if v.decomposition == "svd"]
    assert len(svd) == 8 and all(parse_method_spec(v.spec).params["decomposition"] == "svd" for v in svd)
    assert esm_polarization_grid(["svd", "svd"]) == svd
    for bad in (["pca"], [], "esd"):
        with pytest.raises(ParameterError):
            esm_polarization_grid(bad)


def test_ends_only_keeps_the_two_extreme_cells_of_a_decomposition():
    grid = esm_polarization_grid(["esd", "svd"], ends_only=["svd"])
    assert len(grid) == 10 and sum(v.decomposition == "esd" for v in grid) == 8
    svd = [v for v in grid if v.decomposition == "svd"]
    assert [v.levels for v in svd] == [0, 3] and svd[-1].spec == "esm[decomposition=svd]"
    with pytest.raises(ParameterError):
        esm_polarization_grid(["esd"], ends_only=["pca"])


def test_each_polarization_switch_changes_the_svd_merge():
    vectors = _task_vectors(tasks=2, seed=1)
    # uneven task norms, so that the task level has something to favour
    vectors[1] = {k: 3 * v for k, v in vectors[1].items()}
    merged = {v.levels_label: merge("esm", vectors, **parse_method_spec(v.spec).params)
              for v in esm_polarization_grid(["svd"])}
    reference = merged["none"]
    for level in ESM_LEVELS:
        assert any(not torch.allclose(merged[level][k], reference[k]) for k in reference), level


# ----------------------------------------------------------------------------- tables
def _domain_results() -> pd.DataFrame:
    """Two datasets, of two and three held-out domains; a coefficient-0.5 row that must be ignored."""
    rows = []
    values = {
        ("A", "a1"): {ZERO_SHOT: 0.2, "score": 0.5, "score[keep=diagonal]": 0.6, "tsv_m": 0.5, ENSEMBLE: 0.7, OWN_EXPERT: 0.9},
        ("A", "a2"): {ZERO_SHOT: 0.4, "score": 0.7, "score[keep=diagonal]": 0.5, "tsv_m": 0.6, ENSEMBLE: 0.5, OWN_EXPERT: 1.0},
        ("B", "b1"): {ZERO_SHOT: 0.1, "score": 0.3, "score[keep=diagonal]": 0.2, "tsv_m": 0.3, ENSEMBLE: 0.4, OWN_EXPERT: 0.8},
        ("B", "b2"): {ZERO_SHOT: 0.1, "score": 0.3, "score[keep=diagonal]": 0.2, "tsv_m": 0.3, ENSEMBLE: 0.4, OWN_EXPERT: 0.8},
        ("B", "b3"): {ZERO_SHOT: 0.4, "score": 0.6, "score[keep=diagonal]": 0.8, "tsv_m": 0.9, ENSEMBLE: 0.1, OWN_EXPERT: 0.8},
    }
    for (dataset, domain), methods in values.items():
        for method, score in methods.items():
            baseline = method in (ZERO_SHOT, ENSEMBLE, OWN_EXPERT)
            rows.append({"benchmark": dataset, "held_out": domain, "method": method,
                         "coefficient": float("nan") if baseline else 1.0, "value": score})
        rows.append({"benchmark": dataset, "held_out": domain, "method": "score", "coefficient": 0.5, "value": 0.0})
    return pd.DataFrame(rows)


def test_method_means_average_the_datasets_means_at_coefficient_one():
    means = method_means(_domain_results())
    assert means["score"] == pytest.approx(((0.5 + 0.7) / 2 + (0.3 + 0.3 + 0.6) / 3) / 2)
    assert means["tsv_m"] == pytest.approx(((0.5 + 0.6) / 2 + (0.3 + 0.3 + 0.9) / 3) / 2)
    assert means[ENSEMBLE] == pytest.approx(((0.7 + 0.5) / 2 + (0.4 + 0.4 + 0.1) / 3) / 2)
    # one dataset, no dataset column: the plain mean over the held-out domains
    single = _domain_results().query("benchmark == 'B'").drop(columns="benchmark")
    assert method_means(single)["score"] == pytest.approx(0.4)


def test_score_ablation_table_gives_differences_and_fold_wins():
    variants = score_ablation_specs()[:2]  # score, score[keep=diagonal]
    table = score_ablation_table(_domain_results(), variants).set_index("spec")
    means = method_means(_domain_results())
    assert table.loc["score", "difference"] == 0 and table.loc["score", "folds better"] == 0
    assert table.loc["score[keep=diagonal]", "difference"] == pytest.approx(means["score[keep=diagonal]"] - means["score"])
    assert table.loc["score[keep=diagonal]", "folds better"] == 2 and table.loc["score[keep=diagonal]", "folds"] == 5
    with pytest.raises(KeyError, match="score\\[z=1.0\\]"):
        score_ablation_table(_domain_results(), score_ablation_specs())


def test_the_paper_rank_averages_over_datasets_with_different_numbers_of_domains():
    frames = []
    for dataset, domains in (("A", 3), ("B", 4)):
        variants = score_ablation_specs(z_values=[], rank_fractions=[], n_domains=domains)
        paper = [v for v in variants if v.column == PAPER_RANK]
        assert len(paper) == 1 and paper[0].spec != PAPER_RANK
        rows = [{"benchmark": dataset, "held_out": f"{dataset}{i}", "method": v.spec, "coefficient": 1.0,
                 "value": 0.5 + (0.1 if v.column == PAPER_RANK else 0.0) * (1 if dataset == "A" else 3)}
                for i in range(domains) for v in variants]
        frames.append(tabulated(pd.DataFrame(rows), variants))
    results = pd.concat(frames)
    assert set(results["method"]) >= {PAPER_RANK, SCORE_DEFAULT} and not results["method"].str.contains("rank_fraction").any()
    table = score_ablation_table(results, variants).set_index("spec")
    assert table.loc[PAPER_RANK, "difference"] == pytest.approx((0.1 + 0.3) / 2)
    assert table.loc[PAPER_RANK, "folds better"] == 7


def test_merge_vs_ensemble_picks_the_best_merge_by_its_mean():
    table, best, indistinguishable = merge_vs_ensemble(_domain_results(), ["score", "score[keep=diagonal]", "tsv_m"])
    means = method_means(_domain_results())
    assert best == "tsv_m" and means["tsv_m"] == max(means[m] for m in ["score", "score[keep=diagonal]", "tsv_m"])
    assert indistinguishable is None  # no per-example correctness: no set can be stated
    assert list(table.columns) == [ZERO_SHOT, "score", "tsv_m", ENSEMBLE, OWN_EXPERT]
    assert table.loc[("B", "b3"), ENSEMBLE] == pytest.approx(0.1)
    assert table.loc[("mean", "mean")].to_dict() == pytest.approx(means[list(table.columns)].to_dict())
    only = merge_vs_ensemble(_domain_results(), ["score"]).best
    assert only == "score"
    tied = _domain_results().replace({"method": {"tsv_m": "tsv_copy"}})
    tied = pd.concat([tied, _domain_results().query("method == 'tsv_m'")])
    assert merge_vs_ensemble(tied, ["tsv_copy", "tsv_m"])[1] == "tsv_copy"  # ties: the first listed
    assert merge_vs_ensemble(tied, ["tsv_m", "tsv_copy"])[1] == "tsv_m"


def test_inference_costs_count_t_encoders_for_the_ensemble_and_one_for_a_merge():
    costs = inference_costs(5, 1_000_000)
    assert costs.loc[ENSEMBLE, "forward passes per image"] == 5 and costs.loc[ENSEMBLE, "encoders held"] == 5
    for model in (ZERO_SHOT, "merge", OWN_EXPERT):
        assert costs.loc[model, "forward passes per image"] == 1 and costs.loc[model, "encoders held"] == 1
    assert costs.loc[ENSEMBLE, "weights memory (MB)"] == pytest.approx(5 * 4e6 / 2**20)
    assert costs["needs target-domain training data"].tolist() == [False, False, False, True]
    with pytest.raises(ParameterError):
        inference_costs(0)


def test_esm_table_and_level_effects_recover_an_additive_design():
    grid = esm_polarization_grid(["esd", "svd"])
    effect = {"task": 0.03, "dimension": -0.01, "layer": 0.05}
    rows = []
    for variant in grid:
        base = 0.6 if variant.decomposition == "esd" else 0.5
        value = base + sum(effect[level] for level, on in variant.switches.items() if on)
        for task, shift in (("t1", -0.1), ("t2", 0.1)):
            rows.append({"method": variant.spec, "task": task, "accuracy": value + shift, "normalized_accuracy": value + shift,
                         "selected_coefficient": 1.5 if variant.levels else 0.5})
    table = esm_ablation_table(pd.DataFrame(rows), grid)
    assert len(table) == 16
    released = table.set_index("spec").loc[ESM_DEFAULT]
    assert released["normalized"] == pytest.approx(0.6 + sum(effect.values())) and released["coefficient"] == 1.5
    effects = level_effects(table)
    for decomposition in ("esd", "svd"):
        for level in ESM_LEVELS:
            assert effects.loc[decomposition, level] == pytest.approx(effect[level])
    with pytest.raises(ValueError, match="all 8"):
        level_effects(table.iloc[:-1])
    with pytest.raises(KeyError):
        esm_ablation_table(pd.DataFrame(rows).query("method != 'esm'"), grid)


def test_comparison_words():
    assert comparison(2.0, 1.0) == "higher than"
    assert comparison(1.0, 2.0) == "lower than"
    assert comparison(1.0, 1.0) == "equal to"
    assert comparison(1.04, 1.0, tolerance=0.05) == "equal to"
    assert comparison(0.0, 1.0, words=("above", "below", "level with")) == "below"
    assert comparison(46.281, 46.279) == "higher than"
    assert comparison(46.281, 46.279, decimals=2) == "equal to"  # both print as 46.28
    assert comparison(46.286, 46.279, decimals=2) == "higher than"
    assert not math.isnan(method_means(_domain_results())[ZERO_SHOT])


# ----------------------------------------------------------------------------- intervals
N_PER_DOMAIN = 600
DOMAINS = {"A": ("a1", "a2"), "B": ("b1", "b2", "b3")}


def _flip(correct: np.ndarray, to_right: float, to_wrong: float, rng: np.random.Generator) -> np.ndarray:
    """``correct`` with a share ``to_right`` of its wrong answers made right and ``to_wrong`` of
    its right answers made wrong (a model tested on the same images, partly agreeing)."""
    draw = rng.random(len(correct))
    return np.where(correct, draw >= to_wrong, draw < to_right)


def _correctness_case(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Results and their correctness table on two datasets: per held-out domain, SCORE right on
    about 60 % of the images; a variant much better (``clear``), one identical to SCORE
    (``same``), one that differs from it on a few images both ways (``close``); the baselines; and a
    coefficient-0.5 SCORE row (all wrong) that every table must ignore."""
    rng = np.random.default_rng(seed)
    records, rows = [], []
    for dataset, domains in DOMAINS.items():
        for domain in domains:
            labels = rng.integers(0, 10, N_PER_DOMAIN)
            score = rng.random(N_PER_DOMAIN) < 0.6
            models = {ZERO_SHOT: _flip(score, 0.0, 0.5, rng), "score": score,
                      "score[keep=diagonal]": _flip(score, 0.6, 0.0, rng), "score[keep=full]": score.copy(),
                      "score[keep=off_diagonal]": _flip(score, 0.02, 0.013, rng),
                      ENSEMBLE: _flip(score, 0.3, 0.1, rng), OWN_EXPERT: _flip(score, 0.9, 0.0, rng)}
            for method, correct in models.items():
                coefficient = float("nan") if method in (ZERO_SHOT, ENSEMBLE, OWN_EXPERT) else 1.0
                keys = dict(benchmark=dataset, held_out=domain, method=method, coefficient=coefficient)
                records.append(stats.correctness_record(correct, labels, split="test", **keys))
                rows.append({**keys, "value": correct.mean(), "metric": "accuracy"})
            wrong = np.zeros(N_PER_DOMAIN, bool)
            keys = dict(benchmark=dataset, held_out=domain, method="score", coefficient=0.5)
            records.append(stats.correctness_record(wrong, labels, split="test", **keys))
            rows.append({**keys, "value": 0.0, "metric": "accuracy"})
    return pd.DataFrame(rows), stats.correctness_frame(records)


CLEAR, SAME, CLOSE = "score[keep=diagonal]", "score[keep=full]", "score[keep=off_diagonal]"


def _variants() -> list:
    return [v for v in SCORE_KEEP_VARIANTS if v.spec in ("score", CLEAR, SAME, CLOSE)]


def _literal_bootstrap(a: dict, b: dict, resamples: int, seed: int) -> np.ndarray:
    """The paired difference of {dataset: {domain: correct}} means under a literal resample of
    example indices within each domain (the definition, independent of the count draws)."""
    rng = np.random.default_rng(seed)
    draws = np.zeros(resamples)
    for dataset in a:
        for domain in a[dataset]:
            x, y = a[dataset][domain].astype(float), b[dataset][domain].astype(float)
            index = rng.integers(0, len(x), size=(resamples, len(x)))
            draws += (x[index].mean(1) - y[index].mean(1)) / len(a[dataset]) / len(a)
    return draws


def test_score_ablation_table_gives_each_difference_its_paired_interval():
    results, correctness = _correctness_case()
    table = score_ablation_table(results, _variants(), correctness=correctness).set_index("spec")
    assert table.equals(score_ablation_table(results, _variants(), correctness=correctness).set_index("spec"))
    assert not table.equals(score_ablation_table(results, _variants(), correctness=correctness, seed=1).set_index("spec"))
    means = method_means(results)
    for spec, row in table.iterrows():
        assert row["difference"] == pytest.approx(means[spec] - means["score"])
        assert row["low"] <= row["difference"] <= row["high"]
    # the variant identical to SCORE: a zero-width interval at 0, never "lower" or "higher"
    assert tuple(table.loc[SAME, ["difference", "low", "high"]]) == (0.0, 0.0, 0.0)
    assert table.loc[SAME, "verdict"].startswith("indistinguishable at this scale")
    assert table.loc[SAME, ["folds resolved better", "folds resolved worse"]].tolist() == [0, 0]
    # a clear difference is resolved, overall and on every fold
    assert table.loc[CLEAR, "low"] > 0 and table.loc[CLEAR, "verdict"].startswith("higher (+")
    assert table.loc[CLEAR, "folds resolved better"] == table.loc[CLEAR, "folds"] == 5
    # a variant that differs on a few images: its small difference is not resolved
    assert abs(table.loc[CLOSE, "difference"]) < 0.01 and table.loc[CLOSE, "low"] < 0 < table.loc[CLOSE, "high"]
    assert "indistinguishable" in table.loc[CLOSE, "verdict"] and "folds better" not in table


def test_the_ablation_interval_agrees_with_a_literal_index_bootstrap():
    results, correctness = _correctness_case(seed=3)
    row = score_ablation_table(results, _variants(), correctness=correctness, n_resamples=4000).set_index("spec").loc[CLOSE]
    selected = correctness[correctness["coefficient"].isna() | (correctness["coefficient"] == 1.0)]
    nested = {m: {d: {h: selected[(selected.method == m) & (selected.benchmark == d) & (selected.held_out == h)]
                      ["correct"].iloc[0] for h in domains} for d, domains in DOMAINS.items()} for m in (CLOSE, "score")}
    literal = _literal_bootstrap(nested[CLOSE], nested["score"], 4000, seed=11)
    low, high = np.quantile(literal, [0.025, 0.975])
    width = high - low
    assert row["high"] - row["low"] == pytest.approx(width, rel=0.1)
    assert row["low"] == pytest.approx(low, abs=0.1 * width) and row["high"] == pytest.approx(high, abs=0.1 * width)


def test_merge_vs_ensemble_reports_the_set_of_merges_not_distinguishable_from_the_top():
    results, correctness = _correctness_case()
    merges = ["score", SAME, CLOSE, CLEAR]
    table, best, indistinguishable = merge_vs_ensemble(results, merges, correctness=correctness)
    assert best == CLEAR and indistinguishable == [CLEAR]  # far above every other merge
    table, best, indistinguishable = merge_vs_ensemble(results, ["score", SAME, CLOSE], correctness=correctness)
    means = method_means(results)
    assert best == max(["score", SAME, CLOSE], key=lambda m: means[m])
    assert set(indistinguishable) == {"score", SAME, CLOSE} and indistinguishable[0] == best
    assert table.loc[("mean", "mean"), best] == pytest.approx(means[best])


def test_domain_and_multitask_correctness_select_the_reported_rows():
    results, correctness = _correctness_case()
    correct, labels = domain_correctness(correctness)
    assert labels is None and set(correct["score"]) == {"A", "B"} and set(correct["score"]["B"]) == {"b1", "b2", "b3"}
    assert stats.accuracy(correct["score"]) == pytest.approx(method_means(results)["score"])  # not the 0.5 rows
    _, balanced = domain_correctness(correctness, balanced=["B"])
    assert balanced["A"] is None and set(balanced["B"]) == {"b1", "b2", "b3"}
    rng = np.random.default_rng(0)
    records, labels = [], rng.integers(0, 3, 50)
    for task in ("t1", "t2"):
        for method, coefficient in (("ta", 0.5), ("ta", 1.0), (ZERO_SHOT, float("nan"))):
            for split in ("val", "test"):
                right = np.full(50, coefficient == 1.0) if method == "ta" else np.arange(50) < 10
                records.append(stats.correctness_record(right, labels, method=method, coefficient=coefficient,
                                                        split=split, task=task))
    chosen = pd.DataFrame({"method": ["ta", "ta"], "task": ["t1", "t2"], "selected_coefficient": [1.0, 1.0]})
    picked = multitask_correctness(stats.correctness_frame(records), chosen)
    assert set(picked) == {"ta", ZERO_SHOT} and set(picked["ta"]) == {"t1", "t2"}
    assert stats.accuracy(picked["ta"]) == 1.0 and stats.accuracy(picked[ZERO_SHOT]) == pytest.approx(0.2)


def test_level_effect_intervals_recover_known_main_effects():
    """An additive design on the same images: the layer level makes a fixed 20 % of the images
    right, the dimension level a fixed 5 % wrong, the task level changes nothing."""
    rng = np.random.default_rng(4)
    grid = esm_polarization_grid(["esd"])
    base = {task: rng.random(800) < 0.5 for task in ("t1", "t2")}
    gain = {task: (~base[task]) & (rng.random(800) < 0.4) for task in base}
    loss = {task: base[task] & ~gain[task] & (rng.random(800) < 0.1) for task in base}
    correct = {}
    for variant in grid:
        correct[variant.spec] = {task: (base[task] | (gain[task] if variant.layer else False))
                                 & ~(loss[task] if variant.dimension else False) for task in base}
    table = level_effect_intervals(grid, correct).set_index("level")
    assert list(table.index) == list(ESM_LEVELS)
    expected_layer = np.mean([gain[t].mean() for t in base])
    expected_dimension = -np.mean([loss[t].mean() for t in base])
    assert table.loc["layer", "effect"] == pytest.approx(expected_layer)
    assert table.loc["dimension", "effect"] == pytest.approx(expected_dimension)
    assert tuple(table.loc["task", ["effect", "low", "high"]]) == (0.0, 0.0, 0.0)
    assert table.loc["layer", "verdict"].startswith("higher") and table.loc["dimension", "verdict"].startswith("lower")
    assert table.loc["task", "verdict"].startswith("indistinguishable")
    for level in ESM_LEVELS:
        assert table.loc[level, "low"] <= table.loc[level, "effect"] <= table.loc[level, "high"]
    assert level_effect_intervals(grid[:-1], correct).empty  # not all eight cells: no main effect
