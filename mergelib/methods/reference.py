"""A straightforward reference implementation of SCORE (every variant) and TSV-M, for benchmarks and tests.

SCORE: Chaves et al., CVPR 2026, arXiv 2603.05768; TSV-M: Gargiulo et al., CVPR 2025, arXiv
2412.00081. Written the obvious way, as the released code reads: a Python loop over tensors and tasks,
``torch.linalg.svd`` with its default full matrices for each task matrix, polar factors by full
SVDs, projection and trimming task by task, in the inputs' dtype. Its only departures from the
released code are the two documented rules that make the methods functions of their inputs
(:mod:`mergelib.methods.common`): the sign rule of the singular vectors and the deterministic
completion of the shared basis when T does not divide r. It is what
``benchmarks/merge_benchmark.py`` and ``benchmarks/grid_benchmark.py`` time mergelib against and
what ``tests/methods/test_svd.py`` checks mergelib's parity with (float64 to round-off, float32 to
1e-2 relative), in the inputs' dtype; it shares none of mergelib's factor code (truncated SVDs,
Gram routes, caching) but the completion, so agreement is evidence.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from mergelib.methods.common import fix_signs, is_matrix, orthonormal_completion
from mergelib.methods.registry import MethodSpec, parse_method_spec


def _full_svd_signed(delta: torch.Tensor):
    u, s, vh = torch.linalg.svd(delta)  # full matrices: the default
    r = s.shape[0]
    return (*fix_signs(u[:, :r], vh[:r]), s)


def _polar_full(matrix: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(matrix)
    r = min(matrix.shape)
    return p[:, :r] @ qh[:r]


def _concatenation(deltas: Sequence[torch.Tensor], k: int):
    m, n = deltas[0].shape
    tasks = len(deltas)
    ucat = torch.zeros(m, tasks * k, dtype=deltas[0].dtype)
    vtcat = torch.zeros(tasks * k, n, dtype=deltas[0].dtype)
    scat = []
    for i, delta in enumerate(deltas):
        u, vh, s = _full_svd_signed(delta)
        ucat[:, i * k:(i + 1) * k] = u[:, :k]
        vtcat[i * k:(i + 1) * k] = vh[:k]
        scat.append(s[:k])
    return ucat, torch.cat(scat), vtcat


def reference_tsv_m_matrix(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TSV-M of one matrix from the list of the tasks' matrices."""
    r, tasks = min(deltas[0].shape), len(deltas)
    ucat, scat, vtcat = _concatenation(deltas, int(r / tasks))
    return _polar_full(ucat) @ torch.diag(scat) @ _polar_full(vtcat)


def reference_score_matrix(
    deltas: Sequence[torch.Tensor], *, keep: str = "trimmed", z: float = 1.96, divide_by_tasks: bool = True,
    trim_statistics: str = "released", rank_fraction: float = 1.0, complete_basis: bool = True,
) -> torch.Tensor:
    """SCORE of one matrix from the list of the tasks' matrices, every parameter of ``score``."""
    r, tasks = min(deltas[0].shape), len(deltas)
    k = int(r / tasks) if rank_fraction == 1.0 else max(1, int(rank_fraction * r / tasks))
    ucat, _, vtcat = _concatenation(deltas, k)
    u_star, vt_star = _polar_full(ucat), _polar_full(vtcat)
    missing = (r if complete_basis else tasks * k) - u_star.shape[1]
    if missing > 0:  # the documented deterministic completion (see mergelib.methods.common)
        u_star = torch.cat([u_star, orthonormal_completion(u_star, missing)], dim=1)
        vt_star = torch.cat([vt_star, orthonormal_completion(vt_star.T, missing).T], dim=0)
    size = u_star.shape[1]
    total = torch.zeros(size, size, dtype=deltas[0].dtype)
    for delta in deltas:
        projected = u_star.T @ delta @ vt_star.T
        diagonal = torch.diag(torch.diagonal(projected))
        off = projected.clone()
        off.fill_diagonal_(0)
        if keep == "diagonal":
            total += diagonal
            continue
        if keep == "full":
            total += projected
            continue
        if keep == "released_full":
            total += diagonal + 1
            continue
        values = off if trim_statistics == "released" else off[~torch.eye(size, dtype=torch.bool)]
        threshold = z * values.std() / (tasks if divide_by_tasks else 1)
        kept = off * ((off - values.mean()).abs() <= threshold)
        total += kept if keep == "off_diagonal" else diagonal + kept
    return u_star @ total @ vt_star


REFERENCE_RULES: dict[str, Callable[..., torch.Tensor]] = {"score": reference_score_matrix, "tsv_m": reference_tsv_m_matrix}


def reference_merge(method: str | MethodSpec, task_vectors: Sequence[Mapping[str, torch.Tensor]], keys=None) -> dict:
    """Merge with the reference rule of ``method`` (``"score[keep=diagonal]"``, ``"tsv_m"``):
    matrices by the rule, every other tensor averaged."""
    spec = method if isinstance(method, MethodSpec) else parse_method_spec(method)
    rule = REFERENCE_RULES[spec.name]
    out = {}
    for key in keys or task_vectors[0]:
        deltas = [tv[key] for tv in task_vectors]
        out[key] = rule(deltas, **spec.params) if is_matrix(key, deltas[0]) else sum(deltas) / len(deltas)
    return out
