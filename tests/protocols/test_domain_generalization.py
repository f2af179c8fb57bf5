"""Leave-one-domain-out: the held-out expert never reaches a merge or the ensemble; baselines are right."""

from __future__ import annotations

import pytest
import torch

from mergelib.protocols.domain_generalization import BASELINES, ENSEMBLE, OTHER_EXPERTS_MEAN, OWN_EXPERT, ZERO_SHOT, evaluate_leave_one_domain_out, leave_one_out
from mergelib.models.evaluation import EncoderEvaluator, classification_metrics
from mergelib.models.heads import zero_shot_head
from mergelib.methods import METHODS, register
from mergelib.data import make_domain_benchmark
from mergelib.task_vectors import encoder_state, task_vector


def test_leave_one_out_holds_each_domain_out_once():
    names = ["a", "b", "c", "d"]
    folds = list(leave_one_out(names))
    assert [held for held, _ in folds] == names
    for held, sources in folds:
        assert held not in sources and sorted(sources + [held]) == sorted(names)
    with pytest.raises(ValueError, match="unique"):
        list(leave_one_out(["a", "a"]))
    with pytest.raises(ValueError, match="at least two"):
        list(leave_one_out(["a"]))


def test_metrics():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 1])
    metrics = classification_metrics(logits, labels)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["balanced_accuracy"] == pytest.approx((1.0 + 1 / 3) / 2)


@pytest.fixture()
def spy_method():
    received = []

    @register("spy_for_test", paper="test", arxiv=None, equation="")
    def spy(task_vectors, *, device=None, tag=""):
        received.append([id(tv) for tv in task_vectors])
        return {k: torch.stack([tv[k] for tv in task_vectors]).mean(0) for k in task_vectors[0]}

    yield received
    del METHODS["spy_for_test"]


def test_protocol_never_uses_the_held_out_expert(tiny_clip, spy_method):
    bench = make_domain_benchmark(("photo", "negative", "sketch"), n_train=8, n_test=40, seed=1)
    head = zero_shot_head(tiny_clip, bench.classnames, ("a photo of a {}.",))
    pretrained = encoder_state(tiny_clip.model.visual)
    g = torch.Generator().manual_seed(0)
    experts = {d: {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in pretrained.items()} for d in bench.domains}
    vectors = {d: task_vector(s, pretrained) for d, s in experts.items()}
    evaluator = EncoderEvaluator(tiny_clip)
    results, matrix = evaluate_leave_one_domain_out(
        evaluator, pretrained, experts, vectors, head, bench.test, ["spy_for_test"], [1.0], progress=False)

    ids = {id(v): d for d, v in vectors.items()}
    assert [sorted(ids[i] for i in call) for call in spy_method] == [["negative", "sketch"], ["photo", "sketch"], ["negative", "photo"]]

    # fold parameters see exactly the sources, in the order the task vectors are passed
    seen = []
    specs = ["spy_for_test", "spy_for_test[tag=b]"]
    results_b, _ = evaluate_leave_one_domain_out(
        evaluator, pretrained, experts, vectors, head, bench.test, specs, {specs[0]: [1.0], specs[1]: [0.5, 1.0]},
        fold_parameters={"spy_for_test": lambda sources: seen.append(list(sources)) or {}}, progress=False)
    assert seen == [s for _, s in leave_one_out(list(bench.domains)) for _ in specs]
    merges = results_b[results_b.coefficient.notna()]
    assert sorted(merges.groupby("method").size().items()) == [(specs[0], 3), (specs[1], 6)]

    assert set(results.method) == set(BASELINES) | {"spy_for_test"}
    assert len(results) == 3 * (len(BASELINES) + 1) and len(matrix) == 9
    for held in bench.domains:
        rows = results[results.held_out == held].set_index("method")
        labels = bench.test[held].labels
        others = [d for d in bench.domains if d != held]
        # independent recomputation of the ensemble and the single-expert baselines
        ensemble = sum(evaluator.logits(experts[d], head, bench.test[held]) for d in others) / len(others)
        assert rows.loc[ENSEMBLE, "accuracy"] == pytest.approx(classification_metrics(ensemble, labels)["accuracy"])
        singles = [classification_metrics(evaluator.logits(experts[d], head, bench.test[held]), labels)["accuracy"] for d in others]
        assert rows.loc[OTHER_EXPERTS_MEAN, "accuracy"] == pytest.approx(sum(singles) / len(singles))
        own = classification_metrics(evaluator.logits(experts[held], head, bench.test[held]), labels)
        assert rows.loc[OWN_EXPERT, "accuracy"] == pytest.approx(own["accuracy"])
        zs = classification_metrics(evaluator.logits(pretrained, head, bench.test[held]), labels)
        assert rows.loc[ZERO_SHOT, "accuracy"] == pytest.approx(zs["accuracy"])
