"""The 8/14/20-task registry: order, published numbers, the TALL split and loading real on-disk layouts."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset, random_split

from mergelib.data import task_suites as ts
from mergelib.data.files import DataLayoutError
from mergelib.errors import ParameterValueError, UnknownNameError
from conftest import fake_mnist_family

RELEASED_ORDER = [
    "Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SVHN", "SUN397", "STL10", "OxfordIIITPet",
    "Flowers102", "CIFAR100", "PCAM", "FER2013", "CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "EMNIST", "KMNIST",
]

# Transcribed independently from the released results JSON (percent, rounded to 2 decimals):
# task -> (B/32 test, B/32 val, B/16 test, B/16 val, L/14 test, L/14 val).
REFERENCE_PERCENT = {
    "Cars": (78.19, 78.01, 87.61, 86.49, 92.26, 92.87), "DTD": (97.98, 78.55, 98.30, 82.09, 98.51, 85.11),
    "EuroSAT": (98.93, 99.04, 98.89, 99.26, 99.26, 99.30), "GTSRB": (99.14, 99.92, 99.00, 99.92, 99.15, 99.96),
    "MNIST": (99.69, 99.56, 99.75, 99.50, 99.79, 99.70), "RESISC45": (95.79, 96.24, 96.94, 97.04, 97.32, 97.30),
    "SVHN": (97.57, 96.38, 97.82, 96.76, 98.13, 97.24), "SUN397": (75.35, 75.42, 78.81, 77.58, 82.09, 82.42),
    "STL10": (97.97, 98.40, 98.60, 99.60, 99.51, 99.40), "OxfordIIITPet": (91.11, 92.39, 94.49, 94.84, 95.53, 95.92),
    "Flowers102": (90.50, 95.10, 93.76, 97.06, 97.87, 99.02), "CIFAR100": (89.27, 89.52, 90.71, 91.08, 93.33, 93.68),
    "PCAM": (87.88, 97.36, 89.18, 97.86, 90.27, 98.04), "FER2013": (72.95, 73.52, 74.76, 75.26, 77.01, 77.35),
    "CIFAR10": (97.91, 97.88, 98.53, 98.42, 99.20, 99.06), "Food101": (89.10, 84.62, 92.88, 89.56, 95.46, 93.06),
    "FashionMNIST": (95.30, 95.52, 95.65, 95.28, 95.81, 95.66),
    "RenderedSST2": (74.35, 71.39, 79.19, 77.31, 85.45, 82.51), "EMNIST": (99.78, 99.82, 99.79, 99.78, 99.81, 99.78),
    "KMNIST": (98.63, 99.50, 98.79, 99.74, 98.75, 99.74),
}
DERIVED_AVERAGES = {"ViT-B-32": (92.83, 90.88, 91.37), "ViT-B-16": (94.64, 92.76, 93.17), "ViT-L-14": (95.81, 94.29, 94.73)}
REFERENCE_EPOCHS = {
    "Cars": 35, "DTD": 76, "EuroSAT": 12, "GTSRB": 11, "MNIST": 5, "RESISC45": 15, "SVHN": 4, "SUN397": 14,
    "STL10": 60, "OxfordIIITPet": 82, "Flowers102": 147, "CIFAR100": 6, "PCAM": 1, "FER2013": 10, "CIFAR10": 6,
    "Food101": 4, "FashionMNIST": 5, "RenderedSST2": 39, "EMNIST": 2, "KMNIST": 5,
}


# ------------------------------------------------------------------ registry and published numbers

def test_suites_are_prefixes_of_the_released_order():
    assert list(ts.TASK_ORDER) == RELEASED_ORDER == list(ts.TASKS)
    assert len(set(ts.TASK_ORDER)) == 20
    assert ts.SUITES[8] == ts.suite_tasks(8) == tuple(RELEASED_ORDER[:8])
    assert ts.SUITES[14][:8] == ts.SUITES[8] and ts.SUITES[20][:14] == ts.SUITES[14]
    assert len(ts.SUITES[14]) == 14 and len(ts.SUITES[20]) == 20
    with pytest.raises(ParameterValueError, match="suites of \\[8, 14, 20\\]"):
        ts.suite_tasks(10)


def test_spec_fields_match_released_loaders():
    emnist = ts.TASKS["EMNIST"]
    assert emnist.train.class_name == "EMNIST" and emnist.train.constructor_kwargs == {"split": "digits", "train": True}
    assert emnist.test.constructor_kwargs == {"split": "digits", "train": False}
    assert ts.TASKS["OxfordIIITPet"].train.constructor_kwargs == {"split": "trainval"}
    assert ts.TASKS["DTD"].test.root_subdir == "dtd/val"  # the released code tests DTD on its "val" folder
    assert ts.TASKS["EuroSAT"].val is not None and all(ts.TASKS[t].val is None for t in RELEASED_ORDER if t != "EuroSAT")
    assert {t: ts.TASKS[t].epochs for t in RELEASED_ORDER} == REFERENCE_EPOCHS
    assert all(s.classname_source in ts.CLASSNAME_SOURCES for s in ts.TASKS.values())
    assert all((s.classname_source == "fixed") == (s.fixed_classnames is not None) for s in ts.TASKS.values())
    assert len(ts.GTSRB_CLASSNAMES) == 43 and len(ts.FLOWERS102_CLASSNAMES) == 102 and len(ts.RESISC45_CLASSNAMES) == 45
    assert ts.FER2013_CLASSNAMES[3] == "['happy', 'smiling']"  # as the released head builder formats it
    assert ts.EMNIST_ROTATE_FLIP_BY_REPO == {"tall_masks": False, "iso-merging": False,
                                             "task_singular_vectors": True, "ESM": True}


def test_templates_have_one_placeholder_each():
    assert set(ts.TEMPLATES) == set(RELEASED_ORDER)
    for name, spec in ts.TASKS.items():
        assert spec.templates == ts.TEMPLATES[name] and spec.templates
        for template in spec.templates:
            assert template.count("{}") == 1 and template.count("{") == 1, (name, template)
            assert "CLASS" in template.format("CLASS")
    assert len(ts.TEMPLATES["RESISC45"]) == 18 and ts.TEMPLATES["RESISC45"][1] == "aerial imagery of {}."
    assert len(ts.TEMPLATES["CIFAR10"]) == 18 and ts.TEMPLATES["CIFAR10"] == ts.TEMPLATES["CIFAR100"]
    assert ts.ESM_TEMPLATE_DIFFERENCES["EMNIST"] != ts.TEMPLATES["EMNIST"]


def test_published_accuracies_match_the_reference_table():
    columns = [(b, s) for b in ts.PAPER_BACKBONES for s in ("test", "val")]
    for task, row in REFERENCE_PERCENT.items():
        for (backbone, split), percent in zip(columns, row):
            assert round(100 * ts.published_finetuned_accuracy(backbone, task, split), 2) == pytest.approx(percent), (
                task, backbone, split)
    assert ts.published_finetuned_accuracy("B/32", "EMNIST") == 0.997825
    assert ts.TASKS["MNIST"].finetuned_accuracies["ViT-L-14"] == {"test": 0.9979, "val": 0.997}


@pytest.mark.parametrize("backbone", ts.PAPER_BACKBONES)
def test_suite_averages_equal_the_derived_table(backbone):
    for n, expected in zip((8, 14, 20), DERIVED_AVERAGES[backbone]):
        mean = 100 * float(np.mean([ts.published_finetuned_accuracy(backbone, t) for t in ts.suite_tasks(n)]))
        assert abs(mean - expected) <= 0.005 + 1e-9, (backbone, n, mean)


@pytest.mark.parametrize("backbone", ts.PAPER_BACKBONES)
def test_published_accuracies_are_counts_over_the_implied_split_sizes(backbone):
    """Each accuracy is correct/total: with the TALL val size and the official test size the
    counts are integers, which checks the split rule and the recorded sizes against the JSON."""
    for name, spec in ts.TASKS.items():
        n_val = spec.n_val if spec.val is not None else ts.tall_validation_size(spec.n_train)
        for split, total in (("val", n_val), ("test", spec.n_test)):
            count = ts.published_finetuned_accuracy(backbone, name, split) * total
            assert abs(count - round(count)) < 1e-6, (name, split, count)


def test_normalized_accuracy_divides_by_the_published_split():
    accuracies = {"MNIST": 0.9969 / 2, "Cars": 0.5}
    normalized = ts.normalized_accuracy(accuracies, "ViT-B-32")
    assert normalized["MNIST"] == pytest.approx(0.5)
    assert normalized["Cars"] == pytest.approx(0.5 / 0.7818679268747668)
    assert ts.normalized_accuracy({"MNIST": 0.9956}, "B/32", split="val")["MNIST"] == pytest.approx(1.0)
    assert ts.mean_normalized_accuracy(accuracies, "ViT-B-32") == pytest.approx(np.mean(list(normalized.values())))
    with pytest.raises(ParameterValueError, match="not a fraction"):
        ts.normalized_accuracy({"MNIST": 99.0}, "ViT-B-32")
    with pytest.raises(UnknownNameError, match="MNISTVal"):
        ts.normalized_accuracy({"MNISTVal": 0.9}, "ViT-B-32")
    with pytest.raises(UnknownNameError, match="backbone"):
        ts.published_finetuned_accuracy("RN50", "MNIST")
    with pytest.raises(ParameterValueError, match="'test' or 'val'"):
        ts.published_finetuned_accuracy("ViT-B-32", "MNIST", "train")


# ------------------------------------------------------------------ TALL validation split

@pytest.mark.parametrize("n, expected_val", [(60000, 5000), (7000, 700), (1020, 102), (28709, 2870), (19, 1)])
def test_tall_split_sizes_cover_and_match_random_split(n, expected_val):
    fit, val = ts.tall_validation_split(n)
    assert len(val) == expected_val == ts.tall_validation_size(n) and len(fit) == n - expected_val
    assert not set(fit) & set(val) and sorted(fit + val) == list(range(n))
    assert ts.tall_validation_split(n) == (fit, val)
    ref_fit, ref_val = random_split(range(n), [n - expected_val, expected_val], generator=torch.Generator().manual_seed(0))
    assert fit == list(ref_fit.indices) and val == list(ref_val.indices)


def test_tall_split_reproduces_the_released_mnist_check_and_depends_on_seed():
    fit, _ = ts.tall_validation_split(60000)
    assert fit[0] == 36044  # the assertion in tall_masks' split_train_into_train_val for MNISTVal
    assert ts.tall_validation_split(500, seed=1) != ts.tall_validation_split(500, seed=0)
    assert len(ts.tall_validation_split(500, fraction=0.2, cap=None)[1]) == 100
    assert len(ts.tall_validation_split(500, fraction=0.2, cap=30)[1]) == 30


@pytest.mark.parametrize("kwargs, message", [
    ({"n_train_items": 1}, ">= 2"), ({"n_train_items": 100, "fraction": 0.0}, "fraction"),
    ({"n_train_items": 100, "fraction": 1.0}, "fraction"), ({"n_train_items": 5}, "empty"),
    ({"n_train_items": 100, "cap": 0}, "cap"),
])
def test_tall_split_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ParameterValueError, match=message):
        ts.tall_validation_split(**kwargs)


# ------------------------------------------------------------------ loading torchvision's on-disk layouts

@pytest.fixture
def mnist_root(tmp_path):
    data = fake_mnist_family(tmp_path / "MNIST" / "raw", {"train": "train", "test": "t10k"}, {"train": 40, "test": 12})
    return tmp_path, data


def test_load_mnist_from_idx_files(mnist_root):
    root, data = mnist_root
    train, names = ts.load_task("MNIST", root, "train")
    val, _ = ts.load_task("MNIST", root, "val")
    test, _ = ts.load_task("MNIST", root, "test")
    assert names == tuple("0123456789")
    assert isinstance(train, Subset) and isinstance(val, Subset) and train.dataset is not val.dataset
    assert (len(train), len(val), len(test)) == (36, 4, 12)
    fit, held_out = ts.tall_validation_split(40)
    assert train.indices == fit and val.indices == held_out
    assert not set(train.indices) & set(val.indices) and sorted(train.indices + val.indices) == list(range(40))
    images, labels = data["train"]
    for position in (0, 3):
        image, label = val[position]
        source = held_out[position]
        assert label == int(labels[source]) and np.array_equal(np.asarray(image), images[source])
    image, label = test[5]
    assert label == int(data["test"][1][5]) and np.array_equal(np.asarray(image), data["test"][0][5])


def test_load_task_applies_the_transform(mnist_root):
    root, data = mnist_root
    test, _ = ts.load_task("MNIST", root, "test", transform=lambda im: torch.from_numpy(np.array(im)).float() / 255)
    tensor, _ = test[0]
    assert torch.allclose(tensor, torch.from_numpy(data["test"][0][0]).float() / 255)


def test_load_cifar10_from_pickled_batches(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    batches = {}
    for name, n in [*[(f"data_batch_{i}", 6) for i in range(1, 6)], ("test_batch", 8)]:
        pixels = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=n)]
        (folder / name).write_bytes(pickle.dumps({"data": pixels, "labels": labels}))
        batches[name] = (pixels, labels)
    label_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": label_names}))
    # torchvision checks the real files' MD5 sums, which tiny fakes cannot match: check existence only.
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())

    train, names = ts.load_task("CIFAR10", tmp_path, "train")
    val, _ = ts.load_task("CIFAR10", tmp_path, "val")
    test, test_names = ts.load_task("CIFAR10", tmp_path, "test")
    assert names == test_names == tuple(label_names)
    assert (len(train), len(val), len(test)) == (27, 3, 8)
    assert not set(train.indices) & set(val.indices) and sorted(train.indices + val.indices) == list(range(30))
    all_pixels = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    all_labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    image, label = val[1]
    source = val.indices[1]
    assert label == all_labels[source]
    assert np.array_equal(np.asarray(image), all_pixels[source].reshape(3, 32, 32).transpose(1, 2, 0))
    assert test[7][1] == batches["test_batch"][1][7]


def test_emnist_rotate_flip_is_explicit_and_transposes(tmp_path):
    data = fake_mnist_family(tmp_path / "EMNIST" / "EMNIST" / "raw",
                              {"train": "emnist-digits-train", "test": "emnist-digits-test"}, {"train": 20, "test": 5})
    plain, names = ts.load_task("EMNIST", tmp_path, "test")
    fixed, _ = ts.load_task("EMNIST", tmp_path, "test", emnist_rotate_flip=True)
    assert names == tuple("0123456789")
    stored = data["test"][0][2]
    assert np.array_equal(np.asarray(plain[2][0]), stored)  # off by default: the tall_masks/Iso convention
    assert np.array_equal(np.asarray(fixed[2][0]), stored.T)  # rotate -90 then flip = transpose
    tensor = torch.arange(16.0).reshape(1, 4, 4)  # after CLIP preprocessing: a square CHW tensor
    assert torch.equal(ts.emnist_orientation(tensor), tensor.transpose(1, 2))


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(path)


def test_eurosat_uses_its_val_folder_and_openai_names(tmp_path):
    folders = sorted(ts.EUROSAT_FOLDER_TO_CLASSNAME)
    for split, count in (("train", 3), ("val", 1), ("test", 2)):
        for k, folder in enumerate(folders):
            for i in range(count):
                _png(tmp_path / "EuroSAT_splits" / split / folder / f"{split}_{i}.png", k)
    train, names = ts.load_task("EuroSAT", tmp_path, "train")
    val, _ = ts.load_task("EuroSAT", tmp_path, "val")
    assert (len(train), len(val)) == (30, 10) and not isinstance(val, Subset)
    assert names[2] == "brushland or shrubland" and names[-1] == "lake or sea"
    assert sorted(val[i][1] for i in range(10)) == list(range(10))


def test_resisc45_split_lists_select_files(tmp_path):
    base = tmp_path / "resisc45"
    folders = [n.replace(" ", "_") for n in ts.RESISC45_CLASSNAMES]
    for k, folder in enumerate(folders):
        for i in range(3):
            _png(base / "NWPU-RESISC45" / folder / f"{folder}_{i}.jpg", k)
    (base / "resisc45-train.txt").write_text("".join(f"{f}_0.jpg\n{f}_1.jpg\n" for f in folders))
    (base / "resisc45-test.txt").write_text("".join(f"{f}_2.jpg\n" for f in folders))
    test, names = ts.load_task("RESISC45", tmp_path, "test")
    train, _ = ts.load_task("RESISC45", tmp_path, "train")
    val, _ = ts.load_task("RESISC45", tmp_path, "val")
    assert names[2] == "baseball diamond" and len(test) == 45
    assert all(Path(p).stem.endswith("_2") for p, _ in test.samples)
    assert (len(train), len(val)) == (81, 9)


def test_missing_dataset_error_names_folder_and_remedy(tmp_path):
    with pytest.raises(DataLayoutError) as info:
        ts.load_task("MNIST", tmp_path, "test")
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "MNIST" in message and "download=True" in message
    with pytest.raises(DataLayoutError) as info:
        ts.load_task("DTD", tmp_path / "data", "val")
    assert str(tmp_path / "data" / "dtd" / "train") in str(info.value) and "train1.txt" in str(info.value)
    with pytest.raises(DataLayoutError, match="fer2013.csv"):
        ts.load_task("FER2013", tmp_path, "test", download=True)  # torchvision cannot download it: no network use
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)  # the folder without its files
    with pytest.raises(DataLayoutError, match="torchvision cannot read it"):
        ts.load_task("MNIST", tmp_path, "train")


def test_load_task_rejects_bad_names(tmp_path):
    with pytest.raises(UnknownNameError, match="valid task names"):
        ts.load_task("ImageNet", tmp_path, "test")
    with pytest.raises(ParameterValueError, match="'train', 'val' or 'test'"):
        ts.load_task("MNIST", tmp_path, "validation")
