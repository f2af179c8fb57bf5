"""SCORE: Subspace COnflict-Resolving mErging (Chaves et al., CVPR 2026, arXiv 2603.05768).

For each matrix (2-D tensor whose name does not contain ``text_projection``; every other tensor
is averaged over the tasks, as in the released code), with ``r = min(m, n)`` and
``k = int(r / T)``:

1. *Shared basis.* As in TSV-M, each task's top-k singular vectors are concatenated and
   orthogonalised by polar factors: ``U* (m x r)`` and ``V* (n x r)``.
2. *Change of basis.* Each task matrix is expressed in it: ``M_t = U*^T Delta_t V*`` (r x r).
   Its diagonal is what task t does along the shared directions; its off-diagonal entries are
   cross-talk between directions, where tasks conflict.
3. *Trim.* With ``O_t`` = ``M_t`` with its diagonal zeroed, ``mu_t`` and ``sigma_t`` its mean and
   unbiased standard deviation, an off-diagonal entry is kept when ``|O_t - mu_t| <= h``:
   ``trim(M_t) = diag(M_t) + O_t * 1[|O_t - mu_t| <= h]``, ``h = z sigma_t / T``.
4. *Merge.* ``tau = U* (sum_t trim(M_t)) V*^T``.

``keep`` selects what is summed: ``"trimmed"`` (the paper's method, released ``ours_v1``),
``"diagonal"`` (``ours_v2``), ``"off_diagonal"`` (released ``ours_v3``: the *trimmed*
off-diagonal, although its log message says "no prune"), ``"full"`` (diagonal plus every
off-diagonal entry, the ablation as the paper describes it; equal to
``U* U*^T (sum_t Delta_t) V* V*^T``, i.e. task arithmetic on layers whose shared basis is square)
and ``"released_full"`` (what the released ``ours_v4`` computes: the diagonal plus a constant 1
in every entry, a bug that explains the paper's "full matrix collapse" to about 7.6 %).

Where this follows the released code rather than the paper: see
``METHODS['score'].code_notes`` and the book's Paper versus released code page.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergelib.methods.common import (
    Choice,
    Flag,
    Fraction,
    Number,
    StateDict,
    concatenated_singular_vectors,
    is_matrix,
    mean_over_tasks,
    merge_per_key,
    rank_per_task,
    shared_basis,
)
from mergelib.methods.factors import all_zero, fold_value, projection, shared_basis_of
from mergelib.methods.registry import CodeNote, register

KEEP_CHOICES = ("trimmed", "diagonal", "off_diagonal", "full", "released_full")
TRIM_STATISTICS = ("released", "off_diagonal")


def score_basis(
    stack: torch.Tensor, key: str = "matrix", *, rank_fraction: float = 1.0, complete_basis: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared bases ``U*`` and ``V*^T`` of the ``[T, m, n]`` task matrices.

    Each task contributes ``k = max(1, int(rank_fraction * r / T))`` singular directions (released:
    ``int(r / T)``); with ``complete_basis`` the basis is completed to ``r`` directions as the
    released zero padding does (``U*`` is ``m x r``), otherwise it spans the ``T k`` directions only.
    """
    tasks, rank = stack.shape[0], min(stack.shape[1:])
    k = rank_per_task(key, rank, tasks)
    k = max(1, int(rank_fraction * rank / tasks)) if rank_fraction != 1.0 else k
    return shared_basis_of(stack, k, rank if complete_basis else tasks * k)  # once per fold (factors)


def basis_from_svd(decomposition, k: int, *, complete: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared bases from the tasks' batched SVD ``(U [T, m, r], S [T, r], Vh [T, r, n])``."""
    u, s, vh = decomposition
    left, _, right = concatenated_singular_vectors(u, s, vh, k)
    return shared_basis(left, right, min(u.shape[1], vh.shape[2]) if complete else left.shape[1])


def trim_statistics(off_diagonal: torch.Tensor, statistics: str = "released") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task mean and unbiased standard deviation (``[T, 1, 1]``) of the diagonal-zeroed
    ``[T, r, r]`` matrices: over all r^2 entries, the r zeros included (``"released"``), or over
    the r^2 - r off-diagonal entries only (``"off_diagonal"``, the paper's text)."""
    if statistics == "released":
        return (off_diagonal.mean(dim=(-2, -1), keepdim=True),
                off_diagonal.std(dim=(-2, -1), keepdim=True, correction=1))
    rank = off_diagonal.shape[-1]
    entries = off_diagonal.flatten(-2)[..., ~torch.eye(rank, dtype=torch.bool, device=off_diagonal.device).flatten()]
    return entries.mean(dim=-1)[..., None, None], entries.std(dim=-1, correction=1)[..., None, None]


def off_diagonal_part(projected: torch.Tensor) -> torch.Tensor:
    """The ``[..., r, r]`` matrices with their diagonal zeroed (a copy)."""
    off_diagonal = projected.clone()
    torch.diagonal(off_diagonal, dim1=-2, dim2=-1).zero_()
    return off_diagonal


def task_moments(projected: torch.Tensor, statistics: str = "released") -> tuple[torch.Tensor, torch.Tensor]:
    """The trimming statistics (:func:`trim_statistics`) of the projected ``[T, r, r]`` matrices."""
    return trim_statistics(off_diagonal_part(projected), statistics)


def trim_mask(off_diagonal: torch.Tensor, z: float, divisor: float, statistics: str = "released") -> torch.Tensor:
    """Which entries of the diagonal-zeroed ``[T, r, r]`` matrices lie within ``z sigma / divisor``
    of their mean (statistics per task, see :func:`trim_statistics`)."""
    mean, std = trim_statistics(off_diagonal, statistics)
    return (off_diagonal - mean).abs() <= z * std / divisor


def score_core(
    projected: torch.Tensor, keep: str, z: float, divide_by_tasks: bool, statistics: str = "released",
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``sum_t`` of what ``keep`` retains of each projected task matrix ``[T, r, r]``.

    ``moments``: the tasks' trimming statistics ``(mean, std)`` (``[T, 1, 1]``, as
    :func:`trim_statistics` gives them for ``statistics``), if already computed."""
    tasks, rank, _ = projected.shape
    diagonal_sum = torch.diagonal(projected, dim1=-2, dim2=-1).sum(dim=0)
    if keep == "diagonal":
        return torch.diag(diagonal_sum)
    if keep == "full":
        return projected.sum(dim=0)
    if keep == "released_full":
        return torch.diag(diagonal_sum) + tasks  # ours_v4 adds the flag (True == 1) to every entry
    mean, std = moments if moments is not None else task_moments(projected, statistics)
    threshold = z * std / (tasks if divide_by_tasks else 1)
    total = torch.zeros_like(projected[0])
    for t in range(tasks):  # task by task: r x r temporaries, not T r^2 ones
        off_diagonal = off_diagonal_part(projected[t])
        # the test of trim_mask, entry for entry: |O - mu| <= z sigma / divisor
        total += off_diagonal.mul_((off_diagonal - mean[t]).abs_() <= threshold[t])
    if keep == "trimmed":
        torch.diagonal(total).add_(diagonal_sum)
    return total


def score_matrix(
    key: str, stack: torch.Tensor, *, keep: str = "trimmed", z: float = 1.96, divide_by_tasks: bool = True,
    trim_statistics: str = "released", rank_fraction: float = 1.0, complete_basis: bool = True,
) -> torch.Tensor:
    """SCORE of one matrix: ``stack`` is ``[T, m, n]``; returns ``[m, n]``."""
    if all_zero(stack):
        return torch.zeros_like(stack[0])
    basis = score_basis(stack, key, rank_fraction=rank_fraction, complete_basis=complete_basis)
    return score_from_basis(stack, *basis, keep=keep, z=z, divide_by_tasks=divide_by_tasks, trim_statistics=trim_statistics,
                            basis_id=(float(rank_fraction), bool(complete_basis)))


def score_from_basis(
    stack: torch.Tensor, u_star: torch.Tensor, vh_star: torch.Tensor, *, keep: str = "trimmed", z: float = 1.96,
    divide_by_tasks: bool = True, trim_statistics: str = "released", basis_id=None,
) -> torch.Tensor:
    """Steps 2-4 of SCORE in a given shared basis: project, keep what ``keep`` says, sum, map back.

    ``basis_id`` (hashable) names the basis among those of the same stack, so that a
    :class:`mergelib.methods.factors.FactorCache` computes the projections and the trimming
    statistics once for every variant that shares them; ``None`` never caches."""
    projected = projection(stack, u_star, vh_star, basis_id)
    tasks = projected.shape[0]
    if keep in ("diagonal", "released_full"):  # U* diag(d) V*^T: a column scaling, not an r x r product
        merged = (u_star * torch.diagonal(projected, dim1=-2, dim2=-1).sum(dim=0)) @ vh_star
        if keep == "released_full":  # + U* (T 1 1^T) V*^T, a rank-one term
            merged.addr_(u_star.sum(dim=1), vh_star.sum(dim=0), alpha=tasks)
        return merged
    moments = None
    if keep in ("trimmed", "off_diagonal"):
        moments = fold_value(stack, "trim statistics", None if basis_id is None else (basis_id, trim_statistics),
                             lambda: task_moments(projected, trim_statistics))
    core = score_core(projected, keep, z, divide_by_tasks, trim_statistics, moments=moments)
    # the small factors first: r^2 min(m, n) + m r n multiply-adds instead of r^2 max(m, n) + m r n
    return u_star @ (core @ vh_star) if u_star.shape[0] > vh_star.shape[1] else (u_star @ core) @ vh_star


@register(
    "score",
    paper="Bridging Domains through Subspace-Aware Model Merging (Chaves et al., CVPR 2026)",
    arxiv="2603.05768",
    equation=r"\tau = U^\ast \Big(\sum_{t=1}^{T} \operatorname{trim}\big(U^{\ast\top}\Delta_t V^\ast\big)\Big)"
             r" V^{\ast\top}",
    code_notes=(
        CodeNote("trimming threshold",
                 paper="keep an off-diagonal entry when |x − μ| < zσ, z = 1.96 (notes)",
                 released="zσ/T on PACS, DomainNet, ImageNet-R, OfficeHome, NICO++ and TerraIncognita, zσ on "
                          "FedISIC and RetinaDomains, chosen by the dataset's name",
                 switch="divide_by_tasks=False",
                 mergelib="`divide_by_tasks=True` by default (the released natural-image setting); `z` sets z"),
        CodeNote("statistics of the trim",
                 paper="the mean and spread of the off-diagonal entries",
                 released="mean and unbiased std over all r² entries of the r × r matrix with its diagonal zeroed "
                          "(its r zeros included)",
                 switch="trim_statistics='off_diagonal'"),
        CodeNote("comparison", paper="strict <", released="≤",
                 mergelib="≤ (immaterial for continuous values)"),
        CodeNote("rank per expert",
                 paper="the top 1/D of each expert's directions",
                 released="int(r / T), T = D − 1 the number of merged models under leave-one-out; the r − T k "
                          "leftover columns are zero-padded",
                 switch="rank_fraction=0.75",
                 mergelib="`rank_fraction` (ours, for the sensitivity study) scales it, k = max(1, int(rank_fraction r / T)); "
                          "`rank_fraction = T / (T + 1)` gives the paper's 1/D (0.75 for T = 3)"),
        CodeNote("the padded columns",
                 paper="not discussed",
                 released="the SVD routine completes the polar factor with arbitrary orthonormal directions, which "
                          "enter M_t and so the result",
                 mergelib="completed deterministically by column-pivoted Gram–Schmidt over the standard basis "
                          "(`orthonormal_completion`), so the result is a function of the inputs; "
                          "`complete_basis=False` (ours) keeps only the T k concatenated directions"),
        CodeNote("orientation",
                 paper="U*ᵀ Δ V* and U* Σ V*ᵀ",
                 released="the right factor stored as rows (V*ᵀ)",
                 mergelib="the same mathematics"),
        CodeNote("non-matrix parameters",
                 paper="not described",
                 released="averaged (mean) while the trimmed matrices are summed over tasks in the shared basis; "
                          "`text_projection` averaged; `visual.proj` and the positional embedding take the "
                          "matrix path",
                 mergelib="as released (the matrix rule)"),
        CodeNote("the \"full matrix\" ablation",
                 paper="the diagonal plus every off-diagonal entry",
                 released="`ours_v4` adds the boolean flag (1) to every entry, diag(M_t) + 1 1ᵀ: a bug that "
                          "explains the paper's \"full matrix collapse\" to about 7.6 %",
                 switch="keep='full'",
                 mergelib="`keep='released_full'` computes the released version; `keep='full'` equals "
                          "U* U*ᵀ (Σ_t Δ_t) V* V*ᵀ, i.e. task arithmetic where the shared basis is square"),
        CodeNote("the \"off-diagonal\" ablation",
                 paper="the off-diagonal entries",
                 released="`ours_v3` keeps the *trimmed* off-diagonal (its log message says \"no prune\")",
                 mergelib="`keep='off_diagonal'` (released)"),
        CodeNote("signs of singular vectors",
                 paper="not discussed",
                 released="whatever the linear-algebra library returns; the trimming statistics depend on them",
                 mergelib="deterministic: each left singular vector's largest-magnitude entry positive "
                          "(`methods.common.svd`); the performance chapter measures the effect"),
        CodeNote("merge coefficient",
                 paper="ε = 1, fixed",
                 released="1.0 in the final script; a deleted script swept 0.1–1.5",
                 mergelib="the protocol's global coefficient λ, 1 by default"),
    ),
    checks=dict(keep=Choice(KEEP_CHOICES), z=Number(minimum=0, strict=True), divide_by_tasks=Flag(),
                trim_statistics=Choice(TRIM_STATISTICS), rank_fraction=Fraction(zero_ok=False, one_ok=True),
                complete_basis=Flag()),
)
def score(
    task_vectors: Sequence[StateDict],
    *,
    device: torch.device | None = None,
    keep: str = "trimmed",
    z: float = 1.96,
    divide_by_tasks: bool = True,
    trim_statistics: str = "released",
    rank_fraction: float = 1.0,
    complete_basis: bool = True,
) -> StateDict:
    """SCORE: project each task matrix into a shared basis, trim off-diagonal outliers, sum.

    Matrix rule: 2-D tensors whose name does not contain ``text_projection`` take the matrix
    path; every other tensor is averaged over the tasks.
    """
    options = dict(keep=keep, z=z, divide_by_tasks=divide_by_tasks, trim_statistics=trim_statistics,
                   rank_fraction=rank_fraction, complete_basis=complete_basis)

    def merge_key(key: str, stack: torch.Tensor) -> torch.Tensor:
        if not is_matrix(key, stack[0]):
            return mean_over_tasks(key, stack)
        return score_matrix(key, stack, **options)

    return merge_per_key(task_vectors, merge_key, device=device)
