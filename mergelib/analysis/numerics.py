"""How stable a merge is as a function of its inputs: round-off, precision and sign conventions.

SCORE trims entries of each task matrix expressed in a basis of singular vectors. Singular
vectors whose singular values are close are individually ill-determined (any rotation among
them is almost as good), so a change of the input at the level of float32 round-off can rotate
them noticeably, and an entry-wise rule applied in that basis then changes. Methods whose result
depends only on subspaces and their singular values (TSV-M, Iso) are far less affected. These
functions measure it on given task vectors; the book's performance page shows the numbers.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from mergelib.methods import merge, parse_method_spec
from mergelib.methods.common import rank_per_task, svd
from mergelib.methods.score import basis_from_svd, score_from_basis


def relative_change(a: Mapping[str, torch.Tensor] | torch.Tensor, b: Mapping[str, torch.Tensor] | torch.Tensor) -> float:
    """``||a - b|| / ||b||`` over all tensors (Frobenius norm, computed in float64)."""
    if isinstance(a, torch.Tensor):
        a, b = {"x": a}, {"x": b}
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return (num / den) ** 0.5 if den else float("nan")


def perturbation_sensitivity(
    method: str, task_vectors: Sequence[Mapping[str, torch.Tensor]], *, relative: float = 1e-7, seed: int = 0
) -> float:
    """Relative change of ``method``'s result when every input entry is multiplied by
    ``1 + relative * N(0, 1)`` (``relative = 1e-7``: about float32's round-off)."""
    spec = parse_method_spec(method)
    generator = torch.Generator().manual_seed(seed)
    perturbed = [{k: v * (1 + relative * torch.randn(v.shape, generator=generator, dtype=v.dtype)) for k, v in tv.items()}
                 for tv in task_vectors]
    return relative_change(merge(spec.name, perturbed, device="cpu", **spec.params),
                           merge(spec.name, task_vectors, device="cpu", **spec.params))


def precision_gap(method: str, task_vectors: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Relative difference between ``method``'s result computed in float32 and in float64."""
    spec = parse_method_spec(method)
    single = [{k: v.float() for k, v in tv.items()} for tv in task_vectors]
    double = [{k: v.double() for k, v in tv.items()} for tv in task_vectors]
    return relative_change(merge(spec.name, single, device="cpu", **spec.params),
                           merge(spec.name, double, device="cpu", **spec.params))


def flipped_signs(decomposition, generator: torch.Generator):
    """The SVD ``(U, S, Vh)`` with every triplet's sign flipped at random, as another linear-algebra
    library might return it (``(u, s, v)`` and ``(-u, s, -v)`` describe the same matrix)."""
    u, s, vh = decomposition
    signs = (torch.randint(0, 2, s.shape, generator=generator) * 2 - 1).to(u.dtype)
    return u * signs[..., None, :], s, vh * signs[..., :, None]


def sign_convention_effect(stack: torch.Tensor, *, seed: int = 0, **score_params) -> float:
    """Relative change of SCORE's merge of one ``[T, m, n]`` layer when the per-task singular
    vectors come with other signs than mergelib's deterministic rule."""
    k = rank_per_task("layer", min(stack.shape[1:]), stack.shape[0])
    decomposition = svd(stack)
    ours = score_from_basis(stack, *basis_from_svd(decomposition, k), **score_params)
    other = flipped_signs(decomposition, torch.Generator().manual_seed(seed))
    theirs = score_from_basis(stack, *basis_from_svd(other, k), **score_params)
    return relative_change(theirs, ours)
