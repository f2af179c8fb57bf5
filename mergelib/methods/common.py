"""Building blocks shared by the merging methods: the matrix rule, per-key streaming, SVD helpers.

**The matrix rule** (as in the released code of TSV-M, Iso, SCORE and ESM): a tensor takes the
*matrix path* of the SVD-based methods when it is 2-D and its name does not contain
``text_projection``; every other tensor (biases, LayerNorms, the class embedding, the 4-D patch
embedding, ``logit_scale``, ``text_projection``) is averaged over the tasks. For open_clip ViT
image encoders the matrices are, per block, ``attn.in_proj_weight``, ``attn.out_proj.weight``,
``mlp.c_fc.weight`` and ``mlp.c_proj.weight``, plus ``visual.positional_embedding`` and
``visual.proj``.

**Streaming.** :func:`merge_per_key` merges one tensor name at a time: it stacks the T task
tensors of that name on the compute device (float32, or float64 on request), calls the method's
per-key function and moves the result back, so at most one name's stack lives on the device.

**Deterministic signs.** A singular triplet ``(u, s, v)`` can be replaced by ``(-u, s, -v)``
without changing the matrix, and which of the two an SVD routine returns depends on the
linear-algebra library. :func:`svd` fixes the choice: each triplet is flipped so that the
largest-magnitude entry of its left singular vector is positive (the first such entry on ties).
SCORE's trimming statistics depend on these signs, so with this rule its output is a function
of its inputs on every machine.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Callable, Mapping, Sequence

import torch

from ..errors import ParameterValueError

TaskVector = dict[str, torch.Tensor]
EXCLUDED_FROM_MATRIX_PATH = "text_projection"
HALF_DTYPES = (torch.float16, torch.bfloat16)


def is_matrix(key: str, tensor: torch.Tensor) -> bool:
    """Whether ``key`` takes the matrix path: 2-D and not ``text_projection``."""
    return tensor.ndim == 2 and EXCLUDED_FROM_MATRIX_PATH not in key


def check_fraction(name: str, value: float, *, zero_ok: bool, one_ok: bool) -> None:
    """Raise ``ValueError`` unless ``value`` lies in the interval given by the two flags."""
    low, high = ("[" if zero_ok else "("), ("]" if one_ok else ")")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    inside = number and (0 <= value if zero_ok else 0 < value) and (value <= 1 if one_ok else value < 1)
    if not inside:
        raise ParameterValueError(f"{name} must be a number in {low}0, 1{high}, got {value!r}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ParameterValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_number(name: str, value: object, *, minimum: float | None = None, strict: bool = False) -> float:
    """``value`` as a float; raise unless it is a finite number (not a bool) at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ParameterValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ParameterValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return value


def check_flag(name: str, value: object) -> None:
    """Raise unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ParameterValueError(f"{name} must be True or False, got {value!r}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is merged in: half precision is widened to float32."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def stacked(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    key: str,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The T tensors of ``key`` as one ``[T, *shape]`` tensor on ``device`` (half widened to float32)."""
    first = task_vectors[0][key]
    target = dtype or compute_dtype(first.dtype)
    out = torch.empty((len(task_vectors), *first.shape), dtype=target, device=resolve_device(device))
    for index, vector in enumerate(task_vectors):
        out[index].copy_(vector[key])
    return out


def merge_per_key(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    function: Callable[[str, torch.Tensor], torch.Tensor],
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    keys: Sequence[str] | None = None,
) -> TaskVector:
    """Apply ``function(key, stack)`` to each key's ``[T, *shape]`` stack, one key at a time.

    Results come back on the device of the inputs, in the inputs' own dtype.
    """
    device = resolve_device(device)
    out: TaskVector = {}
    for key in keys if keys is not None else task_vectors[0]:
        source = task_vectors[0][key]
        stack = stacked(task_vectors, key, device=device, dtype=dtype)
        out[key] = function(key, stack).to(device=source.device, dtype=source.dtype)
        del stack
    return out


def mean_over_tasks(key: str, stack: torch.Tensor) -> torch.Tensor:
    """The per-key function of the non-matrix path: the arithmetic mean over tasks."""
    return stack.mean(dim=0)


def is_all_zero(stack: torch.Tensor) -> bool:
    """True when every task's tensor is exactly zero (e.g. CLIP's untouched text-side weights).

    The SVD-based methods map such a stack to zero, so they skip its SVDs.
    """
    return not bool(stack.any())


def rank_per_task(key: str, rank: int, tasks: int) -> int:
    """``int(r / T)`` singular directions per task, as in the released TSV-M and SCORE code.

    Raises a clear error when a matrix is too small for the number of tasks (k = 0).
    """
    k = int(rank / tasks)
    if k < 1:
        raise ValueError(
            f"{key!r}: a matrix of rank at most {rank} cannot give each of {tasks} tasks a singular "
            f"direction (int(r / T) = 0); merge fewer tasks or exclude this tensor"
        )
    return k


def fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular triplets so the largest-magnitude entry of each left vector is positive.

    ``u`` is ``[..., m, r]`` (vectors in columns), ``vh`` is ``[..., r, n]`` (vectors in rows).
    ``argmax`` returns the first maximal entry, which settles ties.
    """
    pivot = u.abs().argmax(dim=-2, keepdim=True)  # [..., 1, r]
    signs = torch.sign(torch.gather(u, -2, pivot))
    signs[signs == 0] = 1
    return u * signs, vh * signs.transpose(-2, -1)


def svd(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``A = U diag(S) Vh`` of a matrix or a batch, with deterministic signs.

    Wide matrices are decomposed through their transpose: LAPACK's divide-and-conquer SVD is
    several times slower on the wide layout (and pathologically so when batched on the CPU).
    """
    if matrices.shape[-2] < matrices.shape[-1]:
        v, s, uh = torch.linalg.svd(matrices.mT, full_matrices=False)
        u, vh = uh.mT, v.mT
    else:
        u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    u, vh = fix_signs(u, vh)
    return u, s, vh


GRAM_ASPECT = 1.5  # the Gram route pays off when one side is at least this much longer than the other


def truncated_svd(matrices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``k`` singular triplets of a matrix or batch, with deterministic signs.

    Returns ``U [..., m, k]``, ``S [..., k]``, ``Vh [..., k, n]``. For float32 (or widened half)
    matrices whose long side is at least 1.5 times the short one, the triplets come from the
    eigendecomposition of the small Gram matrix (``A^T A`` or ``A A^T``) computed in float64:
    several times cheaper than an SVD of the rectangular matrix, and, since the Gram of float32
    values is formed in float64, more accurate than a float32 SVD for every singular value above
    about 1e-8 of the largest. Square-ish and float64 matrices use the thin SVD of :func:`svd`.
    A batch in which some task's top-k contains a (numerically) zero singular value falls back to
    the SVD, whose null directions are then the LAPACK routine's choice.
    """
    m, n = matrices.shape[-2:]
    if matrices.dtype != torch.float32 or max(m, n) < GRAM_ASPECT * min(m, n):
        u, s, vh = svd(matrices)
        return u[..., :k], s[..., :k], vh[..., :k, :]
    wide = m < n
    x = (matrices.mT if wide else matrices).double()  # tall: [.., long, short]
    values, vectors = torch.linalg.eigh(x.mT @ x)  # ascending
    values, vectors = values.flip(-1)[..., :k], vectors.flip(-1)[..., :k]
    floor = values[..., :1] * (torch.finfo(torch.float64).eps * x.shape[-2]) ** 2
    if bool((values <= floor).any()):
        u, s, vh = svd(matrices)
        return u[..., :k], s[..., :k], vh[..., :k, :]
    singular = values.sqrt()
    long_side = (x @ vectors) / singular[..., None, :]  # the other side's singular vectors
    u, vh = (vectors, long_side.mT) if wide else (long_side, vectors.mT)
    u, vh = fix_signs(u, vh)
    return u.to(matrices.dtype), singular.to(matrices.dtype), vh.to(matrices.dtype)


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``P Q^T`` of ``A = P S Q^T`` (the closest matrix with
    orthonormal columns or rows, in Frobenius norm); batched over leading dimensions."""
    if matrix.shape[-2] < matrix.shape[-1]:
        return polar(matrix.mT).mT
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def orthonormal_completion(basis: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` orthonormal columns orthogonal to the orthonormal columns of ``basis`` (m x p).

    Deterministic: column-pivoted Gram-Schmidt over the standard basis, each step taking the axis
    with the largest component outside the span so far (the first one on ties), with one
    re-orthogonalisation and the sign rule of :func:`fix_signs`.
    """
    m, p = basis.shape
    if p + count > m:
        raise ValueError(f"cannot complete {p} orthonormal columns of length {m} with {count} more")
    columns = basis
    outside = (1.0 - (basis * basis).sum(dim=1)).clamp_min(0)  # |(I - Q Q^T) e_j|^2 for every axis j
    added = []
    for _ in range(count):
        axis = int(torch.argmax(outside))
        vector = -(columns @ columns[axis])
        vector[axis] += 1.0
        vector -= columns @ (columns.T @ vector)
        vector /= vector.norm()
        if vector[vector.abs().argmax()] < 0:
            vector = -vector
        added.append(vector)
        columns = torch.cat([columns, vector[:, None]], dim=1)
        outside = (outside - vector * vector).clamp_min(0)
    return torch.stack(added, dim=1) if added else basis.new_zeros(m, 0)


def concatenated_singular_vectors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each task's first ``k`` singular triplets side by side: ``[m, T k]``, ``[T k]``, ``[T k, n]``.

    ``u``, ``s``, ``vh`` are a batched SVD over tasks (``[T, m, r]``, ``[T, r]``, ``[T, r, n]``);
    task ``t`` fills slots ``t k .. (t+1) k - 1``, as in the released TSV-M and SCORE code (which
    then pads the ``r - T k`` remaining slots with zeros).
    """
    tasks, m, _ = u.shape
    n = vh.shape[-1]
    left = u[:, :, :k].permute(1, 0, 2).reshape(m, tasks * k)
    right = vh[:, :k, :].reshape(tasks * k, n)
    return left, s[:, :k].reshape(tasks * k), right


def shared_basis(left: torch.Tensor, right: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared orthonormal bases ``U* (m x rank)`` and ``V*^T (rank x n)`` of TSV-M and SCORE.

    ``left`` (m x p) and ``right`` (p x n) are the concatenated singular vectors. Their polar
    factors span the first p slots; when p < rank (T does not divide r) the released code pads
    with zero vectors and lets the SVD routine complete the polar factor with arbitrary orthonormal
    vectors; here :func:`orthonormal_completion` fills those slots deterministically.
    """
    u_star = polar(left)
    vh_star = polar(right)
    missing = rank - left.shape[1]
    if missing > 0:
        u_star = torch.cat([u_star, orthonormal_completion(u_star, missing)], dim=1)
        vh_star = torch.cat([vh_star, orthonormal_completion(vh_star.T, missing).T], dim=0)
    return u_star, vh_star
