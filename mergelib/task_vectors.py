"""Task vectors: fine-tuned minus pretrained weights of the image encoder (Ilharco et al., arXiv 2212.04089).

State dicts of the image encoder use open_clip's full-model names (``visual.conv1.weight``, ...),
so task vectors read and written here match open_clip checkpoints. Only floating-point tensors
have task vectors; integer buffers are skipped, as in the papers' code.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

PREFIX = "visual."
StateDict = dict[str, torch.Tensor]


def encoder_state(image_encoder: nn.Module) -> StateDict:
    """A detached copy of the image encoder's state dict with open_clip names (``visual.*``)."""
    return {PREFIX + k: v.detach().clone() for k, v in image_encoder.state_dict().items()}


def load_encoder_state(image_encoder: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a ``visual.*`` state dict into an image encoder (strict: every key must match)."""
    stripped = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state.items()}
    image_encoder.load_state_dict(stripped, strict=True)


def task_vector(finetuned: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor]) -> StateDict:
    """``finetuned - pretrained`` for every floating-point tensor of ``pretrained``."""
    missing = [k for k in pretrained if k not in finetuned]
    if missing:
        raise KeyError(f"fine-tuned state lacks {len(missing)} pretrained keys, e.g. {missing[:3]}")
    vector = {}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            continue
        tuned = finetuned[key]
        if tuned.shape != base.shape:
            raise ValueError(f"{key}: fine-tuned shape {tuple(tuned.shape)} != pretrained {tuple(base.shape)}")
        vector[key] = tuned.to(base.dtype) - base
    return vector


def apply_task_vector(
    pretrained: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor], alpha: float = 1.0
) -> StateDict:
    """``pretrained + alpha * vector``; keys without a task vector are copied unchanged."""
    unknown = [k for k in vector if k not in pretrained]
    if unknown:
        raise KeyError(f"task vector has keys that the pretrained state lacks, e.g. {unknown[:3]}")
    out = {}
    for key, base in pretrained.items():
        delta = vector.get(key)
        out[key] = base.clone() if delta is None else base + (delta.to(base.dtype) if alpha == 1 else alpha * delta.to(base.dtype))
    return out
