"""merge_grid: each expert decomposed once, results bitwise equal to merging one (fold, method) at a time."""

from __future__ import annotations

import pytest
import torch

import mergelib
from mergelib.methods import grid as grid_module
from mergelib.experiments.ablations import score_ablation_specs
from mergelib.errors import ParameterError, ParameterValueError, UnknownNameError
from mergelib.methods import common, factors, parse_method_spec
from mergelib.methods.factors import FactorCache

BLOCK = "visual.transformer.resblocks.0."
SHAPES = {
    BLOCK + "attn.in_proj_weight": (36, 12),   # tall: Gram route of truncated_svd
    BLOCK + "attn.out_proj.weight": (12, 12),  # square: SVD route
    BLOCK + "mlp.c_fc.weight": (24, 12),
    BLOCK + "mlp.c_proj.weight": (12, 24),     # wide
    BLOCK + "ln_1.weight": (12,),
    "visual.proj": (12, 8),
}
SVD_METHODS = [v.spec for v in score_ablation_specs(z_values=[1.0], rank_fractions=[0.5, 1.0], n_domains=5)] + [
    "tsv_m", "iso_c", "iso_cts", "esm[decomposition=svd]", "esm[decomposition=svd, rank_budget=min_dim]"]


def _experts(count=5, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    shared = {k: torch.randn(s, generator=generator, dtype=dtype) for k, s in SHAPES.items()}
    return {f"d{i}": {k: 0.5 * shared[k] + torch.randn(s, generator=generator, dtype=dtype) for k, s in SHAPES.items()}
            for i in range(count)}


def _one_at_a_time(experts, fold, method):
    spec = parse_method_spec(method)
    return mergelib.merge(spec.name, [experts[n] for n in fold], **spec.params)


def _assert_bitwise(a, b, context):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), (context, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grid_equals_merging_one_at_a_time_bitwise(dtype):
    experts = _experts(dtype=dtype)
    names = list(experts)
    folds = [[n for n in names if n != held] for held in names]  # leave-one-out, T = 4
    folds += [names[:2], names[1:4], list(reversed(names))]      # other sizes: another rank per task
    methods = SVD_METHODS + ["task_arithmetic"]
    seen = []
    for fold, method, merged in mergelib.merge_grid(experts, folds, methods):
        _assert_bitwise(merged, _one_at_a_time(experts, fold, method), (fold, method))
        seen.append((tuple(fold), method))
    assert sorted(seen) == sorted((tuple(f), m) for f in folds for m in methods)
    # folds in the order given, every method of a fold before the next fold
    assert [f for f, _ in seen[:: len(methods)]] == [tuple(f) for f in folds]


def test_each_expert_is_decomposed_once_for_every_rank_and_each_fold_basis_once(monkeypatch):
    experts = _experts()
    names = list(experts)
    folds = [[n for n in names if n != held] for held in names]
    methods = ["score", "score[keep=diagonal]", "score[z=1.0]", "score[complete_basis=false]", "tsv_m",
               "score[rank_fraction=0.5]"]
    caches = []

    class Recording(FactorCache):
        def __init__(self):
            super().__init__()
            caches.append(self)

        def clear(self):  # keep the tallies readable after the grid
            self.final_counts = dict(self.counts)
            super().clear()

    monkeypatch.setattr(grid_module, "FactorCache", Recording)
    decompositions = []
    original = factors.spectrum
    monkeypatch.setattr(factors, "spectrum", lambda matrix, k: decompositions.append(k) or original(matrix, k))
    for _ in mergelib.merge_grid(experts, folds, methods):
        pass
    matrices = sum(len(s) == 2 for s in SHAPES.values())
    counts = caches[0].final_counts
    # T = 4 in every fold; the larger rank comes first, and the smaller one is read from the same spectrum
    assert len(decompositions) == counts["triplets computed"] == len(names) * matrices
    assert counts["triplets computed"] + counts["triplets reused"] == len(folds) * 4 * matrices * 2  # per fold and rank
    # polar factors once per fold, matrix and rank, shared by the four SCORE variants and TSV-M
    assert counts["polars computed"] == len(folds) * matrices * 2
    # projections: once per fold, matrix and basis (completed or not, two ranks), shared by the keep/z variants
    assert counts["projection computed"] == len(folds) * matrices * 3
    assert counts["projection reused"] == len(folds) * matrices * 2
    # trimming statistics: once per fold, matrix and basis, shared by the variants that change z only
    assert counts["trim statistics computed"] == len(folds) * matrices * 3
    assert counts["trim statistics reused"] == len(folds) * matrices


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_truncated_svd_of_a_batch_is_each_matrix_alone_and_any_larger_spectrum_bitwise(dtype):
    generator = torch.Generator().manual_seed(3)
    for shape in [(40, 12), (12, 40), (16, 16)]:  # the Gram route (tall, wide) and the SVD route
        stack = torch.randn(4, *shape, generator=generator, dtype=dtype)
        low = torch.randn(shape[0], 2, generator=generator, dtype=dtype)
        stack[2] = low @ torch.randn(2, shape[1], generator=generator, dtype=dtype)
        batched = common.truncated_svd(stack, 4)  # task 2's top 4 has zero singular values: its own fallback
        for t in range(4):
            alone = common.truncated_svd(stack[t], 4)
            for part_batched, part_alone in zip(batched, alone):
                assert torch.equal(part_batched[t], part_alone), (shape, t)
            for size in (4, 7, 12):  # what the factor cache keeps: the top of the spectrum, read for a smaller k
                kept = common.spectrum(stack[t], size)
                for k in (1, 3, 4):
                    for part_kept, part_direct in zip(common.spectrum_triplets(stack[t], kept, k),
                                                      common.truncated_svd(stack[t], k)):
                        assert torch.equal(part_kept, part_direct), (shape, t, size, k)
        with pytest.raises(ValueError, match="cannot give the top 5"):
            common.spectrum_triplets(stack[0], common.spectrum(stack[0], 4), 5)


def test_cached_factors_are_invalidated_when_a_task_vector_changes():
    experts = _experts()
    fold = list(experts)[:3]
    key = BLOCK + "attn.in_proj_weight"
    with FactorCache() as cache:
        mergelib.merge("score", [experts[n] for n in fold])
        experts[fold[1]][key].mul_(-2.0).add_(1.0)  # in place: bumps the version counter
        changed = mergelib.merge("score", [experts[n] for n in fold])
        assert cache.counts["triplets computed"] > 0
    _assert_bitwise(changed, _one_at_a_time(experts, fold, "score"), "after an in-place change")
    # and in the grid: a change between two yields reaches the later merges
    names = list(experts)
    folds = [names[:3], names[:3], names[1:4]]
    for index, (fold, method, merged) in enumerate(mergelib.merge_grid(experts, folds, ["score", "tsv_m"])):
        _assert_bitwise(merged, _one_at_a_time(experts, fold, method), (index, method))
        if index == 1:
            experts[names[1]][key].add_(0.5)
        if index == 3:
            experts[names[2]] = {k: v.flip(0) if v.ndim == 2 else v for k, v in experts[names[2]].items()}


def test_a_completed_basis_holds_the_polar_factors_it_extends():
    experts = _experts()
    fold = [experts[n] for n in list(experts)[:3]]  # T = 3 does not divide r = 8 or 12: completed bases
    with FactorCache() as cache:
        mergelib.merge("score", fold)
        tensors = cache.cached_tensors()
        shared = len(tensors) - len({t.untyped_storage().data_ptr() for t in tensors})
        assert shared == 2 * sum(min(s) % 3 != 0 for s in SHAPES.values() if len(s) == 2)  # U and V views
        assert cache.nbytes < sum(t.numel() * t.element_size() for t in tensors)
        tsv = mergelib.merge("tsv_m", fold)  # from the views: bitwise what it is alone
    _assert_bitwise(tsv, mergelib.merge("tsv_m", fold), "tsv_m after score")


def test_grid_memory_is_bounded_by_the_cached_factors_and_released_at_the_end(monkeypatch):
    experts = _experts(count=6)
    names = list(experts)
    folds = [[n for n in names if n != held] for held in names]
    methods = [v.spec for v in score_ablation_specs(n_domains=6)] + ["tsv_m"]
    caches, peaks = [], []

    class Recording(FactorCache):
        def __init__(self):
            super().__init__()
            caches.append(self)

        def fold_entry(self, *args):
            value = super().fold_entry(*args)
            peaks.append(self.nbytes)
            return value

    monkeypatch.setattr(grid_module, "FactorCache", Recording)
    expert_bytes = sum(t.numel() * t.element_size() for v in experts.values() for t in v.values())
    outputs = 0
    for _ in mergelib.merge_grid(experts, folds, methods):
        outputs += 1
    assert outputs == len(folds) * len(methods)
    # the spectra of every expert (one for every rank) plus one group's bases and projections
    assert max(peaks) < 2 * expert_bytes, (max(peaks), expert_bytes)
    assert caches[0].live_tensors == 0  # nothing left once the grid is done


def test_the_spectra_of_experts_no_later_fold_merges_are_released(monkeypatch):
    experts = _experts()
    caches = []

    class Recording(FactorCache):
        def __init__(self):
            super().__init__()
            caches.append(self)

    monkeypatch.setattr(grid_module, "FactorCache", Recording)
    matrices = sum(len(s) == 2 for s in SHAPES.values())
    held = []
    for fold, _, _ in mergelib.merge_grid(experts, [["d0", "d1"], ["d1", "d2"], ["d3", "d4"]], ["score", "tsv_m"]):
        held.append((tuple(fold), {id(source) for source, _, _ in caches[0]._spectra.values()}))
    ids = {name: {id(t) for t in experts[name].values() if t.ndim == 2} for name in experts}
    for fold, sources in held:  # d0 is gone in the second fold, d1 and d2 in the third
        assert sources == set().union(*(ids[name] for name in fold)), fold
        assert len(sources) == len(fold) * matrices


@pytest.mark.parametrize("folds, methods, error", [
    ([["d0", "nope"]], ["score"], UnknownNameError),
    ([["d0", "d1"], []], ["score"], ParameterError),
    ([["d0", "d0", "d1"]], ["score"], ParameterError),
    ("d0", ["score"], ParameterError),
    ([["d0", "d1"]], ["score[keep=diagonal"], ParameterError),
    ([["d0", "d1"]], ["scor"], UnknownNameError),
    ([["d0", "d1"]], ["score[kep=diagonal]"], ParameterError),
    ([["d0", "d1"]], ["score[keep=everything]"], ParameterValueError),
    ([["d0", "d1"]], ["score", "score"], ParameterError),
    ([["d0", "d1"]], [], ParameterError),
])
def test_bad_inputs_are_refused_before_any_decomposition(monkeypatch, folds, methods, error):
    experts = _experts(count=3)
    calls = []
    monkeypatch.setattr(factors, "truncated_svd", lambda *a: calls.append(a))
    monkeypatch.setattr(common, "svd", lambda *a: calls.append(a))
    with pytest.raises(error):
        mergelib.merge_grid(experts, folds, methods)  # raises at the call, not at the first merge
    assert calls == []


def test_grid_order_groups_methods_that_share_factors():
    specs = [parse_method_spec(s) for s in
             ["iso_c", "score", "score[rank_fraction=0.5, complete_basis=false]", "tsv_m", "score[keep=diagonal]", "ties"]]
    assert grid_module.grid_order(specs) == [1, 3, 4, 2, 0, 5]
