"""The chapters' bookkeeping helpers (mergelib.report.book_helpers)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergelib.report import book_helpers as bh
from mergelib.io.provenance import REPO_ROOT

BENCHMARKS = REPO_ROOT / "results" / "benchmarks"


def test_results_location():
    assert bh.results_location("", standin=True) == REPO_ROOT / "results" / "standin"
    assert bh.results_location("", standin=False) == REPO_ROOT / "results" / "replication"
    assert bh.results_location("elsewhere", standin=True) == Path("elsewhere")
    assert bh.benchmark_location("") == BENCHMARKS and bh.benchmark_location("x") == Path("x")


def test_random_weights_are_one_seeded_init(tmp_path):
    before = torch.random.get_rng_state()
    first = bh.backbone_weights("tiny-clip", "random", tmp_path / "a")
    second = bh.backbone_weights("tiny-clip", "random", tmp_path / "b")
    assert torch.equal(torch.random.get_rng_state(), before)  # the global generator is left alone
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert bh.backbone_weights("ViT-B-32", "published") == "published"


def test_benchmark_parsers_on_the_stored_runs():
    merges = bh.load_benchmark_records(BENCHMARKS, "merge")
    assert "cpu" in merges
    table = bh.merge_method_table(merges["cpu"])
    assert {"backbone", "T", "method", "seconds", "peak extra (MiB)", "of twice"} <= set(table.columns)
    assert len(table) == sum(len(c["methods"]) for c in bh.benchmark_configurations(merges["cpu"]))
    reference = bh.reference_table(merges["cpu"])
    assert set(reference["method"]) <= {"score", "tsv_m"}
    assert bh.merge_sentence(merges["cpu"]).count("slowest") == len(bh.benchmark_configurations(merges["cpu"]))
    throughput = bh.load_benchmark_records(BENCHMARKS, "finetune")
    for records in throughput.values():
        assert len(bh.throughput_table(records)) == sum(len(r["results"]) for r in records)
        assert all("images per second" in bh.throughput_sentence(r) for r in records)
    assert "No GPU figures" in bh.gpu_status({}, {}, 450)
    assert bh.gpu_checks_budget() > 0


def test_synthetic_layers_are_seeded():
    a = bh.synthetic_task_layers([12, 6], 3, seed=1)
    b = bh.synthetic_task_layers([12, 6], 3, seed=1)
    assert len(a) == 3 and a[0][bh.SYNTHETIC_KEY].shape == (12, 6)
    assert all(torch.equal(x[bh.SYNTHETIC_KEY], y[bh.SYNTHETIC_KEY]) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- comparisons
def _evidence():
    import numpy as np

    rng = np.random.default_rng(0)
    base = {d: rng.random(500) < 0.6 for d in ("photo", "sketch")}
    flip = {d: rng.random(500) for d in base}
    correct = {"top": {d: base[d] | (flip[d] < 0.5) for d in base},  # far above the others
               "same": {d: base[d].copy() for d in base},
               "base": base,
               "bad": {d: base[d] & (flip[d] < 0.5) for d in base}}
    return bh.Evidence(correct)


def test_evidence_sentences_follow_the_paired_interval():
    from mergelib.analysis import stats

    evidence = _evidence()
    assert evidence.versus("top", "base") == stats.verdict(*stats.paired_bootstrap_ci(
        evidence.correct["top"], evidence.correct["base"]))
    assert evidence.versus("top", "base").startswith("higher (+")
    assert evidence.versus("bad", "base").startswith("lower (\u2212")
    assert evidence.versus("same", "base") == "indistinguishable at this scale (0.0 points, 95 % CI 0.0 to 0.0)"
    assert evidence.best() == ["top"] and evidence.best(["same", "base", "bad"]) == ["same", "base"]
    assert evidence.best_sentence(["same", "base", "bad"]).endswith("not distinguishable from it at this scale: base")
    assert evidence.best_sentence().endswith("every other one is resolved below it")
    assert evidence.tally("base", ["top", "same", "bad"]) == {1: ["top"], -1: ["bad"], 0: ["same"]}
    assert evidence.tally_sentence("base", ["top", "same", "bad"]) == (
        "1 of the 3 methods is resolved above base, 1 below it and 1 is indistinguishable from it at this scale")
    assert evidence.folds("top", "base") == {1: 2, -1: 0, 0: 0}
    assert evidence.folds_sentence("bad", "base", "B").startswith("resolved above B on 0 of the 2 held-out domains")
    table = evidence.differences(reference="base")
    assert list(table["method"]) == ["top", "same", "bad"] and (table["low"] <= table["difference"]).all()
    assert evidence.ordering(["top", "base", "bad"]).resolved == 2
    bars = evidence.error_bars(["top", "bad"])
    assert list(bars.index) == ["top", "bad"] and bars.loc["top", "estimate"] > 50  # percent
    per_domain = evidence.group_error_bars("base")
    assert list(per_domain.index) == ["photo", "sketch"]
    assert per_domain.loc["sketch", "estimate"] == pytest.approx(100 * evidence.correct["base"]["sketch"].mean())
    assert (per_domain["low"] <= per_domain["estimate"]).all() and (per_domain["estimate"] <= per_domain["high"]).all()
    assert bh.unpaired_sentence(0.01, -0.002, 0.022).endswith("unpaired normal approximation)")


def test_seeds_beside_reads_the_study_or_says_how_to_make_it(tmp_path):
    import pandas as pd

    single = pd.Series({"score": 45.0, "tsv_m": 46.0, "not in study": 40.0})
    missing = bh.seeds_beside(single, "domain_generalization", study_dir=tmp_path / "none")
    assert not missing.available and missing.sentence == bh.SEEDS_MISSING and "make seeds-study" in missing.table.iloc[0, 0]
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.02), (2, -0.02)):
        for method in ("score", "tsv_m"):
            for domain in ("photo", "sketch"):
                value = 0.45 + shift + (0.01 if method == "tsv_m" else 0.0)
                rows.append({"setting": "domain_generalization", "benchmark": "fashion-domains", "backbone": "tiny-clip",
                             "method": method, "coefficient": 1.0, "selected": True, "split": "test",
                             "held_out": domain, "n_examples": 100, "accuracy": value, "metric": "accuracy",
                             "value": value, "factor": "fine-tuning", "finetune_seed": seed, "pretrain_seed": 0})
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    (tmp_path / "provenance.json").write_text(
        '{"created": "2026-01-02T00:00:00", "git": {"commit": "abcdef1234567"}, "parameters": {"n_test": 1000}}')
    found = bh.seeds_beside(single, "domain_generalization", study_dir=tmp_path, config={"n_test": 96})
    assert found.available and list(found.table.index) == ["score", "tsv_m"]
    assert found.table.loc["score", "seeds: mean (%)"] == pytest.approx(45.0)
    assert found.table.loc["score", "sd (points)"] == pytest.approx(2.0) and found.table.loc["score", "seeds"] == 3
    assert "Across 3 fine-tuning seeds" in found.sentence and "2026-01-02 at commit abcdef1234" in found.sentence
    assert "standard deviation of 2.0 to 2.0 points" in found.sentence
    assert "differs in n_test" in found.sentence
    assert "differs" not in bh.seeds_beside(single, "domain_generalization", study_dir=tmp_path,
                                           config={"n_test": 1000}).sentence
    assert not bh.seeds_beside(single, "multitask", study_dir=tmp_path).available


def test_grid_table_reads_the_grid_benchmark_as_stored():
    from mergelib.report.book_helpers import benchmark_location, grid_table, load_benchmark_records

    records = load_benchmark_records(benchmark_location(""), "grid").get("cpu", [])
    assert records, "results/benchmarks/grid-*.json is committed"
    table = grid_table(records)
    assert len(table) == len(records)
    for (_, row), record in zip(table.iterrows(), records):
        result = record["results"]
        # the speed-up is the ratio of the two timings the run recorded
        assert row["one at a time (s)"] / row["grid (s)"] == pytest.approx(result["speedup_over_merge"], rel=1e-3)
        assert row["T"] == result["tasks_per_fold"] and row["backbone"] == result["backbone"]
