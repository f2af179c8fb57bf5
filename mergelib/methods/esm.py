"""ESM: Essential Subspace Merging (Li, Qi, Tian, Geng, CVPR 2026, arXiv 2602.20208).

Matrix rule (as released): 2-D tensors whose name does not contain ``text_projection`` take the
matrix path; every other tensor (biases, LayerNorms, class embedding, the 4-D ``conv1``,
``text_projection``, ``logit_scale``) is averaged over the tasks. Among the matrices, the *ESD
layers* of every residual block of the image tower, ``visual.transformer.resblocks.<i>.``
{``attn.in_proj_weight`` (QKV), ``mlp.c_fc.weight`` (fc1), ``mlp.c_proj.weight`` (fc2)}, are
merged by ESM; the other matrices (``attn.out_proj.weight``, ``visual.positional_embedding``,
``visual.proj``) by plain TSV-M (:func:`mergelib.methods.tsv.tsv_merge_matrix`).

**Essential subspaces** (computed beforehand from models and data by
:func:`mergelib.models.essential.essential_subspaces`, one dict per task): for task t and an ESD layer
with task matrix ``ΔW_t`` (``d_out x d_in``), ``E_t`` are the principal directions (columns,
sorted) and ``λ_t`` the eigenvalues of the activation offsets ``X ΔW_tᵀ`` on proxy inputs of the
expert (uncentred PCA). ``decomposition="svd"`` uses the left singular vectors of ``ΔW_t`` and
``σ²`` instead (the paper's ablation "SVD + polarized scaling"; needs no data).

**Merge of one ESD layer** (rank budget ``k = int(d_out / T)``, released and paper alike):

    C_t = E_tᵀ ΔW_t,                n_t = ‖C_t‖_F                      (task norm)
    ω_t = (λ_t[:k] / mean λ_t[:k])^γ,   ω_t ← ω_t / mean ω_t             (eigenvalue weights, γ = 0.15)
    Ê = [E_1[:, :k] diag(ω_1) | … | E_T[:, :k] diag(ω_T)]                (d_out x T k)
    Ĉ = [s_1 diag(ω_1) C_1[:k] ; … ; s_T diag(ω_T) C_T[:k]],  s_t = (n_t / mean n)^p   (task level)
    Ĉ[:, j] ← Ĉ[:, j] (g_j / mean g)^p,  g_j = ‖Ĉ[:, j]‖₂                (dimension level)
    ΔW = c · (mean σ(Ê)) polar(Ê) · (mean σ(Ĉ)) polar(Ĉ)                (c = 2)

with ``p = 2`` (polarized scaling: squared relative norms). After all layers are merged,
**layer-level** polarization scales each ``ΔW_ℓ`` of the four block layer types (in_proj,
out_proj, c_fc, c_proj; out_proj included although TSV-merged) by ``(‖ΔW_ℓ‖_F / μ_type)^p``,
``μ_type`` the mean norm over the blocks of that type. The merged model is
``θ_0 + α ΔW`` on the ESD keys and ``θ_0 + ΔW`` elsewhere (released); the released code picks α
by a golden-section search on validation data (see the code notes); that search is the caller's,
``alpha`` here is just the factor.

**Released code vs paper.** The defaults follow the released code (``kiddo127/ESM``,
``ESM-ViT/src/utils/esm_utils.py``); each difference has a switch whose other value is the paper
text where there is one (the CVPR text itself could not be read; the paper side is from
third-party notes). Where this follows the released code rather than the paper: see
``METHODS['esm'].code_notes`` and the book's Paper versus released code page.

Parameters that are not such differences: ``task_scaling``, ``dimension_scaling``,
``layer_scaling`` (all ``True``) switch the three polarization levels one at a time (the paper's
ablation); ``polarization_power=2`` is their common exponent (``-2`` is the reciprocal scaling the
paper reports as harmful). ``rank_budget="output"`` gives ``k = int(d_out / T)`` for the ESD
layers (paper and code; for fc1 and QKV far more than TSV's ``int(min(d_out, d_in) / T)``, which
``rank_budget="min_dim"`` selects, e.g. for the SVD ablation). With ``decomposition="svd"`` at
most ``min(d_out, d_in)`` singular vectors exist, so ``k`` is capped there.

Numerical notes: when all ``λ_t[:k]`` are zero (a zero task matrix among non-zero ones) the
eigenvalue weights are taken as 1 (the released code would divide 0 by 0); an all-zero stack
merges to zero. If ``Ê`` or ``Ĉ`` is rank-deficient (e.g. padded axes with zero weight when the
proxy set has fewer rows than ``k``), the polar factor's null directions are the SVD routine's
choice, as in the released code. Everything is computed one tensor name at a time on ``device``,
in float32 (half precision widened) or float64 for float64 inputs; on the CPU the output is a
deterministic function of the inputs.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from mergelib.errors import ParameterValueError, StateKeyError
from mergelib.methods.common import (
    BLOCK_KEY_PATTERN,
    Choice,
    Flag,
    Number,
    StateDict,
    block_layer,
    check_choice,
    check_tensor,
    describe_keys,
    is_all_zero,
    is_list_like,
    is_matrix,
    prefix_hint,
    rank_per_task,
    resolve_device,
    stacked,
)
from mergelib.methods.factors import task_triplets
from mergelib.methods.registry import CodeNote, MethodSpec, parse_method_spec, register
from mergelib.methods.tsv import tsv_merge_matrix

ESD_LAYER_SETS: dict[str, tuple[str, ...]] = {
    "released": ("attn.in_proj_weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
    "all_linear": ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
}
LAYER_TYPES: tuple[str, ...] = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

ALPHA_SCOPES = ("esd_keys", "all")
DECOMPOSITIONS = ("esd", "svd")
RANK_BUDGETS = ("output", "min_dim")
TASK_NORMS = ("full", "truncated")


def layer_type(key: str) -> str | None:
    """The block layer type of ``key`` (one of :data:`LAYER_TYPES`) for the image tower's blocks, else None."""
    block = block_layer(key)
    return block[1] if block is not None and block[1] in LAYER_TYPES else None


def esd_keys(keys: Sequence[str], esd_layers: str = "released") -> list[str]:
    """The keys merged by ESM (the ESD layers of the image tower's blocks), in order."""
    check_choice("esd_layers", esd_layers, tuple(ESD_LAYER_SETS))
    wanted = ESD_LAYER_SETS[esd_layers]
    return [key for key in keys if layer_type(key) in wanted]


def rank_budget_of(key: str, shape: Sequence[int], tasks: int, rank_budget: str = "output") -> int:
    """Directions per task: ``int(d_out / T)`` (``"output"``) or ``int(min(d_out, d_in) / T)`` (``"min_dim"``)."""
    d_out, d_in = shape
    return rank_per_task(key, d_out if rank_budget == "output" else min(d_out, d_in), tasks)


def eigen_weights(eigenvalues: torch.Tensor, exponent: float) -> torch.Tensor:
    """``ω = (λ / mean λ)^γ`` normalised to mean 1 (all ones when ``γ = 0`` or every ``λ`` is zero)."""
    values = eigenvalues.clamp_min(0)
    mean = values.mean()
    if exponent == 0 or not bool(mean > 0):
        return torch.ones_like(values)
    weights = (values / mean).pow(exponent)
    return weights / weights.mean()


def _whiten(matrix: torch.Tensor, mean_singular_value_scaling: bool) -> torch.Tensor:
    """The polar factor ``P Qᵀ`` of ``matrix``, times its mean singular value when asked
    (a wide matrix is decomposed through its transpose: same factor, much faster)."""
    if matrix.shape[-2] < matrix.shape[-1]:
        return _whiten(matrix.mT, mean_singular_value_scaling).mT
    p, s, qh = torch.linalg.svd(matrix, full_matrices=False)
    factor = p @ qh
    return factor * s.mean() if mean_singular_value_scaling else factor


def _relative_power(values: torch.Tensor, power: float) -> torch.Tensor:
    """``(v / mean v)^power`` with zeros kept at zero (so a negative power never gives inf)."""
    mean = values.mean()
    if not bool(mean > 0):
        return torch.ones_like(values)
    ratio = values / mean
    return torch.where(ratio > 0, ratio.pow(power), torch.zeros_like(ratio))


def esm_merge_matrix(
    key: str,
    stack: torch.Tensor,
    subspaces: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
    *,
    rank_budget: str = "output",
    eigen_exponent: float = 0.15,
    task_scaling: bool = True,
    task_norm: str = "full",
    dimension_scaling: bool = True,
    polarization_power: float = 2.0,
    mean_singular_value_scaling: bool = True,
    output_factor: float = 2.0,
) -> torch.Tensor:
    """ESM of one ESD layer (before layer-level polarization and α).

    ``stack`` is ``[T, d_out, d_in]``; ``subspaces`` one ``(eigenvectors [d_out, >= k],
    eigenvalues [d_out])`` per task on ``stack``'s device and dtype, or ``None`` for the SVD
    decomposition (left singular vectors and ``σ²``). Returns ``[d_out, d_in]``.
    """
    if is_all_zero(stack):
        return torch.zeros_like(stack[0])
    tasks, d_out, d_in = stack.shape
    k = rank_budget_of(key, (d_out, d_in), tasks, rank_budget)
    if subspaces is None:
        k = min(k, d_out, d_in)
        left, singular, _ = task_triplets(stack, k)  # [T, d_out, k], [T, k]; once per expert (methods.factors)
        bases = [(left[t], singular[t].square()) for t in range(tasks)]
    else:
        bases = list(subspaces)
    columns, rows, norms = [], [], []
    for t in range(tasks):
        delta = stack[t]
        vectors, values = bases[t]
        top = vectors[:, :k]
        coords = top.T @ delta  # the kept coordinates Â_t, [k, d_in]
        if task_norm == "truncated":
            norm = torch.linalg.matrix_norm(coords)
        elif vectors.shape[1] == d_out:  # the released ‖E_tᵀ ΔW_t‖_F over the full basis
            norm = torch.linalg.matrix_norm(vectors.T @ delta)
        else:  # a truncated orthonormal basis: its completion gives ‖ΔW_t‖_F
            norm = torch.linalg.matrix_norm(delta)
        weights = eigen_weights(values[:k], eigen_exponent)
        columns.append(top * weights)
        rows.append(coords * weights[:, None])
        norms.append(norm)
    if task_scaling:
        factors = _relative_power(torch.stack(norms), polarization_power)
        rows = [r * f for r, f in zip(rows, factors)]
    basis = torch.cat(columns, dim=1)  # Ê, [d_out, T k]
    coordinates = torch.cat(rows, dim=0)  # Ĉ, [T k, d_in]
    if dimension_scaling:
        coordinates = coordinates * _relative_power(torch.linalg.vector_norm(coordinates, dim=0), polarization_power)
    merged = _whiten(basis, mean_singular_value_scaling) @ _whiten(coordinates, mean_singular_value_scaling)
    return merged * output_factor


def polarize_layers(
    merged: Mapping[str, torch.Tensor], *, power: float = 2.0, types: Sequence[str] = LAYER_TYPES
) -> dict[str, float]:
    """Layer-level polarization factors ``(‖ΔW_ℓ‖_F / μ_type)^power`` for the image tower's blocks.

    ``μ_type`` is the mean Frobenius norm of the merged matrices of one layer type (norms in
    float64). Returns ``{key: factor}`` for every block matrix of the given types; layers of a
    type whose norms are all zero get factor 1, zero layers factor 0 (they stay zero).
    """
    norms: dict[str, dict[str, float]] = {t: {} for t in types}
    for key, tensor in merged.items():
        kind = layer_type(key)
        if kind in norms:
            norms[kind][key] = float(torch.linalg.vector_norm(tensor.double()))
    factors: dict[str, float] = {}
    for kind, by_key in norms.items():
        if not by_key:
            continue
        mean = math.fsum(by_key.values()) / len(by_key)
        for key, norm in by_key.items():
            factors[key] = 1.0 if mean == 0 else ((norm / mean) ** power if norm > 0 else 0.0)
    return factors


def check_subspaces_argument(name: str, value: object) -> None:
    """None, or a sequence with one dict per task: ESD key -> (eigenvectors, eigenvalues).

    The parameter check of ``subspaces``; the dicts' entries are checked against the task vectors
    when merging.
    """
    if value is None:
        return
    if not is_list_like(value):
        raise ParameterValueError(
            f"{name} must be None or a sequence with one dict per task (key -> (eigenvectors, eigenvalues)), "
            f"got {type(value).__name__}"
        )
    for t, per_task in enumerate(value):
        if not isinstance(per_task, Mapping):
            raise ParameterValueError(
                f"{name}[{t}] must be a dict key -> (eigenvectors, eigenvalues), got {type(per_task).__name__}")


def _check_subspaces(
    subspaces: object,
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    keys: Sequence[str],
    rank_budget: str,
) -> None:
    """Subspaces: one mapping per task with ``(eigenvectors [d_out, >= k], eigenvalues [d_out])`` per ESD key."""
    tasks = len(task_vectors)
    if subspaces is None:
        raise ValueError(
            "esm with decomposition='esd' needs subspaces: a list with one dict per task (in the order of "
            "the task vectors), key -> (eigenvectors, eigenvalues), computed for task t by "
            "mergelib.models.essential.essential_subspaces(image_encoder, pretrained_state, task_vectors[t], "
            "proxy_inputs_t) on a few proxy images of that task; or use decomposition='svd', which needs no data"
        )
    if len(subspaces) != tasks:
        raise ValueError(f"subspaces has {len(subspaces)} entries but there are {tasks} task vectors (one dict per task)")
    for t, per_task in enumerate(subspaces):
        missing = [key for key in keys if key not in per_task]
        if missing:
            raise ParameterValueError(
                f"subspaces[{t}] lacks {len(missing)} ESD keys, e.g. {missing[:3]}; it has {describe_keys(per_task)}"
                f"{prefix_hint(missing, per_task)}; compute them with "
                "mergelib.models.essential.essential_subspaces(..., layers=...) matching esd_layers"
            )
        for key in keys:
            entry = per_task[key]
            d_out, d_in = task_vectors[0][key].shape
            if (
                not isinstance(entry, Sequence)
                or len(entry) != 2
                or not all(isinstance(part, torch.Tensor) for part in entry)
            ):
                raise ValueError(f"subspaces[{t}][{key!r}] must be a pair of tensors (eigenvectors, eigenvalues)")
            vectors, values = entry
            k = rank_budget_of(key, (d_out, d_in), tasks, rank_budget)
            if vectors.ndim != 2 or vectors.shape[0] != d_out:
                raise ValueError(
                    f"subspaces[{t}][{key!r}]: eigenvectors must be [d_out={d_out}, columns], got {tuple(vectors.shape)}"
                )
            if vectors.shape[1] < k:
                raise ValueError(
                    f"subspaces[{t}][{key!r}] keeps {vectors.shape[1]} eigenvectors but the rank budget needs "
                    f"{k} per task; recompute with essential_subspaces(keep >= {k})"
                )
            if values.shape != (d_out,):
                raise ValueError(f"subspaces[{t}][{key!r}]: eigenvalues must have shape ({d_out},), got {tuple(values.shape)}")
            if not (vectors.is_floating_point() and values.is_floating_point()):
                raise ValueError(f"subspaces[{t}][{key!r}] must be floating point")
            check_tensor(f"subspaces[{t}][{key!r}] eigenvectors", vectors)
            check_tensor(f"subspaces[{t}][{key!r}] eigenvalues", values)


@register(
    "esm",
    paper="Model Merging in the Essential Subspace (Li, Qi, Tian, Geng, CVPR 2026)",
    arxiv="2602.20208",
    equation=(
        r"\Delta W^\ell = \alpha\,\beta_\ell\, c\,\bar\sigma(\hat E)\operatorname{polar}(\hat E)\,"
        r"\bar\sigma(\hat C)\operatorname{polar}(\hat C),\ "
        r"\hat E = [E_1^{(k)}\Omega_1 \cdots E_T^{(k)}\Omega_T],\ "
        r"\hat C = \Big[\big(\tfrac{n_t}{\bar n}\big)^{2}\Omega_t E_t^{(k)\top}\Delta W_t\Big]_{t}"
        r"\operatorname{diag}\big((g_j/\bar g)^{2}\big),\ "
        r"\Omega_t \propto \operatorname{diag}(\lambda_t/\bar\lambda_t)^{0.15},\ "
        r"\beta_\ell = \big(\|\Delta W^\ell\|_F/\mu_{\mathrm{type}}\big)^{2},\ k = \lfloor d_{\mathrm{out}}/T\rfloor"
    ),
    code_notes=(
        CodeNote("eigenvalue weighting",
                 paper="none (notes)",
                 released="basis columns and coordinate rows weighted by ω_t = (λ_t / mean λ_t)^0.15, normalised "
                          "to mean 1 (probably an addition of the extended version, arXiv 2606.19164)",
                 switch="eigen_exponent=0"),
        CodeNote("whitening",
                 paper="bare polar factors U_P V_Pᵀ, U_A V_Aᵀ (notes)",
                 released="each polar factor rescaled by the mean singular value of what it whitens",
                 switch="mean_singular_value_scaling=False"),
        CodeNote("output factor",
                 paper="none, i.e. 1 (notes)",
                 released="the merged ESD layers are doubled; since α scales only the ESD keys, this factor is "
                          "not absorbed by α for the other keys' relative scale",
                 switch="output_factor=1.0"),
        CodeNote("task norm",
                 paper="of the truncated coordinates, ‖Â_t‖_F of the k kept rows (notes)",
                 released="of the full coordinates, n_t = ‖E_tᵀ ΔW_t‖_F (‖ΔW_t‖_F for a complete orthonormal "
                          "basis); its full basis is not orthonormal only when the PCA had fewer rows than d_out "
                          "(padded standard axes, e.g. ViT-B/32 QKV and fc1 with 32 images), where it counts the "
                          "padded rows of ΔW_t twice",
                 switch="task_norm='truncated'",
                 mergelib="a subspace stored truncated (`essential_subspaces(keep=...)` < d_out columns) gives "
                          "‖ΔW_t‖_F, its value for any orthonormal completion; pass complete bases (keep=d_out) "
                          "to reproduce the released value exactly. Measured once by the project with the "
                          "released code (not rerun by the build): its task norm with truncated subspaces differs "
                          "from mergelib's by about 2e-3"),
        CodeNote("which layers get the ESD",
                 paper="every layer, no exclusion described (notes)",
                 released="QKV, MLP fc1 and fc2 (out_proj's hook is commented out); `attn.out_proj.weight`, "
                          "`visual.proj` and the positional embedding get TSV-M, non-matrices the mean",
                 switch="esd_layers='all_linear'",
                 mergelib="`visual.proj` and the positional embedding stay TSV-M in both settings (a single "
                          "class token per image is too few rows for a PCA, as the released code notes)"),
        CodeNote("layer-level polarization",
                 paper="a factor β_ℓ per layer (notes)",
                 released="β_ℓ = (‖ΔW_ℓ‖_F / μ_type)^p with μ_type the mean over the blocks of each of in_proj, "
                          "out_proj, c_fc, c_proj separately, out_proj included although it is TSV-merged"),
        CodeNote("where α applies",
                 paper="θ_0 + α β_ℓ ΔW on every key (notes)",
                 released="α multiplies only the ESD keys; the other keys are added with coefficient 1",
                 switch="alpha_scope='all'",
                 mergelib="with `alpha_scope='esd_keys'` the caller applies the merged vector with global "
                          "coefficient 1"),
        CodeNote("choosing α",
                 paper="on validation data (notes)",
                 released="golden-section search on [0, 2] (ratio 0.618, first points 0.764 and 1.236, at most 15 "
                          "iterations, bracket < 0.01) comparing validation mean accuracy, keeping the evaluated α "
                          "with the best validation normalized accuracy (reference §0.6)",
                 mergelib="the search is the caller's (`alpha` is just the factor); the miniature chooses the "
                          "coefficient on a validation grid (the ESM derivation chapter)"),
        CodeNote("proxy data",
                 paper="a few proxy inputs per task (notes)",
                 released="min(32, N) validation images of each expert (np.random.RandomState(seed).choice), hooks "
                          "on θ_0 + τ_t, uncentred PCA with λ = s² / (n − 1), padded with standard axes when "
                          "n < d_out",
                 mergelib="as released (`mergelib.models.essential.essential_subspaces`)"),
        CodeNote("ordering of tied eigenvalues",
                 paper="not discussed",
                 released="when the per-task budget exceeds the number of non-zero eigenvalues (for `mlp.c_fc` "
                          "whenever T ≤ 3 at ViT widths), it picks among exactly-zero eigenvalues with an unstable "
                          "sort, so its result there is not a function of its inputs",
                 mergelib="a stable order: deterministic. Measured once by the project with the released code "
                          "on a ViT-B/32 block (not rerun by the build): merged `c_fc` differs by about 5e-2 "
                          "(relative) from mergelib's, 7e-6 when both are given the same subspaces"),
    ),
    checks=dict(
        subspaces=check_subspaces_argument, alpha=Number(), alpha_scope=Choice(ALPHA_SCOPES),
        esd_layers=Choice(tuple(ESD_LAYER_SETS)), decomposition=Choice(DECOMPOSITIONS),
        rank_budget=Choice(RANK_BUDGETS), eigen_exponent=Number(minimum=0), task_scaling=Flag(),
        task_norm=Choice(TASK_NORMS), dimension_scaling=Flag(), layer_scaling=Flag(),
        polarization_power=Number(), mean_singular_value_scaling=Flag(), output_factor=Number(minimum=0, strict=True),
    ),
)
def esm(
    task_vectors: Sequence[StateDict],
    *,
    device: torch.device | None = None,
    subspaces: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
    alpha: float = 1.0,
    alpha_scope: str = "esd_keys",
    esd_layers: str = "released",
    decomposition: str = "esd",
    rank_budget: str = "output",
    eigen_exponent: float = 0.15,
    task_scaling: bool = True,
    task_norm: str = "full",
    dimension_scaling: bool = True,
    layer_scaling: bool = True,
    polarization_power: float = 2.0,
    mean_singular_value_scaling: bool = True,
    output_factor: float = 2.0,
) -> StateDict:
    """ESM: merge in each task's essential (activation-PCA) subspace, with polarized scaling.

    Matrix rule: 2-D tensors whose name does not contain ``text_projection`` take the matrix
    path (ESD layers by ESM, the others by TSV-M); every other tensor is averaged over the tasks.

    Args:
        subspaces: one dict per task (same order as ``task_vectors``), ESD key ->
            ``(eigenvectors [d_out, >= k], eigenvalues [d_out])``, from
            :func:`mergelib.models.essential.essential_subspaces`; required for ``decomposition="esd"``
            (the task vectors must hold ESD layers, see ``ESD_LAYER_SETS``), unused for ``"svd"``;
            extra keys are ignored.
        alpha: the factor of the merged vector on ``alpha_scope`` (``"esd_keys"``, released, or
            ``"all"``); apply the result with global coefficient 1.
        esd_layers: ``"released"`` (QKV, fc1, fc2) or ``"all_linear"`` (adds out_proj).
        decomposition: ``"esd"`` or ``"svd"`` (left singular vectors and ``σ²`` instead).
        rank_budget: ``"output"`` (``int(d_out/T)``) or ``"min_dim"`` (TSV's ``int(min(d_out, d_in)/T)``).
        eigen_exponent: γ of the eigenvalue weights (>= 0; 0 turns them off).
        task_scaling, dimension_scaling, layer_scaling: the three polarization levels.
        task_norm: ``"full"`` (released) or ``"truncated"`` (paper) task norm.
        polarization_power: the exponent of the three polarization levels (2).
        mean_singular_value_scaling: rescale each polar factor by its mean singular value.
        output_factor: the constant factor of the merged ESD layers (2; paper 1).
    """
    vectors = list(task_vectors)
    device = resolve_device(device)
    keys = list(vectors[0])
    targets = [key for key in esd_keys(keys, esd_layers) if is_matrix(key, vectors[0][key])]
    if not targets:
        layers = ", ".join(ESD_LAYER_SETS[esd_layers])
        raise StateKeyError(
            f"esm merges the image tower's blocks: it expects 2-D tensors named {BLOCK_KEY_PATTERN!r} with <layer> one "
            f"of {layers} (e.g. 'visual.transformer.resblocks.0.attn.in_proj_weight'); the task vectors have none "
            f"among their {describe_keys(keys)}{prefix_hint([], keys)}. For tensors outside that convention use tsv_m"
        )
    if decomposition == "esd":
        _check_subspaces(subspaces, vectors, targets, rank_budget)
    target_set = set(targets)
    options = dict(
        rank_budget=rank_budget,
        eigen_exponent=float(eigen_exponent),
        task_scaling=task_scaling,
        task_norm=task_norm,
        dimension_scaling=dimension_scaling,
        polarization_power=float(polarization_power),
        mean_singular_value_scaling=mean_singular_value_scaling,
        output_factor=float(output_factor),
    )

    merged: StateDict = {}  # in the compute dtype until the end, on the inputs' devices
    for key in keys:
        source = vectors[0][key]
        stack = stacked(vectors, key, device=device)
        if key in target_set:
            bases = None
            if decomposition == "esd":
                bases = [
                    tuple(part.to(device=device, dtype=stack.dtype) for part in subspaces[t][key])
                    for t in range(len(vectors))
                ]
            result = esm_merge_matrix(key, stack, bases, **options)
        elif is_matrix(key, source):
            result = tsv_merge_matrix(key, stack)
        else:
            result = stack.mean(dim=0)
        merged[key] = result.to(source.device)
        del stack

    if layer_scaling:
        for key, factor in polarize_layers(merged, power=float(polarization_power)).items():
            merged[key] = merged[key] * factor
    if alpha != 1:
        for key in targets if alpha_scope == "esd_keys" else keys:
            merged[key] = merged[key] * float(alpha)
    return {key: merged[key].to(dtype=vectors[0][key].dtype) for key in keys}


def needs_essential_subspaces(method: str | MethodSpec) -> bool:
    """Whether a method spec is ESM with its activation decomposition (the default), which needs
    each expert's essential subspaces, hence a model and proxy data, beside the task vectors."""
    spec = method if isinstance(method, MethodSpec) else parse_method_spec(method)
    return spec.name == "esm" and spec.params.get("decomposition", "esd") == "esd"
