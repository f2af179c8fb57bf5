"""The SVD family (TSV-M, Iso-C, Iso-CTS, SCORE): properties and parity with straightforward
implementations of the papers and their released code as described in each method's module
docstring (SCORE, arXiv 2603.05768; TSV-M, arXiv 2412.00081; Iso, arXiv 2502.04959), in float64
so that parity is not blurred by float32 round-off. SCORE and TSV-M are checked against the one
reference implementation, :mod:`mergelib.methods.reference` (which the benchmarks time), Iso here."""

from __future__ import annotations

import pytest
import torch

import mergelib
from mergelib.methods import common, factors, score as score_module
from mergelib.methods.common import orthonormal_completion
from mergelib.methods.iso import iso_cts_sizes
from mergelib.methods.reference import reference_merge, reference_score_matrix, reference_tsv_m_matrix
from mergelib.methods.score import score_core

SVD_METHODS = ("tsv_m", "iso_c", "iso_cts", "score")


def _task_vectors(tasks, shapes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [{key: torch.randn(*shape, generator=g, dtype=dtype) for key, shape in shapes.items()} for _ in range(tasks)]


SHAPES = {
    "visual.transformer.resblocks.0.attn.in_proj_weight": (18, 6),  # tall, T=3 divides 6
    "visual.transformer.resblocks.0.mlp.c_proj.weight": (6, 24),    # wide
    "visual.transformer.resblocks.0.attn.out_proj.weight": (9, 9),  # square, T=3 divides 9
    "visual.proj": (10, 8),                                          # T=3 does not divide 8: padded
    "visual.transformer.resblocks.0.ln_1.weight": (6,),
    "visual.conv1.weight": (6, 3, 2, 2),
    "text_projection": (5, 4),
}


# ----------------------------------------------------------------- independent implementations (Iso)
def _polar(matrix):
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def reference_iso_c(deltas):
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    return s.mean() * u @ vh


def reference_iso_cts(deltas, fraction=0.8):
    """tsv-iso-esm.md §2.2, step by step."""
    m, n = deltas[0].shape
    r, tasks = min(m, n), len(deltas)
    task_slots = round((r - int(fraction * r)) / tasks) * tasks
    common_size, per_task = r - task_slots, task_slots // tasks
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    uc = u[:, :common_size]
    blocks_u, blocks_s, blocks_v = [], [], []
    for delta in deltas:
        ut, st, vht = torch.linalg.svd(delta - uc @ uc.T @ delta, full_matrices=False)
        blocks_u.append(ut[:, :per_task]); blocks_s.append(st[:per_task]); blocks_v.append(vht[:per_task])
    big_u = torch.cat(blocks_u + [uc], dim=1)
    big_v = torch.cat(blocks_v + [vh[:common_size]], dim=0)
    mean_value = torch.cat(blocks_s + [s[:common_size]]).mean()
    return mean_value * _polar(big_u) @ _polar(big_v)


# ----------------------------------------------------------------- parity
MATRIX_KEYS_T_DIVIDES = [k for k, s in SHAPES.items() if len(s) == 2 and "text_projection" not in k and min(s) % 3 == 0]


@pytest.mark.parametrize("key", [k for k, s in SHAPES.items() if len(s) == 2 and "text_projection" not in k])
def test_tsv_m_matches_the_zero_padded_reference(key):
    tvs = _task_vectors(3, SHAPES)
    merged = mergelib.merge("tsv_m", tvs, device="cpu")
    torch.testing.assert_close(merged[key], reference_tsv_m_matrix([tv[key] for tv in tvs]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("keep", ["trimmed", "diagonal", "off_diagonal", "full", "released_full"])
@pytest.mark.parametrize("divide", [True, False])
def test_score_matches_the_pseudocode_of_the_released_code(keep, divide):
    tvs = _task_vectors(3, SHAPES, seed=1)
    merged = mergelib.merge("score", tvs, device="cpu", keep=keep, divide_by_tasks=divide)
    for key in MATRIX_KEYS_T_DIVIDES:
        expected = reference_score_matrix([tv[key] for tv in tvs], keep=keep, divide_by_tasks=divide)
        torch.testing.assert_close(merged[key], expected, rtol=1e-9, atol=1e-9)


def test_score_paper_statistics_match_the_reference():
    tvs = _task_vectors(3, SHAPES, seed=21)
    merged = mergelib.merge("score", tvs, device="cpu", trim_statistics="off_diagonal")
    released = mergelib.merge("score", tvs, device="cpu")
    for key in MATRIX_KEYS_T_DIVIDES:
        deltas = [tv[key] for tv in tvs]
        expected = reference_score_matrix(deltas, trim_statistics="off_diagonal")
        torch.testing.assert_close(merged[key], expected, rtol=1e-9, atol=1e-9)
        assert not torch.allclose(merged[key], released[key])


def _relative_difference(ours, theirs):
    num = sum(float((ours[k] - theirs[k]).double().square().sum()) for k in ours)
    return (num / sum(float(theirs[k].double().square().sum()) for k in ours)) ** 0.5


@pytest.mark.parametrize("method", ["score", "score[keep=off_diagonal]", "score[trim_statistics=off_diagonal]",
                                    "score[rank_fraction=0.75]", "score[rank_fraction=0.5, complete_basis=false]",
                                    "tsv_m"])
def test_agreement_with_the_reference_in_float64_and_float32(method):
    """The contract of the performance work (issue 14): float64 to 1e-8, float32 to 1e-2 relative (SCORE's
    entry-wise trim acts in a basis whose near-degenerate directions rotate under float32 round-off).
    Every shape here needs the completion, which the reference shares (orthonormal_completion)."""
    block = "visual.transformer.resblocks.0."
    shapes = {block + "attn.in_proj_weight": (96, 32), block + "mlp.c_proj.weight": (32, 80),
              block + "attn.out_proj.weight": (40, 40), "visual.proj": (40, 25), block + "ln_1.weight": (32,)}
    wide = _task_vectors(3, shapes, seed=30)
    spec = mergelib.methods.parse_method_spec(method)
    assert _relative_difference(mergelib.merge(spec.name, wide, device="cpu", **spec.params),
                                reference_merge(method, wide)) <= 1e-8
    single = [{k: v.float() for k, v in tv.items()} for tv in wide]
    assert _relative_difference(mergelib.merge(spec.name, single, device="cpu", **spec.params),
                                reference_merge(method, single)) <= 1e-2


def test_score_rank_fraction_and_an_uncompleted_basis():
    tvs = _task_vectors(3, {"visual.w": (12, 9)}, seed=22)
    stack = torch.stack([tv["visual.w"] for tv in tvs])
    u_star, vh_star = score_module.score_basis(stack, rank_fraction=1 / 3, complete_basis=False)
    assert u_star.shape == (12, 3) and vh_star.shape == (3, 9)  # k = int(9 / 3 / 3) = 1 per task
    torch.testing.assert_close(u_star.T @ u_star, torch.eye(3, dtype=stack.dtype))
    # the uncompleted basis at full rank differs from the default only where T does not divide r
    torch.testing.assert_close(mergelib.merge("score", tvs, device="cpu", complete_basis=False)["visual.w"],
                               mergelib.merge("score", tvs, device="cpu")["visual.w"])
    low = mergelib.merge("score", tvs, device="cpu", rank_fraction=1 / 3, complete_basis=False, keep="full")["visual.w"]
    assert torch.linalg.matrix_rank(low) <= 3
    with pytest.raises(ValueError, match="rank_fraction"):
        mergelib.merge("score", tvs, rank_fraction=1.5)


@pytest.mark.parametrize("method, reference", [("iso_c", reference_iso_c), ("iso_cts", reference_iso_cts)])
def test_iso_matches_the_reference(method, reference):
    tvs = _task_vectors(3, SHAPES, seed=2)
    merged = mergelib.merge(method, tvs, device="cpu")
    for key, shape in SHAPES.items():
        if len(shape) == 2 and "text_projection" not in key:
            torch.testing.assert_close(merged[key], reference([tv[key] for tv in tvs]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_non_matrices_and_text_projection_are_averaged(method):
    tvs = _task_vectors(3, SHAPES, seed=3)
    merged = mergelib.merge(method, tvs, device="cpu")
    for key in ("visual.transformer.resblocks.0.ln_1.weight", "visual.conv1.weight", "text_projection"):
        torch.testing.assert_close(merged[key], sum(tv[key] for tv in tvs) / 3)


# ----------------------------------------------------------------- properties
@pytest.mark.parametrize("shape, tasks", [((12, 9), 3), ((12, 8), 3), ((8, 8), 3), ((5, 20), 3), ((8, 8), 5)])
def test_shared_bases_are_orthonormal_and_extend_the_polar_factors(shape, tasks):
    stack = torch.stack([tv["w"] for tv in _task_vectors(tasks, {"w": shape}, seed=4)])
    u_star, vh_star = score_module.score_basis(stack)
    rank = min(shape)
    eye = torch.eye(rank, dtype=stack.dtype)
    torch.testing.assert_close(u_star.T @ u_star, eye)
    torch.testing.assert_close(vh_star @ vh_star.T, eye)
    # the first T k columns are exactly the polar factor of the concatenated singular vectors
    u, s, vh = common.svd(stack)
    k = int(rank / tasks)
    left, _, right = common.concatenated_singular_vectors(u, s, vh, k)
    torch.testing.assert_close(u_star[:, : tasks * k], _polar(left))
    torch.testing.assert_close(vh_star[: tasks * k], _polar(right))


@pytest.mark.parametrize("shape", [(60, 20), (20, 60), (24, 20)])
def test_truncated_svd_of_float32_is_at_least_as_accurate_as_a_float32_svd(shape):
    g = torch.Generator().manual_seed(0)
    spectrum = torch.logspace(0, -3, min(shape), dtype=torch.float64)  # distinct values down to 1e-3

    def matrix():
        left = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g, dtype=torch.float64))[0]
        right = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g, dtype=torch.float64))[0]
        return (left * spectrum) @ right.T

    exact = torch.stack([matrix(), matrix()])
    k = min(shape) // 2
    u, s, vh = common.truncated_svd(exact.float(), k)
    assert u.shape == (2, shape[0], k) and s.shape == (2, k) and vh.shape == (2, k, shape[1]) and u.dtype == torch.float32
    reference_u, reference_s, reference_vh = common.svd(exact)  # float64 truth, same sign rule
    single_u, _, _ = common.svd(exact.float())
    error = (u.double() - reference_u[..., :k]).abs().max()
    assert error <= 2 * (single_u.double()[..., :k] - reference_u[..., :k]).abs().max() + 1e-6
    torch.testing.assert_close(s.double(), reference_s[..., :k], rtol=1e-5, atol=1e-9)
    # the largest entry of every left singular vector is positive
    pivot = u.abs().argmax(dim=-2, keepdim=True)
    assert bool((torch.gather(u, -2, pivot) > 0).all())


def test_truncated_svd_falls_back_to_the_svd_on_rank_deficient_matrices():
    rank_two = torch.randn(40, 2) @ torch.randn(2, 10)
    u, s, vh = common.truncated_svd(rank_two[None], 4)
    assert torch.isfinite(u).all() and s[0, 2:].abs().max() < 1e-4
    torch.testing.assert_close(u[0] @ torch.diag(s[0]) @ vh[0], rank_two, atol=1e-4, rtol=1e-4)


def test_orthonormal_completion_is_deterministic_and_handles_axis_aligned_bases():
    basis = torch.eye(6, dtype=torch.float64)[:, [0, 2, 3]]  # spans e0, e2, e3 exactly
    completion = orthonormal_completion(basis, 3)
    full = torch.cat([basis, completion], dim=1)
    torch.testing.assert_close(full.T @ full, torch.eye(6, dtype=torch.float64))
    assert torch.equal(completion, orthonormal_completion(basis, 3))
    with pytest.raises(ValueError, match="cannot complete"):
        orthonormal_completion(basis, 4)


@pytest.mark.parametrize("shape", [(9, 9), (8, 8)])  # T=3 divides 9, not 8 (completed basis)
def test_score_full_equals_task_arithmetic_when_the_shared_basis_is_square(shape):
    tvs = _task_vectors(3, {"visual.w": shape}, seed=5)
    full = mergelib.merge("score", tvs, device="cpu", keep="full")["visual.w"]
    torch.testing.assert_close(full, sum(tv["visual.w"] for tv in tvs))


def test_score_full_is_task_arithmetic_projected_onto_the_shared_subspaces():
    tvs = _task_vectors(3, {"visual.w": (12, 6)}, seed=6)
    stack = torch.stack([tv["visual.w"] for tv in tvs])
    u_star, vh_star = score_module.score_basis(stack)
    expected = u_star @ u_star.T @ stack.sum(0) @ vh_star.T @ vh_star
    torch.testing.assert_close(mergelib.merge("score", tvs, device="cpu", keep="full")["visual.w"], expected)


def test_score_diagonal_is_invariant_to_singular_vector_signs_but_trimming_is_not(monkeypatch):
    tvs = _task_vectors(3, {"visual.w": (15, 9)}, seed=7)
    before = {keep: mergelib.merge("score", tvs, device="cpu", keep=keep)["visual.w"] for keep in ("diagonal", "trimmed")}
    original = common.truncated_svd
    flips = torch.Generator().manual_seed(0)

    def flipped_svd(matrices, k):
        u, s, vh = original(matrices, k)
        signs = torch.randint(0, 2, s.shape, generator=flips).to(u.dtype) * 2 - 1
        return u * signs[..., None, :], s, vh * signs[..., :, None]

    monkeypatch.setattr(factors, "truncated_svd", flipped_svd)  # where SCORE's triplets come from
    after = {keep: mergelib.merge("score", tvs, device="cpu", keep=keep)["visual.w"] for keep in ("diagonal", "trimmed")}
    torch.testing.assert_close(after["diagonal"], before["diagonal"])
    assert not torch.allclose(after["trimmed"], before["trimmed"], rtol=1e-6, atol=1e-9)


def test_score_trim_limits():
    tvs = _task_vectors(3, {"visual.w": (12, 9)}, seed=8)
    merge = lambda **p: mergelib.merge("score", tvs, device="cpu", **p)["visual.w"]  # noqa: E731
    torch.testing.assert_close(merge(z=1e9), merge(keep="full"))  # a huge threshold keeps everything
    torch.testing.assert_close(merge(z=1e-12), merge(keep="diagonal"))  # a tiny one keeps the diagonal
    torch.testing.assert_close(merge() - merge(keep="diagonal"), merge(keep="off_diagonal"))


def test_score_threshold_divided_by_tasks_keeps_fewer_entries():
    projected = torch.randn(4, 10, 10, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    diagonal = torch.diag_embed(torch.diagonal(projected, dim1=-2, dim2=-1))
    off = projected - diagonal
    kept_divided = score_module.trim_mask(off, 1.96, 4)
    kept_plain = score_module.trim_mask(off, 1.96, 1)
    assert kept_divided.sum() < kept_plain.sum() and bool((kept_plain | ~kept_divided).all())
    # the released ours_v4: the diagonal plus one in every entry of every task
    torch.testing.assert_close(score_core(projected, "released_full", 1.96, True) - score_core(projected, "diagonal", 1.96, True),
                               torch.full((10, 10), 4.0, dtype=torch.float64))


def test_iso_c_spectrum_is_flat_at_the_mean_singular_value_of_the_sum():
    tvs = _task_vectors(4, {"visual.w": (14, 10)}, seed=10)
    merged = mergelib.merge("iso_c", tvs, device="cpu")["visual.w"]
    values = torch.linalg.svdvals(merged)
    expected = torch.linalg.svdvals(sum(tv["visual.w"] for tv in tvs)).mean()
    torch.testing.assert_close(values, torch.full_like(values, expected.item()))


def test_iso_cts_spectrum_is_flat_and_reduces_to_iso_c_with_a_full_common_subspace():
    tvs = _task_vectors(3, {"visual.w": (14, 10)}, seed=11)
    values = torch.linalg.svdvals(mergelib.merge("iso_cts", tvs, device="cpu")["visual.w"])
    torch.testing.assert_close(values, torch.full_like(values, values.mean().item()))
    torch.testing.assert_close(mergelib.merge("iso_cts", tvs, device="cpu", common_fraction=1.0)["visual.w"],
                               mergelib.merge("iso_c", tvs, device="cpu")["visual.w"])


@pytest.mark.parametrize("rank, tasks, common_size, per_task", [
    (768, 3, 615, 51), (768, 5, 613, 31), (768, 14, 614, 11), (768, 8, 616, 19), (768, 20, 608, 8),
    (50, 20, 50, 0), (197, 8, 157, 5), (1024, 8, 816, 26), (257, 14, 201, 4),
])
def test_iso_cts_subspace_sizes_follow_the_released_rule(rank, tasks, common_size, per_task):
    assert iso_cts_sizes(rank, tasks, 0.8) == (common_size, per_task)


# ----------------------------------------------------------------- contract
@pytest.mark.parametrize("method", SVD_METHODS)
def test_bitwise_deterministic_on_cpu(method):
    tvs = _task_vectors(3, SHAPES, seed=12, dtype=torch.float32)
    first, second = mergelib.merge(method, tvs, device="cpu"), mergelib.merge(method, tvs, device="cpu")
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_half_precision_returns_its_dtype_and_all_zero_matrices_stay_zero(method):
    tvs = _task_vectors(3, {"visual.w": (12, 6), "token_embedding.weight": (20, 6)}, seed=13, dtype=torch.float32)
    for tv in tvs:
        tv["token_embedding.weight"].zero_()  # CLIP's text side: never fine-tuned
    half = [{k: v.half() for k, v in tv.items()} for tv in tvs]
    merged = mergelib.merge(method, half, device="cpu")
    assert all(v.dtype == torch.float16 for v in merged.values())
    assert not merged["token_embedding.weight"].any()
    wide = mergelib.merge(method, [{k: v.float() for k, v in tv.items()} for tv in half], device="cpu")
    torch.testing.assert_close(merged["visual.w"].float(), wide["visual.w"], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("method", ["tsv_m", "score"])
def test_more_tasks_than_the_rank_allows_is_a_clear_error(method):
    tvs = _task_vectors(3, {"visual.positional_embedding": (2, 8)}, seed=14)
    with pytest.raises(ValueError, match=r"'visual.positional_embedding'.*cannot give each of 3 tasks"):
        mergelib.merge(method, tvs, device="cpu")


def test_score_rejects_bad_parameters():
    tvs = _task_vectors(2, {"visual.w": (4, 4)})
    with pytest.raises(ValueError, match="keep must be one of"):
        mergelib.merge("score", tvs, keep="everything")
    with pytest.raises(ValueError, match="z must be > 0"):
        mergelib.merge("score", tvs, z=0)
    with pytest.raises(ValueError, match="common_fraction"):
        mergelib.merge("iso_cts", tvs, common_fraction=0)
