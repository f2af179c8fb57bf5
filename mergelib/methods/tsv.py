"""TSV-M: Task Singular Vectors merging (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

For each matrix (2-D tensor whose name does not contain ``text_projection``; every other tensor
is averaged over the tasks, as in the released code), with ``r = min(m, n)`` and
``k = int(r / T)``: each task keeps its top-k singular triplets ``U_t, s_t, V_t``; the
concatenations ``[U_1 .. U_T]`` and ``[V_1 .. V_T]`` are orthogonalised by their polar factors
(Procrustes, the paper's Eq. 8 and Alg. 1), and

    tau = polar([U_1 .. U_T]) diag(s_1 .. s_T) polar([V_1 .. V_T])^T.

Where this follows the released code rather than the paper: see
``METHODS['tsv_m'].code_notes`` and the book's Paper versus released code page.

Singular vectors use the deterministic sign rule of :func:`mergelib.methods.common.svd`; TSV-M's
output does not depend on it (each vector appears with its own singular value and partner).
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergelib.methods.common import (
    StateDict,
    is_matrix,
    mean_over_tasks,
    merge_per_key,
    rank_per_task,
)
from mergelib.methods.factors import all_zero, concatenation_polars
from mergelib.methods.registry import CodeNote, register


def tsv_merge_matrix(key: str, stack: torch.Tensor) -> torch.Tensor:
    """TSV-M of one matrix: ``stack`` is ``[T, m, n]``; returns ``[m, n]``."""
    if all_zero(stack):
        return torch.zeros_like(stack[0])
    tasks, m, n = stack.shape
    k = rank_per_task(key, min(m, n), tasks)
    u_polar, values, vh_polar = concatenation_polars(stack, k)  # once per fold (see methods.factors)
    return (u_polar * values) @ vh_polar


def tsv_merge_key(key: str, stack: torch.Tensor) -> torch.Tensor:
    """The per-key rule of TSV-M: matrices by :func:`tsv_merge_matrix`, the rest averaged."""
    return tsv_merge_matrix(key, stack) if is_matrix(key, stack[0]) else mean_over_tasks(key, stack)


@register(
    "tsv_m",
    paper="Task Singular Vectors: Reducing Task Interference in Model Merging (Gargiulo et al., CVPR 2025)",
    arxiv="2412.00081",
    equation=r"\tau = \operatorname{polar}(\hat U)\,\operatorname{diag}(\hat\sigma)\,"
             r"\operatorname{polar}(\hat V)^\top,\ \hat U = [U_1^{(k)} \cdots U_T^{(k)}],\ k = \lfloor r/T \rfloor",
    code_notes=(
        CodeNote("rank per task",
                 paper="the top 1/T of each task's singular directions",
                 released="k = int(r / T), the concatenation zero-padded to r slots (the padded slots carry a "
                          "zero singular value, so they contribute nothing to the result)"),
        CodeNote("non-matrix parameters",
                 paper="not described",
                 released="non-matrix tensors and `text_projection` averaged over tasks (mean), not summed"),
        CodeNote("merge coefficient",
                 paper="α tuned on validation data (the paper reports α = 1)",
                 released="the global coefficient applied with the merged vector",
                 mergelib="the protocol's global coefficient λ; SCORE's domain-generalisation protocol applies "
                          "every method at λ = 1"),
    ),
)
def tsv_m(task_vectors: Sequence[StateDict], *, device: torch.device | None = None) -> StateDict:
    """TSV-M: per matrix, the task's top 1/T singular triplets, decorrelated by polar factors.

    Matrix rule: 2-D tensors whose name does not contain ``text_projection`` take the matrix
    path; every other tensor is averaged over the tasks.
    """
    return merge_per_key(task_vectors, tsv_merge_key, device=device)
