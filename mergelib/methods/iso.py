"""Iso-C and Iso-CTS: isotropic merging (Marczak et al., ICML 2025, arXiv 2502.04959).

Matrix rule (as released): 2-D tensors whose name does not contain ``text_projection`` take the
matrix path; every other tensor is averaged over the tasks.

**Iso-C** (Alg. 1, Eqs. 7-9): with the task-arithmetic sum ``M = sum_t Delta_t = U S V^T``
(thin SVD, ``r = min(m, n)`` values), every singular value is replaced by their mean,

    tau = mean(diag S) * U V^T,

so the merged update acts with the same strength in every direction of the sum's subspace.

**Iso-CTS** (Alg. 2, Eqs. 10-14): a common subspace from the sum plus task-specific directions.
With ``k_0 = int(f r)`` (``common_fraction`` f = 0.8), ``S = round((r - k_0) / T) T`` task-specific
slots (Python ``round``, half to even), common size ``c = r - S`` and ``s = S / T`` per task:
keep the top-c triplets of ``M``; for each task, remove the common *left* subspace,
``R_t = Delta_t - U_c U_c^T Delta_t``, and keep the top-s triplets of ``R_t``; place the task blocks
first and the common block last (as released; the paper writes the common block first, which
does not matter since the spectrum becomes flat), orthogonalise the stacked left and right
vectors by their polar factors, and use the mean of all ``r`` kept singular values:

    tau = mean(sigma) * polar([U~_1 .. U~_T | U_c]) polar([V~_1 .. V~_T | V_c])^T.

Where this follows the released code rather than the paper: see ``METHODS['iso_c'].code_notes``,
``METHODS['iso_cts'].code_notes`` and the book's Paper versus released code page.

When the sum is rank-deficient, its zero singular directions get the mean value too, and which
directions they are is the SVD routine's choice (as in the released code).
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergelib.methods.common import Fraction, StateDict, is_all_zero, is_matrix, mean_over_tasks, merge_per_key, polar, svd, truncated_svd
from mergelib.methods.registry import CodeNote, register


def iso_c_matrix(stack: torch.Tensor) -> torch.Tensor:
    """Iso-C of one matrix: ``stack`` is ``[T, m, n]``."""
    u, s, vh = torch.linalg.svd(stack.sum(dim=0), full_matrices=False)
    return s.mean() * (u @ vh)


def iso_cts_sizes(rank: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """``(common size c, per-task size s)`` of Iso-CTS for a matrix of rank ``rank``, as released."""
    initial_common = int(common_fraction * rank)
    task_slots = round((rank - initial_common) / tasks) * tasks
    common = rank - task_slots
    return common, task_slots // tasks


def iso_cts_matrix(stack: torch.Tensor, common_fraction: float) -> torch.Tensor:
    """Iso-CTS of one matrix: ``stack`` is ``[T, m, n]``."""
    tasks, m, n = stack.shape
    common, per_task = iso_cts_sizes(min(m, n), tasks, common_fraction)
    u, s, vh = svd(stack.sum(dim=0))
    u_common, s_common, vh_common = u[:, :common], s[:common], vh[:common]
    lefts, values, rights = [], [], []
    if per_task > 0:
        residual = stack - u_common @ (u_common.T @ stack)
        u_t, s_t, vh_t = truncated_svd(residual, per_task)
        lefts.append(u_t.permute(1, 0, 2).reshape(m, tasks * per_task))
        values.append(s_t.reshape(-1))
        rights.append(vh_t.reshape(tasks * per_task, n))
    left = torch.cat([*lefts, u_common], dim=1)
    right = torch.cat([*rights, vh_common], dim=0)
    mean_value = torch.cat([*values, s_common]).mean()
    return mean_value * (polar(left) @ polar(right))


def _per_key(matrix_rule):
    def merge_key(key: str, stack: torch.Tensor) -> torch.Tensor:
        if not is_matrix(key, stack[0]):
            return mean_over_tasks(key, stack)
        return torch.zeros_like(stack[0]) if is_all_zero(stack) else matrix_rule(stack)

    return merge_key


_COMMON_NOTES = (
    CodeNote("non-matrix parameters",
             paper="not described",
             released="non-matrix tensors and `text_projection` averaged over tasks (mean)"),
    CodeNote("merge coefficient",
             paper="α tuned on validation data",
             released="the global coefficient α applied afterwards to every tensor",
             mergelib="SCORE's domain-generalisation protocol applies every method at α = 1"),
)

@register(
    "iso_c",
    paper="No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces "
          "(Marczak et al., ICML 2025)",
    arxiv="2502.04959",
    equation=r"\tau = \bar\sigma\, U V^\top,\quad \textstyle\sum_t \Delta_t = U \Sigma V^\top,\ "
             r"\bar\sigma = \frac{1}{r}\sum_i \sigma_i",
    code_notes=_COMMON_NOTES,
)
def iso_c(task_vectors: Sequence[StateDict], *, device: torch.device | None = None) -> StateDict:
    """Iso-C: the task-arithmetic sum with its singular spectrum flattened to its mean.

    Matrix rule: 2-D tensors whose name does not contain ``text_projection`` take the matrix
    path; every other tensor is averaged over the tasks.
    """
    return merge_per_key(task_vectors, _per_key(iso_c_matrix), device=device)


@register(
    "iso_cts",
    paper="No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces "
          "(Marczak et al., ICML 2025)",
    arxiv="2502.04959",
    equation=r"\tau = \bar\sigma\,\operatorname{polar}([\tilde U_1 \cdots \tilde U_T\ U_c])\,"
             r"\operatorname{polar}([\tilde V_1 \cdots \tilde V_T\ V_c])^\top",
    code_notes=(
        CodeNote("subspace sizes",
                 paper="the sizes of Alg. 2 (the rounding below is the code's)",
                 released="c_0 = int(0.8 r), S = round((r − c_0) / T) T task slots (Python's round, half to even), "
                          "common size c = r − S, s = S / T per task; e.g. r = 768, T = 3 gives c = 615, s = 51"),
        CodeNote("order of the blocks",
                 paper="the common block first",
                 released="the task blocks first, the common block last",
                 mergelib="as released (with a flat spectrum the order does not matter)"),
        CodeNote("task residual",
                 paper="each task's residual outside the common subspace",
                 released="the residual removes only the common *left* subspace, R_t = Δ_t − U_c U_cᵀ Δ_t"),
        *_COMMON_NOTES,
    ),
    checks=dict(common_fraction=Fraction(zero_ok=False, one_ok=True)),
)
def iso_cts(
    task_vectors: Sequence[StateDict], *, device: torch.device | None = None, common_fraction: float = 0.8
) -> StateDict:
    """Iso-CTS: a common subspace of the sum plus each task's own directions, with a flat spectrum.

    Matrix rule: 2-D tensors whose name does not contain ``text_projection`` take the matrix
    path; every other tensor is averaged over the tasks.
    """
    return merge_per_key(task_vectors, _per_key(lambda stack: iso_cts_matrix(stack, common_fraction)), device=device)
