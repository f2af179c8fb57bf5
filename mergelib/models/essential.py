"""Essential subspace decomposition (ESD) of task vectors, for ESM (Li, Qi, Tian, Geng, CVPR 2026, arXiv 2602.20208).

ESM replaces the singular vectors of a task matrix ``ΔW_t`` (``d_out x d_in``) by the principal
directions of the *output shift* it causes on real inputs. With ``X`` the inputs that the layer
receives inside the expert ``θ_0 + τ_t`` on a few unlabelled proxy images (one row per token and
image), the activation offset is ``D = X ΔW_tᵀ`` (``n x d_out``) and the ESD is its uncentred PCA:

    D = A diag(s) Bᵀ (thin SVD),   E_t = B,   λ_i = s_i² / (n - 1),

sorted by decreasing ``λ``. Keeping the top ``k`` directions, ``ΔW_t ≈ E_k E_kᵀ ΔW_t``, loses
exactly ``Σ_{i>k} λ_i (n - 1) = ‖X (ΔW_t - E_k E_kᵀ ΔW_t)ᵀ‖_F²`` of output energy on the proxy
inputs, the least any rank-k update of the output space can lose; truncating the SVD instead loses
``Σ_{i>k} σ_i² ‖X v_i‖²``. With ``X = I`` (isotropic inputs) the ESD *is* the SVD (``E`` = the
left singular vectors, ``λ ∝ σ²``): ESD is an SVD weighted by what the layer actually receives.

What this module follows from the released code (``kiddo127/ESM``, ``ESM-ViT``):

* **Where the hooks sit.** On the expert ``θ_0 + τ_t`` (not the pretrained model), for every
  residual block of the image tower: QKV (``attn.in_proj_weight``) receives the input of the
  ``attn`` module, i.e. the LayerNorm-1 output that open_clip's ``ResidualAttentionBlock.attention``
  passes as query, key and value; fc1 (``mlp.c_fc.weight``) receives the input of ``mlp.c_fc``
  (LayerNorm-2 output); fc2 (``mlp.c_proj.weight``) the input of ``mlp.c_proj`` (after the
  activation). ``layers="all_linear"`` adds ``attn.out_proj.weight``, whose input (the heads'
  attention outputs) ``nn.MultiheadAttention`` never passes through the ``out_proj`` module: it is
  recomputed exactly from the hooked query (the released code only has a commented-out
  approximation that skips the attention). ``visual.proj`` is never decomposed (one class token
  per image is too few rows, as the released code notes).
* **Rows.** Tokens x images are flattened into rows in image-major order (open_clip 3.x runs
  the blocks batch first; a sequence-first layout is transposed first, so the rows are the same).
* **PCA.** Not mean-centred; ``λ = s² / (n - 1)``; when ``n < d_out`` the thin SVD has only
  ``n`` directions and the basis is padded, as released, with the standard-basis axes
  ``e_{n+1} .. e_{d_out}`` (zero eigenvalue). Those padded columns are *not* orthogonal to the
  real eigenvectors; for ``T >= 2`` tasks they are reached only when ``int(d_out/T) > n``.
  The released code's fallback (re-running a failed SVD on ``0.1 D``) is not needed here.
* **Proxy images.** ``min(32, N)`` images of the expert's own validation split, drawn by
  ``np.random.RandomState(seed).choice(N, n, replace=False)`` (:func:`proxy_indices`), with the
  evaluation preprocessing; ONE forward pass, labels unused. The released ``config.yaml`` has
  ``seed: 1``, its scripts and README pass ``seed=0``.

Determinism: each eigenvector's largest-magnitude entry is made positive (the rule of
:func:`mergelib.methods.common.fix_signs`); ties in ``λ`` keep the SVD's order (stable sort).

Memory: :func:`essential_subspaces` computes each layer's ESD inside its forward hook, so the
inputs of all layers are never held at once, and keeps only the first ``keep`` eigenvectors
(default ``ceil(d_out / 2)``, enough for ESM's budget ``int(d_out / T)`` with ``T >= 2`` tasks).
"""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mergelib.methods.common import check_choice, check_tensor, compute_dtype, fix_signs, require_keys, resolve_device

if TYPE_CHECKING:  # the backbones module imports open_clip; only needed by subspaces_of_experts
    from mergelib.models.backbones import Clip
from mergelib.methods.esm import ESD_LAYER_SETS
from mergelib.task_vectors import PREFIX, apply_task_vector, load_encoder_state

Subspace = tuple[torch.Tensor, torch.Tensor]  # (eigenvectors [d_out, keep], eigenvalues [d_out])


def default_keep(d_out: int) -> int:
    """The default number of eigenvectors kept: ``ceil(d_out / 2)`` (>= ``int(d_out / T)`` for T >= 2)."""
    return -(-d_out // 2)


def _resolve_keep(keep: int | None, d_out: int) -> int:
    if keep is None:
        return default_keep(d_out)
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or keep < 1:
        raise ValueError(f"keep must be a positive integer (eigenvectors kept per layer) or None, got {keep!r}")
    return min(int(keep), d_out)


def activation_pca(
    inputs: torch.Tensor, delta_w: torch.Tensor, keep: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ESD of one layer: uncentred PCA of the activation offsets ``D = X ΔWᵀ``.

    Args:
        inputs: ``X``, ``[n, d_in]``, the inputs the layer receives (one row per token and image).
        delta_w: ``ΔW``, ``[d_out, d_in]``, the layer's task matrix.
        keep: eigenvectors returned (``None``: ``ceil(d_out / 2)``; capped at ``d_out``).

    Returns:
        ``(eigenvectors [d_out, keep], eigenvalues [d_out])``: the right singular vectors of ``D``
        as columns and ``λ = s² / (n - 1)``, sorted by decreasing ``λ``; when ``n < d_out`` the
        basis is padded with the standard axes ``e_{n+1} .. e_{d_out}`` and ``λ`` with zeros, as in
        the released code. Signs: each eigenvector's largest-magnitude entry is positive.
        Computed in the wider dtype of the two inputs (half precision widened to float32).
    """
    if inputs.ndim != 2 or delta_w.ndim != 2:
        raise ValueError(
            f"activation_pca expects inputs [n, d_in] and delta_w [d_out, d_in], got "
            f"{tuple(inputs.shape)} and {tuple(delta_w.shape)}"
        )
    n, d_in = inputs.shape
    d_out = delta_w.shape[0]
    if delta_w.shape[1] != d_in:
        raise ValueError(f"inputs have {d_in} features but delta_w expects {delta_w.shape[1]} ({tuple(delta_w.shape)})")
    if n < 2:
        raise ValueError(f"activation_pca needs at least 2 input rows (λ = s² / (n - 1)), got {n}")
    keep = _resolve_keep(keep, d_out)
    dtype = compute_dtype(torch.promote_types(inputs.dtype, delta_w.dtype))
    x = inputs.to(dtype)
    offsets = x @ delta_w.to(device=x.device, dtype=dtype).T  # D, [n, d_out]
    _, s, vh = torch.linalg.svd(offsets, full_matrices=False)
    vectors = vh.T  # [d_out, min(n, d_out)]
    values = s.square() / (n - 1)
    found = vectors.shape[1]
    if found < d_out:  # pad with the remaining standard-basis axes, as the released code does
        full = torch.eye(d_out, dtype=dtype, device=x.device)
        full[:, :found] = vectors
        vectors = full
        values = torch.cat([values, values.new_zeros(d_out - found)])
    order = torch.sort(values, descending=True, stable=True).indices
    vectors, values = vectors[:, order], values[order]
    vectors = vectors[:, :keep]
    vectors, _ = fix_signs(vectors, vectors.T)
    return vectors.contiguous(), values.contiguous()


# --------------------------------------------------------------------------------------------
# Hooks on an open_clip image encoder
# --------------------------------------------------------------------------------------------


def _blocks(image_encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """The residual attention blocks: modules with ``attn`` and ``mlp.c_fc`` / ``mlp.c_proj``."""
    found = []
    for name, module in image_encoder.named_modules():
        attn, mlp = getattr(module, "attn", None), getattr(module, "mlp", None)
        if isinstance(attn, nn.Module) and isinstance(mlp, nn.Module) and hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):
            found.append((name, module))
    if not found:
        raise ValueError(
            "no open_clip residual attention blocks (with .attn and .mlp.c_fc/.mlp.c_proj) found; "
            "pass the image encoder (clip.model.visual) of an open_clip ViT"
        )
    return found


def _rows(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """``[B, L, d]`` (or ``[L, B, d]`` when not batch first) to image-major rows ``[B L, d]``."""
    if x.ndim == 3 and not batch_first:
        x = x.transpose(0, 1)
    return x.reshape(-1, x.shape[-1])


def _first_input(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    return args[0] if args else kwargs[name]


def _multihead_out_proj_input(
    attn: nn.MultiheadAttention, query: torch.Tensor, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    """The tensor ``nn.MultiheadAttention`` feeds to ``out_proj`` (self-attention, batch first ``[B, L, d]``).

    Recomputed from the query with the module's own weights: per head softmax(q kᵀ / sqrt(d_h) + mask) v,
    heads concatenated. Only the configurations open_clip uses are supported.
    """
    if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        raise ValueError("out_proj inputs can be recomputed only for plain self-attention nn.MultiheadAttention")
    batch, length, width = query.shape
    heads = attn.num_heads
    qkv = F.linear(query, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = (t.reshape(batch, length, heads, width // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    mask = None
    if attn_mask is not None:
        mask = attn_mask
        if mask.dtype == torch.bool:  # nn.MultiheadAttention: True = not allowed to attend
            mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill_(mask, float("-inf"))
        if mask.ndim == 3:  # [B * heads, L, L]
            mask = mask.reshape(batch, heads, length, length)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, length, width)


@contextlib.contextmanager
def layer_input_hooks(
    image_encoder: nn.Module,
    callback: Callable[[str, torch.Tensor], None],
    *,
    layers: str = "released",
) -> Iterator[list[str]]:
    """Forward hooks that pass each target layer's input rows to ``callback(key, X)``.

    ``key`` is the layer's weight name in open_clip's full-model naming (``visual.`` + the module
    path + ``.in_proj_weight`` / ``.out_proj.weight`` / ``.c_fc.weight`` / ``.c_proj.weight``) and
    ``X`` is ``[images x tokens, d_in]`` (image-major rows, whatever the block's layout). Targets
    (``layers``): ``"released"`` = QKV, fc1, fc2 of every block; ``"all_linear"`` adds out_proj.

    QKV: the first positional input of the block's ``attn`` module (open_clip's
    ``ResidualAttentionBlock.attention`` calls ``self.attn(q_x, k_x, v_x, ...)`` with
    ``q_x = k_x = v_x = ln_1(x)``); a cross-attention call (key not the query) is an error.

    Used as a context manager; yields the keys it will report and removes the hooks on exit.
    Hooks see tensors under whatever grad mode the caller runs; run the forward under
    ``torch.no_grad()``.
    """
    check_choice("layers", layers, tuple(ESD_LAYER_SETS))
    wanted = ESD_LAYER_SETS[layers]
    handles = []
    keys: list[str] = []

    def attn_hook(prefix: str, batch_first: bool, with_out_proj: bool, is_mha: bool):
        def hook(module, args, kwargs, output):
            query = _first_input(args, kwargs, "query" if is_mha else "x")
            if is_mha:
                key = args[1] if len(args) > 1 else kwargs.get("key")
                if key is not None and key is not query and not torch.equal(key, query):
                    raise ValueError(f"{prefix}attn: cross-attention (key differs from query) is not supported")
            x = query if batch_first or query.ndim != 3 else query.transpose(0, 1)
            if "attn.in_proj_weight" in wanted:
                callback(prefix + "attn.in_proj_weight", _rows(x, True))
            if with_out_proj and is_mha:
                if kwargs.get("key_padding_mask") is not None:
                    raise ValueError(f"{prefix}attn: key_padding_mask is not supported for out_proj inputs")
                mask = kwargs.get("attn_mask", args[5] if len(args) > 5 else None)
                callback(prefix + "attn.out_proj.weight", _rows(_multihead_out_proj_input(module, x, mask), True))

        return hook

    def linear_hook(key: str, batch_first: bool):
        def hook(module, args, output):
            callback(key, _rows(args[0], batch_first))

        return hook

    try:
        for name, block in _blocks(image_encoder):
            prefix = PREFIX + (name + "." if name else "")
            is_mha = isinstance(block.attn, nn.MultiheadAttention)
            batch_first = bool(getattr(block.attn, "batch_first", True))
            with_out_proj = "attn.out_proj.weight" in wanted
            if "attn.in_proj_weight" in wanted or (with_out_proj and is_mha):
                handles.append(
                    block.attn.register_forward_hook(attn_hook(prefix, batch_first, with_out_proj, is_mha), with_kwargs=True)
                )
            if with_out_proj and not is_mha:  # open_clip's custom Attention calls its out_proj module
                handles.append(block.attn.out_proj.register_forward_hook(linear_hook(prefix + "attn.out_proj.weight", batch_first)))
            if "mlp.c_fc.weight" in wanted:
                handles.append(block.mlp.c_fc.register_forward_hook(linear_hook(prefix + "mlp.c_fc.weight", batch_first)))
            if "mlp.c_proj.weight" in wanted:
                handles.append(block.mlp.c_proj.register_forward_hook(linear_hook(prefix + "mlp.c_proj.weight", batch_first)))
            keys.extend(prefix + suffix for suffix in wanted)
        yield keys
    finally:
        for handle in handles:
            handle.remove()


def collect_layer_inputs(
    image_encoder: nn.Module, inputs: torch.Tensor, *, layers: str = "released"
) -> dict[str, torch.Tensor]:
    """One forward pass of ``inputs``; every target layer's input rows ``[B L, d_in]`` by weight name.

    Holds the inputs of all target layers at once: for inspection and tests. ESM itself uses
    :func:`essential_subspaces`, which decomposes each layer inside its hook.
    """
    captured: dict[str, torch.Tensor] = {}

    def store(key: str, x: torch.Tensor) -> None:
        captured[key] = x.detach().clone()

    with layer_input_hooks(image_encoder, store, layers=layers), torch.no_grad():
        image_encoder(inputs)
    return captured


def check_model_input(name: str, images: object) -> torch.Tensor:
    """Raise unless ``images`` is a finite float model input ``[N, 3, H, W]`` with data."""
    check_tensor(name, images)
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"{name} must be the float model input [N, 3, H, W] (use proxy_batch and "
            f"mergelib.models.backbones.batch_to_model_input), got {images.dtype} {tuple(images.shape)}"
        )
    return images


def essential_subspaces(
    image_encoder: nn.Module,
    pretrained_state: Mapping[str, torch.Tensor],
    task_vector: Mapping[str, torch.Tensor],
    proxy_inputs: torch.Tensor,
    *,
    keep: int | None = None,
    layers: str = "released",
    device: str | torch.device | None = None,
) -> dict[str, Subspace]:
    """The ESD of every target layer of one expert ``θ_0 + τ_t``, from one forward pass.

    Args:
        image_encoder: an open_clip image encoder (``clip.model.visual``); it is copied, not changed.
        pretrained_state: ``θ_0`` as a ``visual.*`` state dict (:func:`mergelib.task_vectors.encoder_state`).
        task_vector: ``τ_t`` (``visual.*`` names), e.g. from :func:`mergelib.task_vectors.task_vector`.
        proxy_inputs: the model input of the proxy images, ``[N, 3, H, W]`` float (released: 32
            images of task t's validation split, :func:`proxy_batch` then
            :func:`mergelib.models.backbones.batch_to_model_input`).
        keep: eigenvectors kept per layer (``None``: ``ceil(d_out / 2)``, which loses nothing for
            ESM with T >= 2 tasks; an int is capped at each layer's ``d_out``).
        layers: ``"released"`` (QKV, fc1, fc2) or ``"all_linear"`` (adds out_proj).
        device: where the forward pass and the PCAs run (``None``: CUDA when available).

    Returns:
        ``{key: (eigenvectors [d_out, keep], eigenvalues [d_out])}`` on the CPU (float32 for a
        float32 model), keys as in :func:`layer_input_hooks`; pass one such dict per task to
        ``mergelib.merge("esm", task_vectors, subspaces=[...])``. ``ΔW`` is taken from
        ``task_vector`` in the activations' dtype, as the released code does.
    """
    device = resolve_device(device)
    check_model_input("proxy_inputs", proxy_inputs)
    expert = copy.deepcopy(image_encoder)
    load_encoder_state(expert, apply_task_vector(pretrained_state, task_vector))
    expert.to(device).eval()
    result: dict[str, Subspace] = {}

    def decompose(key: str, x: torch.Tensor) -> None:
        delta = task_vector[key].to(device=x.device, dtype=compute_dtype(x.dtype))
        vectors, values = activation_pca(x.detach(), delta, keep=_resolve_keep(keep, delta.shape[0]))
        result[key] = (vectors.cpu(), values.cpu())

    try:
        with layer_input_hooks(expert, decompose, layers=layers) as keys, torch.no_grad():
            require_keys(task_vector, keys, what="the task vector (for the hooked ESD layers)")
            expert(proxy_inputs.to(device))
    finally:
        del expert
    missing = [k for k in keys if k not in result]
    if missing:
        raise RuntimeError(f"the forward pass did not reach {len(missing)} hooked layers, e.g. {missing[:3]}")
    return {key: result[key] for key in keys}


def proxy_indices(count_available: int, count: int = 32, seed: int = 0) -> list[int]:
    """The released code's proxy draw: ``np.random.RandomState(seed).choice(N, min(count, N), replace=False)``."""
    if count_available < 1:
        raise ValueError("no images to draw proxy samples from")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    rng = np.random.RandomState(seed)
    return [int(i) for i in rng.choice(count_available, size=min(int(count), count_available), replace=False)]


def proxy_batch(images_uint8: torch.Tensor, count: int = 32, seed: int = 0) -> torch.Tensor:
    """``min(count, N)`` proxy images drawn as in the released code (:func:`proxy_indices`).

    ``images_uint8`` is ``[N, 3, H, W]`` uint8; returns the chosen images (uint8, in draw order);
    turn them into model input with :func:`mergelib.models.backbones.batch_to_model_input`.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, H, W], got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    index = torch.tensor(proxy_indices(images_uint8.shape[0], count, seed), dtype=torch.long, device=images_uint8.device)
    return images_uint8.index_select(0, index)


def subspaces_of_experts(
    clip: "Clip",
    pretrained_state: Mapping[str, torch.Tensor],
    task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
    proxy_images: Mapping[str, torch.Tensor],
    *,
    count: int = 32,
    seed: int = 0,
    keep: int | None = None,
    layers: str = "released",
    device: str | torch.device | None = None,
) -> dict[str, dict[str, Subspace]]:
    """:func:`essential_subspaces` of each named expert, on proxy images of its *own* data.

    ``proxy_images[name]`` holds uint8 images ``[N, 3, H, W]`` of expert ``name``'s own task or
    domain (never a held-out domain); :func:`proxy_batch` draws ``count`` of them with ``seed``,
    and the evaluation preprocessing of ``clip`` turns them into model input. An expert's
    subspaces do not depend on which other experts it is merged with, so a leave-one-domain-out
    run computes them once and passes ``[subspaces[s] for s in sources]`` to each fold's merge.
    """
    from mergelib.models.backbones import batch_to_model_input

    return {
        name: essential_subspaces(
            clip.model.visual, pretrained_state, vector,
            batch_to_model_input(proxy_batch(proxy_images[name], count, seed), clip),
            keep=keep, layers=layers, device=device)
        for name, vector in task_vectors.items()
    }


__all__ = [
    "Subspace",
    "subspaces_of_experts",
    "activation_pca",
    "collect_layer_inputs",
    "default_keep",
    "essential_subspaces",
    "layer_input_hooks",
    "proxy_batch",
    "proxy_indices",
]
