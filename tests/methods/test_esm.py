"""ESM: the essential subspace decomposition (activation PCA, hooks, proxy draw) and the merge."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mergelib
from mergelib.errors import ParameterError, StateKeyError
from mergelib.models.essential import (
    activation_pca,
    collect_layer_inputs,
    essential_subspaces,
    proxy_batch,
    proxy_indices,
)
from mergelib.methods import METHODS
from mergelib.methods.esm import LAYER_TYPES, esd_keys, esm
from mergelib.task_vectors import apply_task_vector, encoder_state, load_encoder_state

D = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _anisotropic_inputs(n: int, d_in: int, seed: int) -> torch.Tensor:
    """Rows with a strongly uneven covariance (column scales from 10 down to 0.1), float64."""
    g = _gen(seed)
    scales = torch.logspace(1, -1, d_in, dtype=D)
    mixing = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=D))[0]
    return (torch.randn(n, d_in, generator=g, dtype=D) * scales) @ mixing.T


def _projector(basis: torch.Tensor) -> torch.Tensor:
    return basis @ basis.T


# --------------------------------------------------------------------------------------------
# activation_pca
# --------------------------------------------------------------------------------------------


def test_activation_pca_matches_eigendecomposition_of_the_offsets():
    n, d_in, d_out = 60, 12, 20
    x = _anisotropic_inputs(n, d_in, 0)
    dw = torch.randn(d_out, d_in, generator=_gen(1), dtype=D)
    vectors, values = activation_pca(x, dw, keep=d_out)
    offsets = x @ dw.T
    ref_values, ref_vectors = torch.linalg.eigh(offsets.T @ offsets / (n - 1))
    ref_values, ref_vectors = ref_values.flip(0), ref_vectors.flip(1)
    torch.testing.assert_close(values, ref_values.clamp_min(0), atol=1e-9 * float(ref_values[0]), rtol=1e-9)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(d_out, dtype=D), atol=1e-10, rtol=0)
    for k in (1, 3, 8, 12):  # rank(D) = d_in = 12: subspaces compared where the spectrum has a gap
        torch.testing.assert_close(_projector(vectors[:, :k]), _projector(ref_vectors[:, :k]), atol=1e-8, rtol=0)
    assert bool((values[:-1] >= values[1:]).all())
    pivots = vectors.abs().argmax(dim=0)
    assert bool((vectors[pivots, torch.arange(d_out)] > 0).all())  # deterministic signs
    default_vectors, default_values = activation_pca(x, dw)
    assert default_vectors.shape == (d_out, 10) and default_values.shape == (d_out,)  # ceil(d_out / 2)
    assert torch.equal(default_vectors, vectors[:, :10]) and torch.equal(default_values, values)


def test_activation_pca_pads_with_standard_axes_when_rows_are_fewer_than_outputs():
    n, d_in, d_out = 5, 9, 8  # the released code's case n < d_out (e.g. ViT-B/32 fc1 with 32 images)
    x = torch.randn(n, d_in, generator=_gen(2), dtype=D)
    dw = torch.randn(d_out, d_in, generator=_gen(3), dtype=D)
    vectors, values = activation_pca(x, dw, keep=d_out)
    assert torch.equal(vectors[:, n:], torch.eye(d_out, dtype=D)[:, n:])
    assert torch.equal(values[n:], torch.zeros(d_out - n, dtype=D))
    s = torch.linalg.svdvals(x @ dw.T)
    torch.testing.assert_close(values[:n], s.square() / (n - 1))


def test_with_identity_inputs_esd_is_the_svd():
    """X = I: the ESD is the SVD, E = left singular vectors of ΔW and λ = σ² / (n - 1)."""
    d_out, d_in = 6, 10
    dw = torch.randn(d_out, d_in, generator=_gen(4), dtype=D)
    vectors, values = activation_pca(torch.eye(d_in, dtype=D), dw, keep=d_out)
    u, s, _ = mergelib.methods.common.svd(dw)
    torch.testing.assert_close(values, s.square() / (d_in - 1))
    torch.testing.assert_close(vectors, u)  # same sign rule, so equal, not just equal up to sign


def test_esd_truncation_error_is_the_tail_of_the_spectrum_and_beats_svd():
    n, d_in, d_out = 200, 16, 12
    x = _anisotropic_inputs(n, d_in, 5)
    dw = torch.randn(d_out, d_in, generator=_gen(6), dtype=D)
    vectors, values = activation_pca(x, dw, keep=d_out)
    u = torch.linalg.svd(dw, full_matrices=False)[0]

    def output_error(basis):
        residual = dw - basis @ (basis.T @ dw)
        return float((x @ residual.T).square().sum())

    gaps = []
    for k in range(1, d_out):
        esd_error, svd_error = output_error(vectors[:, :k]), output_error(u[:, :k])
        tail = float(values[k:].sum()) * (n - 1)
        assert esd_error == pytest.approx(tail, rel=1e-8, abs=1e-9)
        assert esd_error <= svd_error * (1 + 1e-10)
        gaps.append(svd_error - esd_error)
    assert max(gaps) > 1e-3 * output_error(u[:, :0])  # anisotropic inputs: ESD strictly better somewhere


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.zeros(4), torch.zeros(3, 4)), "expects inputs"),
        ((torch.zeros(4, 5), torch.zeros(3, 4)), "features"),
        ((torch.zeros(1, 4), torch.zeros(3, 4)), "at least 2"),
        ((torch.zeros(4, 4), torch.zeros(3, 4), 0), "keep"),
    ],
)
def test_activation_pca_errors(args, message):
    with pytest.raises(ValueError, match=message):
        activation_pca(*args)


# --------------------------------------------------------------------------------------------
# Hooks and essential_subspaces on a random tiny-clip
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_clip():
    from mergelib.models.backbones import create_clip

    torch.manual_seed(0)
    clip = create_clip("tiny-clip", weights=None)
    clip.model.eval()
    return clip


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=_gen(seed))


def test_hooks_capture_exactly_what_the_layers_receive(random_clip):
    encoder = random_clip.model.visual
    x = _images(3, 7)
    captured = collect_layer_inputs(encoder, x, layers="all_linear")
    blocks = encoder.transformer.resblocks
    assert len(captured) == 4 * len(blocks)
    with torch.no_grad():
        h = encoder._embeds(x)  # [B, L, d] (open_clip 3.x runs the blocks batch first)
        rows = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731  image-major rows
        for i, block in enumerate(blocks):
            prefix = f"visual.transformer.resblocks.{i}."
            q = block.ln_1(h)
            assert torch.equal(captured[prefix + "attn.in_proj_weight"], rows(q))
            attended = block.attn(q, q, q, need_weights=False)[0]
            out_proj_input = captured[prefix + "attn.out_proj.weight"].reshape(attended.shape)
            torch.testing.assert_close(block.attn.out_proj(out_proj_input), attended, atol=1e-5, rtol=1e-5)
            h = h + block.ls_1(attended)
            z = block.ln_2(h)
            assert torch.equal(captured[prefix + "mlp.c_fc.weight"], rows(z))
            hidden = block.mlp.gelu(block.mlp.c_fc(z))
            assert torch.equal(captured[prefix + "mlp.c_proj.weight"], rows(hidden))
            h = h + block.ls_2(block.mlp.c_proj(hidden))
    assert captured[prefix + "attn.in_proj_weight"].shape == (3 * 17, 128)


def test_hooks_give_the_same_rows_for_a_sequence_first_layout(random_clip):
    import copy

    encoder = random_clip.model.visual
    x = _images(2, 8)
    batch_first = collect_layer_inputs(encoder, x)
    seq_first = copy.deepcopy(encoder)
    seq_first.transformer.batch_first = False
    for block in seq_first.transformer.resblocks:
        block.attn.batch_first = False
    other = collect_layer_inputs(seq_first, x)
    assert other.keys() == batch_first.keys()
    for key in batch_first:
        torch.testing.assert_close(other[key], batch_first[key], atol=1e-5, rtol=1e-5)


def _synthetic_task_vector(state, seed, scale=0.02):
    g = _gen(seed)
    return {k: scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}


def test_essential_subspaces_keys_shapes_determinism_and_consistency(random_clip):
    encoder = random_clip.model.visual
    pretrained = encoder_state(encoder)
    tv = _synthetic_task_vector(pretrained, 9)
    x = _images(4, 10)  # 68 rows: fewer than d_out for QKV (384) and fc1 (512), so the padding path runs
    first = essential_subspaces(encoder, pretrained, tv, x, device="cpu")
    second = essential_subspaces(encoder, pretrained, tv, x, device="cpu")
    expected = {
        f"visual.transformer.resblocks.{i}.{suffix}": d_out
        for i in range(4)
        for suffix, d_out in (("attn.in_proj_weight", 384), ("mlp.c_fc.weight", 512), ("mlp.c_proj.weight", 128))
    }
    assert set(first) == set(expected)
    for key, d_out in expected.items():
        vectors, values = first[key]
        assert vectors.shape == (d_out, math.ceil(d_out / 2)) and values.shape == (d_out,)
        assert torch.equal(vectors, second[key][0]) and torch.equal(values, second[key][1])
    for key, value in encoder_state(encoder).items():  # the encoder itself is not modified
        assert torch.equal(value, pretrained[key])
    # the same as decomposing the expert's captured inputs directly
    expert = __import__("copy").deepcopy(encoder)
    load_encoder_state(expert, apply_task_vector(pretrained, tv))
    inputs = collect_layer_inputs(expert, x)
    key = "visual.transformer.resblocks.2.mlp.c_proj.weight"
    vectors, values = activation_pca(inputs[key], tv[key])
    torch.testing.assert_close(first[key][1], values)
    torch.testing.assert_close(_projector(first[key][0][:, :8]), _projector(vectors[:, :8]), atol=1e-4, rtol=0)
    with_out_proj = essential_subspaces(encoder, pretrained, tv, x, layers="all_linear", device="cpu", keep=16)
    assert with_out_proj["visual.transformer.resblocks.0.attn.out_proj.weight"][0].shape == (128, 16)


def test_esm_end_to_end_on_tiny_clip(random_clip):
    encoder = random_clip.model.visual
    pretrained = encoder_state(encoder)
    tvs = [_synthetic_task_vector(pretrained, 20 + t) for t in range(2)]
    subspaces = [
        essential_subspaces(encoder, pretrained, tv, proxy_batch_input(t), layers="all_linear", device="cpu")
        for t, tv in enumerate(tvs)
    ]
    merged = {}
    for layers in ("released", "all_linear"):
        merged[layers] = mergelib.merge("esm", tvs, subspaces=subspaces, esd_layers=layers, device="cpu")
        assert merged[layers].keys() == tvs[0].keys()
        assert all(v.shape == tvs[0][k].shape and bool(torch.isfinite(v).all()) for k, v in merged[layers].items())
    out_proj = "visual.transformer.resblocks.1.attn.out_proj.weight"
    assert not torch.equal(merged["all_linear"][out_proj], merged["released"][out_proj])  # ESD on out_proj too
    load_encoder_state(__import__("copy").deepcopy(encoder), apply_task_vector(pretrained, merged["released"]))


def proxy_batch_input(seed: int) -> torch.Tensor:
    images = torch.randint(0, 256, (40, 3, 32, 32), generator=_gen(seed), dtype=torch.uint8)
    return proxy_batch(images, count=4, seed=seed).float().div(255.0)


def test_proxy_draw_follows_the_released_rule():
    assert proxy_indices(100, 32, 0) == [int(i) for i in np.random.RandomState(0).choice(100, 32, replace=False)]
    assert sorted(proxy_indices(10, 32, 1)) == list(range(10))  # min(count, N) without replacement
    images = torch.randint(0, 256, (50, 3, 8, 8), generator=_gen(0), dtype=torch.uint8)
    chosen = proxy_batch(images, count=5, seed=3)
    assert chosen.dtype == torch.uint8 and torch.equal(chosen, images[proxy_indices(50, 5, 3)])
    with pytest.raises(ValueError, match="uint8"):
        proxy_batch(images.float())


# --------------------------------------------------------------------------------------------
# The merge, against a literal re-implementation of the released pseudocode (reference §3.3-3.5)
# --------------------------------------------------------------------------------------------

SHAPES = {
    "visual.conv1.weight": (8, 3, 2, 2),
    "visual.positional_embedding": (5, 8),
    "visual.proj": (8, 4),
    "visual.ln_post.weight": (8,),
}
for _i in range(3):
    SHAPES.update(
        {
            f"visual.transformer.resblocks.{_i}.attn.in_proj_weight": (24, 8),
            f"visual.transformer.resblocks.{_i}.attn.in_proj_bias": (24,),
            f"visual.transformer.resblocks.{_i}.attn.out_proj.weight": (8, 8),
            f"visual.transformer.resblocks.{_i}.mlp.c_fc.weight": (32, 8),
            f"visual.transformer.resblocks.{_i}.mlp.c_proj.weight": (8, 32),
        }
    )
ESD_SUFFIXES = ("attn.in_proj_weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _task_vectors(tasks=3, seed=0, dtype=D):
    g = _gen(seed)
    out = []
    for t in range(tasks):
        # uneven task norms and column norms so that every polarization level matters
        out.append({k: (1 + t) * torch.randn(s, generator=g, dtype=D).to(dtype) for k, s in SHAPES.items()})
    return out


@pytest.fixture(scope="module")
def case():
    """Three synthetic float64 task vectors with tiny-clip key names and their full-basis subspaces."""
    tvs = _task_vectors()
    return tvs, _subspaces(tvs)


def _subspaces(tvs, rows=40, keep=None, seed=100):
    """Per task, the ESD of every ESD key from random anisotropic inputs (full bases unless keep)."""
    out = []
    for t, tv in enumerate(tvs):
        per_task = {}
        for j, key in enumerate(k for k in tv if any(k.endswith(s) for s in ESD_SUFFIXES)):
            x = _anisotropic_inputs(rows, tv[key].shape[1], seed + 10 * t + j)
            per_task[key] = activation_pca(x, tv[key].to(D), keep=keep if keep is not None else tv[key].shape[0])
        out.append(per_task)
    return out


def _polar_with_mean(m):
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh, s.mean()


def released_esm(tvs, subspaces, alpha=1.0):
    """The released merge, written out step by step as in the reference pseudocode (§3.3, §3.5)."""
    tasks = len(tvs)
    merged = {}
    for key in tvs[0]:
        if key in subspaces[0]:
            d_out = tvs[0][key].shape[0]
            k = int(d_out * (1 / tasks))
            us, vs, norms = [], [], []
            for t in range(tasks):
                vectors, values = subspaces[t][key]
                v = vectors.T @ tvs[t][key]  # full coordinates
                norm_v = torch.norm(v)
                norms.append(norm_v)
                v = v * norm_v**2
                scale = torch.pow(values[:k] / values[:k].mean(), 0.15)
                scale = scale / scale.mean()
                us.append(vectors[:, :k] * scale[None, :])
                vs.append(v[:k, :] * scale[:, None])
            u_cat, v_cat = torch.cat(us, dim=1), torch.cat(vs, dim=0)
            v_cat = v_cat / torch.stack(norms).mean() ** 2
            col = torch.norm(v_cat, dim=0)
            v_cat = v_cat * (col / col.mean())[None, :] ** 2
            pu, su = _polar_with_mean(u_cat)
            pv, sv = _polar_with_mean(v_cat)
            merged[key] = (pu * su) @ (pv * sv) * 2
        elif tvs[0][key].ndim == 2:  # TSV-M
            r = min(tvs[0][key].shape)
            k = int(r * (1 / tasks))
            us, ss, vs = [], [], []
            for t in range(tasks):
                u, s, vh = torch.linalg.svd(tvs[t][key], full_matrices=False)
                us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k, :])
            pu, _ = _polar_with_mean(torch.cat(us, dim=1))
            pv, _ = _polar_with_mean(torch.cat(vs, dim=0))
            merged[key] = pu @ torch.diag(torch.cat(ss)) @ pv
        else:
            merged[key] = sum(tv[key] for tv in tvs) / tasks
    for kind in LAYER_TYPES:
        keys = [k for k in merged if kind in k]
        mean = torch.stack([torch.norm(merged[k]) for k in keys]).mean()
        for k in keys:
            merged[k] = merged[k] * (torch.norm(merged[k]) / mean) ** 2
    for key in subspaces[0]:
        merged[key] = merged[key] * alpha
    return merged


@pytest.mark.parametrize("rows", [40, 20])  # 20 < d_out of QKV (24) and fc1 (32): padded bases
def test_esm_matches_the_released_pseudocode(rows):
    tvs = _task_vectors()
    full = _subspaces(tvs, rows=rows)
    reference = released_esm(tvs, full, alpha=0.7)
    ours = esm(tvs, subspaces=full, alpha=0.7, device=torch.device("cpu"))
    assert ours.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-9, atol=1e-10 * float(reference[key].abs().max()))
    if rows == 40:  # orthonormal bases: storing only ceil(d_out / 2) eigenvectors changes nothing
        truncated = [{k: (v[:, : math.ceil(v.shape[0] / 2)], lam) for k, (v, lam) in s.items()} for s in full]
        short = esm(tvs, subspaces=truncated, alpha=0.7, device=torch.device("cpu"))
        for key in reference:
            torch.testing.assert_close(short[key], ours[key], rtol=1e-9, atol=1e-10 * float(ours[key].abs().max()))


def test_one_task_with_every_switch_off_is_the_polar_factor():
    """T = 1, no weighting or scaling: ΔW ↦ polar(ΔW); with the mean-σ rescaling, Iso-C's mean(σ) polar(ΔW)."""
    (tv,) = _task_vectors(tasks=1)
    off = dict(
        eigen_exponent=0.0, task_scaling=False, dimension_scaling=False, layer_scaling=False,
        output_factor=1.0, mean_singular_value_scaling=False,
    )
    cpu = torch.device("cpu")
    for decomposition in ("svd", "esd"):
        subs = _subspaces([tv], rows=40) if decomposition == "esd" else None
        bare = esm([tv], subspaces=subs, decomposition=decomposition, device=cpu, **off)
        iso = esm([tv], subspaces=subs, decomposition=decomposition, device=cpu, **{**off, "mean_singular_value_scaling": True})
        for suffix in ESD_SUFFIXES:
            key = f"visual.transformer.resblocks.1.{suffix}"
            u, s, vh = torch.linalg.svd(tv[key], full_matrices=False)
            torch.testing.assert_close(bare[key], u @ vh)
            torch.testing.assert_close(iso[key], s.mean() * (u @ vh))
    with pytest.raises(ValueError, match="keep >= 24"):  # T = 1 needs every eigenvector
        esm([tv], subspaces=_subspaces([tv], rows=40, keep=12), device=cpu)


def test_svd_decomposition_needs_no_data_and_uses_the_singular_spectrum():
    tvs = _task_vectors()
    cpu = torch.device("cpu")
    merged = esm(tvs, decomposition="svd", rank_budget="min_dim", device=cpu)
    # the same as ESD with the (left singular vectors, σ²) pairs given as subspaces (σ² padded
    # with zeros to d_out; only the first k = int(min(d_out, d_in) / T) are used)
    as_subspaces = []
    for tv in tvs:
        per_task = {}
        for key in esd_keys(list(tv)):
            u, s, _ = mergelib.methods.common.svd(tv[key])
            per_task[key] = (u, torch.cat([s.square(), s.new_zeros(u.shape[0] - s.shape[0])]))
        as_subspaces.append(per_task)
    esd = esm(tvs, subspaces=as_subspaces, rank_budget="min_dim", device=cpu)
    for key in merged:
        torch.testing.assert_close(merged[key], esd[key])


def test_layer_polarization_follows_the_squared_relative_norm(case):
    tvs, subs = case
    cpu = torch.device("cpu")
    flat = esm(tvs, subspaces=subs, layer_scaling=False, device=cpu)
    polar = esm(tvs, subspaces=subs, device=cpu)
    for kind in LAYER_TYPES:
        keys = [k for k in flat if k.endswith(kind)]
        assert len(keys) == 3
        norms = torch.stack([flat[k].norm() for k in keys])
        mu = norms.mean()
        for key, norm in zip(keys, norms):
            torch.testing.assert_close(polar[key], flat[key] * (norm / mu) ** 2)
            torch.testing.assert_close(polar[key].norm(), norm**3 / mu**2)
    for key in ("visual.proj", "visual.positional_embedding", "visual.conv1.weight"):
        assert torch.equal(polar[key], flat[key])


def test_task_and_dimension_levels_and_paper_switches_change_the_result(case):
    tvs, subs = case
    cpu = torch.device("cpu")
    base = esm(tvs, subspaces=subs, device=cpu)
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    for change in (
        dict(task_scaling=False), dict(dimension_scaling=False), dict(eigen_exponent=0.0),
        dict(task_norm="truncated"), dict(rank_budget="min_dim"), dict(mean_singular_value_scaling=False),
    ):
        changed = esm(tvs, subspaces=subs, device=cpu, **change)
        keys = [f"visual.transformer.resblocks.0.{suffix}" for suffix in ESD_SUFFIXES]
        assert any(not torch.allclose(changed[k], base[k]) for k in keys), change
    half = esm(tvs, subspaces=subs, device=cpu, output_factor=1.0, layer_scaling=False)
    full = esm(tvs, subspaces=subs, device=cpu, layer_scaling=False)
    torch.testing.assert_close(full[key], 2 * half[key])


@pytest.mark.parametrize("scope", ["esd_keys", "all"])
def test_alpha_scope(scope, case):
    tvs, subs = case
    cpu = torch.device("cpu")
    one = esm(tvs, subspaces=subs, device=cpu)
    scaled = esm(tvs, subspaces=subs, device=cpu, alpha=0.3, alpha_scope=scope)
    targets = set(esd_keys(list(tvs[0])))
    assert len(targets) == 9
    for key in one:
        if key in targets or scope == "all":
            torch.testing.assert_close(scaled[key], 0.3 * one[key])
        else:
            assert torch.equal(scaled[key], one[key])


def test_esm_is_deterministic_and_registered():
    tvs = _task_vectors(dtype=torch.float32)
    subs = [{k: (v.float(), lam.float()) for k, (v, lam) in s.items()} for s in _subspaces(tvs)]
    a = mergelib.merge("esm", tvs, subspaces=subs, device="cpu")
    b = mergelib.merge("esm", tvs, subspaces=subs, device="cpu")
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float32 for k in a)
    method = METHODS["esm"]
    assert method.arxiv == "2602.20208" and method.code_notes and method.equation
    assert method.defaults["eigen_exponent"] == 0.15 and method.defaults["output_factor"] == 2.0
    assert method.defaults["subspaces"] is None and method.defaults["alpha_scope"] == "esd_keys"


def test_task_vectors_without_esd_layers_are_refused():
    """Without a block of the image tower ESM would silently be TSV-M: it says what it expected."""
    tvs = [{"visual.w": torch.randn(6, 4, generator=_gen(t)), "visual.b": torch.randn(4, generator=_gen(t))} for t in range(2)]
    for decomposition in ("esd", "svd"):
        with pytest.raises(StateKeyError, match=r"visual\.transformer\.resblocks\.<i>\.<layer>.*attn\.in_proj_weight.*"
                                                r"none among their 2 key\(s\), e\.g\. \['visual\.w', 'visual\.b'\]"):
            mergelib.merge("esm", tvs, decomposition=decomposition)


def test_esd_keys_are_the_image_tower_blocks_only():
    keys = list(SHAPES) + ["transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.0.attn.in_proj_bias"]
    assert len(esd_keys(keys)) == 9 and all(k.startswith("visual.transformer.resblocks.") for k in esd_keys(keys))
    assert len(esd_keys(keys, "all_linear")) == 12


def test_errors(case):
    tvs, subs = case
    cpu = torch.device("cpu")
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    with pytest.raises(ValueError, match="essential_subspaces"):
        esm(tvs, device=cpu)
    with pytest.raises(ValueError, match="2 entries but there are 3 task vectors"):
        esm(tvs, subspaces=subs[:2], device=cpu)
    with pytest.raises(ValueError, match="one dict per task"):
        esm(tvs, subspaces=subs[0], device=cpu)
    missing = [dict(s) for s in subs]
    del missing[1][key]
    with pytest.raises(ValueError, match=r"subspaces\[1\] lacks 1 ESD keys"):
        esm(tvs, subspaces=missing, device=cpu)
    with pytest.raises(ValueError, match="out_proj"):  # all_linear needs out_proj subspaces
        esm(tvs, subspaces=subs, esd_layers="all_linear", device=cpu)
    wrong = [dict(s) for s in subs]
    wrong[2][key] = (subs[2][key][0][:-1], subs[2][key][1])
    with pytest.raises(ValueError, match="eigenvectors must be"):
        esm(tvs, subspaces=wrong, device=cpu)
    wrong[2][key] = (subs[2][key][0], subs[2][key][1][:-1])
    with pytest.raises(ValueError, match="eigenvalues must have shape"):
        esm(tvs, subspaces=wrong, device=cpu)
    for params, message in (
        (dict(esd_layers="every"), "must be one of 'released', 'all_linear'"),
        (dict(alpha_scope="some"), "must be one of 'esd_keys', 'all'"),
        (dict(decomposition="pca"), "must be one of 'esd', 'svd'"),
        (dict(rank_budget="half"), "must be one of 'output', 'min_dim'"),
        (dict(task_norm="x"), "must be one of 'full', 'truncated'"),
        (dict(eigen_exponent=-0.1), "eigen_exponent must be >= 0"),
        (dict(output_factor=0.0), "output_factor must be > 0"),
        (dict(alpha=float("nan")), "alpha must be a finite number"),
        (dict(layer_scaling="yes"), "layer_scaling must be True or False"),
    ):
        with pytest.raises(ValueError, match=message):
            esm(tvs, subspaces=subs, device=cpu, **params)
    with pytest.raises(ParameterError, match="no parameter"):
        mergelib.merge("esm", tvs, subspaces=subs, exponent=0.2)
