"""Task vectors: the round trip on a real fine-tuned model, linearity, key checks, and the
TaskVector class (arithmetic, apply_to, accepted wherever plain dicts are)."""

from __future__ import annotations

import pytest
import torch

from mergelib.data import make_domain_benchmark
from mergelib.models.finetune import FinetuneConfig, finetune_image_encoder
from mergelib.models.heads import zero_shot_head
import mergelib
from mergelib.errors import ParameterError, ParameterValueError, TensorError
from mergelib.methods.registry import validate_task_vectors
from mergelib.task_vectors import TaskVector, apply_task_vector, encoder_state, load_encoder_state, task_vector


@pytest.fixture(scope="module")
def finetuned(tiny_clip):
    bench = make_domain_benchmark(("sketch",), n_train=128, n_test=8, seed=0)
    head = zero_shot_head(tiny_clip, bench.classnames, ("a photo of a {}.",))
    config = FinetuneConfig(epochs=1, batch_size=64, lr=1e-3, warmup_steps=1, seed=0)
    state, _ = finetune_image_encoder(tiny_clip, head, bench.train["sketch"], config, progress=False)
    return encoder_state(tiny_clip.model.visual), state


def test_round_trip_restores_the_finetuned_weights_exactly(finetuned):
    pretrained, tuned = finetuned
    vector = task_vector(tuned, pretrained, dtype=torch.float64)
    restored = apply_task_vector(pretrained, vector, alpha=1.0)
    assert restored.keys() == tuned.keys()
    for key in tuned:
        assert torch.equal(restored[key], tuned[key]), key
    assert any(v.abs().max() > 0 for v in vector.values())


def test_float32_task_vectors_restore_to_within_rounding(finetuned):
    pretrained, tuned = finetuned
    vector = task_vector(tuned, pretrained)
    assert all(v.dtype == torch.float32 for v in vector.values())
    restored = apply_task_vector(pretrained, vector)
    for key in tuned:
        ulp = torch.finfo(torch.float32).eps * torch.maximum(tuned[key].abs(), pretrained[key].abs())
        assert ((restored[key] - tuned[key]).abs() <= ulp).all(), key


def test_keys_use_open_clip_names_and_load_back(tiny_clip, finetuned):
    pretrained, _ = finetuned
    assert all(k.startswith("visual.") for k in pretrained)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in pretrained
    load_encoder_state(tiny_clip.model.visual, pretrained)  # strict load succeeds


def test_coefficient_scales_the_update(finetuned):
    pretrained, tuned = finetuned
    vector = task_vector(tuned, pretrained)
    half = apply_task_vector(pretrained, vector, alpha=0.5)
    for key in vector:
        torch.testing.assert_close(half[key] - pretrained[key], 0.5 * vector[key], rtol=1e-5, atol=1e-6)
    zero = apply_task_vector(pretrained, vector, alpha=0.0)
    assert all(torch.equal(zero[k], pretrained[k]) for k in pretrained)


def test_integer_buffers_are_skipped_and_keys_checked():
    pre = {"w": torch.ones(2, 2), "step": torch.tensor(3)}
    tuned = {"w": torch.full((2, 2), 1.5), "step": torch.tensor(4)}
    vector = task_vector(tuned, pre)
    assert set(vector) == {"w"}
    assert torch.equal(apply_task_vector(pre, vector)["step"], pre["step"])
    with pytest.raises(KeyError, match="lacks"):
        task_vector({"w": torch.ones(2, 2)}, {"w": torch.ones(2, 2), "b": torch.ones(2)})
    with pytest.raises(ValueError, match="shape"):
        task_vector({"w": torch.ones(3)}, {"w": torch.ones(2)})
    with pytest.raises(KeyError, match="lacks"):
        apply_task_vector({"w": torch.ones(2)}, {"v": torch.ones(2)})


# ----------------------------------------------------------------------------- the TaskVector class
def _states(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"visual.a.weight": torch.randn(6, 4, generator=generator),
            "visual.a.bias": torch.randn(6, generator=generator),
            "visual.proj": torch.randn(4, 3, generator=generator)}


def test_task_vector_class_is_a_dict_of_the_plain_task_vector():
    pretrained, tuned = _states(0), _states(1)
    vector = TaskVector.from_states(tuned, pretrained)
    plain = task_vector(tuned, pretrained)
    assert isinstance(vector, dict) and vector.keys() == plain.keys()
    assert all(torch.equal(vector[k], plain[k]) for k in plain)
    assert mergelib.TaskVector is TaskVector and {"TaskVector", "task_vector", "encoder_state"} <= set(mergelib.__all__)
    from mergelib.methods import common
    assert not hasattr(common, "TaskVector")  # one thing by that name; plain dicts are common.StateDict


def test_task_vector_arithmetic_matches_plain_dict_arithmetic():
    base = _states(0)
    a, b, c = (TaskVector.from_states(_states(seed), base) for seed in (1, 2, 3))
    plain = [dict(v) for v in (a, b, c)]
    expected = {
        "a + b": {k: plain[0][k] + plain[1][k] for k in base},
        "a - b": {k: plain[0][k] - plain[1][k] for k in base},
        "2.5 a": {k: 2.5 * plain[0][k] for k in base},
        "-a": {k: -plain[0][k] for k in base},
        "sum": {k: plain[0][k] + plain[1][k] + plain[2][k] for k in base},
        "0.5 (a + b) - c": {k: 0.5 * (plain[0][k] + plain[1][k]) - plain[2][k] for k in base},
    }
    results = {"a + b": a + b, "a - b": a - b, "2.5 a": 2.5 * a, "-a": -a, "sum": sum([a, b, c]),
               "0.5 (a + b) - c": (a + b) * 0.5 - c}
    for label, result in results.items():
        assert isinstance(result, TaskVector), label
        assert result.keys() == expected[label].keys(), label
        assert all(torch.equal(result[k], expected[label][k]) for k in base), label
    # a plain dict on either side; the operands are left untouched
    assert all(torch.equal((plain[1] + a)[k], expected["a + b"][k]) for k in base)
    assert all(torch.equal((plain[0] - b)[k], expected["a - b"][k]) for k in base)
    assert all(torch.equal(a[k], plain[0][k]) for k in base)


def test_task_vector_apply_to_round_trip_is_bitwise_in_float64():
    pretrained, tuned = _states(0), {k: v + 1e-3 * torch.randn_like(v) for k, v in _states(0).items()}
    tuned["visual.a.bias"][0] = -tuned["visual.a.bias"][0]  # a weight crossing zero: float32 differences round
    vector = TaskVector.from_states(tuned, pretrained, dtype=torch.float64)
    restored = vector.apply_to(pretrained)
    assert all(torch.equal(restored[k], tuned[k]) and restored[k].dtype == torch.float32 for k in tuned)
    half = vector.apply_to(pretrained, alpha=0.5)
    plain = apply_task_vector(pretrained, dict(vector), alpha=0.5)
    assert all(torch.equal(half[k], plain[k]) for k in tuned)
    with pytest.raises(ParameterValueError, match="alpha"):
        vector.apply_to(pretrained, alpha=float("inf"))
    with pytest.raises(KeyError, match="lacks"):
        vector.apply_to({"visual.a.weight": pretrained["visual.a.weight"]})


def test_task_vector_from_models_uses_open_clip_names():
    torch.manual_seed(0)
    pretrained, tuned = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    vector = TaskVector.from_models(tuned, pretrained)
    assert set(vector) == {"visual.weight", "visual.bias"}
    assert torch.equal(vector["visual.weight"], tuned.weight.detach() - pretrained.weight.detach())


@pytest.mark.parametrize("method, params", [("task_arithmetic", {}), ("ties", {}), ("tsv_m", {}),
                                            ("score", {"keep": "trimmed"})])
def test_task_vectors_are_accepted_by_merge_and_apply_like_plain_dicts(method, params):
    base = _states(0)
    vectors = [TaskVector.from_states(_states(seed), base) for seed in (1, 2, 3)]
    plain = [dict(v) for v in vectors]
    assert validate_task_vectors(vectors) == vectors
    merged = mergelib.merge(method, vectors, device="cpu", **params)
    expected = mergelib.merge(method, plain, device="cpu", **params)
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)
    applied, applied_plain = mergelib.apply(base, TaskVector(merged), 0.7), mergelib.apply(base, expected, 0.7)
    assert all(torch.equal(applied[k], applied_plain[k]) for k in base)


def test_task_vector_refuses_mismatched_keys_shapes_and_bad_scalars():
    a = TaskVector({"w": torch.ones(2, 2), "b": torch.ones(2)})
    with pytest.raises(TensorError, match=r"different keys; only on the left: 1 \['b'\], only on the right: 1 \['c'\]"):
        a + {"w": torch.ones(2, 2), "c": torch.ones(2)}
    with pytest.raises(TensorError, match=r"different keys"):
        {"w": torch.ones(2, 2)} - a
    with pytest.raises(TensorError, match=r"'w' has shape \(2, 2\) on the left, \(4,\) on the right"):
        a - {"w": torch.ones(4), "b": torch.ones(2)}
    for scalar in (True, False, float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ParameterValueError, match="finite number"):
            a * scalar
        with pytest.raises(ParameterValueError, match="finite number"):
            scalar * a
    with pytest.raises(TypeError):
        a * "2"
    with pytest.raises(TypeError):
        a + 1
    with pytest.raises(ParameterError, match="not a tensor"):
        TaskVector({"w": [1.0, 2.0]})
    with pytest.raises(ParameterError, match="dict of tensors"):
        TaskVector([("w", torch.ones(1))])
