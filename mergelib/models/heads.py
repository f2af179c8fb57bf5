"""Zero-shot classification heads from CLIP's text tower, as in SCORE's and ESM's released code.

For each class, every template is filled in, encoded by the text tower and L2-normalised; the
embeddings are averaged over templates and normalised again. The stacked class prototypes are
multiplied by ``exp(logit_scale)``; image features are normalised before the (bias-free, frozen)
linear map, so ``logits = scale * cos(image feature, class prototype)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mergelib.models.backbones import Clip


class ClassificationHead(nn.Module):
    """Frozen linear head on L2-normalised features (weight already carries the logit scale)."""

    def __init__(self, weight: torch.Tensor, classnames: Sequence[str] = ()):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.classnames = tuple(classnames)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=-1) @ self.weight.T


class ImageClassifier(nn.Module):
    """An image encoder (CLIP's visual tower) followed by a frozen head."""

    def __init__(self, image_encoder: nn.Module, head: ClassificationHead):
        super().__init__()
        self.image_encoder = image_encoder
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.image_encoder(images))


@torch.no_grad()
def zero_shot_head(clip: Clip, classnames: Sequence[str], templates: Sequence[str]) -> ClassificationHead:
    """Build the zero-shot head of ``classnames`` from ``templates`` (each with one ``{}``)."""
    if not classnames or not templates:
        raise ValueError("a zero-shot head needs at least one class name and one template")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"each template must contain exactly one '{{}}' placeholder: {bad}")
    model = clip.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    prototypes = []
    for name in classnames:
        tokens = clip.tokenizer([t.format(name) for t in templates]).to(device)
        embeddings = F.normalize(model.encode_text(tokens), dim=-1)
        prototypes.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    model.train(was_training)
    weight = torch.stack(prototypes) * model.logit_scale.exp()
    return ClassificationHead(weight, classnames)
