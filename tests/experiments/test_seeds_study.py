"""The seeds study on smoke parameters: its runs, its tidy rows and the spread across seeds."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

from mergelib.errors import ParameterError
from mergelib.protocols.results import load_results
from mergelib.experiments.seeds_study import run_seeds_study, seed_runs, seed_spread


def test_seed_runs_share_the_base_run_and_check_their_seeds(tiny_config):
    runs = seed_runs(tiny_config, (5, 6, 7), (0, 1))
    assert [(f, c.finetune_seed, c.pretrain_seed) for f, c in runs] == [
        ("fine-tuning", 5, 0), ("fine-tuning", 6, 0), ("fine-tuning", 7, 0), ("pretraining", 5, 0), ("pretraining", 5, 1)]
    with pytest.raises(ParameterError, match="must include the book's own seed 5"):
        seed_runs(tiny_config, (6, 7), (0,))
    with pytest.raises(ParameterError, match="distinct integers"):
        seed_runs(tiny_config, (5, 5), (0,))
    with pytest.raises(ParameterError, match="distinct integers"):
        seed_runs(tiny_config, (5, True), (0,))


@pytest.mark.slow
def test_seeds_study_smoke(tiny_config, tmp_path):
    methods = ["task_arithmetic", "score"]
    results = run_seeds_study(tiny_config, finetune_seeds=(5, 6), pretrain_seeds=(0,), methods=methods,
                              multitask_coefficients=(0.5, 1.0), results_dir=tmp_path, progress=False)
    assert set(results["setting"]) == {"domain_generalization", "multitask"}
    assert results["selected"].all() and (results["split"] == "test").all()  # what the protocols report
    assert set(results["factor"]) == {"fine-tuning", "pretraining"}
    assert results["accuracy"].between(0, 1).all()
    # the base run appears under both factors with the same numbers; another fine-tuning seed changes them
    base = results[(results.finetune_seed == 5)]
    by_factor = {f: g.drop(columns="factor").reset_index(drop=True) for f, g in base.groupby("factor")}
    pd.testing.assert_frame_equal(by_factor["fine-tuning"], by_factor["pretraining"])
    tuned = results[results.factor == "fine-tuning"]
    accuracies = {s: g["accuracy"].to_numpy() for s, g in tuned.groupby("finetune_seed")}
    assert (accuracies[5] != accuracies[6]).any()  # other experts, other numbers
    merged = tuned[(tuned.setting == "domain_generalization") & (tuned.method == "score")]
    per_seed = merged.groupby("finetune_seed")["accuracy"].mean()
    spread = seed_spread(results).set_index(["setting", "method"])
    row = spread.loc[("domain_generalization", "score")]
    assert row["seeds"] == 2
    assert row["mean"] == pytest.approx(100 * per_seed.mean())
    assert row["std"] == pytest.approx(100 * per_seed.std(ddof=1))
    stored = load_results(tmp_path / "results.csv")
    assert len(stored) == len(results) and (tmp_path / "provenance.json").is_file()
    with pytest.raises(ParameterError, match="no run of the factor"):
        seed_spread(results[results.factor == "fine-tuning"], factor="pretraining")
