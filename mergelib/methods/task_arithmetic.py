"""Weight averaging and task arithmetic.

* ``weight_average``: the mean of the task vectors, i.e. averaging the experts' weights
  ("model soups", Wortsman et al., arXiv 2203.05482): ``tau = (1/T) sum_t tau_t``.
* ``task_arithmetic``: the sum of the task vectors (Ilharco et al., arXiv 2212.04089):
  ``tau = sum_t tau_t``; the model is ``theta_0 + lambda * tau``, with ``lambda`` the global
  coefficient given at application time.

Both treat every tensor alike (no matrix/non-matrix distinction).

Where this follows the released code rather than the paper: see
``METHODS['task_arithmetic'].code_notes`` and the book's Paper versus released code page.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergelib.methods.common import StateDict, merge_per_key
from mergelib.methods.registry import CodeNote, register


@register(
    "weight_average",
    paper="Model soups: averaging weights of multiple fine-tuned models (Wortsman et al., ICML 2022)",
    arxiv="2203.05482",
    equation=r"\tau = \frac{1}{T}\sum_{t=1}^{T}\tau_t",
)
def weight_average(task_vectors: Sequence[StateDict], *, device: torch.device | None = None) -> StateDict:
    """Average the task vectors (equivalently, average the experts' weights)."""
    count = len(task_vectors)
    return merge_per_key(task_vectors, lambda key, stack: stack.sum(0) / count, device=device)


@register(
    "task_arithmetic",
    paper="Editing models with task arithmetic (Ilharco et al., ICLR 2023)",
    arxiv="2212.04089",
    equation=r"\tau = \sum_{t=1}^{T}\tau_t",
    code_notes=(
        CodeNote("SCORE's \"avg\" baseline",
                 paper="\"avg\" in SCORE's tables (weight averaging, by its name)",
                 released="the sum of the task vectors, applied with coefficient 1.0: task arithmetic at λ = 1",
                 mergelib="`task_arithmetic` (the sum) and `weight_average` (the mean) are separate methods"),
    ),
)
def task_arithmetic(task_vectors: Sequence[StateDict], *, device: torch.device | None = None) -> StateDict:
    """Sum the task vectors; the global coefficient lambda is applied with the merged vector."""
    return merge_per_key(task_vectors, lambda key, stack: stack.sum(0), device=device)
