"""The multi-task replication path on fake torchvision folders and imported tiny-clip experts."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from conftest import fake_mnist_family

from mergelib.models.backbones import create_clip
from mergelib.protocols.coefficients import TSV_GRID
from mergelib.models.importers import import_checkpoint
from mergelib.experiments.replication import dataset_labels, replicate_multitask
from mergelib.analysis.stats import load_correctness
from mergelib.protocols.multitask import FINE_TUNED

logging.getLogger().setLevel(logging.ERROR)
TASKS = ["MNIST", "FashionMNIST"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multitask")
    from mergelib.data.task_suites import TASKS as SPECS

    for name in TASKS:
        fake_mnist_family(tmp / "data" / SPECS[name].train.probe, {"train": "train", "test": "t10k"}, {"train": 200, "test": 20},
                           seed=len(name))
    torch.manual_seed(0)
    clip = create_clip("tiny-clip", weights=None)
    weights = tmp / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(weights))
    visual = {f"visual.{k}": v for k, v in clip.model.visual.state_dict().items()}
    for index, name in enumerate(TASKS):
        generator = torch.Generator().manual_seed(index)
        expert = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                  for k, v in visual.items()}
        torch.save(expert, tmp / f"{name}.pt")
        import_checkpoint(tmp / f"{name}.pt", tmp / "experts" / "tiny-clip" / f"{name}.safetensors", backbone="tiny-clip")
    results = replicate_multitask("tiny-clip", TASKS, data_root=tmp / "data", experts_dir=tmp / "experts",
                            results_dir=tmp / "results", methods=["task_arithmetic", "tsv_m", "esm"], weights=weights,
                            device="cpu", num_workers=0, eval_batch_size=16, esm_proxy_count=2,
                            normalize_with="experts", progress=False)
    return tmp, results


def test_every_method_is_evaluated_on_every_test_split_at_its_selected_alpha(setup):
    tmp, results = setup
    test = results[results["split"] == "test"]
    assert set(test["method"]) == {"zero-shot", "task_arithmetic", "tsv_m", "esm"}
    assert all(sorted(group) == sorted(TASKS) for _, group in test.groupby("method")["task"])
    record = json.loads((tmp / "results" / "tiny-clip" / "multitask" / "2-tasks" / "provenance.json").read_text())
    for method, search in record["searches"].items():
        assert set(test.loc[test["method"] == method, "coefficient"]) == {search["alpha"]}
        val = results[(results["method"] == method) & (results["split"] == "val")]
        assert sorted(set(val["coefficient"])) == sorted(e["alpha"] for e in search["evaluations"])
        chosen = max(search["evaluations"], key=lambda e: e["normalized"])
        assert search["alpha"] == chosen["alpha"]  # selected by validation normalized accuracy


def test_the_store_keeps_each_evaluation_s_correct_examples(setup):
    tmp, results = setup
    correctness, _ = load_correctness(tmp / "results" / "tiny-clip" / "multitask" / "2-tasks" / "correctness.npz")
    # every result row, and the experts' own rows that normalize_with="experts" evaluated
    assert set(correctness["method"]) == set(results["method"]) | {FINE_TUNED}
    assert len(correctness) == len(results) + 2 * len(TASKS)
    merged = results.merge(correctness, on=["method", "coefficient", "split", "task"])
    assert len(merged) == len(results)
    assert all(row.correct.mean() == pytest.approx(row.accuracy) for row in merged.itertuples())


def test_each_method_uses_its_released_coefficient_rule(setup):
    tmp, _ = setup
    searches = json.loads((tmp / "results" / "tiny-clip" / "multitask" / "2-tasks" / "provenance.json").read_text())["searches"]
    assert {e["alpha"] for e in searches["tsv_m"]["evaluations"]} == set(TSV_GRID)
    assert searches["task_arithmetic"]["settings"]["grid"] == pytest.approx([0.1 * i for i in range(1, 11)])
    esm = [e["alpha"] for e in searches["esm"]["evaluations"]]
    assert esm[:2] == pytest.approx([0.763932, 1.236068], abs=1e-5) and all(0 <= a <= 2 for a in esm)


def test_normalized_accuracy_divides_by_the_experts_own_accuracy(setup):
    tmp, results = setup
    rows = results.dropna(subset=["normalized_accuracy"])
    ratio = rows["accuracy"] / rows["normalized_accuracy"]
    for (split, task), group in rows.assign(ratio=ratio).groupby(["split", "task"]):
        assert group["ratio"].round(12).nunique() == 1  # one reference per (split, task)


def test_labels_are_read_without_loading_images(setup):
    tmp, _ = setup
    from mergelib.data.task_suites import load_task

    val = load_task("MNIST", tmp / "data", "val").dataset
    direct = torch.tensor([int(val[i][1]) for i in range(len(val))])
    assert torch.equal(dataset_labels(val), direct)
