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
"""

from __future__ import annotations

import colorsys
import csv
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import ParameterValueError, lookup
from .dg_datasets import DG_DATASETS, SPLITS, DGDatasetSpec, get_dg_dataset

__all__ = ["make_dg_standin", "standin_image"]


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

