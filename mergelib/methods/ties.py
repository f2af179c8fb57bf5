"""TIES-Merging: Resolving Interference When Merging Models (Yadav et al., NeurIPS 2023, arXiv 2306.01708).

Three steps on the task vectors ``tau_t``:

1. **Trim**: each task keeps its largest-magnitude entries, ``tau~_t = tau_t * [|tau_t| >= q_t]``,
   where ``q_t`` is the k-th smallest ``|tau_t|`` with ``k = N - int(density * N)``.
2. **Elect** a sign per coordinate from the mass of the trimmed values, ``s = sign(sum_t tau~_t)``.
3. **Disjoint mean** of the entries that agree with it,
   ``tau = sum_t tau~_t [sign(tau~_t) = s] / max(1, #{t : sign(tau~_t) = s})``.

The model is ``theta_0 + lambda * tau``; the global coefficient lambda is applied with the merged
vector (SCORE's released code uses 1.0).

Parameters: ``density`` (default 0.2, "topk 20" in the released code) is the fraction of entries
each task keeps; ``scope`` says over what the threshold ``q_t`` is taken:

* ``"global"`` (default, as released): over all entries of the task vector flattened together
  (the released code flattens in sorted key order; the order-statistic does not depend on it), so
  ``N`` counts every entry given, including CLIP's all-zero text-side parameters. The effective
  kept fraction therefore differs from tensor to tensor: tensors with large updates keep more
  than ``density``, all-zero tensors keep nothing, and the visual weights as a whole keep more
  than ``density`` when zero text-side entries are part of ``N``.
* ``"per_tensor"``: the same rule within each tensor (MergeKit's granularity); the majority sign
  below is then also taken per tensor.

Where this follows the released code rather than the paper: see
``METHODS['ties'].code_notes`` and the book's Paper versus released code page.

The election itself is the paper's (Algorithm 1): the sign of the total mass of the trimmed values,
with no per-model weights in it (MergeKit multiplies by its model weights first, issue #474).

Memory: the global thresholds are computed one task at a time (one flattened task vector), then
the majority sign and the merge are computed one tensor name at a time.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from mergelib.methods.common import Choice, Fraction, StateDict, compute_dtype, merge_per_key, resolve_device, stacked
from mergelib.methods.registry import CodeNote, register

SCOPES = ("global", "per_tensor")

# (task index, key, tensor on the compute device) -> tensor: a transform applied to every task
# tensor before trimming (DARE's random drop uses it for DARE + TIES).
Preprocess = Callable[[int, str, torch.Tensor], torch.Tensor]


def magnitude_threshold(magnitudes: torch.Tensor, density: float) -> torch.Tensor:
    """The k-th smallest value along the last dimension, ``k = n - int(density * n)`` (kept dim).

    ``k = 0`` (density 1) gives a zero threshold, which keeps every entry.
    """
    n = magnitudes.shape[-1]
    k = n - int(n * density)
    if k == 0:
        return magnitudes.new_zeros((*magnitudes.shape[:-1], 1))
    return magnitudes.kthvalue(k, dim=-1, keepdim=True).values


def task_tensor(vector: StateDict, index: int, key: str, device: torch.device, preprocess: Preprocess | None):
    """One task's tensor on the compute device (half widened to float32), preprocessed."""
    tensor = vector[key].to(device=device, dtype=compute_dtype(vector[key].dtype))
    return preprocess(index, key, tensor) if preprocess else tensor


def global_thresholds(task_vectors, density: float, device: torch.device,
                      preprocess: Preprocess | None) -> torch.Tensor:
    """Per task, the threshold over its whole flattened task vector: a ``[T, 1]`` tensor."""
    keys = sorted(task_vectors[0])
    total = sum(task_vectors[0][key].numel() for key in keys)
    if total - int(total * density) == 0:
        return torch.zeros(len(task_vectors), 1, device=device)
    thresholds = []
    for index, vector in enumerate(task_vectors):  # one flattened task vector at a time
        flat = torch.cat([task_tensor(vector, index, key, device, preprocess).abs().reshape(-1) for key in keys])
        thresholds.append(magnitude_threshold(flat, density))
        del flat
    return torch.stack(thresholds)


def trimmed_rows(key: str, stack: torch.Tensor, thresholds: torch.Tensor | None, density: float,
                 preprocess: Preprocess | None) -> torch.Tensor:
    """The key's stack as ``[T, n]`` rows with each task's small entries set to zero.

    ``thresholds`` is ``[T, 1]`` (global scope) or ``None`` (per tensor: taken within the rows).
    """
    if preprocess:
        for index in range(stack.shape[0]):
            stack[index] = preprocess(index, key, stack[index])
    rows = stack.reshape(stack.shape[0], -1)
    magnitudes = rows.abs()
    if thresholds is None:
        thresholds = magnitude_threshold(magnitudes, density)
    return torch.where(magnitudes >= thresholds, rows, 0.0)


def net_sign_count(signs: torch.Tensor) -> int:
    """(number of +1) - (number of -1), counted exactly."""
    return int((signs > 0).sum()) - int((signs < 0).sum())


def sign_of(count: int) -> int:
    return (count > 0) - (count < 0)


def disjoint_mean(trimmed: torch.Tensor, majority: int) -> torch.Tensor:
    """Elect signs by mass (zeros take ``majority``) and average the agreeing trimmed entries."""
    signs = torch.sign(trimmed.sum(dim=0))
    signs = torch.where(signs == 0, float(majority), signs)
    agree = torch.where(signs > 0, trimmed > 0, trimmed < 0)
    count = agree.sum(dim=0).clamp_min(1).to(trimmed.dtype)
    return (trimmed * agree).sum(dim=0) / count


def ties_merge(task_vectors: Sequence[StateDict], *, device: torch.device | None, density: float, scope: str,
               preprocess: Preprocess | None = None) -> StateDict:
    """TIES on ``task_vectors`` (each task tensor first passed through ``preprocess``, if given);
    ``density`` and ``scope`` as checked by the registered methods that call it."""
    device = resolve_device(device)

    if scope == "per_tensor":
        def merge_key(key: str, stack: torch.Tensor) -> torch.Tensor:
            trimmed = trimmed_rows(key, stack, None, density, preprocess)
            majority = sign_of(net_sign_count(torch.sign(trimmed.sum(dim=0))))
            return disjoint_mean(trimmed, majority).reshape(stack.shape[1:])

        return merge_per_key(task_vectors, merge_key, device=device)

    thresholds = global_thresholds(task_vectors, density, device, preprocess)
    balance = 0  # first pass over the keys: the majority of the elected signs over all coordinates
    for key in task_vectors[0]:
        trimmed = trimmed_rows(key, stacked(task_vectors, key, device=device), thresholds, density, preprocess)
        balance += net_sign_count(torch.sign(trimmed.sum(dim=0)))
    majority = sign_of(balance)
    return merge_per_key(
        task_vectors,
        lambda key, stack: disjoint_mean(trimmed_rows(key, stack, thresholds, density, preprocess), majority)
        .reshape(stack.shape[1:]),
        device=device,
    )


@register(
    "ties",
    paper="TIES-Merging: Resolving Interference When Merging Models (Yadav et al., NeurIPS 2023)",
    arxiv="2306.01708",
    equation=r"\tau = \frac{\sum_t \tilde\tau_t\,[\operatorname{sign}\tilde\tau_t = s]}"
             r"{\max(1, \sum_t [\operatorname{sign}\tilde\tau_t = s])},\ "
             r"s = \operatorname{sign}\textstyle\sum_t \tilde\tau_t,\ "
             r"\tilde\tau_t = \tau_t \odot [|\tau_t| \ge q_t]",
    code_notes=(
        CodeNote("scope of the density",
                 paper="the top 20 % of each model's parameters (SCORE's paper; TIES: of each task vector)",
                 released="one magnitude threshold per task over all keys flattened together (in sorted key "
                          "order), CLIP's all-zero text-side parameters included, so the kept fraction differs "
                          "from tensor to tensor and from the nominal density",
                 mergelib="`scope='global'` (default) or `scope='per_tensor'` (MergeKit's granularity, the "
                          "majority sign then per tensor too)"),
        CodeNote("how many entries are kept",
                 paper="the top density fraction",
                 released="|value| ≥ the k-th smallest, k = N − int(density N): int(density N) + 1 entries (plus "
                          "ties at the threshold), one more than nominal; density = 1 calls kthvalue(0) and fails",
                 mergelib="as released; density = 1 keeps everything"),
        CodeNote("coordinates whose trimmed values sum to 0",
                 paper="the sign of the total mass (Algorithm 1)",
                 released="the majority sign, the sign of the sum of all elected signs (over all coordinates for "
                          "the global scope); if that is 0 too, the negative entries are kept; the signs are "
                          "summed in float32",
                 mergelib="as released, with the majority counted exactly (integers)"),
        CodeNote("settings",
                 paper="the TIES paper: the top 20 % kept, λ chosen on validation data",
                 released="density 0.2 (\"topk 20\") and coefficient 1.0, SCORE's released settings"),
    ),
    checks=dict(density=Fraction(zero_ok=False, one_ok=True), scope=Choice(SCOPES)),
)
def ties(
    task_vectors: Sequence[StateDict],
    *,
    device: torch.device | None = None,
    density: float = 0.2,
    scope: str = "global",
) -> StateDict:
    """TIES-Merging: trim each task to its top entries, elect signs by mass, average the agreeing ones.

    ``density`` in (0, 1] is the fraction each task keeps; ``scope`` is ``"global"`` (threshold
    over the whole task vector, as released) or ``"per_tensor"`` (within each tensor).
    """
    return ties_merge(task_vectors, device=device, density=density, scope=scope)
