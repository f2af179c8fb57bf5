"""Sparsifying and selecting merges: TIES, DARE, Model Breadcrumbs, MagMax, PCB.

The parity tests compare against small reference implementations written here from the
description of SCORE's released code (flatten all keys in sorted order, do it the obvious way).
"""

from __future__ import annotations

import math

import pytest
import torch

import mergelib
from mergelib.methods import METHODS, merge
from mergelib.methods.dare import drop_and_rescale

NAMES = ("ties", "dare", "breadcrumbs", "magmax", "pcb")
SHAPES = {"visual.w": (6, 5), "visual.b": (7,), "text.zero": (4, 3), "logit_scale": (), "visual.conv": (2, 3, 2, 2),
          "visual.big": (20, 10)}


def _vectors(count=3, seed=0, dtype=torch.float32, scales=None):
    """Task vectors with several keys (not in sorted order), one of them all zero like CLIP's text side."""
    g = torch.Generator().manual_seed(seed)
    scales = scales or {}
    out = []
    for _ in range(count):
        tv = {k: torch.randn(s, generator=g) * scales.get(k, 1.0) for k, s in SHAPES.items()}
        tv["text.zero"] = torch.zeros(SHAPES["text.zero"])
        out.append({k: v.to(dtype) for k, v in tv.items()})
    return out


def _flatten(tvs):
    keys = sorted(tvs[0])
    return torch.stack([torch.cat([tv[k].reshape(-1).float() for k in keys]) for tv in tvs]), keys


def _unflatten(vector, like):
    out, start = {}, 0
    for key in sorted(like):
        n = like[key].numel()
        out[key] = vector[start : start + n].reshape(like[key].shape)
        start += n
    return out


def reference_ties(tvs, density):
    x, _ = _flatten(tvs)
    n = x.shape[1]
    k = n - int(n * density)
    threshold = x.abs().sort(dim=1).values[:, k - 1 : k] if k > 0 else torch.zeros(len(tvs), 1)
    trimmed = x * (x.abs() >= threshold)
    signs = torch.sign(trimmed.sum(dim=0))
    signs[signs == 0] = torch.sign(signs.sum())
    agree = torch.where(signs > 0, trimmed > 0, trimmed < 0)
    return _unflatten((trimmed * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1), tvs[0])


def reference_pcb(tvs, ratio):
    x, _ = _flatten(tvs)
    tasks, n = x.shape
    a = x.abs()
    ordered = a.sort(dim=1).values
    low, high = ordered[:, int(n * 0.01)][:, None], ordered[:, int(n * 0.99) - 1][:, None]
    clamped = torch.minimum(torch.maximum(a, low), high)
    mm = (clamped - low) / (high - low)
    z = torch.sign(x) * mm
    scores = torch.exp(tasks * mm**2) * torch.tanh(z[:, None, :] * z[None, :, :]).sum(dim=1)
    threshold = scores.sort(dim=1).values[:, int(n * (1 - ratio))][:, None]
    top = scores.max(dim=1, keepdim=True).values
    weights = (torch.maximum(scores, threshold) - threshold) / (top - threshold)
    merged = (torch.sign(x) * clamped * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-12)
    return _unflatten(merged, tvs[0])


def _assert_close_dicts(actual, expected, **tolerance):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], msg=lambda m: f"{key}: {m}", **tolerance)


def _nonzero(tensor):
    return int((tensor != 0).sum())


# --------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name, arxiv", [("ties", "2306.01708"), ("dare", "2311.03099"), ("breadcrumbs", "2312.06795"),
                                         ("magmax", "2407.06322"), ("pcb", "2410.02396")])
def test_methods_are_registered_with_their_paper(name, arxiv):
    method = METHODS[name]
    assert method.arxiv == arxiv and method.paper and method.equation and method.summary
    assert method.code_notes, "every one of these follows the released code somewhere"
    merged = mergelib.merge(name, _vectors(2))
    assert merged.keys() == set(SHAPES) and all(merged[k].shape == SHAPES[k] for k in SHAPES)


# -------------------------------------------------------------------------------------------- TIES


@pytest.mark.parametrize("density", [0.1, 0.2, 0.5])
def test_ties_global_keeps_int_density_n_plus_one_largest_entries_per_task(density):
    for tv in _vectors(3):
        trimmed = merge("ties", [tv], density=density)  # one task: the merge is its trimmed vector
        total = sum(t.numel() for t in tv.values())
        kept = sum(_nonzero(t) for t in trimmed.values())
        assert kept == int(density * total) + 1  # tie-free data; ">= k-th smallest" keeps one extra
        kept_min = min(tv[k][trimmed[k] != 0].abs().min() for k in tv if _nonzero(trimmed[k]))
        dropped_max = max(tv[k][trimmed[k] == 0].abs().max() for k in tv if _nonzero(trimmed[k]) < tv[k].numel())
        assert kept_min > dropped_max
        assert all(torch.equal(trimmed[k][trimmed[k] != 0], tv[k][trimmed[k] != 0]) for k in tv)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.5])
def test_ties_per_tensor_keeps_int_density_n_plus_one_per_tensor(density):
    for tv in _vectors(3):
        trimmed = merge("ties", [tv], density=density, scope="per_tensor")
        for key, tensor in tv.items():
            n = tensor.numel()
            assert _nonzero(trimmed[key]) <= min(n, int(density * n) + 1)
            if tensor.any():
                assert _nonzero(trimmed[key]) == min(n, int(density * n) + 1)
                if _nonzero(trimmed[key]) < n:
                    assert tensor[trimmed[key] != 0].abs().min() > tensor[trimmed[key] == 0].abs().max()


def test_ties_trim_hand_example_keeps_one_more_than_nominal():
    tv = {"w": torch.tensor([0.1, -5.0, 2.0, -0.3, 4.0])}
    # N = 5, density 0.4: k = 5 - int(2.0) = 3, the 3rd smallest |value| is 2 -> keep |x| >= 2.
    assert torch.equal(merge("ties", [tv], density=0.4)["w"], torch.tensor([0.0, -5.0, 2.0, 0.0, 4.0]))


def test_ties_global_scope_keeps_more_of_tensors_with_large_updates():
    (tv,) = _vectors(1, scales={"visual.big": 100.0})
    total = sum(t.numel() for t in tv.values())
    kept = int(0.2 * total) + 1  # all of them in visual.big, which is large and has 200 entries
    global_trim = merge("ties", [tv], density=0.2)
    assert _nonzero(global_trim["visual.big"]) == kept and kept / 200 > 0.2
    assert all(_nonzero(global_trim[k]) == 0 for k in tv if k != "visual.big")
    per_tensor = merge("ties", [tv], density=0.2, scope="per_tensor")
    assert _nonzero(per_tensor["visual.big"]) == int(0.2 * 200) + 1
    assert _nonzero(per_tensor["visual.w"]) == int(0.2 * 30) + 1


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_ties_of_one_task_at_full_density_is_that_task(scope):
    (tv,) = _vectors(1)
    merged = merge("ties", [tv], density=1.0, scope=scope)
    assert all(torch.equal(merged[k], tv[k]) for k in tv)


@pytest.mark.parametrize(
    "rows, expected",
    [
        # mass election (coordinate 5: one +5 beats two -1), disjoint mean, a zero-sum coordinate
        # (2) taking the majority sign (+: three + against one -), an all-zero coordinate (3)
        ([[1, -2, 3, 0, 1, 5], [2, 1, -3, 0, 1, -1], [-1, -1, 0, 0, 1, -1]], [1.5, -1.5, 3, 0, 1, 5]),
        # the same with every sign flipped: the majority is negative, coordinate 2 takes -3
        ([[-1, 2, -3, 0, -1, -5], [-2, -1, 3, 0, -1, 1], [1, 1, 0, 0, -1, 1]], [-1.5, 1.5, -3, 0, -1, -5]),
        # the majority itself is 0: the zero-sum coordinate keeps its negative entries, as released
        ([[2, 1, -1], [-2, 0, 0]], [-2, 1, -1]),
    ],
)
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_ties_sign_election_and_disjoint_mean_by_hand(rows, expected, scope):
    tvs = [{"w": torch.tensor(row, dtype=torch.float32)} for row in rows]
    merged = merge("ties", tvs, density=1.0, scope=scope)
    assert torch.equal(merged["w"], torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("count", [2, 4])
def test_ties_matches_reference_implementation(density, count):
    tvs = _vectors(count, seed=count)
    _assert_close_dicts(merge("ties", tvs, density=density), reference_ties(tvs, density))
    per_tensor = merge("ties", tvs, density=density, scope="per_tensor")
    expected = {k: reference_ties([{k: tv[k]} for tv in tvs], density)[k] for k in tvs[0]}
    _assert_close_dicts(per_tensor, expected)


# -------------------------------------------------------------------------------------------- DARE


@pytest.mark.parametrize("rescale", [True, False])
def test_dare_without_dropping_is_task_arithmetic(rescale):
    tvs = _vectors(3)
    merged, ta = merge("dare", tvs, drop_rate=0.0, rescale=rescale), merge("task_arithmetic", tvs)
    assert all(torch.equal(merged[k], ta[k]) for k in ta)


@pytest.mark.parametrize("drop_rate", [0.5, 0.9])
def test_dare_is_unbiased_in_expectation(drop_rate):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 10, generator=g)
    x = x + 0.5 * torch.sign(x)  # no tiny entries: the tolerance below is relative to |x|
    seeds = 200
    mean = sum(merge("dare", [{"w": x}], drop_rate=drop_rate, seed=s)["w"] for s in range(seeds)) / seeds
    # Each entry of one draw is x / (1 - p) with probability 1 - p, else 0: variance x^2 p / (1 - p).
    z = (mean - x) / (x.abs() * math.sqrt(drop_rate / (1 - drop_rate) / seeds))
    assert abs(float(z.mean())) < 0.4  # no bias: the mean of 120 standard scores has std 0.09
    assert abs(float((z**2).mean()) - 1.0) < 0.4  # the predicted variance: std of this mean 0.13
    assert float(z.abs().max()) < 5.5


@pytest.mark.parametrize("drop_rate", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_drops_the_requested_fraction_and_rescales_survivors(drop_rate, rescale):
    x = torch.randn(200, 100, generator=torch.Generator().manual_seed(2))
    merged = merge("dare", [{"w": x}], drop_rate=drop_rate, rescale=rescale, seed=7)["w"]
    dropped = float((merged == 0).float().mean())
    assert abs(dropped - drop_rate) < 5 * math.sqrt(drop_rate * (1 - drop_rate) / x.numel())
    survivors = merged != 0
    assert torch.equal(merged[survivors], x[survivors] / (1 - drop_rate) if rescale else x[survivors])


def test_dare_seeds_are_reproducible_key_order_independent_and_per_task():
    tvs = _vectors(2)
    a, b = merge("dare", tvs, drop_rate=0.5, seed=3), merge("dare", tvs, drop_rate=0.5, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = merge("dare", tvs, drop_rate=0.5, seed=4)
    assert not torch.equal(a["visual.big"], other["visual.big"])
    reversed_keys = [dict(reversed(list(tv.items()))) for tv in tvs]
    c = merge("dare", reversed_keys, drop_rate=0.5, seed=3)
    assert all(torch.equal(a[k], c[k]) for k in a)
    # Two identical tasks get different masks: the sum takes 0, x and 2x, not only 0 and 2x.
    x = tvs[0]["visual.big"]
    twice = merge("dare", [{"w": x}, {"w": x}], drop_rate=0.5, rescale=False, seed=0)["w"]
    assert bool((twice == x).any()) and bool((twice == 2 * x).any()) and bool((twice == 0).any())


@pytest.mark.parametrize("ties_density", [1.0, 0.3])
def test_dare_ties_is_ties_on_the_dropped_vectors(ties_density):
    tvs = _vectors(3)
    dropped = [{k: drop_and_rescale(v, task=t, key=k, drop_rate=0.5, rescale=True, seed=5) for k, v in tv.items()}
               for t, tv in enumerate(tvs)]
    merged = merge("dare", tvs, drop_rate=0.5, seed=5, combine="ties", ties_density=ties_density)
    expected = merge("ties", dropped, density=ties_density)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


# ------------------------------------------------------------------------------------------ MagMax


def test_magmax_picks_the_largest_magnitude_and_the_later_task_on_ties():
    rows = [[1.0, -3.0, 2.0, 0.0], [-2.0, 3.0, 1.0, -0.5], [0.5, -1.0, -2.0, 0.5]]
    merged = merge("magmax", [{"w": torch.tensor(row)} for row in rows])["w"]
    assert torch.equal(merged, torch.tensor([-2.0, 3.0, -2.0, 0.5]))


def test_magmax_takes_a_task_value_of_maximal_magnitude_everywhere():
    tvs = _vectors(4)
    merged = merge("magmax", tvs)
    for key in merged:
        stack = torch.stack([tv[key] for tv in tvs])
        assert torch.equal(merged[key].abs(), stack.abs().max(dim=0).values)
        assert bool((stack == merged[key]).any(dim=0).all())


# ------------------------------------------------------------------------------------- Breadcrumbs


@pytest.mark.parametrize("density, gamma", [(0.3, 0.1), (0.15, 0.006), (0.5, 0.0)])
def test_breadcrumbs_keeps_exactly_the_magnitude_band_per_tensor(density, gamma):
    (tv,) = _vectors(1)
    merged = merge("breadcrumbs", [tv], density=density, gamma=gamma)
    assert torch.equal(merged["logit_scale"], tv["logit_scale"])  # 0-D: left unmasked
    for key, tensor in tv.items():
        if tensor.ndim == 0 or not tensor.any():
            continue
        n, keep, top = tensor.numel(), int(density * tensor.numel()), int(gamma * tensor.numel())
        ranks = tensor.abs().reshape(-1).argsort().argsort()  # 0 = smallest (tie-free data)
        band = (ranks >= n - top - keep) & (ranks < n - top)
        assert int(band.sum()) == keep
        assert torch.equal(merged[key].reshape(-1), torch.where(band, tensor.reshape(-1), 0.0))


def test_breadcrumbs_band_is_exact_under_equal_magnitudes():
    tv = {"w": torch.tensor([1.0, -1.0] * 5)}  # ten equal magnitudes: later positions rank higher
    merged = merge("breadcrumbs", [tv], density=0.3, gamma=0.1)["w"]
    assert torch.equal(merged, torch.tensor([0.0] * 6 + [1.0, -1.0, 1.0, 0.0]))


def test_breadcrumbs_is_the_sum_of_masked_tasks_and_full_band_is_task_arithmetic():
    tvs = _vectors(3)
    merged = merge("breadcrumbs", tvs, density=0.4, gamma=0.05)
    singles = [merge("breadcrumbs", [tv], density=0.4, gamma=0.05) for tv in tvs]
    _assert_close_dicts(merged, {k: sum(s[k] for s in singles) for k in merged})
    full, ta = merge("breadcrumbs", tvs, density=1.0, gamma=0.0), merge("task_arithmetic", tvs)
    assert all(torch.equal(full[k], ta[k]) for k in ta)


# --------------------------------------------------------------------------------------------- PCB


@pytest.mark.parametrize("ratio", [0.05, 0.3])
@pytest.mark.parametrize("count", [2, 4])
def test_pcb_matches_reference_implementation(ratio, count):
    tvs = _vectors(count, seed=10 + count)
    _assert_close_dicts(merge("pcb", tvs, ratio=ratio), reference_pcb(tvs, ratio), rtol=1e-5, atol=1e-6)
    per_tensor = merge("pcb", tvs, ratio=ratio, scope="per_tensor")
    # Within a tensor of fewer than 1 / ratio entries (or an all-zero one) the released formulas
    # divide 0 by 0 for every task: NaN there, 0 by mergelib's documented rule.
    expected = {k: torch.nan_to_num(reference_pcb([{k: tv[k]} for tv in tvs], ratio)[k], nan=0.0) for k in tvs[0]}
    assert torch.isnan(reference_pcb([{"b": tv["visual.b"]} for tv in tvs], 0.05)["b"]).all()
    if ratio == 0.05:
        assert not per_tensor["visual.b"].any()
    _assert_close_dicts(per_tensor, expected, rtol=1e-5, atol=1e-6)


def test_pcb_of_one_task_keeps_its_clamped_top_entries():
    (tv,) = _vectors(1)
    x, _ = _flatten([tv])
    n = x.shape[1]
    merged, _ = _flatten([merge("pcb", [tv])])
    # With one task the score increases with |x|: the entries strictly above the position
    # int(0.95 n) keep their value (clamped at the 99 % bound), every other entry gets weight 0.
    kept = merged[0] != 0
    assert int(kept.sum()) == n - 1 - int(0.95 * n)
    high = x.abs().sort().values[0, int(n * 0.99) - 1]
    torch.testing.assert_close(merged[0][kept], (torch.sign(x) * x.abs().clamp(max=high))[0][kept])
    assert x.abs()[0][kept].min() > x.abs()[0][~kept].max()


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_pcb_with_an_all_zero_task_stays_finite(scope):
    tvs = _vectors(2) + [{k: torch.zeros(s) for k, s in SHAPES.items()}]
    merged = merge("pcb", tvs, scope=scope)
    assert all(bool(torch.isfinite(v).all()) for v in merged.values())


@pytest.mark.parametrize("name", ["ties", "pcb"])
def test_global_and_per_tensor_scopes_agree_on_a_single_tensor(name):
    tvs = [{"w": tv["visual.big"]} for tv in _vectors(3)]
    a, b = merge(name, tvs, scope="global"), merge(name, tvs, scope="per_tensor")
    assert torch.equal(a["w"], b["w"])


# -------------------------------------------------------------------------------------- all five


@pytest.mark.parametrize("name", NAMES)
def test_bitwise_deterministic_and_independent_of_key_order(name):
    tvs = _vectors(3)
    originals = [{k: v.clone() for k, v in tv.items()} for tv in tvs]
    a, b = merge(name, tvs), merge(name, tvs)
    c = merge(name, [dict(reversed(list(tv.items()))) for tv in tvs])
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert all(torch.equal(tv[k], orig[k]) for tv, orig in zip(tvs, originals) for k in tv)  # inputs untouched


@pytest.mark.parametrize("name", NAMES)
def test_float16_is_merged_in_float32_and_returned_as_float16(name):
    tvs = _vectors(3, dtype=torch.float16)
    merged = merge(name, tvs)
    widened = merge(name, [{k: v.float() for k, v in tv.items()} for tv in tvs])
    assert all(merged[k].dtype == torch.float16 for k in merged)
    assert all(torch.equal(merged[k], widened[k].to(torch.float16)) for k in merged)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("ties", {"density": 0.0}, r"density must be a number in \(0, 1\]"),
        ("ties", {"density": 1.5}, r"density must be a number in \(0, 1\]"),
        ("ties", {"density": "0.2"}, r"density must be a number"),
        ("ties", {"scope": "layer"}, r"scope must be one of 'global', 'per_tensor'"),
        ("dare", {"drop_rate": 1.0}, r"drop_rate must be a number in \[0, 1\)"),
        ("dare", {"drop_rate": -0.1}, r"drop_rate must be a number in \[0, 1\)"),
        ("dare", {"combine": "mean"}, r"combine must be one of 'sum', 'ties'"),
        ("dare", {"seed": 1.5}, r"seed must be an integer"),
        ("dare", {"rescale": "yes"}, r"rescale must be True or False"),
        ("dare", {"ties_density": 0.5}, r"ties_density only applies with combine='ties'"),
        ("dare", {"combine": "ties", "ties_density": 0.0}, r"ties_density must be a number in \(0, 1\]"),
        ("breadcrumbs", {"density": 0.0}, r"density must be a number in \(0, 1\]"),
        ("breadcrumbs", {"gamma": 1.0}, r"gamma must be a number in \[0, 1\)"),
        ("breadcrumbs", {"density": 0.9, "gamma": 0.2}, r"density \+ gamma must be at most 1"),
        ("pcb", {"ratio": 0.0}, r"ratio must be a number in \(0, 1\]"),
        ("pcb", {"scope": "blocks"}, r"scope must be one of 'global', 'per_tensor'"),
    ],
)
def test_bad_parameter_values_raise_value_error(name, params, message):
    with pytest.raises(ValueError, match=message):
        merge(name, _vectors(2), **params)
