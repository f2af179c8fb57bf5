"""PCB-merging: Parameter Competition Balancing for Model Merging (Du et al., NeurIPS 2024,
arXiv 2410.02396).

Implemented exactly as SCORE's released code, itself a copy of the vision code of the PCB authors
(``pcb_ES.py``). With ``X`` the task vectors as ``T`` rows of ``N`` entries, ``mm`` the per-row
min-max normalisation and all order statistics per row (``v_(p)`` = value at sorted position ``p``):

1. clamp the magnitudes, ``A = clamp(|X|, |X|_(int(0.01 N)), |X|_(int(0.99 N) - 1))``, and keep
   ``Xc = sign(X) ⊙ A``, the values that get combined;
2. normalised signed values ``Z = sign(X) ⊙ mm(A)``;
3. intra-balancing ``I = exp(T · mm(A)²)``;
4. inter-balancing ``B_i = sum_j tanh(Z_i ⊙ Z_j)`` (``j`` includes ``i``);
5. scores ``S = I ⊙ B``, clamped from below at ``S_(int((1 - ratio) N))`` and min-max normalised
   into weights ``W`` (zero outside each row's top ``ratio`` fraction);
6. ``tau = sum_i lambda Xc_i ⊙ W_i / max(sum_i W_i, 1e-12)`` with ``lambda = 1``.

The global coefficient is applied with the merged vector (SCORE uses 1.0).

Parameters: ``ratio`` in (0, 1], default 0.05, the fraction of each task's entries that receive a
weight; ``scope``: ``"global"`` (default, as released) takes every order statistic and min-max
over the task's whole vector, all tensors flattened together, zero text-side entries included (so
the weighted fraction of the visual weights differs from the nominal 5 %); ``"per_tensor"`` takes
them within each tensor. An entry is weighted only if its score is strictly above the threshold,
so a tensor of fewer than ``1 / ratio`` entries merges to zero in the per-tensor scope (its
threshold is its maximum), as does any all-zero tensor.

Where this follows the released code rather than the paper: see
``METHODS['pcb'].code_notes`` and the book's Paper versus released code page.

Memory (global scope): the statistics are per task; pass 1 holds one task's flattened ``|X|`` to
get its clamping bounds; pass 2 computes one task's scores over all tensors (each score needs all
tasks at that coordinate, so every tensor's stack is built once per task) to get its threshold
and maximum; pass 3 merges one tensor at a time. No ``T x N`` matrix is built.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from mergelib.methods.common import Choice, Fraction, StateDict, compute_dtype, merge_per_key, resolve_device, stacked
from mergelib.methods.registry import CodeNote, register
from mergelib.methods.ties import SCOPES

OUTLIER_FRACTION = 0.01  # magnitudes are clamped at the 1 % and 99 % order statistics
WEIGHT_FLOOR = 1e-12


def order_statistic(values: torch.Tensor, position: int) -> torch.Tensor:
    """The value at sorted (ascending) ``position`` along the last dimension, kept as a dim."""
    return values.kthvalue(position + 1, dim=-1, keepdim=True).values


def magnitude_bounds(magnitudes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The released clamping bounds, positions ``int(0.01 n)`` and ``int(0.99 n - 1)``."""
    n = magnitudes.shape[-1]
    low = order_statistic(magnitudes, int(n * OUTLIER_FRACTION))
    return low, order_statistic(magnitudes, max(0, int(n * (1 - OUTLIER_FRACTION) - 1)))


def min_max(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``(values - low) / (high - low)``, with 0 where ``high == low`` (NaN in the released code)."""
    span = high - low
    return torch.where(span > 0, (values - low) / span, 0.0)


def competition_scores(rows: torch.Tensor, low: torch.Tensor, high: torch.Tensor, tasks: Iterable[int]) -> torch.Tensor:
    """Scores ``S_i = exp(T mm(A_i)^2) * sum_j tanh(Z_i Z_j)`` of the given tasks: ``[len(tasks), n]``.

    ``rows`` is ``[T, n]`` (one tensor of every task, or everything); ``low``/``high`` ``[T, 1]``.
    """
    normalised = min_max(rows.abs().clamp(low, high), low, high)
    signed = torch.sign(rows) * normalised
    count = rows.shape[0]
    return torch.stack([
        torch.exp(count * normalised[i] ** 2) * torch.tanh(signed[i] * signed).sum(dim=0) for i in tasks
    ])


def score_bounds(scores: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold at position ``int((1 - ratio) n)`` and maximum, per row."""
    n = scores.shape[-1]
    return order_statistic(scores, int(n * (1 - ratio))), scores.max(dim=-1, keepdim=True).values


def weighted_merge(rows, low, high, scores, threshold, top) -> torch.Tensor:
    """``sum_i Xc_i W_i / max(sum_i W_i, 1e-12)`` with ``W = mm(max(S, threshold))``."""
    weights = min_max(torch.maximum(scores, threshold), threshold, top)
    clamped = torch.sign(rows) * rows.abs().clamp(low, high)
    return (clamped * weights).sum(dim=0) / weights.sum(dim=0).clamp_min(WEIGHT_FLOOR)


def pcb_rows(rows: torch.Tensor, ratio: float) -> torch.Tensor:
    """PCB of ``[T, n]`` rows, every statistic taken within them (the per-tensor scope)."""
    low, high = magnitude_bounds(rows.abs())
    scores = competition_scores(rows, low, high, range(rows.shape[0]))
    return weighted_merge(rows, low, high, scores, *score_bounds(scores, ratio))


def pcb_global(task_vectors: Sequence[StateDict], ratio: float, device: torch.device) -> StateDict:
    keys, count = list(task_vectors[0]), len(task_vectors)

    def rows_of(key: str) -> torch.Tensor:
        return stacked(task_vectors, key, device=device).reshape(count, -1)

    bounds = []  # pass 1: each task's clamping bounds over its flattened magnitudes
    for vector in task_vectors:
        flat = torch.cat([vector[k].to(device, compute_dtype(vector[k].dtype)).abs().reshape(-1) for k in keys])
        bounds.append(magnitude_bounds(flat))
        del flat
    low = torch.stack([b[0] for b in bounds])
    high = torch.stack([b[1] for b in bounds])

    thresholds, tops = [], []  # pass 2: each task's score threshold and maximum over all keys
    for task in range(count):
        flat = torch.cat([competition_scores(rows_of(key), low, high, [task]).reshape(-1) for key in keys])
        threshold, top = score_bounds(flat, ratio)
        thresholds.append(threshold)
        tops.append(top)
        del flat
    threshold, top = torch.stack(thresholds), torch.stack(tops)

    def merge_key(key: str, stack: torch.Tensor) -> torch.Tensor:  # pass 3
        rows = stack.reshape(count, -1)
        scores = competition_scores(rows, low, high, range(count))
        return weighted_merge(rows, low, high, scores, threshold, top).reshape(stack.shape[1:])

    return merge_per_key(task_vectors, merge_key, device=device)


@register(
    "pcb",
    paper="Parameter Competition Balancing for Model Merging (Du et al., NeurIPS 2024)",
    arxiv="2410.02396",
    equation=r"\tau = \frac{\sum_i \hat\tau_i \odot W_i}{\max(\sum_i W_i,\,10^{-12})},\ "
             r"W_i = \operatorname{mm}\big(\max(S_i, S_{i,(\lfloor(1-r)N\rfloor)})\big),\ "
             r"S_i = e^{T\,\operatorname{mm}(A_i)^2} \odot \sum_j \tanh(Z_i \odot Z_j)",
    code_notes=(
        CodeNote("balancing functions",
                 paper="intra- and inter-balancing as the text describes them",
                 released="the PCB authors' vision code (`pcb_ES.py`) as copied by SCORE: magnitudes clamped at "
                          "the 1 % / 99 % order statistics, intra-balancing exp(T mm(A)²), inter-balancing "
                          "Σ_j tanh(Z_i Z_j), and the sorted positions of the order statistics; these concrete "
                          "choices are the code's"),
        CodeNote("scope of the ratio",
                 paper="5 % of each model's parameters (SCORE's paper)",
                 released="every order statistic and min-max over the task's whole vector, all keys flattened "
                          "together, zero text-side entries included, so the weighted fraction of the visual "
                          "weights differs from the nominal 5 %",
                 mergelib="`scope='global'` (default) or `scope='per_tensor'`"),
        CodeNote("coefficients",
                 paper="a per-task λ in [0.8, 1.3] searched by an evolutionary strategy (the PCB authors)",
                 released="λ = 1 for every task (SCORE)"),
        CodeNote("0 / 0 in a min-max normalisation",
                 paper="not discussed",
                 released="NaN, for a row whose clamped magnitudes or clamped scores are all equal (such as an "
                          "all-zero task vector)",
                 mergelib="the normalised value is 0"),
    ),
    checks=dict(ratio=Fraction(zero_ok=False, one_ok=True), scope=Choice(SCOPES)),
)
def pcb(
    task_vectors: Sequence[StateDict],
    *,
    device: torch.device | None = None,
    ratio: float = 0.05,
    scope: str = "global",
) -> StateDict:
    """PCB-merging: weight each task's entries by intra- and inter-task competition scores.

    ``ratio`` in (0, 1] is the fraction of each task's entries that get a weight; ``scope`` is
    ``"global"`` (statistics over the whole task vector, as released) or ``"per_tensor"``.
    """
    device = resolve_device(device)
    if scope == "per_tensor":
        count = len(task_vectors)
        return merge_per_key(
            task_vectors, lambda key, stack: pcb_rows(stack.reshape(count, -1), ratio).reshape(stack.shape[1:]),
            device=device,
        )
    return pcb_global(task_vectors, ratio, device)
