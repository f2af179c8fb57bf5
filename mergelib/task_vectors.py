"""Task vectors: fine-tuned minus pretrained weights of the image encoder (Ilharco et al., arXiv 2212.04089).

State dicts of the image encoder use open_clip's full-model names (``visual.conv1.weight``, ...),
so task vectors read and written here match open_clip checkpoints. Only floating-point tensors
have task vectors; integer buffers are skipped, as in the papers' code.

Exactness: a float32 difference ``fl(b - a)`` is rounded whenever a weight moves by more than
its own magnitude's precision allows (e.g. it crosses zero), so ``a + fl(b - a)`` need not give
``b`` back. ``task_vector(..., dtype=torch.float64)`` keeps the difference of float32 weights
exactly, and :func:`apply_task_vector` adds in the wider of the two dtypes, so applying such a
task vector with coefficient 1 restores the fine-tuned weights bit for bit. The default is the
weights' own dtype (float32), as in the papers' code, at half the memory.
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


def task_vector(
    finetuned: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None
) -> StateDict:
    """``finetuned - pretrained`` for every floating-point tensor of ``pretrained``.

    ``dtype``: that of the result (default: the pretrained tensor's); float64 makes the round
    trip through :func:`apply_task_vector` exact for float32 weights.
    """
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
        wide = dtype or base.dtype
        vector[key] = tuned.to(wide) - base.to(wide)
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
        if delta is None:
            out[key] = base.clone()
            continue
        wide = torch.promote_types(base.dtype, delta.dtype)
        out[key] = torch.add(base.to(wide), delta.to(wide), alpha=alpha).to(base.dtype)
    return out
