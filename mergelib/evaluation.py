"""Evaluation: logits of an image encoder with a head, accuracy and balanced accuracy.

Balanced accuracy is scikit-learn's (mean recall over the classes present in the labels), as
SCORE reports for FedISIC and RetinaDomains.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from sklearn.metrics import balanced_accuracy_score

from .backbones import Clip, batch_to_model_input
from .data import ImageSet
from .heads import ClassificationHead
from .task_vectors import load_encoder_state


class EncoderEvaluator:
    """Evaluates image-encoder states of one backbone, reusing a single working module."""

    def __init__(self, clip: Clip, *, device: str | torch.device = "cpu", batch_size: int = 500):
        self.clip = clip
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.encoder = copy.deepcopy(clip.model.visual).to(self.device).eval()

    @torch.no_grad()
    def logits(self, state: Mapping[str, torch.Tensor], head: ClassificationHead, images: ImageSet) -> torch.Tensor:
        load_encoder_state(self.encoder, state)
        head = head.to(self.device)
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = batch_to_model_input(images.images[start : start + self.batch_size], self.clip).to(self.device)
            chunks.append(head(self.encoder(batch)).float().cpu())
        return torch.cat(chunks)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy and balanced accuracy (fractions in [0, 1]) of ``logits`` against ``labels``."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} predictions for {labels.shape[0]} labels")
    predictions = logits.argmax(dim=1)
    return {
        "accuracy": (predictions == labels).double().mean().item(),
        "balanced_accuracy": float(balanced_accuracy_score(labels.numpy(), predictions.numpy())),
    }
