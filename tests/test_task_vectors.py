"""Task vectors: the round trip on a real fine-tuned model, linearity, and key checks."""

from __future__ import annotations

import pytest
import torch

from mergelib.data import make_domain_benchmark
from mergelib.finetune import FinetuneConfig, finetune_image_encoder
from mergelib.heads import zero_shot_head
from mergelib.task_vectors import apply_task_vector, encoder_state, load_encoder_state, task_vector


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
