"""Fine-tuning: the schedule, determinism, and that it actually lowers the loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mergelib.models.backbones import batch_to_model_input
from mergelib.data import MINI_SUITE_TASKS, make_domain_benchmark, make_task
from mergelib.models.finetune import FinetuneConfig, finetune_image_encoder, lr_factor
from mergelib.models.heads import ClassificationHead, ImageClassifier, zero_shot_head
from mergelib.task_vectors import load_encoder_state


def test_schedule_warms_up_linearly_then_follows_a_cosine():
    total, warmup = 100, 10
    assert [lr_factor(s, total, warmup) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_factor(9, total, warmup) == pytest.approx(1.0)
    assert lr_factor(10, total, warmup) == pytest.approx(1.0)
    assert lr_factor(55, total, warmup) == pytest.approx(0.5)
    assert lr_factor(100, total, warmup) == pytest.approx(0.0, abs=1e-12)
    mid = 10 + 90 / 3
    assert lr_factor(int(mid), total, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 90)))
    # released behaviour: a run shorter than the warm-up never reaches the peak rate
    assert max(lr_factor(s, 20, 500) for s in range(20)) == pytest.approx(20 / 500)


def _loss(clip, head, state, images):
    encoder = copy.deepcopy(clip.model.visual)
    load_encoder_state(encoder, state)
    with torch.no_grad():
        logits = ImageClassifier(encoder, head)(batch_to_model_input(images.images, clip))
    return F.cross_entropy(logits, images.labels).item()


@pytest.fixture(scope="module")
def sketch_run(tiny_clip):
    from mergelib.task_vectors import encoder_state

    bench = make_domain_benchmark(("sketch",), n_train=256, n_test=8, seed=0)
    # a frozen head with well-separated prototypes, so the test measures the fine-tuning
    # mechanics rather than how far the session's barely pretrained text tower got
    prototypes = torch.linalg.qr(torch.randn(128, 10, generator=torch.Generator().manual_seed(0)))[0].T
    head = ClassificationHead(30.0 * prototypes, bench.classnames)
    config = FinetuneConfig(epochs=2, batch_size=64, lr=1e-3, warmup_steps=2, seed=3)
    pretrained = encoder_state(tiny_clip.model.visual)
    state, losses = finetune_image_encoder(tiny_clip, head, bench.train["sketch"], config, progress=False)
    again, _ = finetune_image_encoder(tiny_clip, head, bench.train["sketch"], config, progress=False)
    return tiny_clip, head, bench, pretrained, state, again, losses


def test_finetuning_lowers_the_loss(sketch_run):
    clip, head, bench, pretrained, state, _, losses = sketch_run
    train = bench.train["sketch"]
    before, after = _loss(clip, head, pretrained, train), _loss(clip, head, state, train)
    assert after < 0.8 * before, (before, after)
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert len(losses) == 2 * 4


def test_finetuning_is_deterministic_and_leaves_the_backbone_untouched(sketch_run):
    clip, _, _, pretrained, state, again, _ = sketch_run
    assert all(torch.equal(state[k], again[k]) for k in state)
    current = clip.model.visual.state_dict()
    assert all(torch.equal(current[k[len("visual."):]], v) for k, v in pretrained.items())


def test_finetuning_works_on_a_task_of_the_suite(tiny_clip):
    train, _ = make_task("digits", n_train=128, n_test=8, seed=0)
    head = zero_shot_head(tiny_clip, train.classnames, MINI_SUITE_TASKS["digits"].caption_templates)
    state, losses = finetune_image_encoder(tiny_clip, head, train, FinetuneConfig(epochs=1, batch_size=64, lr=1e-3, warmup_steps=1), progress=False)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert state.keys() == {"visual." + k for k in tiny_clip.model.visual.state_dict()}


def test_head_and_dataset_classes_must_agree(tiny_clip):
    train, _ = make_task("digits", n_train=16, n_test=8, seed=0)
    head = zero_shot_head(tiny_clip, ("a", "b"), ("{}",))
    with pytest.raises(ValueError, match="do not match"):
        finetune_image_encoder(tiny_clip, head, train, FinetuneConfig(epochs=1), progress=False)
