"""MagMax: Leveraging Model Merging for Seamless Continual Learning (Marczak et al., ECCV 2024,
arXiv 2407.06322).

Element-wise maximum-magnitude selection over the task vectors: for every coordinate ``j``::

    tau_j = tau_{t*, j},   t* = argmax_t |tau_{t, j}|,

applied to every tensor alike. The global coefficient lambda is applied with the merged vector.

Where this follows the released code rather than the paper: see
``METHODS['magmax'].code_notes`` and the book's Paper versus released code page.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergelib.methods.common import StateDict, merge_per_key
from mergelib.methods.registry import CodeNote, register


def max_magnitude(key: str, stack: torch.Tensor) -> torch.Tensor:
    """The entry of largest magnitude over the tasks (dim 0); the later task wins ties."""
    best = stack[0]
    for candidate in stack[1:]:
        best = torch.where(candidate.abs() >= best.abs(), candidate, best)
    return best


@register(
    "magmax",
    paper="MagMax: Leveraging Model Merging for Seamless Continual Learning (Marczak et al., ECCV 2024)",
    arxiv="2407.06322",
    equation=r"\tau_j = \tau_{t^*\!,\,j},\ t^* = \arg\max_t |\tau_{t,j}|",
    code_notes=(
        CodeNote("ties in magnitude",
                 paper="argmax_t |τ_t,j|, ties not discussed",
                 released="SCORE's code (matching the MagMax authors') scans the tasks in order and a later task "
                          "replaces the current value when its magnitude is greater or equal: the later task wins"),
        CodeNote("which task vectors",
                 paper="those of sequentially fine-tuned models (each starting from the previous one)",
                 released="SCORE applies the selection to independently fine-tuned experts",
                 mergelib="as SCORE; the rule does not depend on how the vectors were made"),
    ),
)
def magmax(task_vectors: Sequence[StateDict], *, device: torch.device | None = None) -> StateDict:
    """MagMax: element-wise, the task value of largest magnitude (the later task on ties)."""
    return merge_per_key(task_vectors, max_magnitude, device=device)
