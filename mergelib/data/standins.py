"""Stand-in folders: small generated images in the real layouts of the papers' datasets.

A stand-in is **not data**. It exists so that the readers, the registries and whole pipelines
(fine-tuning, merging, evaluation) can be exercised in tests and smoke runs on machines that
cannot download PACS, DomainNet and the rest. The images are coloured stripe patterns: the colour
follows the class, the stripe direction and frequency follow the domain, and a little seeded noise
makes every image different, so a model can learn something, but nothing about the real datasets.

:func:`make_dg_standin` writes one of SCORE's eight domain-generalisation datasets
(:mod:`mergelib.data.dg_datasets`) in the layout :func:`~mergelib.data.dg_datasets.load_domain`
expects, including PACS's kfold lists and FedISIC's split CSV, and the documented irregularities
of the real data: DomainNet's painting train split has no ``t-shirt`` folder, Retina's Moderate
grade folder is present (the 4-class default leaves it out when reading), and PACS's test lists
hold the whole domain.

:func:`make_task_standin` does the same for tasks of the 8/14/20-task suites
(:mod:`mergelib.data.task_suites`) whose torchvision readers accept generated files: the MNIST
family (IDX files), the ``ImageFolder`` trees (DTD, EuroSAT, SUN397, RESISC45 with its split lists),
GTSRB (PPM files and the test CSV) and Stanford Cars (the devkit ``.mat`` files). SVHN, CIFAR,
STL10, Flowers102, PCAM, FER2013 and the rest have no stand-in: torchvision checks the MD5 sums of
their real files, which generated files cannot match.
"""

from __future__ import annotations

import colorsys
import csv
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from mergelib.errors import ParameterValueError, lookup
from mergelib.data.dg_datasets import DG_DATASETS, SPLITS, DGDatasetSpec, get_dg_dataset

__all__ = ["check_task_standin", "make_dg_standin", "make_task_standin", "standin_image", "TASK_STANDINS"]


def standin_image(class_index: int, domain_index: int, seed_parts: Sequence[int], size: tuple[int, int]) -> Image.Image:
    """A deterministic RGB pattern of ``size = (width, height)``: colour by class, stripes by domain."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = 0.7 * domain_index
    frequency = 1.5 + domain_index % 5
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * (x * np.cos(angle) + y * np.sin(angle)) / width)
    colour = np.array(colorsys.hsv_to_rgb((0.618034 * class_index) % 1.0, 0.75, 0.95), dtype=np.float32)
    noise = np.random.default_rng(list(seed_parts)).normal(0.0, 0.04, (height, width, 3)).astype(np.float32)
    rgb = colour * (0.35 + 0.65 * stripes[..., None]) + noise
    return Image.fromarray((np.clip(rgb, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), "RGB")


def _class_folders(spec: DGDatasetSpec, n_classes: int | None) -> list[str]:
    """Fixed lists whole; folder-named classes as ``class_000``..., with the documented absences."""
    if spec.classes is not None:
        return list(spec.classes)
    n = spec.n_classes if n_classes is None else n_classes
    if not 1 <= n <= spec.n_classes:
        raise ParameterValueError(f"{spec.name}: n_classes must lie in [1, {spec.n_classes}], got {n}")
    names = [f"class_{i:03d}" for i in range(n)]
    tolerated = sorted({c for _, _, c in spec.tolerated_missing})
    if tolerated and n > len(tolerated):  # keep the real names of classes the data are known to lack somewhere
        names[-len(tolerated):] = tolerated
    return names


def _domain_list(spec: DGDatasetSpec, domains: Sequence[str] | None) -> list[str]:
    if domains is None:
        return list(spec.domains)
    for domain in domains:
        lookup(dict.fromkeys(spec.domains), f"{spec.name} domain", domain)
    return list(domains)


def make_dg_standin(name: str, root: str | Path, *, images_per_class: int = 2, n_classes: int | None = None,
                    domains: Sequence[str] | None = None, seed: int = 0,
                    image_size: tuple[int, int] = (40, 32)) -> Path:
    """Write a stand-in of DG dataset ``name`` under ``root``; return ``root`` (the data root to load from).

    Every written (domain, split, class) holds ``images_per_class`` images, except PACS, whose test
    list is the whole domain (``2 * images_per_class`` per class: the train images and as many
    held-out ones). ``n_classes`` keeps the first ``n`` of a class list that comes from folder names
    (DomainNet 345, ImageNet-R 200, Office-Home 65, NICO++ 60); the classes fixed by the released
    code are always written whole, since their readers require them. ``domains`` limits the domains
    written (default: all). The same arguments give byte-identical files.
    """
    spec = get_dg_dataset(name)
    if images_per_class < 1:
        raise ParameterValueError(f"images_per_class must be at least 1, got {images_per_class}")
    root = Path(root)
    base = root / spec.directory
    classes = _class_folders(spec, n_classes)
    chosen = _domain_list(spec, domains)
    dataset_index = list(DG_DATASETS).index(spec.name)
    suffix = ".png" if spec.name == "RetinaDomains" else ".jpg"  # APTOS ships PNG files

    def write(path: Path, class_index: int, domain: str, split: str, item: int) -> None:
        domain_index = spec.domains.index(domain)
        parts = (seed, dataset_index, domain_index, class_index, SPLITS.index(split), item)
        path.parent.mkdir(parents=True, exist_ok=True)
        standin_image(class_index, domain_index, parts, image_size).save(path)

    if spec.reader == "pacs_lists":
        for domain in chosen:
            lines = {"train": [], "test": []}
            for label, cls in enumerate(classes):
                for item in range(2 * images_per_class):
                    relative = f"{domain}/{cls}/pic_{item:03d}{suffix}"
                    write(base / "kfold" / relative, label, domain, "train", item)
                    lines["test"].append(f"{relative} {label + 1}")
                    if item < images_per_class:
                        lines["train"].append(f"{relative} {label + 1}")
            for split in SPLITS:
                (base / f"{domain}_{split}_kfold.txt").write_text("\n".join(lines[split]) + "\n")
    elif spec.reader == "fedisic_csv":
        rows, number = [], 0
        for domain in chosen:
            center = spec.domains.index(domain)
            for split in SPLITS:
                for target in range(len(classes)):
                    for item in range(images_per_class):
                        image = f"ISIC_{number:07d}"
                        number += 1
                        write(base / "ISIC_2019_Training_Input" / f"{image}.jpg", target, domain, split, item)
                        rows.append({"image": image, "target": target, "center": center, "fold": split,
                                     "fold2": f"{split}_{center}"})
        base.mkdir(parents=True, exist_ok=True)
        with (base / "train_test_split.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["image", "target", "center", "fold", "fold2"])
            writer.writeheader()
            writer.writerows(rows)
    elif spec.reader == "imagenet_r":
        for split in SPLITS:
            for label, cls in enumerate(classes):
                (base / split / cls).mkdir(parents=True, exist_ok=True)  # every class folder, in both splits
                for domain in chosen:
                    for item in range(images_per_class):
                        write(base / split / cls / f"{domain}_{item}{suffix}", label, domain, split, item)
    else:  # {dir}/{split}/{domain}/{class}/
        for split in SPLITS:
            for domain in chosen:
                for label, cls in enumerate(classes):
                    if (domain, split, cls) in spec.tolerated_missing:
                        continue
                    for item in range(images_per_class):
                        write(base / split / domain / cls / f"{split}_{item:03d}{suffix}", label, domain, split, item)
    return root



# ------------------------------------------------------------------------- the task suites

#: Tasks of :mod:`mergelib.data.task_suites` that :func:`make_task_standin` can write.
TASK_STANDINS = ("Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "FashionMNIST", "EMNIST", "KMNIST")
_IDX_FILES = {"MNIST": ("MNIST/raw", "train", "t10k"), "FashionMNIST": ("FashionMNIST/FashionMNIST/raw", "train", "t10k"),
              "KMNIST": ("KMNIST/KMNIST/raw", "train", "t10k"),
              "EMNIST": ("EMNIST/EMNIST/raw", "emnist-digits-train", "emnist-digits-test")}


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file (the MNIST format) of a uint8 array."""
    import struct

    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def check_task_standin(name: str) -> str:
    """``name`` if :func:`make_task_standin` can write it, else a clear error (an unknown task
    gets the registry's error listing the valid names)."""
    from mergelib.data import task_suites as ts

    if name not in TASK_STANDINS:
        lookup(ts.TASKS, "task", name)
        raise ParameterValueError(
            f"no stand-in for {name}: torchvision checks the MD5 sums of its real files; stand-ins exist for "
            f"{', '.join(TASK_STANDINS)}")
    return name


def make_task_standin(name: str, root: str | Path, *, images_per_class: int = 4, n_classes: int = 5, seed: int = 0,
                      image_size: int = 32) -> Path:
    """Write a stand-in of suite task ``name`` under ``root`` in the layout that
    :func:`~mergelib.data.task_suites.load_task` reads; return ``root``.

    Each split of each class holds ``images_per_class`` images (the train split is then cut into
    the TALL training and validation parts by ``load_task``). ``n_classes`` is the number of
    classes where the class list comes from the files (MNIST family at most 10, DTD, SUN397, Cars,
    GTSRB at most 43); EuroSAT's 10 and RESISC45's 45 class folders are always written whole,
    since their class names are fixed by folder name. The same arguments give identical files.
    """
    from mergelib.data import task_suites as ts

    check_task_standin(name)
    if images_per_class < 1 or n_classes < 1:
        raise ParameterValueError(f"images_per_class and n_classes must be at least 1, got {images_per_class}, {n_classes}")
    root = Path(root)
    task_index = ts.TASK_ORDER.index(name)

    def image(label: int, split: int, item: int) -> Image.Image:
        return standin_image(label, task_index, (seed, task_index, label, split, item), (image_size, image_size))

    def folder_tree(base: Path, splits: Sequence[str], folders: Sequence[str], suffix: str = ".jpg") -> dict[str, list[str]]:
        written: dict[str, list[str]] = {split: [] for split in splits}
        for s, split in enumerate(splits):
            for label, folder in enumerate(folders):
                for item in range(images_per_class):
                    file = f"{folder}_{split}_{item:03d}{suffix}"
                    path = base / split / folder / file if split else base / folder / file
                    path.parent.mkdir(parents=True, exist_ok=True)
                    image(label, s, item).save(path)
                    written[split].append(file)
        return written

    if name in _IDX_FILES:
        if n_classes > 10:
            raise ParameterValueError(f"{name} has 10 classes; n_classes must be at most 10, got {n_classes}")
        raw, train_prefix, test_prefix = _IDX_FILES[name]
        for s, prefix in enumerate((train_prefix, test_prefix)):
            labels = np.repeat(np.arange(n_classes), images_per_class)
            pixels = np.stack([np.asarray(image(int(label), s, item).convert("L").resize((28, 28)))
                               for item, label in enumerate(labels)])
            _write_idx(root / raw / f"{prefix}-images-idx3-ubyte", pixels)
            _write_idx(root / raw / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    elif name == "DTD":
        folder_tree(root / "dtd", ("train", "val"), [f"texture_{i:02d}" for i in range(n_classes)])
    elif name == "SUN397":
        folder_tree(root / "sun397", ("train", "val"), [f"s_scene_{i:03d}" for i in range(n_classes)])
    elif name == "EuroSAT":
        folder_tree(root / "EuroSAT_splits", ("train", "val", "test"), sorted(ts.EUROSAT_FOLDER_TO_CLASSNAME))
    elif name == "RESISC45":
        folders = [c.replace(" ", "_") for c in ts.RESISC45_CLASSNAMES]
        lists = {"train": [], "val": [], "test": []}
        base = root / "resisc45"
        for s, split in enumerate(lists):
            for label, folder in enumerate(folders):
                for item in range(images_per_class):
                    file = f"{folder}_{s * images_per_class + item + 1}.jpg"  # NWPU names: {class}_{n}.jpg
                    path = base / "NWPU-RESISC45" / folder / file
                    path.parent.mkdir(parents=True, exist_ok=True)
                    image(label, s, item).save(path)
                    lists[split].append(file)
        for split, files in lists.items():
            (base / f"resisc45-{split}.txt").write_text("\n".join(files) + "\n")
    elif name == "GTSRB":
        if n_classes > 43:
            raise ParameterValueError(f"GTSRB has 43 classes; n_classes must be at most 43, got {n_classes}")
        base = root / "gtsrb"
        folder_tree(base / "GTSRB" / "Training", ("",), [f"{i:05d}" for i in range(n_classes)], ".ppm")
        rows = []
        for label in range(n_classes):
            for item in range(images_per_class):
                file = f"{len(rows):05d}.ppm"
                path = base / "GTSRB" / "Final_Test" / "Images" / file
                path.parent.mkdir(parents=True, exist_ok=True)
                image(label, 1, item).save(path)
                rows.append(f"{file};{image_size};{image_size};0;0;{image_size - 1};{image_size - 1};{label}")
        header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
        (base / "GT-final_test.csv").write_text("\n".join([header, *rows]) + "\n")
    else:  # Cars: torchvision's StanfordCars reads the devkit's .mat files
        from scipy.io import savemat

        base = root / "stanford_cars"
        (base / "devkit").mkdir(parents=True, exist_ok=True)
        savemat(base / "devkit" / "cars_meta.mat",
                {"class_names": np.array([f"Make_{i:03d} Model {2000 + i}" for i in range(n_classes)], dtype=object)})
        for s, (folder, annotations_file) in enumerate((("cars_train", base / "devkit" / "cars_train_annos.mat"),
                                                        ("cars_test", base / "cars_test_annos_withlabels.mat"))):
            records = []
            for label in range(n_classes):
                for item in range(images_per_class):
                    file = f"{len(records) + 1:05d}.jpg"
                    path = base / folder / file
                    path.parent.mkdir(parents=True, exist_ok=True)
                    image(label, s, item).save(path)
                    records.append((file, label + 1))  # the devkit's classes count from 1
            table = np.array(records, dtype=[("fname", object), ("class", object)])
            savemat(annotations_file, {"annotations": table})
    return root
