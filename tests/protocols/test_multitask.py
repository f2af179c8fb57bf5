"""The multi-task protocol, ESM's proxy pools, and the cache of evaluation results."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from mergelib.io.checkpoints import cached_tables
from mergelib.data import MINI_SUITE_TASKS, make_task
from mergelib.models.evaluation import EncoderEvaluator, classification_metrics
from mergelib.models.heads import zero_shot_head
from mergelib.methods import METHODS, register
from mergelib.protocols.multitask import FINE_TUNED, ZERO_SHOT, evaluate_multitask, select_on_validation
from mergelib.task_vectors import apply_task_vector, encoder_state, task_vector


def test_cached_tables_compute_once_and_return_identical_frames(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"a": [0.1, 1 / 3], "b": ["x", "y"]}), pd.DataFrame({"c": [float("nan"), 2.0]})

    first = cached_tables(tmp_path, {"k": 1}, compute)
    second = cached_tables(tmp_path, {"k": 1}, compute)
    assert len(calls) == 1
    for a, b in zip(first, second):
        pd.testing.assert_frame_equal(a, b)
    assert first[0]["a"][1] == 1 / 3  # floats survive the CSV round trip exactly
    cached_tables(tmp_path, {"k": 2}, compute)
    assert len(calls) == 2
    # an unreadable entry is recomputed, never used
    manifest = next(p for p in tmp_path.glob("*.json") if '"k": 1' in p.read_text())
    manifest.write_text("{not json")
    cached_tables(tmp_path, {"k": 1}, compute)
    assert len(calls) == 3


@pytest.fixture()
def counting_method():
    calls = []

    @register("count_for_test", paper="test", arxiv=None, equation="")
    def count(task_vectors, *, device=None, scale=1.0):
        calls.append(len(task_vectors))
        return {k: scale * sum(tv[k] for tv in task_vectors) / len(task_vectors) for k in task_vectors[0]}

    yield calls
    del METHODS["count_for_test"]


def test_multitask_merges_every_task_once_and_normalizes_by_the_own_expert(tiny_clip, counting_method):
    names = ("digits", "textures")
    sets = {t: make_task(t, n_train=8, n_test=40, seed=0) for t in names}
    heads = {t: zero_shot_head(tiny_clip, sets[t][0].classnames, MINI_SUITE_TASKS[t].caption_templates) for t in names}
    tests = {t: sets[t][1] for t in names}
    pretrained = encoder_state(tiny_clip.model.visual)
    g = torch.Generator().manual_seed(0)
    experts = {t: {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in pretrained.items()} for t in names}
    vectors = {t: task_vector(s, pretrained) for t, s in experts.items()}
    evaluator = EncoderEvaluator(tiny_clip)
    vals = {t: sets[t][0] for t in names}  # any disjoint set stands in for a validation split here
    results, reference = evaluate_multitask(evaluator, pretrained, experts, vectors, heads, tests,
                                            ["count_for_test", "count_for_test[scale=0.5]"], [0.5, 1.0],
                                            val_sets=vals, progress=False)
    assert counting_method == [2, 2]  # one merge of all tasks per method spec
    assert len(results) == 2 * 2 * 2 * len(names) and set(reference.method) == {ZERO_SHOT, FINE_TUNED}
    assert set(results.split) == {"val", "test"}
    ref = reference[reference.split == "test"].set_index(["task", "method"])["accuracy"]
    for task in names:
        own = classification_metrics(evaluator.logits(experts[task], heads[task], tests[task]), tests[task].labels)["accuracy"]
        assert ref[task, FINE_TUNED] == pytest.approx(own)
        # an independent evaluation of one merged model
        merged = {k: 0.5 * (vectors["digits"][k] + vectors["textures"][k]) / 2 for k in vectors["digits"]}
        state = apply_task_vector(pretrained, merged, alpha=1.0)
        expected = classification_metrics(evaluator.logits(state, heads[task], tests[task]), tests[task].labels)["accuracy"]
        row = results[(results.method == "count_for_test[scale=0.5]") & (results.coefficient == 1.0) & (results.task == task)
                      & (results.split == "test")].iloc[0]
        assert row.accuracy == pytest.approx(expected)
        assert row.normalized_accuracy == pytest.approx(expected / own)


def test_selection_on_validation_picks_the_best_mean_and_reports_test():
    rows = []
    for method, val_by_coefficient in (("a", {0.5: 0.6, 1.0: 0.8}), ("b", {0.5: 0.7, 1.0: 0.7})):
        for coefficient, val in val_by_coefficient.items():
            for task in ("x", "y"):
                rows.append({"method": method, "coefficient": coefficient, "split": "val", "task": task, "accuracy": val})
                rows.append({"method": method, "coefficient": coefficient, "split": "test", "task": task,
                             "accuracy": coefficient / 10})
    chosen = select_on_validation(pd.DataFrame(rows))
    assert dict(zip(chosen.method, chosen.selected_coefficient)) == {"a": 1.0, "b": 0.5}  # ties: the smaller
    assert set(chosen.split) == {"test"} and len(chosen) == 4
    assert chosen[chosen.method == "a"].accuracy.tolist() == [0.1, 0.1]
    with pytest.raises(ValueError, match="validation"):
        select_on_validation(pd.DataFrame(rows).query("split == 'test'"))


def test_proxy_pools_are_the_experts_own_data_or_the_others(monkeypatch):
    from mergelib.experiments import miniature

    received = {}

    def fake(clip, pretrained, vectors, pools, **kwargs):
        received.update(pools)
        return {n: {} for n in vectors}

    monkeypatch.setattr(miniature, "subspaces_of_experts", fake)
    train = {n: type("S", (), {"images": torch.full((2, 3, 32, 32), i, dtype=torch.uint8)})() for i, n in enumerate("abc")}
    prepared = type("P", (), {"names": ("a", "b", "c"), "train": train, "task_vectors": {n: {} for n in "abc"},
                              "clip": None, "pretrained": {}, "config": miniature.MiniatureConfig(device="cpu")})()
    miniature.proxy_subspaces(prepared, source="own")
    assert all(torch.equal(received[n], train[n].images) for n in "abc")
    miniature.proxy_subspaces(prepared, source="others")
    assert sorted(received["a"][:, 0, 0, 0].tolist()) == [1, 1, 2, 2]  # b's and c's images, never a's
    with pytest.raises(ValueError, match="source must be one of"):
        miniature.proxy_subspaces(prepared, source="test")
