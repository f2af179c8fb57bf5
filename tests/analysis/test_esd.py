"""mergelib.analysis.esd: output-space truncation error, energy and CKA of the ESD against the SVD."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch

from mergelib.analysis.esd import (
    layer_truncation_table,
    linear_cka,
    truncated_output_cka,
    truncation_curves,
    truncation_error,
)
from mergelib.models.essential import activation_pca, collect_layer_inputs
from mergelib.methods.common import svd

D = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _anisotropic(n: int, d_in: int, seed: int, mixing_seed: int = 0) -> torch.Tensor:
    """Rows ``z diag(scales) Mᵀ`` with scales from 10 down to 0.1 and a fixed random rotation ``M``
    (``mixing_seed``): different ``seed`` = new samples of the same distribution."""
    scales = torch.logspace(1, -1, d_in, dtype=D)
    mixing = torch.linalg.qr(torch.randn(d_in, d_in, generator=_gen(mixing_seed), dtype=D))[0]
    return (torch.randn(n, d_in, generator=_gen(seed), dtype=D) * scales) @ mixing.T


def _delta(d_out: int, d_in: int, seed: int) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=_gen(seed), dtype=D)


def _curve(frame: pd.DataFrame, decomposition: str, column: str = "error") -> list[float]:
    return frame[frame.decomposition == decomposition][column].tolist()


def _tail_shares(spectrum: torch.Tensor) -> list[float]:
    """``Σ_{i>k} spectrum_i / Σ spectrum`` for k = 0 .. len(spectrum)."""
    total = float(spectrum.sum())
    return [float(spectrum[k:].sum()) / total for k in range(len(spectrum) + 1)]


# --------------------------------------------------------------------------------------------
# truncation_error
# --------------------------------------------------------------------------------------------


def test_esd_truncation_error_is_the_tail_of_its_eigenvalues():
    n, d_in, d_out = 80, 10, 16  # n >= d_out: no padded columns
    x, w = _anisotropic(n, d_in, 1), _delta(d_out, d_in, 2)
    vectors, values = activation_pca(x, w, keep=d_out)
    total = float((x @ w.T).square().sum())
    assert float(values.sum()) * (n - 1) == pytest.approx(total, rel=1e-12)
    for k, share in enumerate(_tail_shares(values)):
        error = truncation_error(x, w, vectors, k)
        assert error == pytest.approx(share, rel=1e-9, abs=1e-14)
        # the absolute loss is Σ_{i>k} λ_i (n - 1)
        assert error * total == pytest.approx(float(values[k:].sum()) * (n - 1), rel=1e-9, abs=1e-12)
    assert truncation_error(x, w, vectors, 0) == 1.0


def test_with_identity_inputs_the_svd_error_is_its_tail_energy_and_the_esd_is_the_svd():
    d_out, d_in = 9, 6
    w = _delta(d_out, d_in, 3)
    x = torch.eye(d_in, dtype=D)
    u, s, _ = svd(w)
    for k, share in enumerate(_tail_shares(s.square())):
        assert truncation_error(x, w, u, k) == pytest.approx(share, rel=1e-9, abs=1e-14)
    # isotropic inputs (X = I, or any scaled orthogonal X): both decompositions give the same curve
    rotated = 3.0 * torch.linalg.qr(torch.randn(d_in, d_in, generator=_gen(4), dtype=D))[0]
    for inputs in (x, rotated):
        frame = truncation_curves(inputs, w, range(d_out + 1))
        assert _curve(frame, "ESD") == pytest.approx(_curve(frame, "SVD"), rel=1e-9, abs=1e-12)
        assert _curve(frame, "ESD", "energy") == pytest.approx(_curve(frame, "SVD", "energy"), rel=1e-9, abs=1e-12)


def test_a_non_orthonormal_basis_is_replaced_by_the_projector_onto_its_span():
    x, w = _anisotropic(30, 7, 5), _delta(8, 7, 6)
    basis = torch.randn(8, 5, generator=_gen(7), dtype=D)  # not orthonormal
    basis = torch.cat([basis[:, :2], basis[:, :1] + 2 * basis[:, 1:2], basis[:, 2:]], dim=1)  # column 2 is dependent
    d = x @ w.T
    for k in range(basis.shape[1] + 1):
        b = basis[:, :k]
        projector = b @ torch.linalg.pinv(b, rtol=1e-10) if k else torch.zeros(8, 8, dtype=D)
        expected = float((d - d @ projector).square().sum() / d.square().sum())
        assert truncation_error(x, w, basis, k) == pytest.approx(expected, rel=1e-9, abs=1e-14)
    # the dependent column adds nothing
    assert truncation_error(x, w, basis, 3) == pytest.approx(truncation_error(x, w, basis, 2), rel=1e-12)
    # literally, B Bᵀ is not a projector: the "error" can exceed 1
    assert truncation_error(x, w, 5 * basis, 2, orthonormalize=False) > 1


def test_padded_esd_columns_are_orthonormalised():
    n, d_in, d_out = 6, 8, 14  # n < d_out: activation_pca pads with standard axes
    x, w = _anisotropic(n, d_in, 8), _delta(d_out, d_in, 9)
    vectors, values = activation_pca(x, w, keep=d_out)
    padded = vectors[:, n:]
    assert torch.equal(padded.abs().sum(dim=0), torch.ones(d_out - n, dtype=D))  # standard axes
    assert bool((values[n:] == 0).all())
    d = x @ w.T
    for k in range(n, d_out + 1):
        # as a projector onto span(first k columns): D already lies in the span of the n real ones
        assert truncation_error(x, w, vectors, k) < 1e-20
        # literally, E Eᵀ adds the padded axes' share of D on top of D itself: a spurious error
        literal = truncation_error(x, w, vectors, k, orthonormalize=False)
        expected = float((d @ vectors[:, n:k]).square().sum() / d.square().sum())
        assert literal == pytest.approx(expected, rel=1e-9, abs=1e-14)
        assert (literal > 1e-12) == (k > n)
    # on held-out inputs the padded axes keep lowering the error, to 0 at d_out
    held_out = _anisotropic(40, d_in, 10)
    frame = truncation_curves(x, w, range(d_out + 1), eval_inputs=held_out)
    esd = _curve(frame, "ESD")
    assert all(a >= b for a, b in zip(esd, esd[1:])) and esd[n] > 1e-6 and esd[-1] < 1e-20
    for k in (n, n + 3, d_out):
        assert esd[k] == pytest.approx(truncation_error(held_out, w, vectors, k), rel=1e-9, abs=1e-14)
    assert _curve(frame, "ESD", "energy")[n:] == [1.0] * (d_out - n + 1)


# --------------------------------------------------------------------------------------------
# truncation_curves
# --------------------------------------------------------------------------------------------


def test_esd_beats_svd_on_the_fitted_inputs_at_every_rank():
    n, d_in, d_out = 120, 12, 20
    x, w = _anisotropic(n, d_in, 11), _delta(d_out, d_in, 12)
    ranks = list(range(d_out + 1))
    frame = truncation_curves(x, w, ranks)
    assert list(frame.columns) == ["rank", "decomposition", "error", "energy"]
    assert len(frame) == 2 * len(ranks)
    assert frame.decomposition.tolist() == ["ESD"] * len(ranks) + ["SVD"] * len(ranks)
    assert frame["rank"].tolist() == ranks * 2
    esd, svd_ = _curve(frame, "ESD"), _curve(frame, "SVD")
    for curve in (esd, svd_):
        assert curve[0] == 1.0 and curve[-1] < 1e-20
        assert all(a >= b for a, b in zip(curve, curve[1:]))  # monotone in k
    assert all(e <= s + 1e-12 for e, s in zip(esd, svd_))
    assert esd[2] < svd_[2] - 0.1  # and clearly so at small rank on anisotropic inputs
    # beyond rank(ΔW) = d_in the SVD keeps everything
    assert svd_[d_in:] == pytest.approx([0.0] * (d_out - d_in + 1), abs=1e-20)
    # energies: cumulative shares of λ and σ², reaching 1; on the fitted inputs ESD energy = 1 - error
    _, values = activation_pca(x, w, keep=d_out)
    s = svd(w)[1]
    assert _curve(frame, "ESD", "energy") == pytest.approx([1 - t for t in _tail_shares(values)], abs=1e-12)
    svd_energy = [1 - t for t in _tail_shares(s.square())]
    assert _curve(frame, "SVD", "energy")[: d_in + 1] == pytest.approx(svd_energy, abs=1e-12)
    assert _curve(frame, "ESD", "energy")[-1] == 1.0 and _curve(frame, "SVD", "energy")[-1] == 1.0
    assert [1 - e for e in esd] == pytest.approx(_curve(frame, "ESD", "energy"), abs=1e-12)
    # the curves agree with truncation_error on each decomposition's basis
    u = svd(w)[0]
    vectors, _ = activation_pca(x, w, keep=d_out)
    for k in (1, 5, 12):
        assert esd[k] == pytest.approx(truncation_error(x, w, vectors, k), rel=1e-9)
        assert svd_[k] == pytest.approx(truncation_error(x, w, u, k), rel=1e-9)


def test_held_out_inputs():
    d_in, d_out = 16, 24
    x, w = _anisotropic(400, d_in, 13), _delta(d_out, d_in, 14)
    held_out = _anisotropic(400, d_in, 15)  # new samples of the same distribution
    ranks = [1, 2, 4, 8]
    fitted = truncation_curves(x, w, ranks)
    pd.testing.assert_frame_equal(truncation_curves(x, w, ranks, eval_inputs=x), fitted)
    other = truncation_curves(x, w, ranks, eval_inputs=held_out)
    assert _curve(other, "ESD", "energy") == _curve(fitted, "ESD", "energy")  # a property of the fit
    esd, svd_ = _curve(other, "ESD"), _curve(other, "SVD")
    assert esd != _curve(fitted, "ESD")
    # not guaranteed off the fitted inputs, but with 400 rows of the same distribution the gap
    # at small rank (0.3 to 0.4 here) is far larger than the sampling error
    assert all(e < s - 0.1 for e, s in zip(esd[:3], svd_[:3]))


# --------------------------------------------------------------------------------------------
# linear_cka
# --------------------------------------------------------------------------------------------


def _cka_by_hsic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kornblith et al.'s definition, spelled out with the centring matrix H = I - 11ᵀ/n."""
    n = a.shape[0]
    h = torch.eye(n, dtype=D) - torch.ones(n, n, dtype=D) / n
    k, l_ = a @ a.T, b @ b.T

    def hsic(p, q):
        return torch.trace(p @ h @ q @ h) / (n - 1) ** 2

    return float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))


@pytest.mark.parametrize("n, p, q", [(50, 4, 7), (6, 20, 30), (12, 12, 3)])  # feature and Gram branches
def test_linear_cka_matches_the_hsic_definition(n, p, q):
    g = _gen(n + p + q)
    a = torch.randn(n, p, generator=g, dtype=D) + 3
    b = a[:, :1] * torch.randn(1, q, generator=g, dtype=D) + torch.randn(n, q, generator=g, dtype=D)
    value = linear_cka(a, b)
    assert value == pytest.approx(_cka_by_hsic(a, b), rel=1e-10)
    assert 0 <= value <= 1
    assert linear_cka(b, a) == pytest.approx(value, rel=1e-12)
    assert linear_cka(a.float(), b.float()) == pytest.approx(value, rel=1e-5)


def test_linear_cka_invariances():
    g = _gen(21)
    a = torch.randn(40, 6, generator=g, dtype=D) * torch.logspace(0, 1, 6, dtype=D)
    b = torch.randn(40, 5, generator=g, dtype=D) + a[:, :5]
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=D))[0]
    base = linear_cka(a, b)
    assert linear_cka(a, a) == pytest.approx(1.0, abs=1e-14)
    assert linear_cka(a, -2.5 * a @ rotation + 7.0) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(a @ rotation, b) == pytest.approx(base, rel=1e-12)
    assert linear_cka(0.01 * a, 300 * b) == pytest.approx(base, rel=1e-12)
    assert linear_cka(a + torch.randn(1, 6, generator=g, dtype=D), b) == pytest.approx(base, rel=1e-12)
    # but not to anisotropic scaling
    assert abs(linear_cka(a * torch.logspace(0, 2, 6, dtype=D), b) - base) > 1e-3
    # independent representations: small, not zero
    noise = torch.randn(40, 5, generator=g, dtype=D)
    assert 0 < linear_cka(a, noise) < 0.5
    assert math.isnan(linear_cka(torch.ones(40, 3, dtype=D), b))


# --------------------------------------------------------------------------------------------
# truncated_output_cka
# --------------------------------------------------------------------------------------------


def _diagonal_case(n: int = 30):
    """Inputs ``X = Z diag(s)`` with ``Z`` centred, orthonormal columns, and ``ΔW = R diag(σ)``.

    Then ``D = Z diag(c) Rᵀ`` with ``c = s σ``: the SVD ranks the directions ``r_i`` by ``σ``, the
    ESD by ``c``, and keeping the set ``S`` of them gives exactly
    ``CKA = sqrt(Σ_S c⁴ / Σ c⁴)`` and ``error = Σ_{not S} c² / Σ c²``.
    """
    s = torch.tensor([0.05, 0.1, 1.0, 3.0], dtype=D)
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=D)
    z = torch.randn(n, 4, generator=_gen(31), dtype=D)
    z = torch.linalg.qr(z - z.mean(dim=0))[0]
    r = torch.linalg.qr(torch.randn(6, 4, generator=_gen(32), dtype=D))[0]  # d_out = 6 > d_in = 4
    return z * s, r * sigma, (s * sigma)


def test_truncated_output_cka_closed_form_where_esd_must_win():
    x, w, c = _diagonal_case()
    frame = truncated_output_cka(x, w, [1, 2, 3, 4, 6])
    assert list(frame.columns) == ["rank", "decomposition", "cka"]
    esd_order, svd_order = [3, 2, 1, 0], [0, 1, 2, 3]
    fourth = c.pow(4)
    for k, esd, svd_ in zip([1, 2, 3, 4, 6], _curve(frame, "ESD", "cka"), _curve(frame, "SVD", "cka")):
        kept = min(k, 4)
        assert esd == pytest.approx(math.sqrt(float(fourth[esd_order[:kept]].sum() / fourth.sum())), rel=1e-9)
        assert svd_ == pytest.approx(math.sqrt(float(fourth[svd_order[:kept]].sum() / fourth.sum())), rel=1e-9)
    esd1, svd1 = _curve(frame, "ESD", "cka")[0], _curve(frame, "SVD", "cka")[0]
    assert esd1 > 0.9 and svd1 < 0.01
    errors = truncation_curves(x, w, [1, 2])
    share = c.square() / c.square().sum()
    assert _curve(errors, "ESD") == pytest.approx([float(share[:3].sum()), float(share[:2].sum())], rel=1e-9)
    assert _curve(errors, "SVD") == pytest.approx([float(share[1:].sum()), float(share[2:].sum())], rel=1e-9)


def test_truncated_output_cka_on_anisotropic_inputs():
    d_in, d_out = 24, 40
    x, w = _anisotropic(200, d_in, 41), _delta(d_out, d_in, 42)
    ranks = [0, 1, 2, 4, 8, d_in, d_out]
    frame = truncated_output_cka(x, w, ranks)
    esd, svd_ = _curve(frame, "ESD", "cka"), _curve(frame, "SVD", "cka")
    assert math.isnan(esd[0]) and math.isnan(svd_[0])  # the truncated offset is zero
    assert all(0 <= v <= 1 for v in esd[1:] + svd_[1:])
    assert esd[-2:] == pytest.approx([1.0, 1.0], abs=1e-12) and svd_[-2:] == pytest.approx([1.0, 1.0], abs=1e-12)
    # seeded case, ESD well ahead at small rank (about 0.73 vs 0.18 at rank 1 = 2.5% of d_out)
    assert esd[1] > svd_[1] + 0.3 and esd[2] > svd_[2] + 0.1
    # full layer outputs: with W_0 = 0 they are the offsets; otherwise still 1 at full rank
    zero = truncated_output_cka(x, w, ranks[1:], weight=torch.zeros_like(w))
    pd.testing.assert_frame_equal(zero, frame.iloc[[1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13]].reset_index(drop=True))
    w0 = _delta(d_out, d_in, 43)
    full = truncated_output_cka(x, w, ranks, weight=w0)
    values = full["cka"].tolist()
    assert all(0 <= v <= 1 for v in values)
    assert _curve(full, "ESD", "cka")[-1] == pytest.approx(1.0, abs=1e-12)
    assert _curve(full, "ESD", "cka")[0] == pytest.approx(linear_cka(x @ w0.T, x @ (w0 + w).T), rel=1e-12)


# --------------------------------------------------------------------------------------------
# Determinism, devices, errors
# --------------------------------------------------------------------------------------------


def test_determinism_and_float32_inputs():
    x, w = _anisotropic(9, 10, 51), _delta(15, 10, 52)  # padded ESD
    held_out = _anisotropic(30, 10, 53)
    for function in (truncation_curves, truncated_output_cka):
        first = function(x, w, [0, 1, 5, 9, 12, 15], eval_inputs=held_out)
        second = function(x.clone(), w.clone(), [0, 1, 5, 9, 12, 15], eval_inputs=held_out.clone())
        pd.testing.assert_frame_equal(first, second, check_exact=True)
        single = function(x.float(), w.float(), [0, 1, 5, 9, 12, 15], eval_inputs=held_out.float())
        pd.testing.assert_frame_equal(single, first, check_exact=False, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_agrees_with_cpu():
    x, w = _anisotropic(50, 12, 61), _delta(70, 12, 62)
    held_out = _anisotropic(30, 12, 63)
    for function in (truncation_curves, truncated_output_cka):
        cpu = function(x, w, [1, 3, 12, 50, 70], eval_inputs=held_out)
        gpu = function(x.cuda(), w.cuda(), [1, 3, 12, 50, 70], eval_inputs=held_out.cuda())
        pd.testing.assert_frame_equal(gpu, cpu, check_exact=False, rtol=1e-7, atol=1e-10)
    assert linear_cka(x.cuda(), held_out[:, :5].repeat(2, 1)[:50].cuda()) == pytest.approx(
        linear_cka(x, held_out[:, :5].repeat(2, 1)[:50]), rel=1e-10)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, w, b: truncation_error(x[0], w, b, 1), "2-D"),
        (lambda x, w, b: truncation_error(x, w.T, b, 1), "features"),
        (lambda x, w, b: truncation_error(x, w, b[:3], 1), "basis must be"),
        (lambda x, w, b: truncation_error(x, w, b, 6), r"\[0, 5\]"),
        (lambda x, w, b: truncation_error(x, w, b, -1), r"\[0, 5\]"),
        (lambda x, w, b: truncation_error(x, w, b, True), "integer"),
        (lambda x, w, b: truncation_error(x, w, b, 1.0), "integer"),
        (lambda x, w, b: truncation_curves(x, w, [1, 9]), r"\[0, 8\]"),
        (lambda x, w, b: truncation_curves(x, w, []), "empty"),
        (lambda x, w, b: truncation_curves(x, w, 3), "sequence"),
        (lambda x, w, b: truncation_curves(x[:1], w, [1]), "at least 2"),
        (lambda x, w, b: truncation_curves(x, w, [1], eval_inputs=x[:, :2]), "eval_inputs"),
        (lambda x, w, b: truncated_output_cka(x, w, [1], weight=w[:2]), "weight"),
        (lambda x, w, b: linear_cka(x, x[:3]), "same rows"),
        (lambda x, w, b: linear_cka(x[:1], x[:1]), "at least 2"),
    ],
)
def test_errors(call, message):
    x, w = _anisotropic(10, 4, 71), _delta(8, 4, 72)
    basis = torch.linalg.qr(torch.randn(8, 5, generator=_gen(73), dtype=D))[0]
    with pytest.raises(ValueError, match=message):
        call(x, w, basis)


# --------------------------------------------------------------------------------------------
# layer_truncation_table on a random tiny-clip
# --------------------------------------------------------------------------------------------


def test_layer_truncation_table_on_tiny_clip():
    from mergelib.models.backbones import create_clip
    from mergelib.task_vectors import apply_task_vector, encoder_state, load_encoder_state

    torch.manual_seed(0)
    encoder = create_clip("tiny-clip", weights=None).model.visual.eval()
    pretrained = encoder_state(encoder)
    tv = {k: 0.02 * torch.randn(v.shape, generator=_gen(81), dtype=v.dtype) for k, v in pretrained.items()}
    images = torch.randn(4, 3, 32, 32, generator=_gen(82))  # 68 rows: fewer than d_out for QKV and fc1
    fractions = (0.05, 0.25, 1.0)
    table = layer_truncation_table(encoder, pretrained, tv, images, ranks_fraction=fractions)
    assert list(table.columns) == [
        "layer", "layer_type", "d_out", "fraction", "rank", "decomposition", "error", "energy", "cka"]
    assert table.layer.nunique() == 12 and len(table) == 12 * len(fractions) * 2
    assert set(table.layer_type) == {"attn.in_proj_weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}
    assert set(zip(table.layer_type, table.d_out)) == {
        ("attn.in_proj_weight", 384), ("mlp.c_fc.weight", 512), ("mlp.c_proj.weight", 128)}
    assert (table["rank"] == [max(1, int(f * d)) for f, d in zip(table.fraction, table.d_out)]).all()
    esd = table[table.decomposition == "ESD"].reset_index(drop=True)
    svd_ = table[table.decomposition == "SVD"].reset_index(drop=True)
    assert (esd.error <= svd_.error + 1e-12).all()  # fitted inputs: Eckart–Young
    complete = table[table.fraction == 1.0]
    assert (complete.error < 1e-12).all() and (complete.energy == 1.0).all()
    assert complete.cka.tolist() == pytest.approx([1.0] * len(complete), abs=1e-9)
    # the rows of a layer are truncation_curves on the inputs that layer receives inside the expert
    expert = copy.deepcopy(encoder)
    load_encoder_state(expert, apply_task_vector(pretrained, tv))
    key = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    inputs = collect_layer_inputs(expert, images)[key]
    rows = table[table.layer == key].reset_index(drop=True)
    expected = truncation_curves(inputs, tv[key], [25, 128, 512])
    pd.testing.assert_frame_equal(rows[["rank", "decomposition", "error", "energy"]], expected)
    for name, value in encoder_state(encoder).items():  # the encoder itself is not modified
        assert torch.equal(value, pretrained[name])
    held = layer_truncation_table(encoder, pretrained, tv, images, ranks_fraction=(0.25,),
                                  eval_inputs=torch.randn(3, 3, 32, 32, generator=_gen(83)), full_outputs=True)
    assert len(held) == 24 and held.cka.between(0, 1).all()
    with pytest.raises(ValueError, match="ranks_fraction"):
        layer_truncation_table(encoder, pretrained, tv, images, ranks_fraction=(0.0,))
