"""Tests of mergelib.data: determinism, disjointness, formats, domains, errors, and the task suite."""

from __future__ import annotations

import gzip
import itertools
import shutil

import numpy as np
import pytest
import torch

from mergelib.data import (
    DEFAULT_DOMAINS,
    DOMAIN_BENCHMARK_TEMPLATES,
    DOMAINS,
    FASHION_MNIST_CLASSES,
    MINI_SUITE_TASKS,
    DatasetNotFoundError,
    ImageSet,
    UnknownNameError,
    caption_for,
    load_fashion_mnist,
    make_domain_benchmark,
    make_pretraining_pool,
    make_task,
    render_domain,
)
from mergelib.data import fashion_mnist
from mergelib.data.suite import sample_texture_crops, texture_half


def _ids(s: ImageSet) -> set[int]:
    return set(s.source_indices.tolist())


@pytest.fixture(scope="module")
def small():
    return make_domain_benchmark(n_train=200, n_test=100, seed=0)


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_and_fingerprints(small):
    again = make_domain_benchmark(n_train=200, n_test=100, seed=0)
    assert again.fingerprint() == small.fingerprint()
    for d in DEFAULT_DOMAINS:
        assert torch.equal(again.train[d].images, small.train[d].images)
        assert torch.equal(again.test[d].labels, small.test[d].labels)
    pool_a, dom_a = make_pretraining_pool(("photo", "texture"), 100, seed=0)
    pool_b, dom_b = make_pretraining_pool(("photo", "texture"), 100, seed=0)
    assert pool_a.fingerprint() == pool_b.fingerprint() and dom_a == dom_b
    for name in MINI_SUITE_TASKS:
        (a, _), (b, _) = make_task(name, 50, 20, seed=0), make_task(name, 50, 20, seed=0)
        assert a.fingerprint() == b.fingerprint(), name


def test_different_seed_differs(small):
    other = make_domain_benchmark(n_train=200, n_test=100, seed=1)
    assert other.fingerprint() != small.fingerprint()
    for d in DEFAULT_DOMAINS:
        assert other.train[d].fingerprint() != small.train[d].fingerprint()
    pools = [make_pretraining_pool(("photo",), 100, seed)[0] for seed in (0, 1)]
    assert pools[0].fingerprint() != pools[1].fingerprint()
    for name in MINI_SUITE_TASKS:
        assert make_task(name, 50, 20, 0)[0].fingerprint() != make_task(name, 50, 20, 1)[0].fingerprint(), name


def test_fingerprint_is_a_stable_sha256():
    s = ImageSet(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1]), ("a", "b"), "x")
    assert s.fingerprint() == ImageSet(s.images.clone(), s.labels.clone(), ("a", "b"), "x").fingerprint()
    assert len(s.fingerprint()) == 64
    assert s.fingerprint() != ImageSet(s.images, s.labels, ("a", "b"), "y").fingerprint()


def test_domain_images_do_not_depend_on_other_domains(small):
    alone = make_domain_benchmark(("sketch", "photo"), n_train=200, n_test=100, seed=0)
    for d in ("sketch", "photo"):
        assert torch.equal(alone.train[d].images, small.train[d].images)
        assert torch.equal(alone.test[d].images, small.test[d].images)


# ----------------------------------------------------------------------------- disjointness
def test_domains_pool_and_fashion_task_are_disjoint_at_maximum_sizes():
    # different seeds on purpose: the partition must not depend on them
    bench = make_domain_benchmark(n_train=4000, n_test=7500, seed=0)
    pool, _ = make_pretraining_pool(("photo", "negative", "texture"), 6000, seed=1)
    fashion_train, fashion_test = make_task("fashion", 10**6, 10**6, seed=2)  # capped at the maxima
    assert len(fashion_train) == 10000 and len(fashion_test) == 2500
    train_sets = [_ids(bench.train[d]) for d in DEFAULT_DOMAINS] + [_ids(pool), _ids(fashion_train)]
    for a, b in itertools.combinations(train_sets, 2):
        assert not a & b
    assert sum(map(len, train_sets)) == len(set().union(*train_sets)) == 24000 + 18000 + 10000
    # every domain is tested on the same garments: all 7500 of the benchmark's test region,
    # none of them the fashion task's
    domain_tests = {frozenset(_ids(bench.test[d])) for d in DEFAULT_DOMAINS}
    assert len(domain_tests) == 1
    (domain_test,) = domain_tests
    assert len(domain_test) == 7500 and not domain_test & _ids(fashion_test)
    assert len(domain_test | _ids(fashion_test)) == 10000


def test_domains_share_test_garments_in_the_same_order_at_any_size():
    bench = make_domain_benchmark(("photo", "sketch"), n_train=10, n_test=300, seed=3)
    photo, sketch = bench.test["photo"], bench.test["sketch"]
    assert torch.equal(photo.source_indices, sketch.source_indices)
    assert torch.equal(photo.labels, sketch.labels)
    assert not torch.equal(photo.images, sketch.images)  # same garments, each domain's rendering
    alone = make_domain_benchmark(("sketch",), n_train=10, n_test=300, seed=3)
    assert torch.equal(alone.test["sketch"].images, sketch.images)


def test_source_indices_point_at_the_rendered_images(small):
    gray, labels = load_fashion_mnist("train")
    s = small.train["photo"]
    assert torch.equal(s.labels, torch.from_numpy(labels[s.source_indices.numpy()]))
    rendered = render_domain("photo", gray[s.source_indices.numpy()], 0)
    assert np.array_equal(rendered, s.images.permute(0, 2, 3, 1).numpy())


def test_sizes_beyond_the_regions_raise():
    with pytest.raises(ValueError, match="4000"):
        make_domain_benchmark(("photo",), n_train=4001, n_test=10)
    with pytest.raises(ValueError, match="n_test <= 7500"):
        make_domain_benchmark(("photo",), n_train=10, n_test=7501)
    with pytest.raises(ValueError, match="26000"):
        make_pretraining_pool(DEFAULT_DOMAINS, 5000, seed=0)


# ----------------------------------------------------------------------------- formats
def test_shapes_dtypes_labels_and_names(small):
    assert small.domains == DEFAULT_DOMAINS and small.classnames == FASHION_MNIST_CLASSES
    for split, sets in (("train", small.train), ("test", small.test)):
        for d, s in sets.items():
            assert s.images.dtype == torch.uint8 and s.images.shape == (len(s), 3, 32, 32)
            assert s.labels.dtype == torch.int64 and 0 <= s.labels.min() and s.labels.max() < 10
            assert s.name == f"fashion-domains/{d}/{split}"
            assert len(s) == (200 if split == "train" else 100)
    pool, domains = make_pretraining_pool(("photo", "negative", "texture"), 50, seed=0)
    assert len(pool) == len(domains) == 150 and pool.name == "fashion-pool"
    assert domains[:50] == ("photo",) * 50 and domains[-1] == "texture"


def test_load_fashion_mnist_is_cached_and_valid():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert load_fashion_mnist("train")[0] is images  # lru_cache: no second parse
    assert np.bincount(load_fashion_mnist("test")[1]).tolist() == [1000] * 10


def test_imageset_validation_and_subset():
    images, labels = torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(images.float(), labels, ("a", "b"), "x")
    with pytest.raises(ValueError, match="shape"):
        ImageSet(torch.zeros(4, 3, 28, 28, dtype=torch.uint8), labels, ("a", "b"), "x")
    with pytest.raises(ValueError, match="labels must lie"):
        ImageSet(images, torch.tensor([0, 1, 2, 0]), ("a", "b"), "x")
    with pytest.raises(ValueError, match="int64"):
        ImageSet(images, labels.int(), ("a", "b"), "x")
    s = ImageSet(torch.arange(4 * 3072).reshape(4, 3, 32, 32).to(torch.uint8), labels, ["a", "b"], "x")
    assert s.classnames == ("a", "b") and len(s) == 4
    assert s.subset(2, seed=5).fingerprint() == s.subset(2, seed=5).fingerprint() and len(s.subset(2, 5)) == 2
    with pytest.raises(ValueError):
        s.subset(5, seed=0)


# ----------------------------------------------------------------------------- domains
def test_domains_are_visually_distinct():
    gray = load_fashion_mnist("test")[0][:300]
    rendered = {d: render_domain(d, gray, 0).astype(np.float32) for d in DOMAINS}
    for a, b in itertools.combinations(rendered, 2):
        assert np.abs(rendered[a] - rendered[b]).mean() > 30, (a, b)  # out of 255
    # spot-check what each domain is meant to be
    photo = rendered["photo"]
    assert np.abs(rendered["negative"] - (255 - photo)).max() <= 1
    assert photo[:, :, :, 0].mean() < 100 and rendered["sketch"].mean() > 150  # dark ground vs paper
    assert rendered["texture"].std(axis=-1).mean() > 5  # coloured, unlike photo
    background = photo.mean(axis=-1) < 5  # photo's empty background is busy in `texture`
    assert rendered["texture"].mean(axis=-1)[background].std() > 20


def test_render_domain_format_and_rng():
    gray = load_fashion_mnist("test")[0][:10]
    for d in DOMAINS:
        out = render_domain(d, gray, seed=3)
        assert out.dtype == np.uint8 and out.shape == (10, 32, 32, 3)
        assert np.array_equal(out, render_domain(d, gray, seed=3))
    assert not np.array_equal(render_domain("texture", gray, 3), render_domain("texture", gray, 4))
    with pytest.raises(ValueError, match="28, 28"):
        render_domain("photo", gray.astype(np.float32), 0)


def test_captions_and_templates():
    assert caption_for("negative", "ankle boot") == "a negative photo of an ankle boot."
    assert caption_for(DOMAINS["texture"], "coat") == "a textured painting of a coat."
    assert len({DOMAINS[d].caption for d in DOMAINS}) == len(DOMAINS)
    assert all(t.count("{}") == 1 for t in DOMAIN_BENCHMARK_TEMPLATES)
    for spec in MINI_SUITE_TASKS.values():
        assert spec.caption_templates and all(t.count("{}") == 1 for t in spec.caption_templates)


# ----------------------------------------------------------------------------- errors
def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELIB_FASHION_MNIST", str(tmp_path))
    load_fashion_mnist.cache_clear()
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist("train")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in message and "MERGELIB_FASHION_MNIST" in message
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in message


def test_truncated_or_corrupt_idx_raises_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELIB_FASHION_MNIST", str(tmp_path))
    root = fashion_mnist.DEFAULT_ROOT
    shutil.copy(root / "t10k-labels-idx1-ubyte.gz", tmp_path)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    header = np.array([2051, 10000, 28, 28], ">u4").tobytes()
    images.write_bytes(gzip.compress(header + bytes(1000)))  # valid gzip, too few pixels
    with pytest.raises(ValueError, match="truncated.*t10k-images"):
        load_fashion_mnist("test")
    images.write_bytes((root / "t10k-images-idx3-ubyte.gz").read_bytes()[:5000])  # cut-off gzip stream
    with pytest.raises(ValueError, match="t10k-images"):
        load_fashion_mnist("test")
    images.write_bytes(gzip.compress(np.array([2049, 10000, 28, 28], ">u4").tobytes()))
    with pytest.raises(ValueError, match="magic"):
        load_fashion_mnist("test")


def test_unknown_names_list_the_valid_ones():
    gray = np.zeros((1, 28, 28), np.uint8)
    for call, bad, valid in (
        (lambda: render_domain("watercolour", gray, 0), "watercolour", DOMAINS),
        (lambda: make_domain_benchmark(("photo", "watercolour")), "watercolour", DOMAINS),
        (lambda: make_task("cifar", 1, 1, 0), "cifar", MINI_SUITE_TASKS),
    ):
        with pytest.raises(UnknownNameError) as info:
            call()
        assert isinstance(info.value, KeyError)
        assert bad in str(info.value) and all(name in str(info.value) for name in valid)
        assert not str(info.value).startswith(("'", '"'))  # plain message, not KeyError's repr
    with pytest.raises(ValueError, match="train, test"):
        load_fashion_mnist("validation")


# ----------------------------------------------------------------------------- task suite
@pytest.mark.parametrize("name", sorted(MINI_SUITE_TASKS))
def test_task_classes_balance_and_format(name):
    spec = MINI_SUITE_TASKS[name]
    train, test = make_task(name, 2000, 600, seed=0)
    assert train.classnames == test.classnames == spec.classnames and len(spec.classnames) >= 4
    assert (train.name, test.name) == (f"{name}/train", f"{name}/test")
    assert len(train) == min(2000, spec.max_train) and len(test) == min(600, spec.max_test)
    for s in (train, test):
        assert s.images.dtype == torch.uint8 and s.images.shape[1:] == (3, 32, 32)
        counts = np.bincount(s.labels.numpy(), minlength=len(spec.classnames))
        assert counts.min() >= 0.6 * counts.max(), counts  # every class present, roughly balanced
    if name in ("digits", "animals"):  # one source array split in two (fashion: separate IDX splits)
        assert not _ids(train) & _ids(test)


def test_digits_and_animals_use_their_real_sizes_and_names():
    assert (MINI_SUITE_TASKS["digits"].max_train, MINI_SUITE_TASKS["digits"].max_test) == (1258, 539)
    train, test = make_task("digits", 10**6, 10**6, seed=0)
    assert len(train) + len(test) == 1797 and not _ids(train) & _ids(test)
    assert MINI_SUITE_TASKS["digits"].classnames[:2] == ("zero", "one")
    assert MINI_SUITE_TASKS["animals"].classnames == ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe",
                                                      "horse", "sheep", "zebra")


def test_the_old_names_of_the_mini_suite_and_the_papers_backbones_warn_and_still_work():
    import mergelib.data
    from mergelib.data import suite, task_suites

    for module in (mergelib.data, suite):
        with pytest.warns(DeprecationWarning, match=rf"{module.__name__}.TASKS is now {module.__name__}.MINI_SUITE_TASKS"):
            assert module.TASKS is MINI_SUITE_TASKS
    with pytest.warns(DeprecationWarning, match="task_suites.BACKBONES is now mergelib.data.task_suites.PAPER_BACKBONES"):
        assert task_suites.BACKBONES is task_suites.PAPER_BACKBONES
    assert set(task_suites.TASKS).isdisjoint(MINI_SUITE_TASKS)  # the papers' tasks: another name, another registry


def test_texture_crops_come_from_disjoint_halves():
    for split in ("train", "test"):
        crops = sample_texture_crops(split, 3000, seed=0)
        assert crops.size.min() >= 24 and crops.flip_h.any() and crops.flip_v.any()
        for c in range(len(MINI_SUITE_TASKS["textures"].classnames)):
            m = crops.labels == c
            start, end = texture_half(c, split)
            assert (crops.left[m] >= start).all() and (crops.left[m] + crops.size[m] <= end).all()
    # the halves of one image touch but never overlap
    train_half, test_half = texture_half(0, "train"), texture_half(0, "test")
    assert train_half[1] == test_half[0]
