"""How much of a layer's update survives truncation: the ESD against the SVD, in output space.

A linear layer with task matrix ``ΔW`` (``d_out x d_in``) adds the *activation offset*
``D = X ΔWᵀ`` (``n x d_out``) to its outputs on inputs ``X`` (``n x d_in``, one row per token
and image). Subspace merging keeps, for each task, only ``k`` directions of the output space:
with ``B_k`` the first ``k`` columns of an orthonormal basis, the truncated update is
``ΔW_k = B_k B_kᵀ ΔW`` and its offset is ``D B_k B_kᵀ``.

**Output-space truncation error.** What the truncation loses on the inputs, relative to what
the update contributes there::

    error(k) = ‖X (ΔW - B_k B_kᵀ ΔW)ᵀ‖_F² / ‖X ΔWᵀ‖_F² = ‖D (I - B_k B_kᵀ)‖_F² / ‖D‖_F².

**The ESD minimises it on the inputs it was fitted to.** ``D B_k B_kᵀ`` has rank at most ``k``,
and by Eckart–Young no matrix of rank ``k`` is closer to ``D`` in Frobenius norm than its
truncated SVD, which loses ``Σ_{i>k} s_i²`` (``s`` the singular values of ``D``). The ESD
(:func:`mergelib.models.essential.activation_pca`) takes as ``B`` the right singular vectors of ``D``
itself, so ``D B_k B_kᵀ`` *is* that truncated SVD: its error is ``Σ_{i>k} λ_i / Σ_i λ_i`` with
``λ_i = s_i² / (n - 1)``, the least of any rank-``k`` update of the layer (of the form
``B_k B_kᵀ ΔW`` or not) on those inputs. Truncating the SVD of the weights instead
(``ΔW = Σ σ_i u_i v_iᵀ``, ``B = U``) loses ``Σ_{i>k} σ_i² ‖X v_i‖²``: a singular direction is
ranked by its weight energy ``σ_i²`` even when the inputs hardly excite its input direction
``v_i``. On *other* inputs (held-out images) neither basis is optimal, and the curves below
show how much of the ESD's advantage carries over.

**For isotropic inputs the SVD is the ESD.** If ``XᵀX = c I`` (e.g. ``X = I``), then
``DᵀD = c ΔW ΔWᵀ``, whose eigenvectors are the left singular vectors of ``ΔW`` with eigenvalues
``c σ_i²``: the two decompositions coincide (up to the order of equal ``σ``) and so do their
errors. The ESD is an SVD reweighted by the second moments of what the layer actually receives.

**Energy concentration.** The share ``Σ_{i<=k} λ_i / Σ λ_i`` (ESD) or ``Σ_{i<=k} σ_i² / Σ σ_i²``
(SVD) of a decomposition's own spectrum in its first ``k`` components. On the fitted inputs the
ESD's energy is exactly ``1 - error``; the SVD's energy is a statement about weights, not outputs.

**Linear CKA** (centred kernel alignment, Kornblith et al., ICML 2019, arXiv 1905.00414)
compares two representations ``A`` (``n x p``) and ``B`` (``n x q``) of the same ``n`` rows:
after centring every column, ``CKA = ‖BᵀA‖_F² / (‖AᵀA‖_F ‖BᵀB‖_F)``, the cosine between the
centred Gram matrices ``A Aᵀ`` and ``B Bᵀ``. It lies in ``[0, 1]``, is 1 when one representation
is an orthogonal transformation and/or an isotropic rescaling of the other (plus a constant row,
which centring removes), and ignores everything else about the coordinates. It complements the
error: the error is dominated by the highest-energy directions and changes with any rescaling,
while CKA asks whether the truncated outputs keep the *geometry* of the full ones (which tokens
look alike) whatever their overall scale, which matters because ESM rescales its merged
updates anyway (α and the polarized scaling). Note that the ESD is an *uncentred* PCA and CKA
centres, so the ESD is not CKA-optimal by construction; it tends to win on anisotropic inputs.

**Padded ESD columns.** When the ESD is fitted on fewer rows than outputs (``n < d_out``),
:func:`~mergelib.models.essential.activation_pca` pads its basis, as the released code does, with the
standard axes ``e_{n+1} .. e_{d_out}``, which are not orthogonal to the ``n`` real eigenvectors,
so ``B_k B_kᵀ`` is not a projector for ``k > n``. Here a basis is by default *orthonormalised in
column order* (Gram–Schmidt: the first ``k`` resulting columns span the same space as the first
``k`` given ones, for every ``k``; columns that add no new direction are dropped) and ``B_k B_kᵀ``
means the orthogonal projector onto the span of the first ``k`` columns. Leading columns that are
already orthonormal (to 1e-6) are used unchanged, so nothing changes for ``k <= n``. On the
fitted inputs every ``k >= rank(D)`` then has error 0; on other inputs the padded axes keep
lowering the error, to 0 at ``k = d_out`` when the padded basis spans the output space (true
unless the real eigenvectors vanish on some of the first ``n`` axes, e.g. when ``ΔW`` has zero
rows). :func:`truncation_error` with ``orthonormalize=False`` uses the columns literally, as the
released code's ``E_k E_kᵀ ΔW`` does.

All computations run in float64 on the device of the inputs (CPU or CUDA); pandas is used only
to return the tables.
"""

from __future__ import annotations

import copy
from numbers import Integral
from typing import Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from mergelib.models.essential import activation_pca, check_model_input, collect_layer_inputs
from mergelib.methods.common import check_flag, check_fraction, require_keys, svd
from mergelib.methods.esm import layer_type
from mergelib.task_vectors import apply_task_vector, load_encoder_state

DECOMPOSITIONS = ("ESD", "SVD")
ORTHONORMAL_TOLERANCE = 1e-6  # |BᵀB - I| entries below this: the leading columns are used as they are
DEPENDENT_TOLERANCE = 1e-8  # a column whose part outside the previous span is below this (relative) adds nothing
DEFAULT_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)


# --------------------------------------------------------------------------------------------
# Checks and shared helpers
# --------------------------------------------------------------------------------------------


def _matrix(name: str, tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a 2-D tensor, got {shape}")
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must hold real numbers, got {tensor.dtype}")
    return tensor.to(device=device if device is not None else tensor.device, dtype=torch.float64)


def _layer(inputs: torch.Tensor, delta_w: torch.Tensor, *, min_rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``X`` and ``ΔW`` in float64 on the inputs' device, shapes checked."""
    x = _matrix("inputs", inputs)
    w = _matrix("delta_w", delta_w, x.device)
    if w.shape[1] != x.shape[1]:
        raise ValueError(
            f"inputs have {x.shape[1]} features but delta_w [d_out, d_in] expects {w.shape[1]} "
            f"(got inputs {tuple(x.shape)}, delta_w {tuple(w.shape)})"
        )
    if x.shape[0] < min_rows or w.shape[0] < 1:
        raise ValueError(
            f"need at least {min_rows} input rows and one output, got inputs {tuple(x.shape)}, delta_w {tuple(w.shape)}"
        )
    return x, w


def _eval_inputs(eval_inputs: torch.Tensor | None, x: torch.Tensor, *, min_rows: int = 1) -> torch.Tensor:
    if eval_inputs is None:
        return x
    e = _matrix("eval_inputs", eval_inputs, x.device)
    if e.shape[1] != x.shape[1] or e.shape[0] < min_rows:
        raise ValueError(f"eval_inputs must be [m >= {min_rows}, {x.shape[1]}], got {tuple(e.shape)}")
    return e


def _rank(k: object, largest: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, Integral) or not 0 <= int(k) <= largest:
        raise ValueError(f"{name} must be an integer in [0, {largest}], got {k!r}")
    return int(k)


def _ranks(ranks: Iterable[int], d_out: int) -> list[int]:
    if isinstance(ranks, (Integral, str, bytes)) or isinstance(ranks, torch.Tensor) and ranks.ndim == 0:
        raise ValueError(f"ranks must be a sequence of integers in [0, d_out], got {ranks!r}")
    out = [_rank(k.item() if isinstance(k, torch.Tensor) and not k.is_floating_point() else k, d_out, "every rank")
           for k in ranks]
    if not out:
        raise ValueError("ranks is empty")
    return out


def _ratio(numerator: torch.Tensor | float, denominator: torch.Tensor | float) -> float:
    """``numerator / denominator`` as a float; NaN when the denominator is zero (nothing to lose)."""
    denominator = float(denominator)
    return float(numerator) / denominator if denominator > 0 else float("nan")


def _nested_orthonormal(basis: torch.Tensor) -> torch.Tensor:
    """Columns orthonormal or zero, with ``span(Q[:, :j]) = span(basis[:, :j])`` for every ``j``.

    The leading columns that are already orthonormal (to :data:`ORTHONORMAL_TOLERANCE`) are kept
    as they are; the rest are orthogonalised against them and then, in order, against each other
    (Householder QR, or Gram–Schmidt with two passes when some column is dependent); a column
    that adds no new direction (relative residual below :data:`DEPENDENT_TOLERANCE`) becomes zero.
    """
    m = basis.shape[1]
    if m == 0:
        return basis
    gram = basis.T @ basis
    bad = (gram - torch.eye(m, dtype=gram.dtype, device=gram.device)).abs() > ORTHONORMAL_TOLERANCE
    if not bool(bad.any()):
        return basis
    rows, cols = bad.nonzero(as_tuple=True)
    prefix = int(torch.maximum(rows, cols).min())  # columns [0, prefix) are orthonormal
    head, rest = basis[:, :prefix], basis[:, prefix:]
    norms = rest.norm(dim=0)
    for _ in range(2):  # the part of the remaining columns outside span(head), twice for accuracy
        rest = rest - head @ (head.T @ rest)
    out = basis.clone()
    if rest.shape[1] <= rest.shape[0]:
        q, r = torch.linalg.qr(rest)
        if bool((r.diagonal().abs() > DEPENDENT_TOLERANCE * norms).all()):
            q = q - head @ (head.T @ q)  # one more pass against the head for orthogonality to round-off
            out[:, prefix:] = q / q.norm(dim=0)
            return out
    added: list[int] = []  # some column is (nearly) dependent: Gram–Schmidt, dropping such columns
    for j in range(rest.shape[1]):
        v = rest[:, j]
        for _ in range(2):
            if added:
                kept = out[:, added]
                v = v - kept @ (kept.T @ v)
        size = v.norm()
        if norms[j] > 0 and size > DEPENDENT_TOLERANCE * norms[j]:
            out[:, prefix + j] = v / size
            added.append(prefix + j)
        else:
            out[:, prefix + j] = 0
    return out


def _offsets(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.T  # D = X ΔWᵀ, [n, d_out]


def _decompositions(x: torch.Tensor, w: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"ESD": (Q, λ), "SVD": (U, σ²)}``: nested orthonormal output bases and their spectra.

    ESD: :func:`~mergelib.models.essential.activation_pca` of ``X`` and ``ΔW`` with all ``d_out``
    eigenvectors (padded ones orthonormalised, see the module notes). SVD: the left singular
    vectors of ``ΔW`` (``min(d_out, d_in)`` of them, :func:`mergelib.methods.common.svd`).
    """
    vectors, values = activation_pca(x, w, keep=w.shape[0])
    u, s, _ = svd(w)
    return {"ESD": (_nested_orthonormal(vectors), values), "SVD": (u, s.square())}


def _energy(spectrum: torch.Tensor, k: int) -> float:
    return _ratio(spectrum[:k].sum(), spectrum.sum())


# --------------------------------------------------------------------------------------------
# Truncation error
# --------------------------------------------------------------------------------------------


def truncation_error(
    inputs: torch.Tensor, delta_w: torch.Tensor, basis: torch.Tensor, k: int, *, orthonormalize: bool = True
) -> float:
    """Relative output-space error of keeping the first ``k`` columns of ``basis``.

    ``‖X (ΔW - P_k ΔW)ᵀ‖_F² / ‖X ΔWᵀ‖_F²`` with ``X = inputs`` ``[n, d_in]``, ``ΔW = delta_w``
    ``[d_out, d_in]`` and ``P_k`` the orthogonal projector onto the span of ``basis[:, :k]``
    (``basis`` is ``[d_out, m]``, ``0 <= k <= m``). For orthonormal columns ``P_k = B_k B_kᵀ``;
    other columns (e.g. the ESD's padded axes when ``n < d_out``) are orthonormalised in column
    order first. With ``orthonormalize=False``, ``P_k = B_k B_kᵀ`` literally (not a projector for
    non-orthonormal columns; the error can then even exceed 1).

    Computed in float64 from the residual itself (not as ``1 - kept``), so small errors keep
    their relative precision. Returns NaN when ``X ΔWᵀ = 0`` (nothing to lose).
    """
    x, w = _layer(inputs, delta_w)
    b = _matrix("basis", basis, x.device)
    if b.shape[0] != w.shape[0]:
        raise ValueError(f"basis must be [d_out = {w.shape[0]}, m], got {tuple(b.shape)}")
    k = _rank(k, b.shape[1])
    if not isinstance(orthonormalize, bool):
        raise ValueError(f"orthonormalize must be True or False, got {orthonormalize!r}")
    q = b[:, :k]
    if orthonormalize:
        q = _nested_orthonormal(q)
    d = _offsets(x, w)
    residual = d - (d @ q) @ q.T
    return _ratio(residual.square().sum(), d.square().sum())


def _error_curve(d: torch.Tensor, q: torch.Tensor, ranks: Sequence[int]) -> list[float]:
    """``truncation_error`` of ``D`` for every rank, from one product: with ``Q`` orthonormal(-or-zero)
    and nested, the error at ``k`` is ``Σ_{j>=k} ‖D q_j‖² + ‖D (I - Q Qᵀ)‖²`` (Pythagoras), the
    tail summed from the end so that small errors keep their precision. Ranks beyond ``Q``'s
    columns use all of them."""
    coords = d @ q  # [n, m]
    kept = coords.square().sum(dim=0)  # ‖D q_j‖²
    outside = (d - coords @ q.T).square().sum()  # what no column of Q reaches
    tail = torch.cat([kept.flip(0).cumsum(0).flip(0), kept.new_zeros(1)])  # tail[k] = Σ_{j>=k} kept_j
    total = d.square().sum()
    m = q.shape[1]
    return [_ratio(total if k == 0 else tail[min(k, m)] + outside, total) for k in ranks]  # k = 0 loses D itself


def truncation_curves(
    inputs: torch.Tensor,
    delta_w: torch.Tensor,
    ranks: Iterable[int],
    *,
    eval_inputs: torch.Tensor | None = None,
) -> pd.DataFrame:
    """Output-space truncation error and energy concentration of the ESD and the SVD at equal ranks.

    Args:
        inputs: ``X`` ``[n >= 2, d_in]``, the inputs the ESD is fitted to (:func:`mergelib.models.essential.activation_pca`).
        delta_w: ``ΔW`` ``[d_out, d_in]``.
        ranks: numbers of kept output directions, each in ``[0, d_out]``. The SVD has only
            ``min(d_out, d_in)`` directions; a larger rank keeps them all (error 0, energy 1).
        eval_inputs: ``[m, d_in]`` inputs on which the error is measured (default: ``inputs``).
            Held-out inputs show how much of the ESD's advantage is more than fitting.

    Returns:
        A frame with columns ``rank``, ``decomposition`` (``"ESD"`` then ``"SVD"``, ranks in the
        given order), ``error`` (:func:`truncation_error` of the decomposition's first ``rank``
        directions on ``eval_inputs``) and ``energy`` (the share of the decomposition's own
        spectrum, ``λ`` for the ESD and ``σ²`` for the SVD, in its first ``rank`` components;
        NaN for an all-zero spectrum).
    """
    x, w = _layer(inputs, delta_w, min_rows=2)
    ranks = _ranks(ranks, w.shape[0])
    d = _offsets(_eval_inputs(eval_inputs, x), w)
    rows = []
    for name, (q, spectrum) in _decompositions(x, w).items():
        errors = _error_curve(d, q, ranks)
        rows += [(k, name, err, _energy(spectrum, k)) for k, err in zip(ranks, errors)]
    return pd.DataFrame(rows, columns=["rank", "decomposition", "error", "energy"])


# --------------------------------------------------------------------------------------------
# CKA
# --------------------------------------------------------------------------------------------


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA of two representations of the same ``n`` rows (Kornblith et al. 2019).

    ``a`` is ``[n, p]``, ``b`` is ``[n, q]`` (``n >= 2``). Every column is centred, then
    ``CKA = ‖BᵀA‖_F² / (‖AᵀA‖_F ‖BᵀB‖_F)``, equal to ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``
    for the linear kernels ``K = A Aᵀ``, ``L = B Bᵀ``. In float64 on ``a``'s device, through the
    ``p x q`` feature products or the ``n x n`` Gram matrices, whichever is smaller. Symmetric,
    in ``[0, 1]`` (clamped against round-off), 1 for ``b = c a R + 1 tᵀ`` with ``R`` orthogonal and
    ``c != 0``. NaN when either representation is constant over the rows (nothing to compare).
    """
    x = _matrix("a", a)
    y = _matrix("b", b, x.device)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"a and b must have the same rows, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"linear CKA needs at least 2 rows, got {x.shape[0]}")
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    if n * n * (p + q) < n * (p * p + q * q + p * q):  # Gram matrices are smaller
        k, l_ = x @ x.T, y @ y.T
        cross, self_x, self_y = (k * l_).sum(), k.norm(), l_.norm()
    else:
        cross, self_x, self_y = (y.T @ x).square().sum(), (x.T @ x).norm(), (y.T @ y).norm()
    denominator = float(self_x) * float(self_y)
    if denominator == 0:
        return float("nan")
    return min(1.0, max(0.0, float(cross) / denominator))


def truncated_output_cka(
    inputs: torch.Tensor,
    delta_w: torch.Tensor,
    ranks: Iterable[int],
    *,
    weight: torch.Tensor | None = None,
    eval_inputs: torch.Tensor | None = None,
) -> pd.DataFrame:
    """Linear CKA between a layer's outputs with the truncated and with the full update.

    The ESD (fitted on ``inputs``) and the SVD of ``delta_w`` are truncated to each rank as in
    :func:`truncation_curves` (``ΔW_k = P_k ΔW``). Compared, on ``eval_inputs`` ``E`` (default
    ``inputs``):

    * by default the **activation offsets** ``E ΔW_kᵀ`` vs ``E ΔWᵀ``, i.e. what the update
      contributes (NaN at rank 0, where the truncated offset is zero);
    * with ``weight = W_0`` (``[d_out, d_in]``, the pretrained weight), the **full layer outputs**
      ``E (W_0 + ΔW_k)ᵀ`` vs ``E (W_0 + ΔW)ᵀ`` of the expert. A bias would add the same row to
      both and is removed by CKA's centring, so it is not needed.

    Which of the two the ESM paper's "keeping 5% of components gives much higher CKA for ESD
    than for SVD" uses could not be established (its full text was not available); with ``W_0``
    included the pretrained part dominates and both CKAs tend to be close to 1.

    Returns a frame with columns ``rank``, ``decomposition`` (``"ESD"`` then ``"SVD"``) and ``cka``;
    it is 1 at full rank (``d_out``; ``min(d_out, d_in)`` suffices for the SVD).
    """
    x, w = _layer(inputs, delta_w, min_rows=2)
    ranks = _ranks(ranks, w.shape[0])
    e = _eval_inputs(eval_inputs, x, min_rows=2)
    d = _offsets(e, w)
    base = None
    if weight is not None:
        w0 = _matrix("weight", weight, x.device)
        if w0.shape != w.shape:
            raise ValueError(f"weight must have delta_w's shape {tuple(w.shape)}, got {tuple(w0.shape)}")
        base = e @ w0.T
    full = d if base is None else base + d
    rows = []
    for name, (q, _) in _decompositions(x, w).items():
        coords = d @ q
        for k in ranks:
            k_used = min(k, q.shape[1])
            truncated = coords[:, :k_used] @ q[:, :k_used].T
            rows.append((k, name, linear_cka(truncated if base is None else base + truncated, full)))
    return pd.DataFrame(rows, columns=["rank", "decomposition", "cka"])


# --------------------------------------------------------------------------------------------
# Every ESD layer of one expert
# --------------------------------------------------------------------------------------------


def layer_truncation_table(
    image_encoder: nn.Module,
    pretrained_state: Mapping[str, torch.Tensor],
    task_vector: Mapping[str, torch.Tensor],
    proxy_inputs: torch.Tensor,
    *,
    ranks_fraction: Sequence[float] = DEFAULT_FRACTIONS,
    eval_inputs: torch.Tensor | None = None,
    full_outputs: bool = False,
    layers: str = "released",
    device: str | torch.device = "cpu",
) -> pd.DataFrame:
    """:func:`truncation_curves` and :func:`truncated_output_cka` for every ESD layer of one expert.

    The layer inputs are collected, as ESM does, on the expert ``θ_0 + τ`` (a deep copy of
    ``image_encoder`` loaded with ``apply_task_vector(pretrained_state, task_vector)``) in one
    forward pass of ``proxy_inputs`` (model input ``[N, 3, H, W]``), with
    :func:`mergelib.models.essential.collect_layer_inputs`, which holds every layer's inputs at once:
    meant for small models (tiny-clip, or a few images of a ViT-B). ``eval_inputs`` (model input
    of other images) gives held-out layer inputs from a second pass; by default the error and CKA
    are measured on the proxies themselves. ``full_outputs``: compare full layer outputs (with
    the pretrained weight) instead of activation offsets in the CKA.

    Ranks: ``max(1, int(fraction * d_out))`` per layer for each fraction in ``(0, 1]``.

    Returns a frame with columns ``layer`` (weight name), ``layer_type`` (e.g. ``mlp.c_fc.weight``),
    ``d_out``, ``fraction``, ``rank``, ``decomposition``, ``error``, ``energy``, ``cka``.
    """
    if isinstance(ranks_fraction, (str, bytes)) or not isinstance(ranks_fraction, Iterable):
        raise ValueError(f"ranks_fraction must be a non-empty sequence of numbers in (0, 1], got {ranks_fraction!r}")
    fractions = list(ranks_fraction)
    if not fractions:
        raise ValueError("ranks_fraction must be a non-empty sequence of numbers in (0, 1], got an empty one")
    for index, fraction in enumerate(fractions):
        check_fraction(f"ranks_fraction[{index}]", fraction, zero_ok=False, one_ok=True)
    check_model_input("proxy_inputs", proxy_inputs)
    if eval_inputs is not None:
        check_model_input("eval_inputs", eval_inputs)
    check_flag("full_outputs", full_outputs)
    expert = copy.deepcopy(image_encoder)
    load_encoder_state(expert, apply_task_vector(pretrained_state, task_vector))
    expert.to(device).eval()
    fitted = collect_layer_inputs(expert, proxy_inputs.to(device), layers=layers)
    held_out = collect_layer_inputs(expert, eval_inputs.to(device), layers=layers) if eval_inputs is not None else None
    del expert
    require_keys(task_vector, fitted, what="the task vector (for the hooked ESD layers)")
    frames = []
    for key, x in fitted.items():
        delta = task_vector[key].to(x.device)
        d_out = delta.shape[0]
        ranks = [max(1, int(f * d_out)) for f in fractions]
        other = held_out[key] if held_out is not None else None
        curves = truncation_curves(x, delta, ranks, eval_inputs=other)
        weight = pretrained_state[key].to(x.device) if full_outputs else None
        cka = truncated_output_cka(x, delta, ranks, weight=weight, eval_inputs=other)
        frame = curves.assign(cka=cka["cka"].to_numpy(), fraction=fractions * len(DECOMPOSITIONS))
        frames.append(frame.assign(layer=key, layer_type=layer_type(key), d_out=d_out))
    table = pd.concat(frames, ignore_index=True)
    return table[["layer", "layer_type", "d_out", "fraction", "rank", "decomposition", "error", "energy", "cka"]]


__all__ = [
    "layer_truncation_table",
    "linear_cka",
    "truncated_output_cka",
    "truncation_curves",
    "truncation_error",
]
