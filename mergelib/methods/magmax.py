"""MagMax: Leveraging Model Merging for Seamless Continual Learning (Marczak et al., ECCV 2024,
arXiv 2407.06322).

Element-wise maximum-magnitude selection over the task vectors: for every coordinate ``j``::

    tau_j = tau_{t*, j},   t* = argmax_t |tau_{t, j}|,

applied to every tensor alike. The global coefficient lambda is applied with the merged vector.

Following the released code (SCORE's, which matches the MagMax authors'): the tasks are scanned in
order and a later task replaces the current value when its magnitude is greater *or equal*, so on
ties the later task wins. The paper merges the task vectors of *sequentially* fine-tuned models
(each starting from the previous one); SCORE applies the same selection rule to independently
fine-tuned experts, as does this function (the rule does not depend on how the vectors were made).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .common import StateDict, merge_per_key
from .registry import register


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
        "On ties in magnitude the later task wins (the released code compares with >=).",
        "Applied to independently fine-tuned experts, whereas the paper merges sequentially "
        "fine-tuned ones.",
    ),
)
def magmax(task_vectors: Sequence[StateDict], *, device: torch.device | None = None) -> StateDict:
    """MagMax: element-wise, the task value of largest magnitude (the later task on ties)."""
    return merge_per_key(task_vectors, max_magnitude, device=device)
