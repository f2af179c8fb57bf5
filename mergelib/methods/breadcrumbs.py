"""Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (Davari & Belilovsky,
ECCV 2024, arXiv 2312.06795).

Each task vector is sparsified tensor by tensor (layer by layer, as in the paper) with a mask that
removes both the large outliers and the negligible perturbations, keeping the band between them;
the masked vectors are then summed (task arithmetic)::

    tau = sum_t m_t ⊙ tau_t,   m_t[j] = 1  iff  n - top - keep <= rank(|tau_t[j]|) < n - top,

with ``n`` the tensor's size, ranks counted from 0 in ascending order of magnitude,
``top = int(gamma * n)`` (the largest entries removed) and ``keep = int(density * n)`` (the
entries kept). So exactly ``keep`` entries survive per tensor and task; equal magnitudes are
ranked by position (a later position counts as larger), which makes the band exact and
deterministic. 0-dimensional tensors (``logit_scale``) are left unmasked, as in the authors' code.
The global coefficient lambda is applied with the merged vector.

Parameters (MergeKit's names): ``density`` in (0, 1], the fraction kept per tensor, default 0.15;
``gamma`` in [0, 1), the fraction of largest magnitudes removed, default 0.006, with
``density + gamma <= 1``. The defaults are the starting point of the authors' released
hyper-parameter search (kept fraction 0.15 searched in [0.05, 0.20], removed top fraction 0.006 in
[0.001, 0.01]); MergeKit's default gamma is 0.01. ``density = 1, gamma = 0`` is task arithmetic.

Where this follows the released code rather than the paper: see
``METHODS['breadcrumbs'].code_notes`` and the book's Paper versus released code page.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergelib.errors import ParameterValueError
from mergelib.methods.common import Fraction, StateDict, merge_per_key
from mergelib.methods.registry import CodeNote, register


def band_mask(magnitudes: torch.Tensor, keep: int, top: int) -> torch.Tensor:
    """Boolean mask of the entries of ``magnitudes`` (1-D) ranked in ``[n - top - keep, n - top)``."""
    n = magnitudes.numel()
    order = torch.argsort(magnitudes, stable=True)  # ascending; equal values keep their order
    mask = torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
    mask[order[max(0, n - top - keep) : n - top]] = True
    return mask


def breadcrumbs_key(stack: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Mask each task's tensor to its magnitude band and sum over the tasks."""
    if stack.ndim == 1:  # a 0-D parameter per task: nothing to rank
        return stack.sum(dim=0)
    rows = stack.reshape(stack.shape[0], -1)
    n = rows.shape[1]
    keep, top = int(density * n), int(gamma * n)
    for task in range(rows.shape[0]):
        if keep < n and rows[task].any():  # all-zero rows (untouched text weights) stay zero
            rows[task] = torch.where(band_mask(rows[task].abs(), keep, top), rows[task], 0.0)
    return rows.sum(dim=0).reshape(stack.shape[1:])


def check_band(density: float, gamma: float) -> None:
    """The kept band and the removed top must fit in the tensor: ``density + gamma <= 1``."""
    if density + gamma > 1:
        raise ParameterValueError(
            f"density + gamma must be at most 1 (kept plus removed-top fraction), got {density} + {gamma}")


@register(
    "breadcrumbs",
    paper="Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (Davari & Belilovsky, ECCV 2024)",
    arxiv="2312.06795",
    equation=r"\tau = \sum_t m_t \odot \tau_t,\ m_t = [\,n - \gamma' - \kappa \le "
             r"\operatorname{rank}|\tau_t| < n - \gamma'\,],\ \kappa = \lfloor \text{density}\,n \rfloor,\ "
             r"\gamma' = \lfloor \gamma n \rfloor",
    code_notes=(
        CodeNote("ranking of the magnitudes",
                 paper="within each tensor (layer by layer), as MergeKit does",
                 released="the authors' code (and SCORE's copy of it) ranks within each row of a tensor (its last "
                          "dimension)",
                 mergelib="follows the paper's text: within each tensor"),
        CodeNote("0-D tensors",
                 paper="not discussed",
                 released="left unmasked (`logit_scale`)"),
        CodeNote("Breadcrumbs in SCORE's comparison",
                 paper="SCORE's paper compares with Model Breadcrumbs",
                 released="SCORE's `breadcumbs` merge never calls its masking code: a plain sum of the task vectors",
                 mergelib="`breadcrumbs` implements the paper's mask"),
    ),
    checks=dict(density=Fraction(zero_ok=False, one_ok=True), gamma=Fraction(zero_ok=True, one_ok=False)),
    relation=lambda params: check_band(params["density"], params["gamma"]),
)
def breadcrumbs(
    task_vectors: Sequence[StateDict],
    *,
    device: torch.device | None = None,
    density: float = 0.15,
    gamma: float = 0.006,
) -> StateDict:
    """Model Breadcrumbs: per tensor, drop the largest and the smallest magnitudes, then sum.

    ``density`` in (0, 1] is the fraction kept per tensor, ``gamma`` in [0, 1) the fraction of
    largest magnitudes removed (``density + gamma <= 1``).
    """
    return merge_per_key(task_vectors, lambda key, stack: breadcrumbs_key(stack, density, gamma), device=device)
