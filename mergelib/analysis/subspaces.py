"""How much the experts' weight changes share their subspaces: SAR, spectra, SCORE's projected
matrices and TSV's singular task interference.

Every quantity here is computed one layer (one parameter name) at a time from the task matrices
``Delta_1 .. Delta_T`` of that layer (``Delta_t`` = fine-tuned minus pretrained weights, an
``m x n`` matrix with thin SVD ``Delta_t = U_t diag(s_t) V_t^T``, ``r = min(m, n)``).

**Cumulative energy and the rank rule** (:func:`cumulative_energy`, :func:`energy_rank`). With
the singular values in decreasing order, ``e_j = sqrt(sum_{l <= j} s_l^2 / sum_l s_l^2)``
(j from 0) is the fraction of ``||Delta||_F`` that the best rank-(j+1) approximation keeps.
SCORE's released analysis code (comments: "Eq. 6 in the paper") takes ``k`` = the first 0-based
index j with ``e_j > tau``, tau = 0.97, and keeps the singular vectors ``0 .. k-1``: one direction
*fewer* than the number needed to exceed tau (score.md §8 and §11.16). So the kept subspace holds
at most a fraction tau of the norm, and a rank-one matrix (``e_0 = 1``) gets ``k = 0``: an empty
subspace. We reproduce that rule exactly. An all-zero spectrum gets ``k = 0`` (the released code
does the same through ``argmax`` of an all-false comparison).

**Subspace Alignment Ratio** (:func:`sar_matrix`, :func:`sar_per_layer`; SCORE Eq. 5 per the
released comments). For a *source* task i with ``U_{i,k}`` its first ``k_i`` left singular
vectors, ``SAR(j onto i) = ||U_{i,k} U_{i,k}^T Delta_j||_F / ||Delta_j||_F``: the fraction of
task j's update (in norm) that lies in the column space task i mostly writes to. It is 1 when
every column of ``Delta_j`` lies in that subspace, 0 when they are orthogonal to it, not
symmetric, and ``SAR(i onto i) = e_{k_i - 1} <= tau``. As released:

* only the left (column, output-side) subspace is used;
* the layers are the image encoder's matrices: 2-D tensors whose name starts with ``visual.`` and
  does not contain ``text_projection`` (per block ``attn.in_proj_weight``,
  ``attn.out_proj.weight``, ``mlp.c_fc.weight``, ``mlp.c_proj.weight``, plus
  ``visual.positional_embedding`` and ``visual.proj``; the 4-D patch embedding is excluded);
* the matrix is the *unweighted* mean over those layers; entry ``[j, i]`` (row = the projected
  task j, column = the task i whose subspace is used). The released docstring says rows are the
  sources; the code stores ``pairs[j][i]``, which is what the paper's heatmap shows.

The released script computes in float32 on the GPU; here everything is float64 by default, so a
rank can differ by one where some ``e_j`` lies within float32 round-off of tau.
``||U_k U_k^T Delta||_F`` is computed as ``||U_k^T Delta||_F`` (equal, the columns of ``U_k``
being orthonormal).

Ours, not the paper's: ``sides="both"`` projects on both sides,
``||U_{i,k} U_{i,k}^T Delta_j V_{i,k} V_{i,k}^T||_F / ||Delta_j||_F`` with the right singular
vectors of the same rank: the part of task j that reads *and* writes where task i does. It never
exceeds the left-only ratio.

Not the same as Iso's SAR (Marczak et al., ICML 2025; tsv-iso-esm.md §2): Iso projects a task
matrix onto the dominant left subspace of the *merged* matrix, with the rank given by its own
approximation-error rule at epsilon = 0.05; its numbers are not comparable with SCORE's.

**Layers where a task is exactly zero** (e.g. frozen parameters): ``SAR(j onto i)`` is 0/0 when
``Delta_j = 0``. Such layers are skipped for *every* pair, with a warning, so that all entries of
the matrix average over the same layers (``zero_layers="raise"`` raises instead).

**SCORE's projected matrices** (:func:`projected_task_matrices`, :func:`projection_statistics`,
:func:`off_diagonal_entries`; SCORE §6.9 and the §7.6 figures). SCORE builds TSV-M's shared
orthonormal bases ``U* (m x r)`` and ``V* (n x r)`` from each task's top ``k = int(r / T)``
singular vectors and expresses every task in them: ``M_t = U*^T Delta_t V*`` (r x r). The
diagonal of ``M_t`` is what task t does along the shared directions; the off-diagonal entries
couple one shared input direction to another output direction. SCORE keeps the diagonal and
drops off-diagonal *outliers*: with ``O_t`` = ``M_t`` with its diagonal zeroed, ``mu_t`` and
``sigma_t`` the mean and unbiased standard deviation of all r^2 entries of ``O_t`` (the zeroed
diagonal included, as released), an entry is kept when ``|O_t - mu_t| <= h``, with
``h = z sigma_t / T`` as released for the natural-image benchmarks or ``h = z sigma_t`` (the
paper's text). The statistics here reuse :func:`mergelib.methods.score.score_basis`,
:func:`mergelib.methods.score.trim_statistics` and :func:`mergelib.methods.score.trim_mask`, so
they are those of the merge itself. When ``U*`` and ``V*`` are square (``m = n`` and T divides
r), the change of basis is lossless: ``captured = 1``.

**Singular Task Interference** (:func:`singular_task_interference`,
:func:`interference_per_layer`; TSV, Gargiulo et al., CVPR 2025, arXiv 2412.00081, Eq. 6). With
each task's first k singular triplets side by side, ``U^ = [U_1 .. U_T]`` (m x Tk),
``Sigma^ = blockdiag(Sigma_1 .. Sigma_T)``, ``V^ = [V_1 .. V_T]`` (n x Tk),
``STI = ||(U^T U - I) Sigma (V^T V - I)||_1``, the entry-wise L1 norm. ``U^T U - I`` is zero on
the diagonal blocks (each task's own vectors are orthonormal) and holds the cosines between
different tasks' singular vectors elsewhere, so STI is 0 when the tasks' left singular vectors
are mutually orthogonal (or their right ones are), and it grows with the overlap, weighted
by the singular values (it is not normalised: it scales with the size of the updates). It does
not depend on the signs of the singular vectors. ``rank=None`` (our choice of default) uses
*every* triplet (k = r): Eq. 6 as written, on the tasks' full SVDs; then Tk can exceed m or n and
some interference is unavoidable. ``rank="tsv"`` uses TSV-M's ``k = int(r / T)`` (the interference
among the directions TSV-M actually keeps, before its orthogonalisation); an integer uses that k.
The paper shows STI for both full and low-rank task matrices, and we found no released code for
it. A task that is exactly zero has arbitrary singular vectors, so STI is undefined: the
per-layer table skips (or raises on) such layers as for SAR.

All functions are deterministic (singular vectors follow mergelib's sign rule), run on the CPU or
CUDA, compute in torch and convert to pandas only at the end.
"""

from __future__ import annotations

import warnings
from typing import Iterator, Mapping, Sequence

import pandas as pd
import torch

from mergelib.errors import ParameterValueError, StateKeyError
from mergelib.methods.common import (
    BLOCK_KEY_PATTERN,
    VISUAL_PREFIX,
    block_layer,
    check_choice,
    check_flag,
    check_fraction,
    check_number,
    check_tensor,
    compute_dtype,
    concatenated_singular_vectors,
    describe_keys,
    is_matrix,
    prefix_hint,
    rank_per_task,
    require_keys,
    resolve_device,
    stacked,
    svd,
)
from mergelib.methods.registry import check_task_vector_list
from mergelib.methods.score import score_basis, trim_mask, trim_statistics

DEFAULT_ENERGY = 0.97  # tau of the released SAR scripts
SIDES = ("left", "both")
ZERO_LAYERS = ("skip", "raise")


# ----------------------------------------------------------------------------------- helpers
def visual_matrix_keys(task_vector: Mapping[str, torch.Tensor]) -> list[str]:
    """The image encoder's matrices, as in the released SAR scripts: 2-D tensors whose name starts
    with ``visual.`` and does not contain ``text_projection`` (in the task vector's order)."""
    return [key for key, value in task_vector.items() if key.startswith(VISUAL_PREFIX) and is_matrix(key, value)]


def layer_info(key: str) -> tuple[int | None, str]:
    """``(block, layer_type)`` of a parameter name: ``visual.transformer.resblocks.3.mlp.c_fc.weight``
    -> ``(3, "mlp.c_fc.weight")``; ``visual.proj`` -> ``(None, "proj")`` (the block convention of
    :func:`mergelib.methods.common.block_layer`)."""
    block = block_layer(key)
    if block is not None:
        return block
    return None, key[len(VISUAL_PREFIX):] if key.startswith(VISUAL_PREFIX) else key


def _resolve_keys(task_vectors, keys) -> list[str]:
    """The layers to analyse: the default visual matrices, or ``keys`` checked to be present in every
    task vector, 2-D and of one shape."""
    if keys is None:
        keys = visual_matrix_keys(task_vectors[0])
        if not keys:
            present = list(task_vectors[0])
            raise StateKeyError(
                f"no image-encoder matrix in the task vectors: expected 2-D tensors named 'visual.*' (e.g. "
                f"{BLOCK_KEY_PATTERN!r}), got {describe_keys(present)}{prefix_hint([], present)}; or pass keys=")
    elif isinstance(keys, str):
        raise ParameterValueError(f"keys must be a list of parameter names, not the string {keys!r}")
    keys = list(keys)
    if not keys:
        raise ParameterValueError("keys is empty")
    for index, vector in enumerate(task_vectors):
        require_keys(vector, keys, what=f"task vector {index}")
    for key in keys:
        shape = tuple(task_vectors[0][key].shape)
        if len(shape) != 2:
            raise ParameterValueError(f"{key!r} has shape {shape}; these analyses need matrices (2-D tensors)")
        for index, vector in enumerate(task_vectors):
            check_tensor(f"task vector {index}[{key!r}]", vector[key])
            if tuple(vector[key].shape) != shape:
                raise ParameterValueError(
                    f"{key!r}: task vector {index} has shape {tuple(vector[key].shape)}, task vector 0 has {shape}")
    return keys


def _resolve_names(names, tasks: int) -> list[str]:
    if names is None:
        return [str(index) for index in range(tasks)]
    if isinstance(names, str):
        raise ParameterValueError(f"names must be a list of task labels, not the string {names!r}")
    names = [str(name) for name in names]
    if len(names) != tasks:
        raise ParameterValueError(f"got {len(names)} names for {tasks} tasks")
    if len(set(names)) != tasks:
        raise ParameterValueError(f"task names must be unique, got {names}")
    return names


def _check_stack(stack: torch.Tensor, minimum_tasks: int = 2) -> torch.Tensor:
    """A ``[T, m, n]`` floating-point stack with at least ``minimum_tasks`` tasks (half widened)."""
    if not isinstance(stack, torch.Tensor) or stack.ndim != 3:
        shape = tuple(stack.shape) if isinstance(stack, torch.Tensor) else type(stack).__name__
        raise ParameterValueError(f"expected a [T, m, n] stack of task matrices, got {shape}")
    if not stack.is_floating_point():
        raise ParameterValueError(f"expected a floating-point stack, got {stack.dtype}")
    check_tensor("the stack of task matrices", stack)
    if stack.shape[0] < minimum_tasks:
        raise ParameterValueError(f"need at least {minimum_tasks} task matrices, got {stack.shape[0]}")
    if min(stack.shape[1:]) < 1:
        raise ParameterValueError(f"empty task matrices of shape {tuple(stack.shape[1:])}")
    return stack.to(compute_dtype(stack.dtype))


def _zero_tasks(stack: torch.Tensor) -> list[int]:
    """Indices of the tasks whose matrix is exactly zero."""
    return [int(index) for index in torch.nonzero(~stack.flatten(1).any(dim=1)).flatten()]


def _column(values: torch.Tensor):
    """A CPU tensor as a column for pandas (the maths is done by then)."""
    return values.detach().cpu().numpy()


def _blocks(keys: Sequence[str]) -> pd.arrays.IntegerArray:
    return pd.array([layer_info(key)[0] for key in keys], dtype="Int64")


# ------------------------------------------------------------------------- energy and rank
def cumulative_energy(singular_values: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """``e_j = sqrt(sum_{l <= j} s_l^2 / sum_l s_l^2)`` along the last dimension, in float64.

    ``e_j`` is the fraction of the Frobenius norm kept by the best rank-(j+1) approximation. For an
    all-zero spectrum every ``e_j`` is 0 (by our convention; the ratio is 0/0).
    """
    values = torch.as_tensor(singular_values).to(torch.float64)
    squares = values.square().cumsum(dim=-1)
    total = squares[..., -1:]
    return torch.where(total > 0, (squares / total.clamp_min(torch.finfo(torch.float64).tiny)).sqrt(),
                       torch.zeros_like(squares))


def energy_rank(singular_values: torch.Tensor | Sequence[float], energy: float = DEFAULT_ENERGY) -> int:
    """The released SAR rank rule: the first 0-based index j with ``e_j > energy``.

    The projector keeps the singular vectors ``0 .. k-1``, so it holds at most a fraction
    ``energy`` of the norm: one direction fewer than "the number of components needed to exceed
    energy" (score.md §11.16). Hence ``energy_rank([1, 0, 0]) == 0`` (a rank-one matrix's single
    direction already exceeds any energy < 1) and ``energy_rank([1, 1, 1, 1], 0.97) == 3``.
    An all-zero spectrum gives 0.

    ``singular_values`` is a non-empty 1-D sequence, non-negative and non-increasing (an SVD's
    output); ``energy`` lies in (0, 1).
    """
    check_fraction("energy", energy, zero_ok=False, one_ok=False)
    values = torch.as_tensor(singular_values).to(torch.float64)
    if values.ndim != 1 or values.numel() == 0:
        raise ParameterValueError(f"singular_values must be a non-empty 1-D sequence, got shape {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ParameterValueError("singular values must be finite and non-negative")
    if bool((values[1:] > values[:-1]).any()):
        raise ParameterValueError("singular values must be in non-increasing order (as an SVD returns them)")
    if not bool(values.any()):
        return 0
    # e is non-decreasing and its last entry is exactly 1 > energy, so the first index with
    # e_j > energy is the number of indices with e_j <= energy.
    return int((cumulative_energy(values) <= energy).sum())


# ----------------------------------------------------------------------------------------- SAR
def _layer_sar(stack: torch.Tensor, energy: float, sides: str) -> tuple[torch.Tensor, list[int]]:
    """SAR of one layer: ``[T, T]`` (row j = projected task, column i = source) and the ranks k_i."""
    u, s, vh = svd(stack)  # one SVD per task: [T, m, r], [T, r], [T, r, n]
    norms = torch.linalg.matrix_norm(stack)  # ||Delta_j||_F, [T]
    ranks = [energy_rank(s[index], energy) for index in range(stack.shape[0])]
    sar = stack.new_zeros(stack.shape[0], stack.shape[0])
    for source, k in enumerate(ranks):
        if k == 0:  # empty subspace: nothing of any task lies in it
            continue
        projected = u[source, :, :k].mT @ stack  # U_{i,k}^T Delta_j for every j: [T, k, n]
        if sides == "both":
            projected = projected @ vh[source, :k].mT  # U_{i,k}^T Delta_j V_{i,k}: [T, k, k]
        sar[:, source] = torch.linalg.matrix_norm(projected) / norms
    return sar, ranks


def _sar_layers(
    task_vectors, energy, keys, sides, device, dtype, zero_layers
) -> Iterator[tuple[str, torch.Tensor, list[int]]]:
    """``(key, SAR [T, T] on the CPU, ranks)`` for every analysed layer, one layer on the device at a time."""
    task_vectors = check_task_vector_list(task_vectors, 2, "compare their subspaces")
    check_fraction("energy", energy, zero_ok=False, one_ok=False)
    check_choice("sides", sides, SIDES)
    check_choice("zero_layers", zero_layers, ZERO_LAYERS)
    keys = _resolve_keys(task_vectors, keys)
    device = resolve_device(device)
    skipped, produced = [], 0
    for key in keys:
        stack = stacked(task_vectors, key, device=device, dtype=dtype)
        zeros = _zero_tasks(stack)
        if zeros:
            if zero_layers == "raise":
                raise ParameterValueError(
                    f"{key!r}: the task matrix of task(s) {zeros} is exactly zero, so SAR onto it is undefined "
                    f"(0/0); leave the layer out (keys=) or pass zero_layers='skip'")
            skipped.append(key)
            continue
        sar, ranks = _layer_sar(stack, energy, sides)
        produced += 1
        yield key, sar.cpu(), ranks
        del stack
    if skipped:
        warnings.warn(f"SAR: skipped {len(skipped)} layer(s) where some task matrix is exactly zero: {skipped}",
                      stacklevel=3)
    if not produced:
        raise ParameterValueError("SAR: every selected layer has a task matrix that is exactly zero")


def sar_per_layer(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    energy: float = DEFAULT_ENERGY,
    *,
    keys: Sequence[str] | None = None,
    sides: str = "left",
    names: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
    zero_layers: str = "skip",
) -> pd.DataFrame:
    """SAR of every ordered pair of tasks in every layer: one row per (layer, projected, source).

    Columns: ``key``, ``block`` (the residual block, ``<NA>`` outside the blocks), ``layer_type``
    (e.g. ``attn.in_proj_weight``, ``positional_embedding``, ``proj``), ``projected`` (the task j
    whose matrix is projected), ``source`` (the task i whose subspace is used), ``sar``
    (``||U_{i,k} U_{i,k}^T Delta_j||_F / ||Delta_j||_F``, or the two-sided variant), ``rank_source``
    (k_i from :func:`energy_rank`).

    Args:
        task_vectors: at least two task vectors with the same parameter names and shapes.
        energy: tau of the rank rule, in (0, 1); 0.97 as released.
        keys: the layers; default :func:`visual_matrix_keys` of the first task vector.
        sides: ``"left"`` (the paper's) or ``"both"`` (ours: projected on the right too).
        names: task labels for ``projected``/``source``; default ``"0"``, ``"1"``, ...
        device: where the SVDs run (``None``: CUDA when available).
        dtype: compute precision (float64 by default).
        zero_layers: ``"skip"`` (with a warning) or ``"raise"`` on layers where a task is exactly zero.
    """
    task_vectors = check_task_vector_list(task_vectors, 2, "compare their subspaces")
    names = _resolve_names(names, len(task_vectors))
    columns = {name: [] for name in ("key", "projected", "source", "sar", "rank_source")}
    tasks = len(names)
    for key, sar, ranks in _sar_layers(task_vectors, energy, keys, sides, device, dtype, zero_layers):
        columns["key"] += [key] * tasks * tasks
        columns["projected"] += [name for name in names for _ in range(tasks)]
        columns["source"] += names * tasks
        columns["sar"].append(sar.to(torch.float64).flatten())  # row-major: [j, i]
        columns["rank_source"] += ranks * tasks
    return pd.DataFrame({
        "key": columns["key"],
        "block": _blocks(columns["key"]),
        "layer_type": [layer_info(key)[1] for key in columns["key"]],
        "projected": columns["projected"],
        "source": columns["source"],
        "sar": _column(torch.cat(columns["sar"])),
        "rank_source": columns["rank_source"],
    })


def sar_matrix(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    energy: float = DEFAULT_ENERGY,
    *,
    keys: Sequence[str] | None = None,
    sides: str = "left",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
    zero_layers: str = "skip",
) -> torch.Tensor:
    """The pair-wise mean SAR: ``[T, T]`` float64 on the CPU, entry ``[j, i]`` = the unweighted mean
    over the layers of ``SAR(j onto i)`` (row = projected task, column = source task, the released
    layout). Equal to the mean of :func:`sar_per_layer` over its layers; the arguments are the same.
    """
    layers = [sar.to(torch.float64) for _, sar, _ in _sar_layers(task_vectors, energy, keys, sides, device, dtype,
                                                                  zero_layers)]
    return torch.stack(layers).mean(dim=0)


def singular_spectra(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    *,
    keys: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
) -> pd.DataFrame:
    """Every task's singular values in every layer, with the cumulative energy, for spectra and
    energy curves: one row per (layer, task, index).

    Columns: ``task``, ``key``, ``block``, ``layer_type``, ``index`` (0-based, decreasing singular
    values), ``singular_value``, ``energy`` (``e_j`` of :func:`cumulative_energy`; 0 throughout for
    an all-zero matrix). ``energy_rank`` of a task is the number of its rows with
    ``energy <= tau``.
    """
    task_vectors = check_task_vector_list(task_vectors, 1, "compute their spectra")
    keys = _resolve_keys(task_vectors, keys)
    names = _resolve_names(names, len(task_vectors))
    device = resolve_device(device)
    frames = []
    for key in keys:
        stack = stacked(task_vectors, key, device=device, dtype=dtype)
        # same values for the transpose; LAPACK is much faster on the tall layout (see common.svd)
        values = torch.linalg.svdvals(stack if stack.shape[-2] >= stack.shape[-1] else stack.mT)  # [T, r]
        del stack
        tasks, rank = values.shape
        block, layer_type = layer_info(key)
        frames.append(pd.DataFrame({
            "task": [name for name in names for _ in range(rank)],
            "key": key,
            "block": pd.array([block] * tasks * rank, dtype="Int64"),
            "layer_type": layer_type,
            "index": list(range(rank)) * tasks,
            "singular_value": _column(values.to(torch.float64).flatten()),
            "energy": _column(cumulative_energy(values).flatten()),
        }))
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------- SCORE's projected matrices
def projected_task_matrices(
    stack: torch.Tensor, *, key: str = "layer"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SCORE's change of basis of one layer: ``(U* [m, r], V*^T [r, n], M [T, r, r])`` with
    ``M_t = U*^T Delta_t V*``; the shared bases are those of the merge
    (:func:`mergelib.methods.score.score_basis`, ``k = int(r / T)`` per task). ``stack`` is
    ``[T, m, n]`` (T >= 2); half precision is widened to float32, other dtypes kept."""
    stack = _check_stack(stack)
    u_star, vh_star = score_basis(stack, key)
    return u_star, vh_star, u_star.mT @ stack @ vh_star.mT


def _trim_statistics(stack: torch.Tensor, z: float, key: str):
    """Projected matrices and SCORE's trimming statistics of one layer (validated)."""
    check_number("z", z, minimum=0, strict=True)
    stack = _check_stack(stack)
    if min(stack.shape[1:]) < 2:
        raise ParameterValueError(f"{key!r}: a matrix of rank 1 has no off-diagonal entries to trim")
    zeros = _zero_tasks(stack)
    if zeros:
        raise ParameterValueError(f"{key!r}: the task matrix of task(s) {zeros} is exactly zero; its ratios are 0/0")
    _, _, projected = projected_task_matrices(stack, key=key)
    diagonal = torch.diagonal(projected, dim1=-2, dim2=-1)  # [T, r]
    off_diagonal = projected - torch.diag_embed(diagonal)   # O_t: the diagonal zeroed
    mean, std = (value[:, 0, 0] for value in trim_statistics(off_diagonal))  # those of trim_mask (released)
    return stack, projected, diagonal, off_diagonal, mean, std


def projection_statistics(
    stack: torch.Tensor,
    *,
    z: float = 1.96,
    divide_by_tasks: bool = True,
    names: Sequence[str] | None = None,
    key: str = "layer",
) -> pd.DataFrame:
    """How each task looks in SCORE's shared basis, and what SCORE's trim removes: one row per task.

    Columns (``M_t = U*^T Delta_t V*``, ``O_t`` = ``M_t`` with its diagonal zeroed):

    * ``task``; ``r`` (= min(m, n)) and ``k`` (= int(r / T), directions per task in the basis);
    * ``captured`` = ``||M_t||_F^2 / ||Delta_t||_F^2``: the energy the shared basis keeps (1 when
      the bases are square, i.e. m = n and T divides r);
    * ``diagonal_energy`` = ``||diag M_t||^2 / ||M_t||_F^2`` and ``off_diagonal_energy`` =
      ``||O_t||_F^2 / ||M_t||_F^2`` (they sum to 1);
    * ``trimmed_entries``: the fraction of the r^2 - r off-diagonal entries that SCORE's trim
      removes; ``trimmed_energy``: the fraction of ``||O_t||_F^2`` they carry (0 when O_t = 0);
    * ``mean``, ``std``: ``mu_t`` and the unbiased ``sigma_t`` over all r^2 entries of ``O_t``;
      ``threshold`` = ``z sigma_t / T`` (``divide_by_tasks=True``, as released for the
      natural-image benchmarks) or ``z sigma_t``. An entry is trimmed when ``|O - mu| > threshold``.

    ``stack`` is ``[T, m, n]`` (T >= 2, min(m, n) >= 2, no task exactly zero); computed in its dtype
    (half widened to float32), as the merge would.
    """
    check_flag("divide_by_tasks", divide_by_tasks)
    stack, projected, diagonal, off_diagonal, mean, std = _trim_statistics(stack, z, key)
    tasks, rank, _ = projected.shape
    names = _resolve_names(names, tasks)
    divisor = tasks if divide_by_tasks else 1
    off_positions = ~torch.eye(rank, dtype=torch.bool, device=projected.device)
    trimmed = ~trim_mask(off_diagonal, z, divisor) & off_positions  # [T, r, r]
    total = projected.square().sum(dim=(-2, -1))
    off_energy = off_diagonal.square().sum(dim=(-2, -1))
    trimmed_energy = (off_diagonal.square() * trimmed).sum(dim=(-2, -1))
    return pd.DataFrame({
        "task": names,
        "r": rank,
        "k": rank_per_task(key, rank, tasks),
        "captured": _column(total / stack.square().sum(dim=(-2, -1))),
        "diagonal_energy": _column(diagonal.square().sum(dim=-1) / total),
        "off_diagonal_energy": _column(off_energy / total),
        "trimmed_entries": _column(trimmed.sum(dim=(-2, -1)).to(projected.dtype) / (rank * rank - rank)),
        "trimmed_energy": _column(torch.where(off_energy > 0, trimmed_energy / off_energy.clamp_min(
            torch.finfo(projected.dtype).tiny), torch.zeros_like(off_energy))),
        "threshold": _column(z * std / divisor),
        "mean": _column(mean),
        "std": _column(std),
    })


def off_diagonal_entries(
    stack: torch.Tensor,
    *,
    z: float = 1.96,
    names: Sequence[str] | None = None,
    key: str = "layer",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The off-diagonal entries of SCORE's projected matrices, for histograms: ``(entries, stats)``.

    ``entries``: one row per task and off-diagonal position (``T (r^2 - r)`` rows; about 4.7 M for
    a ViT-B layer and T = 8, so pass one layer at a time), columns ``task`` (categorical), ``row``,
    ``column``, ``value`` (the entry of ``M_t``), ``kept_divided`` and ``kept_undivided`` (whether
    SCORE keeps it with the threshold ``z sigma / T`` resp. ``z sigma``).

    ``stats``: one row per task, columns ``task``, ``mean``, ``std`` (``mu_t`` and the unbiased
    ``sigma_t`` over all r^2 entries of the diagonal-zeroed matrix, as SCORE computes them),
    ``threshold_divided`` (``z sigma / T``) and ``threshold_undivided`` (``z sigma``): an entry is
    kept when ``|value - mean| <= threshold``.
    """
    _, projected, _, off_diagonal, mean, std = _trim_statistics(stack, z, key)
    tasks, rank, _ = projected.shape
    names = _resolve_names(names, tasks)
    rows, cols = torch.nonzero(~torch.eye(rank, dtype=torch.bool), as_tuple=True)  # row-major order
    rows_d, cols_d = rows.to(projected.device), cols.to(projected.device)
    values = off_diagonal[:, rows_d, cols_d]  # [T, r^2 - r]
    kept_divided = trim_mask(off_diagonal, z, tasks)[:, rows_d, cols_d]
    kept_undivided = trim_mask(off_diagonal, z, 1)[:, rows_d, cols_d]
    count = rows.numel()
    entries = pd.DataFrame({
        "task": pd.Categorical([name for name in names for _ in range(count)], categories=names),
        "row": _column(rows.repeat(tasks)),
        "column": _column(cols.repeat(tasks)),
        "value": _column(values.flatten()),
        "kept_divided": _column(kept_divided.flatten()),
        "kept_undivided": _column(kept_undivided.flatten()),
    })
    stats = pd.DataFrame({
        "task": names,
        "mean": _column(mean),
        "std": _column(std),
        "threshold_divided": _column(z * std / tasks),
        "threshold_undivided": _column(z * std),
    })
    return entries, stats


# ------------------------------------------------------------------ singular task interference
def _interference_rank(rank, key: str, r: int, tasks: int) -> int:
    if rank is None:
        return r
    if rank == "tsv":
        return rank_per_task(key, r, tasks)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ParameterValueError(f"rank must be None, 'tsv' or an integer, got {rank!r}")
    if not 1 <= rank <= r:
        raise ParameterValueError(f"{key!r}: rank must lie in [1, {r}] (min(m, n)), got {rank}")
    return rank


def singular_task_interference(stack: torch.Tensor, *, rank: int | str | None = None, key: str = "layer") -> float:
    """TSV's Singular Task Interference of one layer (arXiv 2412.00081, Eq. 6):
    ``||(U^T U - I) Sigma (V^T V - I)||_1`` (entry-wise L1 norm) over the tasks' first k singular
    triplets side by side.

    ``stack`` is ``[T, m, n]`` (T >= 2, no task exactly zero), computed in its dtype (half widened
    to float32). ``rank``: ``None`` = every triplet (k = min(m, n), Eq. 6 on the full SVDs);
    ``"tsv"`` = TSV-M's ``int(r / T)``; an integer = that k. The Gram matrices are ``Tk x Tk``:
    with the full rank of a ViT-B layer and T = 8, three 6144 x 6144 matrices (300 MB each in
    float64).
    """
    stack = _check_stack(stack)
    tasks = stack.shape[0]
    k = _interference_rank(rank, key, min(stack.shape[1:]), tasks)
    zeros = _zero_tasks(stack)
    if zeros:
        raise ParameterValueError(
            f"{key!r}: the task matrix of task(s) {zeros} is exactly zero; its singular vectors are arbitrary")
    left, sigma, right = concatenated_singular_vectors(*svd(stack), k)  # [m, Tk], [Tk], [Tk, n]
    identity = torch.eye(tasks * k, dtype=stack.dtype, device=stack.device)
    left_gram = left.mT @ left - identity     # U^T U - I: cosines between different tasks' left vectors
    right_gram = right @ right.mT - identity  # V^T V - I
    return float(((left_gram * sigma) @ right_gram).abs().sum())


def interference_per_layer(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    *,
    keys: Sequence[str] | None = None,
    rank: int | str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
    zero_layers: str = "skip",
) -> pd.DataFrame:
    """:func:`singular_task_interference` of every layer: columns ``key``, ``block``,
    ``layer_type``, ``k`` (triplets per task), ``sti``.

    Keys default to :func:`visual_matrix_keys`; ``rank`` as in :func:`singular_task_interference`
    (an integer larger than a layer's min(m, n) raises); layers where a task is exactly zero are
    skipped with a warning (``zero_layers="skip"``) or raise (``"raise"``).
    """
    task_vectors = check_task_vector_list(task_vectors, 2, "measure their interference")
    check_choice("zero_layers", zero_layers, ZERO_LAYERS)
    keys = _resolve_keys(task_vectors, keys)
    device = resolve_device(device)
    rows, skipped = [], []
    for key in keys:
        stack = stacked(task_vectors, key, device=device, dtype=dtype)
        if _zero_tasks(stack):
            if zero_layers == "raise":
                singular_task_interference(stack, rank=rank, key=key)  # raises the explanatory error
            skipped.append(key)
            continue
        block, layer_type = layer_info(key)
        k = _interference_rank(rank, key, min(stack.shape[1:]), stack.shape[0])
        rows.append((key, block, layer_type, k, singular_task_interference(stack, rank=rank, key=key)))
        del stack
    if skipped:
        warnings.warn(f"STI: skipped {len(skipped)} layer(s) where some task matrix is exactly zero: {skipped}",
                      stacklevel=2)
    frame = pd.DataFrame(rows, columns=["key", "block", "layer_type", "k", "sti"])
    frame["block"] = pd.array(frame["block"].tolist(), dtype="Int64")
    return frame
