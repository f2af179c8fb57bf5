"""Zero-shot heads: an independent computation of the prototypes, and the logit definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mergelib.models.heads import ImageClassifier, zero_shot_head

CLASSES = ("coat", "bag", "sandal")
TEMPLATES = ("a photo of a {}.", "a negative photo of a {}.")


def test_head_matches_a_straightforward_computation(tiny_clip):
    head = zero_shot_head(tiny_clip, CLASSES, TEMPLATES)
    model = tiny_clip.model
    with torch.no_grad():
        expected = []
        for name in CLASSES:
            rows = [F.normalize(model.encode_text(tiny_clip.tokenizer([t.format(name)])), dim=-1)[0] for t in TEMPLATES]
            mean = torch.stack(rows).mean(0)
            expected.append(mean / mean.norm())
        expected = torch.stack(expected) * model.logit_scale.exp()
    torch.testing.assert_close(head.weight, expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in head.parameters())


def test_logits_are_scaled_cosines(tiny_clip):
    head = zero_shot_head(tiny_clip, CLASSES, TEMPLATES)
    features = torch.randn(5, head.weight.shape[1])
    scale = tiny_clip.model.logit_scale.exp().item()
    cosines = F.normalize(features, dim=-1) @ F.normalize(head.weight, dim=-1).T
    torch.testing.assert_close(head(features), scale * cosines, rtol=1e-5, atol=1e-5)
    classifier = ImageClassifier(tiny_clip.model.visual, head)
    assert classifier(torch.zeros(2, 3, 32, 32)).shape == (2, len(CLASSES))


def test_templates_need_one_placeholder(tiny_clip):
    with pytest.raises(ValueError, match="placeholder"):
        zero_shot_head(tiny_clip, CLASSES, ("a photo of a thing.",))
