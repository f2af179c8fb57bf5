"""Evaluation: logits of an image encoder with a head, accuracy and balanced accuracy.

Balanced accuracy is scikit-learn's (mean recall over the classes present in the labels), as
SCORE reports for FedISIC and RetinaDomains.

Images come either in memory (``ImageSet``, the miniature's) or as files
(``ImageFileSet``, the real datasets'), read through a ``DataLoader``
with the backbone's validation transform (open_clip's), as in the papers' code.
"""

from __future__ import annotations

import copy
import warnings
from typing import Mapping

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

from mergelib.models.backbones import Clip, batch_to_model_input
from mergelib.data import ImageSet
from mergelib.data.files import ImageFileSet
from mergelib.models.heads import ClassificationHead
from mergelib.task_vectors import load_encoder_state


class EncoderEvaluator:
    """Evaluates image-encoder states of one backbone, reusing a single working module."""

    def __init__(self, clip: Clip, *, device: str | torch.device = "cpu", batch_size: int = 500,
                 num_workers: int = 0, precision: str = "fp32"):
        self.clip = clip
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.autocast = autocast_context(precision, self.device)
        self.encoder = copy.deepcopy(clip.model.visual).to(self.device).eval()

    def batches(self, images):
        """Model inputs of ``images`` in order, ``batch_size`` at a time, on the device.

        ``images``: an ``ImageSet``, an ``ImageFileSet``, or any torch ``Dataset`` of
        ``(input tensor, label)`` pairs already transformed (e.g. a torchvision dataset built with
        the backbone's validation transform)."""
        if isinstance(images, ImageFileSet):
            images = images.with_transform(self.clip.preprocess_val)
        if isinstance(images, torch.utils.data.Dataset):
            loader = torch.utils.data.DataLoader(images, batch_size=self.batch_size, shuffle=False,
                                                 num_workers=self.num_workers)
            for inputs, _ in loader:
                yield inputs.to(self.device)
            return
        for start in range(0, len(images), self.batch_size):
            yield batch_to_model_input(images.images[start : start + self.batch_size], self.clip).to(self.device)

    @torch.no_grad()
    def logits(self, state: Mapping[str, torch.Tensor], head: ClassificationHead, images: ImageSet | ImageFileSet) -> torch.Tensor:
        load_encoder_state(self.encoder, state)
        head = head.to(self.device)
        chunks = []
        for batch in self.batches(images):
            with self.autocast():
                chunks.append(head(self.encoder(batch)).float().cpu())
        return torch.cat(chunks)


PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision_name(precision: str) -> str:
    """``precision`` if it is one of ``PRECISIONS``, else a clear error."""
    from mergelib.errors import ParameterValueError

    if precision not in PRECISIONS:
        raise ParameterValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autocast_context(precision: str, device: torch.device):
    """A factory of autocast contexts for ``precision`` (``fp32``: no autocast)."""
    import contextlib

    check_precision_name(precision)
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy and balanced accuracy (fractions in [0, 1]) of ``logits`` against ``labels``.

    Balanced accuracy is the mean recall over the classes present in ``labels`` (scikit-learn's
    definition); predictions of absent classes count as errors. scikit-learn's warnings about
    such classes are silenced: on small splits they are expected, and the definition is fixed.
    """
    return classification_outcomes(logits, labels)[0]


def classification_outcomes(logits: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, float], np.ndarray]:
    """:func:`classification_metrics` and which examples the model gets right: a numpy bool
    vector ``correct[i] = (argmax_k logits[i, k] == labels[i])``, whose mean is the accuracy.

    Keep ``correct`` (with the labels) for the bootstrap intervals of :mod:`mergelib.analysis.stats`:
    ``stats.correctness_record(correct, labels, method=..., ...)``.
    """
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} predictions for {labels.shape[0]} labels")
    predictions = logits.argmax(dim=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")
        balanced = float(balanced_accuracy_score(labels.numpy(), predictions.numpy()))
    correct = predictions == labels
    return {"accuracy": correct.double().mean().item(), "balanced_accuracy": balanced}, correct.numpy()
