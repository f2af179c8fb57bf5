"""The real-benchmark path (replication, reporting, file datasets) on stand-in folders with tiny-clip."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from mergelib.models import finetune as finetune_module
from mergelib.models.backbones import create_clip
from mergelib.data.dg_datasets import get_dg_dataset, load_domain
from mergelib.data.files import ImageFileSet
from mergelib.data.standins import make_dg_standin
from mergelib.protocols.domain_generalization import BASELINES
from mergelib.models.evaluation import EncoderEvaluator
from mergelib.models.finetune import FinetuneConfig, finetune_image_encoder
from mergelib.models.heads import zero_shot_head
from mergelib.report.published import domain_generalization_table
from mergelib.protocols.results import conform
from mergelib.analysis.stats import load_correctness
from mergelib.protocols.domain_generalization import OTHER_EXPERTS_BEST, OTHER_EXPERTS_MEAN
from mergelib.experiments.replication import LazyStates, replicate_domain_generalization
from mergelib.report.comparisons import NOT_RUN, dg_comparison

logging.getLogger().setLevel(logging.ERROR)
METHODS = ["task_arithmetic", "score"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in create_clip("tiny-clip", weights=None).model.state_dict().items()}, str(path))
    return path


def _run(dataset, root, tmp_path, weights, **kwargs):
    return replicate_domain_generalization(
        "tiny-clip", dataset, data_root=root, checkpoint_dir=tmp_path / "ckpt", results_dir=tmp_path / "results",
        methods=METHODS, weights=weights, device="cpu", epochs=1, num_workers=0, batch_size=8,
        finetune_overrides={"lr": 1e-4, "warmup_steps": 1}, progress=False, **kwargs)


@pytest.fixture(scope="module")
def pacs_run(tmp_path_factory, tiny_weights):
    tmp = tmp_path_factory.mktemp("pacs")
    root = make_dg_standin("PACS", tmp / "data", images_per_class=2)
    results, matrix = _run("PACS", root, tmp, tiny_weights)
    return tmp, root, results, matrix


def test_every_fold_method_and_baseline_is_reported_and_stored(pacs_run):
    tmp, _, results, matrix = pacs_run
    domains = get_dg_dataset("PACS").domains_in_iteration_order
    assert set(results["held_out"]) == set(domains)
    assert len(results) == len(domains) * (len(METHODS) + len(BASELINES))
    assert (results.groupby("held_out").size() == len(METHODS) + len(BASELINES)).all()
    assert set(results.loc[results["method"].isin(METHODS), "coefficient"]) == {1.0}
    assert (results["metric"] == "accuracy").all() and (results["value"] == results["accuracy"]).all()
    assert len(matrix) == len(domains) ** 2
    stored = tmp / "results" / "tiny-clip" / "domain_generalization" / "PACS"
    for method in METHODS:
        table = pd.read_csv(stored / f"{method}.csv")
        assert len(table) == len(domains) and (table["method"] == method).all()
    record = json.loads((stored / "provenance.json").read_text())
    assert record["parameters"]["dataset"] == "PACS"
    assert record["parameters"]["method_params"]["score"]["divide_by_tasks"] is True  # natural images: zσ/T
    assert set(record["experts"]) == set(domains)


def test_the_store_keeps_which_test_images_each_model_got_right(pacs_run):
    tmp, _, results, _ = pacs_run
    stored = tmp / "results" / "tiny-clip" / "domain_generalization" / "PACS"
    correctness, record = load_correctness(stored / "correctness.npz")
    assert record["parameters"]["dataset"] == "PACS"
    # every single model's row (not the mean or best of the other experts) has its examples, and
    # their mean is the stored accuracy
    single = results[~results["method"].isin([OTHER_EXPERTS_MEAN, OTHER_EXPERTS_BEST])]
    assert len(correctness) == len(single)
    merged = single.merge(correctness, on=["method", "held_out"], suffixes=("", "_c"))
    assert len(merged) == len(single)
    for row in merged.itertuples():
        assert row.n == row.n_examples and row.correct.mean() == pytest.approx(row.accuracy)
    # the same held-out domain: the same examples (test set fingerprint and labels) for every model
    assert (correctness.groupby("held_out")[["test_set", "labels_sha256"]].nunique() == 1).all().all()


def test_a_rerun_reuses_the_experts_and_gives_the_same_results(pacs_run, tiny_weights, monkeypatch):
    tmp, root, results, _ = pacs_run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished expert was fine-tuned again")

    monkeypatch.setattr("mergelib.experiments.replication.finetune_image_encoder", no_training)
    again, _ = _run("PACS", root, tmp, tiny_weights)
    pd.testing.assert_frame_equal(results.reset_index(drop=True), again.reset_index(drop=True))


def test_medical_datasets_use_balanced_accuracy_and_the_untightened_threshold(tmp_path, tiny_weights):
    root = make_dg_standin("FedISIC", tmp_path / "data", images_per_class=2, domains=["BCN", "MSK", "HAM_rosendahl"])
    spec = get_dg_dataset("FedISIC")
    assert spec.metric == "balanced_accuracy" and not spec.trim_divide_by_tasks
    results, _ = _run("FedISIC", root, tmp_path, tiny_weights, domains=["MSK", "BCN", "HAM_rosendahl"])
    assert list(dict.fromkeys(results["held_out"])) == ["BCN", "HAM_rosendahl", "MSK"]  # the released order
    assert (results["metric"] == "balanced_accuracy").all()
    assert (results["value"] == results["balanced_accuracy"]).all()
    record = json.loads((tmp_path / "results" / "tiny-clip" / "domain_generalization" / "FedISIC" / "provenance.json").read_text())
    assert record["parameters"]["method_params"]["score"]["divide_by_tasks"] is False


def test_file_images_are_evaluated_like_a_straightforward_pil_loop(tmp_path, tiny_weights):
    root = make_dg_standin("PACS", tmp_path / "data", images_per_class=2)
    files = load_domain("PACS", root, "photo", "test")
    clip = create_clip("tiny-clip", weights=tiny_weights)
    head = zero_shot_head(clip, files.classnames, get_dg_dataset("PACS").templates)
    state = {f"visual.{k}": v for k, v in clip.model.visual.state_dict().items()}
    logits = EncoderEvaluator(clip, batch_size=5).logits(state, head, files)
    from PIL import Image

    inputs = torch.stack([clip.preprocess_val(Image.open(p).convert("RGB")) for p in files.paths])
    with torch.no_grad():
        expected = head(clip.model.visual.eval()(inputs))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_accumulation_counts_optimizer_steps_and_fp16_is_rejected_on_unknown_precision(tmp_path, tiny_weights):
    root = make_dg_standin("PACS", tmp_path / "data", images_per_class=2)
    files = load_domain("PACS", root, "photo", "train")  # 14 images
    clip = create_clip("tiny-clip", weights=tiny_weights)
    head = zero_shot_head(clip, files.classnames, ("a photo of a {}.",))
    for accumulation, expected_steps in ((1, 2 * 4), (3, 2 * 2)):  # 4 batches of 4 per epoch, 2 epochs
        config = FinetuneConfig(epochs=2, batch_size=4, lr=1e-4, warmup_steps=1, accumulation_steps=accumulation)
        _, losses = finetune_image_encoder(clip, head, files, config, progress=False)
        assert len(losses) == expected_steps
    with pytest.raises(ValueError, match="precision"):
        finetune_image_encoder(clip, head, files, FinetuneConfig(epochs=1, batch_size=4, precision="fp8"), progress=False)


def test_lazy_states_keep_only_the_last_few():
    loads = []
    lazy = LazyStates(["a", "b", "c"], lambda name: loads.append(name) or {"x": torch.tensor(len(loads))}, keep=2)
    lazy["a"], lazy["b"], lazy["a"], lazy["c"], lazy["a"]
    assert loads == ["a", "b", "c"]  # "a" stayed cached as the most recently used
    lazy["b"]
    assert loads == ["a", "b", "c", "b"]
    assert list(lazy) == ["a", "b", "c"] and len(lazy) == 3
    with pytest.raises(KeyError):
        lazy["d"]


def _store(results_dir, backbone, datasets, score):
    for dataset in datasets:
        rows = [{"held_out": d, "method": m, "coefficient": 1.0, "n_examples": 10, "accuracy": score.get(m, 0.5)}
                for d in ("d1", "d2") for m in ("score", "zero-shot")]
        path = results_dir / backbone / "domain_generalization" / dataset / "all.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        conform(pd.DataFrame(rows), setting="domain_generalization", benchmark=dataset, backbone=backbone).to_csv(
            path, index=False)


def test_comparison_gives_differences_only_over_the_papers_eight_datasets(tmp_path):
    eight = [f"ds{i}" for i in range(8)]
    _store(tmp_path, "ViT-B-32", eight, {"score": 0.66, "zero-shot": 0.55})
    table = dg_comparison(tmp_path, "ViT-B-32").set_index("method")
    paper = domain_generalization_table().query("backbone == 'ViT-B-32'").set_index("method")["accuracy"]
    assert table.loc["score", "ours"] == pytest.approx(66.0)
    assert table.loc["score", "difference"] == pytest.approx(66.0 - paper["score"])
    assert table.loc["zero-shot", "difference"] == pytest.approx(55.0 - paper["zero-shot"])
    assert table.loc["tsv_m", "status"] == NOT_RUN and pd.isna(table.loc["tsv_m", "ours"])

    _store(tmp_path, "ViT-L-14", eight[:2], {"score": 0.7})
    partial = dg_comparison(tmp_path, "ViT-L-14").set_index("method")
    assert partial.loc["score", "status"] == "2 of 8 datasets" and pd.isna(partial.loc["score", "difference"])
    assert (dg_comparison(tmp_path, "ViT-B-16")["status"] == NOT_RUN).all()


def test_image_file_sets_check_their_labels_and_subsets_are_deterministic(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(6)]
    files = ImageFileSet(paths, torch.tensor([0, 1, 0, 1, 0, 1]), ("a", "b"), "toy")
    assert files.subset(3, seed=1).paths == files.subset(3, seed=1).paths
    assert files.fingerprint() == ImageFileSet(paths, torch.tensor([0, 1, 0, 1, 0, 1]), ("a", "b"), "toy").fingerprint()
    assert files.fingerprint() != ImageFileSet(paths, torch.tensor([1, 1, 0, 1, 0, 1]), ("a", "b"), "toy").fingerprint()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        ImageFileSet(paths, torch.tensor([0, 1, 2, 1, 0, 1]), ("a", "b"), "toy")
    with pytest.raises(ValueError, match="6 paths but 5 labels"):
        ImageFileSet(paths, torch.tensor([0, 1, 0, 1, 0]), ("a", "b"), "toy")
    assert files.missing_files() == paths
