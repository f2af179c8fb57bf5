"""Subspace analyses (SAR, spectra, SCORE's projected matrices, TSV's STI): properties and parity
with straightforward implementations written here from the papers' definitions (SCORE's SAR and
projected matrices, arXiv 2603.05768; TSV's singular task interference, arXiv 2412.00081), in
float64 with numpy so that the comparison is independent of mergelib."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from mergelib.analysis.subspaces import (
    cumulative_energy,
    energy_rank,
    interference_per_layer,
    layer_info,
    off_diagonal_entries,
    projected_task_matrices,
    projection_statistics,
    sar_matrix,
    sar_per_layer,
    singular_spectra,
    singular_task_interference,
    visual_matrix_keys,
)

SHAPES = {
    "visual.conv1.weight": (6, 3, 2, 2),                              # 4-D: excluded
    "visual.class_embedding": (6,),                                     # 1-D: excluded
    "visual.positional_embedding": (5, 6),                              # wide, included
    "visual.ln_pre.weight": (6,),                                       # 1-D: excluded
    "visual.transformer.resblocks.0.attn.in_proj_weight": (18, 6),      # tall
    "visual.transformer.resblocks.0.attn.out_proj.weight": (6, 6),      # square
    "visual.transformer.resblocks.1.mlp.c_fc.weight": (24, 6),
    "visual.transformer.resblocks.1.mlp.c_proj.weight": (6, 24),        # wide
    "visual.proj": (6, 4),
    "visual.text_projection": (6, 4),                                   # contains text_projection: excluded
    "text_projection": (6, 4),                                          # excluded
    "token_embedding.weight": (10, 6),                                  # 2-D, not visual.: excluded
    "logit_scale": (),
}
EXPECTED_KEYS = [
    "visual.positional_embedding",
    "visual.transformer.resblocks.0.attn.in_proj_weight",
    "visual.transformer.resblocks.0.attn.out_proj.weight",
    "visual.transformer.resblocks.1.mlp.c_fc.weight",
    "visual.transformer.resblocks.1.mlp.c_proj.weight",
    "visual.proj",
]


def _task_vectors(tasks=3, shapes=SHAPES, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [{key: torch.randn(shape, generator=g, dtype=dtype) for key, shape in shapes.items()} for _ in range(tasks)]


def _orthonormal(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    return q


# ----------------------------------------------------------------- independent implementations
def _reference_rank(s, tau):
    """score.md §8: the first 0-based j with sqrt(cumsum(s^2) / sum(s^2))_j > tau."""
    total = float(np.sum(s ** 2))
    running = 0.0
    for j, value in enumerate(s):
        running += float(value) ** 2
        if math.sqrt(running / total) > tau:
            return j
    raise AssertionError("unreachable for a non-zero spectrum")


def _reference_sar(task_vectors, tau=0.97, sides="left"):
    """Per layer {key: D x D array [j, i]} and the mean, with an explicit projector per source."""
    keys = [k for k, v in task_vectors[0].items()
            if k.startswith("visual.") and v.ndim == 2 and "text_projection" not in k]
    deltas = {k: [tv[k].numpy() for tv in task_vectors] for k in keys}
    per_layer = {}
    for key in keys:
        d = len(task_vectors)
        sar = np.zeros((d, d))
        for i in range(d):
            u, s, vt = np.linalg.svd(deltas[key][i], full_matrices=False)
            k = _reference_rank(s, tau)
            left = u[:, :k] @ u[:, :k].T
            right = vt[:k].T @ vt[:k]
            for j in range(d):
                projected = left @ deltas[key][j]
                if sides == "both":
                    projected = projected @ right
                sar[j, i] = np.linalg.norm(projected, "fro") / np.linalg.norm(deltas[key][j], "fro")
        per_layer[key] = sar
    return per_layer, np.mean(np.stack(list(per_layer.values())), axis=0)


def _signed_svd(matrix):
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    for j in range(u.shape[1]):
        if u[np.argmax(np.abs(u[:, j])), j] < 0:
            u[:, j], vh[j] = -u[:, j], -vh[j]
    return u, s, vh


def _polar(matrix):
    p, _, qh = np.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def _reference_projected(deltas):
    """SCORE's U*^T Delta_t V* for T dividing r (no completion needed), from score.md §6.9."""
    m, n = deltas[0].shape
    r, tasks = min(m, n), len(deltas)
    k = r // tasks
    ucat = np.concatenate([_signed_svd(d)[0][:, :k] for d in deltas], axis=1)
    vtcat = np.concatenate([_signed_svd(d)[2][:k] for d in deltas], axis=0)
    us, vts = _polar(ucat), _polar(vtcat)
    return np.stack([us.T @ d @ vts.T for d in deltas])


def _reference_sti(deltas, k=None):
    """TSV Eq. 6, densely: block-diagonal Sigma, ||(U^T U - I) Sigma (V^T V - I)||_1 entry-wise."""
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        k_t = len(s) if k is None else k
        us.append(u[:, :k_t]), ss.append(np.diag(s[:k_t])), vs.append(vt[:k_t].T)
    u, v = np.concatenate(us, axis=1), np.concatenate(vs, axis=1)
    sigma = np.zeros((u.shape[1], u.shape[1]))
    offset = 0
    for block in ss:
        sigma[offset:offset + len(block), offset:offset + len(block)] = block
        offset += len(block)
    eye = np.eye(u.shape[1])
    return float(np.abs((u.T @ u - eye) @ sigma @ (v.T @ v - eye)).sum())


# ------------------------------------------------------------------------------ energy and rank
def test_energy_rank_hand_made_spectra():
    # e = 0.5, 0.707, 0.866, 1: the first index above 0.97 is 3, so 3 vectors are kept, though 4
    # components are needed to exceed 0.97 (the released off-by-one).
    assert energy_rank([1.0, 1.0, 1.0, 1.0], 0.97) == 3
    assert energy_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.8) == 2
    assert energy_rank([1.0, 1.0, 1.0, 1.0], 0.5) == 1  # e_0 = 0.5 exactly: not *above* 0.5
    assert energy_rank([1.0, 0.0, 0.0]) == 0             # rank one: its direction already exceeds tau
    assert energy_rank([3.0, 1e-9]) == 0
    assert energy_rank([0.0, 0.0, 0.0]) == 0             # all-zero spectrum: documented convention
    assert energy_rank([2.0]) == 0
    spectrum = torch.tensor([5.0, 4.0, 2.0, 1.0, 0.5, 0.1])
    e = cumulative_energy(spectrum)
    for tau in (0.1, 0.5, 0.9, 0.97, 0.999):
        k = energy_rank(spectrum, tau)
        assert k == _reference_rank(spectrum.numpy(), tau)
        assert e[k] > tau and (k == 0 or e[k - 1] <= tau)


@pytest.mark.parametrize("bad", [0, 1, 1.0, -0.1, 1.5, float("nan"), "0.9", True])
def test_energy_rank_rejects_energy_outside_open_interval(bad):
    with pytest.raises(ValueError):
        energy_rank([2.0, 1.0], bad)


@pytest.mark.parametrize("spectrum", [[], [[1.0, 0.5]], [1.0, -0.5], [0.5, 1.0], [1.0, float("inf")]])
def test_energy_rank_rejects_bad_spectra(spectrum):
    with pytest.raises(ValueError):
        energy_rank(spectrum)


def test_cumulative_energy():
    e = cumulative_energy(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    assert e.dtype == torch.float64
    assert torch.allclose(e[0], torch.tensor([0.6, 1.0], dtype=torch.float64))
    assert e[0, -1] == 1.0 and torch.equal(e[1], torch.zeros(2, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ SAR
def test_default_keys_are_the_image_encoder_matrices():
    tvs = _task_vectors()
    assert visual_matrix_keys(tvs[0]) == EXPECTED_KEYS
    assert list(dict.fromkeys(sar_per_layer(tvs)["key"])) == EXPECTED_KEYS


def test_layer_info():
    assert layer_info("visual.transformer.resblocks.11.attn.in_proj_weight") == (11, "attn.in_proj_weight")
    assert layer_info("visual.transformer.resblocks.0.mlp.c_fc.weight") == (0, "mlp.c_fc.weight")
    assert layer_info("visual.positional_embedding") == (None, "positional_embedding")
    assert layer_info("visual.proj") == (None, "proj")


@pytest.mark.parametrize("sides", ["left", "both"])
@pytest.mark.parametrize("tau", [0.97, 0.8])
def test_sar_matches_straightforward_implementation(sides, tau):
    tvs = _task_vectors(tasks=4)
    per_layer, mean = _reference_sar(tvs, tau, sides)
    matrix = sar_matrix(tvs, tau, sides=sides, device="cpu")
    assert matrix.dtype == torch.float64 and matrix.shape == (4, 4)
    assert np.allclose(matrix.numpy(), mean, atol=1e-12, rtol=0)
    table = sar_per_layer(tvs, tau, sides=sides, device="cpu")
    assert list(table.columns) == ["key", "block", "layer_type", "projected", "source", "sar", "rank_source"]
    assert len(table) == len(EXPECTED_KEYS) * 16
    for key, expected in per_layer.items():
        rows = table[table.key == key]
        got = rows.pivot(index="projected", columns="source", values="sar").loc[list("0123"), list("0123")]
        assert np.allclose(got.to_numpy(), expected, atol=1e-12, rtol=0), key


def test_sar_matrix_is_the_mean_of_the_table_over_layers():
    tvs = _task_vectors(tasks=3)
    names = ["photo", "sketch", "cartoon"]
    table = sar_per_layer(tvs, names=names)
    mean = table.groupby(["projected", "source"])["sar"].mean().unstack().loc[names, names]
    assert np.allclose(sar_matrix(tvs).numpy(), mean.to_numpy(), atol=1e-14, rtol=0)
    row = table[(table.key == "visual.transformer.resblocks.1.mlp.c_fc.weight")
                & (table.projected == "sketch") & (table.source == "photo")].iloc[0]
    assert row.block == 1 and row.layer_type == "mlp.c_fc.weight"
    assert table[table.key == "visual.proj"].block.isna().all()
    assert set(table[table.key == "visual.proj"].layer_type) == {"proj"}


def test_sar_layout_row_is_projected_column_is_source():
    # task 1 lives inside task 0's dominant column space; task 0 does not live in task 1's
    q, g = _orthonormal(12), torch.Generator().manual_seed(1)
    w = _orthonormal(8, seed=2)  # s = 10 .. 5: k = 5, the kept span is q[:, :5]
    delta0 = q[:, :6] @ torch.diag(torch.tensor([10.0, 9, 8, 7, 6, 5], dtype=torch.float64)) @ w[:, :6].T
    delta1 = q[:, :1] @ torch.randn(1, 8, generator=g, dtype=torch.float64)
    key = "visual.proj"
    matrix = sar_matrix([{key: delta0}, {key: delta1}])
    assert matrix[1, 0] == pytest.approx(1.0, abs=1e-12)  # SAR(1 onto 0): row 1, column 0
    assert matrix[0, 1] == 0.0  # a rank-one source keeps k = 0 directions


def test_diagonal_is_at_most_energy_and_equals_the_kept_fraction():
    tvs = _task_vectors(tasks=3)
    for tau in (0.97, 0.6):
        table = sar_per_layer(tvs, tau)
        own = table[table.projected == table.source]
        assert (own.sar <= tau + 1e-12).all()
        assert (torch.diagonal(sar_matrix(tvs, tau)) <= tau + 1e-12).all()
        spectra = singular_spectra(tvs)
        for row in own.itertuples():
            e = spectra[(spectra.key == row.key) & (spectra.task == row.source)].energy.to_numpy()
            assert row.rank_source == int((e <= tau).sum())
            assert row.sar == pytest.approx(e[row.rank_source - 1] if row.rank_source else 0.0, abs=1e-12)


def test_sar_is_one_inside_the_kept_subspace_and_zero_for_orthogonal_column_spaces():
    m, n = 12, 8
    q, g = _orthonormal(m), torch.Generator().manual_seed(3)
    w = _orthonormal(n, seed=4)
    # s = 4, 3, 2, 1: e = 0.73, 0.91, 0.98, 1 -> k = 2 at tau = 0.97: span of q[:, :2]
    delta0 = q[:, :4] @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ w[:, :4].T
    delta1 = q[:, :2] @ torch.randn(2, n, generator=g, dtype=torch.float64)        # inside the kept span
    delta2 = q[:, 4:8] @ torch.randn(4, n, generator=g, dtype=torch.float64)       # orthogonal columns
    delta3 = q[:, 2:4] @ torch.randn(2, n, generator=g, dtype=torch.float64)       # in the span, not the kept part
    key = "visual.transformer.resblocks.0.attn.out_proj.weight"
    tvs = [{key: d} for d in (delta0, delta1, delta2, delta3)]
    matrix = sar_matrix(tvs, 0.97)
    assert sar_per_layer(tvs, 0.97).query("source == '0'").rank_source.iloc[0] == 2
    assert matrix[1, 0] == pytest.approx(1.0, abs=1e-12)
    assert matrix[2, 0] == pytest.approx(0.0, abs=1e-12)
    assert matrix[0, 2] == pytest.approx(0.0, abs=1e-12)
    assert matrix[3, 0] == pytest.approx(0.0, abs=1e-12)  # the off-by-one drops directions 2..3
    assert matrix[1, 3] == pytest.approx(0.0, abs=1e-12)
    both = sar_matrix(tvs, 0.97, sides="both")
    assert both[2, 0] == pytest.approx(0.0, abs=1e-12)


def test_both_sides_never_exceeds_left():
    tvs = _task_vectors(tasks=4, seed=5)
    left, both = sar_per_layer(tvs), sar_per_layer(tvs, sides="both")
    assert (both.sar.to_numpy() <= left.sar.to_numpy() + 1e-12).all()
    assert (both.sar < left.sar - 1e-3).any()  # and it is a different quantity
    assert (sar_matrix(tvs, sides="both") <= sar_matrix(tvs) + 1e-12).all()


def test_zero_layers_are_skipped_with_a_warning_or_raise():
    tvs = _task_vectors(tasks=3)
    zero_key = "visual.transformer.resblocks.0.attn.out_proj.weight"
    tvs[1][zero_key] = torch.zeros_like(tvs[1][zero_key])
    with pytest.warns(UserWarning, match="exactly zero"):
        table = sar_per_layer(tvs)
    assert zero_key not in set(table.key) and len(set(table.key)) == len(EXPECTED_KEYS) - 1
    kept = [key for key in EXPECTED_KEYS if key != zero_key]
    with pytest.warns(UserWarning):
        skipped = sar_matrix(tvs)
    assert torch.allclose(skipped, sar_matrix(tvs, keys=kept), atol=1e-15, rtol=0)
    with pytest.raises(ValueError, match="exactly zero"):
        sar_matrix(tvs, zero_layers="raise")
    with pytest.raises(ValueError, match="every selected layer"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sar_matrix(tvs, keys=[zero_key])


def test_sar_input_errors():
    tvs = _task_vectors(tasks=2)
    with pytest.raises(ValueError, match="need at least 2 task vectors to compare their subspaces, got 1"):
        sar_matrix(tvs[:1])
    with pytest.raises(TypeError, match="task_vectors must be a sequence of dicts"):
        sar_matrix(tvs[0])  # a single dict, not a list
    with pytest.raises(ValueError, match="sides"):
        sar_matrix(tvs, sides="right")
    for energy in (0.0, 1.0, 1.2):
        with pytest.raises(ValueError, match="energy"):
            sar_per_layer(tvs, energy)
    with pytest.raises(ValueError, match="names"):
        sar_per_layer(tvs, names=["a"])
    with pytest.raises(ValueError, match="unique"):
        sar_per_layer(tvs, names=["a", "a"])
    with pytest.raises(ValueError, match="matrices"):
        sar_matrix(tvs, keys=["visual.ln_pre.weight"])
    with pytest.raises(ValueError, match=r"task vector 0 lacks 1 of the 1 key\(s\) needed, e.g. \[.visual.missing.\]"):
        sar_matrix(tvs, keys=["visual.missing"])
    with pytest.raises(ValueError, match="string"):
        sar_matrix(tvs, keys="visual.proj")
    bad = [dict(tvs[0]), dict(tvs[1])]
    bad[1]["visual.proj"] = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        sar_matrix(bad)
    with pytest.raises(ValueError, match="no image-encoder matrix"):
        sar_matrix([{"text_projection": torch.randn(4, 3)}] * 2)


# -------------------------------------------------------------------------------------- spectra
def test_singular_spectra():
    tvs = _task_vectors(tasks=2)
    spectra = singular_spectra(tvs, names=["a", "b"])
    assert list(spectra.columns) == ["task", "key", "block", "layer_type", "index", "singular_value", "energy"]
    assert len(spectra) == 2 * sum(min(SHAPES[k]) for k in EXPECTED_KEYS)
    key = "visual.transformer.resblocks.1.mlp.c_proj.weight"
    rows = spectra[(spectra.key == key) & (spectra.task == "b")]
    assert rows["index"].tolist() == list(range(6))
    assert np.allclose(rows.singular_value.to_numpy(), np.linalg.svd(tvs[1][key].numpy(), compute_uv=False))
    assert np.all(np.diff(rows.energy.to_numpy()) >= 0) and rows.energy.iloc[-1] == 1.0
    for (task, key), group in spectra.groupby(["task", "key"]):
        assert energy_rank(torch.tensor(group.singular_value.to_numpy())) == int((group.energy <= 0.97).sum())


# ----------------------------------------------------------------------- SCORE's projected matrices
def _stack(tasks, m, n, seed=0):
    return torch.randn(tasks, m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shape", [(9, 9), (18, 6), (6, 24)])
def test_projected_matrices_match_straightforward_basis(shape):
    stack = _stack(3, *shape)
    u_star, vh_star, projected = projected_task_matrices(stack)
    r = min(shape)
    assert u_star.shape == (shape[0], r) and vh_star.shape == (r, shape[1]) and projected.shape == (3, r, r)
    assert np.allclose(projected.numpy(), _reference_projected(list(stack.numpy())), atol=1e-10)


def _reference_trim(projected, z, divisor):
    """Per task: (trimmed fraction of off-diagonal entries, their energy fraction, mu, sigma)."""
    out = []
    for m in projected:
        r = m.shape[0]
        off = m.copy()
        np.fill_diagonal(off, 0.0)
        mu, sigma = off.mean(), off.std(ddof=1)
        outside = ~np.eye(r, dtype=bool)
        trimmed = (np.abs(off - mu) > z * sigma / divisor) & outside
        out.append((trimmed.sum() / (r * r - r), (off[trimmed] ** 2).sum() / (off ** 2).sum(), mu, sigma))
    return out


@pytest.mark.parametrize("divide_by_tasks", [True, False])
def test_projection_statistics(divide_by_tasks):
    for shape in ((9, 9), (18, 6), (10, 7)):
        stack = _stack(3, *shape, seed=sum(shape))
        stats = projection_statistics(stack, divide_by_tasks=divide_by_tasks, names=["a", "b", "c"])
        assert list(stats.columns) == ["task", "r", "k", "captured", "diagonal_energy", "off_diagonal_energy",
                                       "trimmed_entries", "trimmed_energy", "threshold", "mean", "std"]
        assert stats.task.tolist() == ["a", "b", "c"]
        fractions = stats[["captured", "diagonal_energy", "off_diagonal_energy", "trimmed_entries", "trimmed_energy"]]
        assert ((fractions >= 0) & (fractions <= 1 + 1e-12)).all().all()
        assert np.allclose(stats.diagonal_energy + stats.off_diagonal_energy, 1.0, atol=1e-12)
        if shape == (9, 9):  # U*, V* square: the change of basis loses nothing
            assert np.allclose(stats.captured, 1.0, atol=1e-12)
        else:
            assert (stats.captured < 1 - 1e-6).all()
        _, _, projected = projected_task_matrices(stack)
        divisor = 3 if divide_by_tasks else 1
        reference = _reference_trim(projected.numpy(), 1.96, divisor)
        for row, (fraction, energy, mu, sigma) in zip(stats.itertuples(), reference):
            assert row.trimmed_entries == pytest.approx(fraction, abs=1e-15)
            assert row.trimmed_energy == pytest.approx(energy, abs=1e-12)
            assert row.mean == pytest.approx(mu, abs=1e-12) and row.std == pytest.approx(sigma, abs=1e-12)
            assert row.threshold == pytest.approx(1.96 * sigma / divisor, abs=1e-12)
            m = projected[row.Index].numpy()
            assert row.captured == pytest.approx((m ** 2).sum() / (stack[row.Index].numpy() ** 2).sum(), abs=1e-12)
        if divide_by_tasks:  # 1.96 sigma / 3 removes a good part of Gaussian-like entries
            assert (stats.trimmed_entries > 0.2).all()


def test_trimming_extremes_and_threshold_ordering():
    stack = _stack(4, 12, 8, seed=2)
    assert (projection_statistics(stack, z=1e6)[["trimmed_entries", "trimmed_energy"]] == 0).all().all()
    almost_all = projection_statistics(stack, z=1e-9)
    assert (almost_all.trimmed_entries > 0.95).all()
    divided = projection_statistics(stack, divide_by_tasks=True)
    undivided = projection_statistics(stack, divide_by_tasks=False)
    assert (divided.trimmed_entries >= undivided.trimmed_entries).all()
    assert np.allclose(undivided.threshold, 4 * divided.threshold)


def test_off_diagonal_entries_agree_with_the_statistics():
    stack = _stack(3, 10, 6, seed=7)
    entries, stats = off_diagonal_entries(stack, names=["x", "y", "z"])
    r = 6
    assert len(entries) == 3 * (r * r - r)
    assert list(entries.columns) == ["task", "row", "column", "value", "kept_divided", "kept_undivided"]
    assert list(stats.columns) == ["task", "mean", "std", "threshold_divided", "threshold_undivided"]
    assert (entries.row != entries.column).all()
    _, _, projected = projected_task_matrices(stack)
    for t, name in enumerate(["x", "y", "z"]):
        rows = entries[entries.task == name]
        assert np.allclose(rows.value, projected[t].numpy()[rows.row, rows.column], atol=0)
        s = stats.iloc[t]
        assert s.threshold_undivided == pytest.approx(3 * s.threshold_divided)
        assert (rows.kept_divided == ((rows.value - s["mean"]).abs() <= s.threshold_divided)).all()
        assert (rows.kept_undivided == ((rows.value - s["mean"]).abs() <= s.threshold_undivided)).all()
    table = projection_statistics(stack)
    kept_fraction = entries.groupby("task", observed=True).kept_divided.mean().loc[["x", "y", "z"]]
    assert np.allclose(1 - kept_fraction.to_numpy(), table.trimmed_entries.to_numpy(), atol=1e-15)


def test_projection_input_errors():
    with pytest.raises(ValueError):
        projection_statistics(_stack(1, 6, 6))
    with pytest.raises(ValueError):
        projection_statistics(torch.randn(6, 6))
    with pytest.raises(ValueError, match="z"):
        projection_statistics(_stack(2, 6, 6), z=0)
    with pytest.raises(ValueError, match="divide_by_tasks"):
        projection_statistics(_stack(2, 6, 6), divide_by_tasks=1)
    with pytest.raises(ValueError, match="exactly zero"):
        projection_statistics(torch.cat([_stack(1, 6, 6), torch.zeros(1, 6, 6, dtype=torch.float64)]))
    with pytest.raises(ValueError):
        projected_task_matrices(torch.ones(2, 3, 3, dtype=torch.int64))


# ------------------------------------------------------------------- singular task interference
def _disjoint_tasks(tasks=3, per_task=4, left_shared=False, seed=0):
    """Tasks whose left (and right) singular vectors occupy disjoint blocks of orthonormal bases."""
    m = n = tasks * per_task
    q, w = _orthonormal(m, seed), _orthonormal(n, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    out = []
    for t in range(tasks):
        block = slice(t * per_task, (t + 1) * per_task)
        s = torch.sort(torch.rand(per_task, generator=g, dtype=torch.float64) + 0.5, descending=True).values
        left = q[:, :per_task] if left_shared else q[:, block]
        out.append(left @ torch.diag(s) @ w[:, block].T)
    return torch.stack(out)


def test_sti_is_zero_for_mutually_orthogonal_tasks():
    stack = _disjoint_tasks()  # 12 x 12, each task rank 4
    assert singular_task_interference(stack, rank="tsv") == pytest.approx(0.0, abs=1e-12)  # k = 4
    assert singular_task_interference(stack, rank=2) == pytest.approx(0.0, abs=1e-12)
    # only the right singular vectors orthogonal: (U^T U - I) != 0 but (V^T V - I) = 0
    assert singular_task_interference(_disjoint_tasks(left_shared=True), rank=4) == pytest.approx(0.0, abs=1e-12)
    # the full SVD adds each task's null-space directions, which overlap the others' (sigma > 0)
    assert singular_task_interference(stack) > 1e-3


def test_sti_is_positive_otherwise_and_matches_dense_computation():
    for shape in ((8, 5), (5, 8), (6, 6)):
        stack = _stack(3, *shape, seed=11)
        deltas = list(stack.numpy())
        for rank, k in ((None, None), ("tsv", min(shape) // 3), (2, 2), (1, 1)):
            sti = singular_task_interference(stack, rank=rank)
            assert sti > 0
            assert sti == pytest.approx(_reference_sti(deltas, k), rel=1e-10)
    # scaling every task by c scales STI by c; it does not depend on the order of the tasks
    stack = _stack(3, 7, 5, seed=12)
    assert singular_task_interference(2 * stack) == pytest.approx(2 * singular_task_interference(stack), rel=1e-10)
    assert singular_task_interference(stack.flip(0)) == pytest.approx(singular_task_interference(stack), rel=1e-10)


def test_interference_per_layer():
    tvs = _task_vectors(tasks=3)
    table = interference_per_layer(tvs, rank="tsv")
    assert list(table.columns) == ["key", "block", "layer_type", "k", "sti"]
    assert table.key.tolist() == EXPECTED_KEYS
    for row in table.itertuples():
        stack = torch.stack([tv[row.key] for tv in tvs])
        assert row.k == min(SHAPES[row.key]) // 3
        assert row.sti == pytest.approx(singular_task_interference(stack, rank="tsv"), rel=1e-12)
    tvs[0]["visual.proj"] = torch.zeros(6, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="exactly zero"):
        assert "visual.proj" not in interference_per_layer(tvs).key.tolist()
    with pytest.raises(ValueError, match="exactly zero"):
        interference_per_layer(tvs, zero_layers="raise")


def test_sti_input_errors():
    with pytest.raises(ValueError):
        singular_task_interference(_stack(1, 4, 4))
    with pytest.raises(ValueError, match="rank"):
        singular_task_interference(_stack(2, 4, 4), rank=5)
    with pytest.raises(ValueError, match="rank"):
        singular_task_interference(_stack(2, 4, 4), rank="full")
    with pytest.raises(ValueError):
        singular_task_interference(_stack(5, 4, 4), rank="tsv")  # int(4 / 5) = 0
    with pytest.raises(ValueError, match="at least 2"):
        interference_per_layer(_task_vectors(tasks=1))


# ---------------------------------------------------------------------------------- determinism
def test_bitwise_deterministic_on_cpu():
    tvs = _task_vectors(tasks=3, dtype=torch.float32, seed=9)
    assert torch.equal(sar_matrix(tvs, device="cpu"), sar_matrix(tvs, device="cpu"))
    assert sar_per_layer(tvs, sides="both").equals(sar_per_layer(tvs, sides="both"))
    assert singular_spectra(tvs).equals(singular_spectra(tvs))
    stack = torch.stack([tv["visual.transformer.resblocks.0.attn.in_proj_weight"] for tv in tvs])
    assert projection_statistics(stack).equals(projection_statistics(stack))
    first, second = off_diagonal_entries(stack), off_diagonal_entries(stack)
    assert first[0].equals(second[0]) and first[1].equals(second[1])
    assert singular_task_interference(stack) == singular_task_interference(stack)
    assert interference_per_layer(tvs).equals(interference_per_layer(tvs))


def test_float32_inputs_are_analysed_in_float64_by_default():
    tvs64 = _task_vectors(tasks=3)
    tvs32 = [{k: v.float() for k, v in tv.items()} for tv in tvs64]
    single = sar_matrix(tvs32, device="cpu")
    assert single.dtype == torch.float64
    assert torch.allclose(single, sar_matrix([{k: v.double() for k, v in tv.items()} for tv in tvs32]), atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_agrees_with_cpu():
    tvs = _task_vectors(tasks=3)
    assert torch.allclose(sar_matrix(tvs, device="cuda"), sar_matrix(tvs, device="cpu"), atol=1e-10)
    assert np.allclose(sar_per_layer(tvs, sides="both", device="cuda").sar,
                       sar_per_layer(tvs, sides="both", device="cpu").sar, atol=1e-10)
    stack = torch.stack([tv["visual.transformer.resblocks.0.attn.in_proj_weight"] for tv in tvs])
    cpu, gpu = projection_statistics(stack), projection_statistics(stack.cuda())
    assert np.allclose(cpu.drop(columns="task").to_numpy(float), gpu.drop(columns="task").to_numpy(float), atol=1e-10)
    assert singular_task_interference(stack.cuda()) == pytest.approx(singular_task_interference(stack), rel=1e-10)
    assert np.allclose(interference_per_layer(tvs, device="cuda").sti, interference_per_layer(tvs, device="cpu").sti,
                       rtol=1e-10)
