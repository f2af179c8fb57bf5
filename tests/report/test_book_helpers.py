"""The chapters' bookkeeping helpers (mergelib.report.book_helpers)."""

from pathlib import Path

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
