"""SCORE's eight domain-generalisation datasets: registry, readers of their folder layouts, splits.

SCORE (arXiv 2603.05768, CVPR 2026) fine-tunes one CLIP expert per domain and merges them
leave-one-domain-out on PACS, DomainNet, ImageNet-R, NICO++, Office-Home, TerraIncognita, FedISIC and
RetinaDomains (49 domains). Each :class:`DGDatasetSpec` records what the released code
(``VirtualSpaceman/score_cvpr26``, ``src/datasets/*.py``, ``src/constants.py`` and the preparation
scripts under ``scripts/DIL/datasets``) does with a dataset: domains in its index order and the order
its scripts loop over them, class lists where the code fixes them, prompt templates, metric, epochs
and whether SCORE's trim threshold is divided by the number of merged tasks (zσ/T for the natural-
image datasets, zσ for FedISIC and RetinaDomains; the code switches on the dataset *name*).

:func:`load_domain` reads one domain's train or test split from the prepared folders into an
:class:`~mergelib.data.files.ImageFileSet` whose class names are the prompt names (``_`` -> space)
in label order, so ``zero_shot_head(clip, files.classnames, spec.templates)`` is the head of exactly
that split, as the released code rebuilds the head for every domain subset. Four readers:

* folders ``{root}/{dir}/{train,test}/{domain}/{class}/*`` (DomainNet, Office-Home, NICO++,
  TerraIncognita, RetinaDomains): classes are the sorted class-folder names, as torchvision's
  ``ImageFolder`` sorts them; images are the files with an image suffix directly inside a class folder
  (``ImageFolder`` would also walk sub-folders; the prepared data have none);
* ImageNet-R ``{root}/imagenet-r/{train,test}/{class}/{domain}_{n}.jpg``: every class folder is a
  class, even with no image of the domain (released: ``ImageFolder(allow_empty=True)``);
* PACS lists ``{root}/PACS/{domain}_{train,test}_kfold.txt``, images under ``{root}/PACS/kfold/``;
* FedISIC ``train_test_split.csv`` (FLamby's split) over the raw ISIC 2019 images.

Where this module follows released code rather than the paper, or departs from it on purpose:

* **PACS test = the whole domain.** The released loader reads ``{domain}_test_kfold.txt``, which in
  the official PACS release lists every image of the domain, so the "test" split contains the
  training images (the expert upper bound on PACS is partly measured on seen images). That is the
  default (``pacs_test="whole_domain"``); ``pacs_test="held_out"`` gives the deterministic
  alternative: the test list minus the images of the train list.
* **RetinaDomains has 4 classes by default.** The released class list spells the grade
  ``Modetate_Diabetic_Retinopathy`` while the preparation notebook writes the folder as
  ``Moderate_Diabetic_Retinopathy``; the released subset builder skips class folders it cannot find,
  so the Moderate grade is silently dropped. The paper's "4-365 classes" fits a 4-class Retina.
  ``retina_classes=4`` (default) reproduces that; ``retina_classes=5`` keeps Moderate. Either
  spelling of the folder is accepted (both at once is an error).
* **Office-Home ``Real World``.** The released reader expects ``Real World``; the released
  preparation script writes ``Real_World``. Either is accepted; both at once is an error.
* **DomainNet painting has no ``t-shirt`` in its official train list** (an external fact), so that
  split has 344 classes. :func:`check_dataset` tolerates exactly the absences listed in
  ``DGDatasetSpec.tolerated_missing`` and rejects every other difference between the class lists of
  one dataset's domains and splits.
* **Splits.** The released 80/20 splits were unseeded when the paper's numbers were made; seed 17
  was added afterwards (2026-05-30). :func:`split_files` is the seeded rule of the released
  ImageNet-R, Office-Home and NICO++ preparation (``torch.utils.data.random_split`` with
  ``torch.Generator().manual_seed(17)``, ``int(0.8 n)`` training items). ImageNet-R is split over
  the whole dataset, not per domain. TerraIncognita's released script shuffles with Python's
  ``random.Random(17)`` instead, so its split is not reproduced bit for bit by :func:`split_files`.
* **Empty class folders stay classes** (with no images) in every folder dataset; the released
  ``ImageFolder`` calls allow that only for ImageNet-R and NICO++ and would refuse it elsewhere.
  A domain with no image at all is an error.

Class lists are fixed by the code for PACS (7, in the code's order), FedISIC (8, label = FLamby's
target index), TerraIncognita (10) and RetinaDomains (5 grades); for the last two the label order
is still the sorted folder order, as ``ImageFolder`` gives it. The released DomainNet, Office-Home,
NICO++ and ImageNet-R readers also carry class lists, but these only repeat the folder names; here
they come from the folders, and :func:`check_dataset` checks that the domains agree.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypeVar

import torch

from mergelib.errors import ParameterValueError, lookup
from mergelib.data.files import DataLayoutError, ImageFileSet
from mergelib.data.templates import DG_TEMPLATES

__all__ = [
    "DGDatasetSpec", "ClassName", "DatasetReport", "DG_DATASETS", "SPLITS", "IMAGE_SUFFIXES",
    "get_dg_dataset", "load_domain", "domain_classes", "domain_classnames", "check_dataset",
    "split_files", "MissingImagesError", "ClassMismatchError", "AmbiguousFolderError",
]

SPLITS = ("train", "test")
# torchvision's IMG_EXTENSIONS, compared case-insensitively as ImageFolder does.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
RETINA_MODERATE = "Moderate_Diabetic_Retinopathy"
PACS_TEST_CHOICES = ("whole_domain", "held_out")


class MissingImagesError(DataLayoutError):
    """A split list or CSV names image files that do not exist."""


class ClassMismatchError(DataLayoutError):
    """The class lists of a dataset's domains or splits differ beyond the documented exceptions."""


class AmbiguousFolderError(DataLayoutError):
    """Two accepted spellings of the same folder exist side by side."""


@dataclass(frozen=True)
class ClassName:
    """A class on disk (folder name in its registry spelling; FedISIC: the CSV target) and as prompted."""

    on_disk: str
    prompt: str


@dataclass(frozen=True)
class DGDatasetSpec:
    """What SCORE's released code does with one domain-generalisation dataset."""

    name: str  # registry key, as in the released code
    display_name: str
    directory: str  # dataset folder under the data root
    reader: str  # "folders", "imagenet_r", "pacs_lists" or "fedisic_csv"
    domains: tuple[str, ...]  # released index order
    iteration_order: tuple[int, ...]  # indices into ``domains``, in the order the scripts loop
    classes: tuple[str, ...] | None  # on-disk names fixed by the code; None: from the folders
    n_classes: int  # classes of the full dataset (RetinaDomains: 5 grades, 4 used by default)
    templates: tuple[str, ...]
    metric: str  # "top1" or "balanced_accuracy"
    epochs: int  # fine-tuning epochs per domain (released constants)
    trim_divide_by_tasks: bool  # SCORE's off-diagonal threshold: z*sigma/T (True) or z*sigma
    layout: str
    split_rule: str
    split_seed: int | None
    aliases: tuple[tuple[str, str], ...] = ()  # (domain or fixed class folder, other accepted spelling)
    tolerated_missing: tuple[tuple[str, str, str], ...] = ()  # (domain, split, class folder)
    notes: str = ""

    @property
    def domains_in_iteration_order(self) -> tuple[str, ...]:
        return tuple(self.domains[i] for i in self.iteration_order)

    def spellings(self, name: str) -> tuple[str, ...]:
        """``name`` and the other spellings of that folder this module accepts."""
        return (name, *(alt for canonical, alt in self.aliases if canonical == name))


def _spec(**fields) -> DGDatasetSpec:
    return DGDatasetSpec(templates=DG_TEMPLATES[fields["name"]], **fields)


_NATURAL_TOP1 = dict(metric="top1", trim_divide_by_tasks=True)
_MEDICAL = dict(metric="balanced_accuracy", trim_divide_by_tasks=False)
_SPLIT_80_20 = "random 80/20 per domain: split_files(..., 0.8, seed=17) (seed added after the paper)"

DG_DATASETS: dict[str, DGDatasetSpec] = {s.name: s for s in (
    _spec(
        name="PACS", display_name="PACS", directory="PACS", reader="pacs_lists",
        domains=("art_painting", "cartoon", "photo", "sketch"), iteration_order=(0, 1, 2, 3),
        classes=("dog", "elephant", "giraffe", "guitar", "horse", "house", "person"), n_classes=7,
        epochs=10, **_NATURAL_TOP1,
        layout="{root}/PACS/{domain}_{train,test}_kfold.txt, one '<relative path> <label 1-7>' per line; "
               "images under {root}/PACS/kfold/<relative path> (e.g. kfold/art_painting/dog/pic_001.jpg)",
        split_rule="official kfold lists; the test list is the whole domain (pacs_test='held_out': test "
                   "list minus train list)",
        split_seed=None,
        notes="Label = list label - 1, in the fixed class order. Domain sizes (external): photo 1,670, "
              "art_painting 2,048, cartoon 2,344, sketch 3,929."),
    _spec(
        name="DomainNet", display_name="DomainNet", directory="domainnet", reader="folders",
        domains=("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
        iteration_order=(0, 5, 4, 1, 3, 2), classes=None, n_classes=345, epochs=10, **_NATURAL_TOP1,
        layout="{root}/domainnet/{train,test}/{domain}/{class}/*.jpg, built from the official "
               "{domain}_{train,test}.txt lists (class folders as in the release, e.g. The_Eiffel_Tower)",
        split_rule="official DomainNet train/test lists", split_seed=None,
        tolerated_missing=(("painting", "train", "t-shirt"),),
        notes="The official painting train list has no t-shirt image, so that split has 344 classes."),
    _spec(
        name="ImageNetR", display_name="ImageNet-R", directory="imagenet-r", reader="imagenet_r",
        domains=("deviantart", "cartoon", "misc", "embroidery", "videogame", "painting", "art", "graphic",
                 "origami", "tattoo", "toy", "sticker", "graffiti", "sculpture", "sketch"),
        iteration_order=(9, 14, 7, 5, 6, 8, 13, 12, 1, 2, 10, 3, 4, 11, 0), classes=None, n_classes=200,
        epochs=10, **_NATURAL_TOP1,
        layout="{root}/imagenet-r/{train,test}/{class}/{domain}_{n}.jpg (wnid folders renamed to class "
               "names); the domain is the file-name prefix; all 200 class folders exist in both splits",
        split_rule="random 80/20 over the whole dataset, not per domain: split_files(..., 0.8, seed=17) "
                   "over ImageFolder's order (seed added after the paper)",
        split_seed=17,
        notes="Every class folder is a class of every domain, also where it holds no image of it."),
    _spec(
        name="NICOpp", display_name="NICO++", directory="NICOpp_track1", reader="folders",
        domains=("autumn", "dim", "grass", "outdoor", "rock", "water"), iteration_order=(0, 1, 2, 3, 4, 5),
        classes=None, n_classes=60, epochs=15, **_NATURAL_TOP1,
        layout="{root}/NICOpp_track1/{train,test}/{domain}/{class}/*, made from NICO++ track 1 "
               "public_dg_0416/train/{domain}/{class} with spaces in folder names replaced by '_'",
        split_rule=_SPLIT_80_20, split_seed=17),
    _spec(
        name="OfficeHome", display_name="Office-Home", directory="OfficeHomeDataset", reader="folders",
        domains=("Art", "Clipart", "Product", "Real World"), iteration_order=(0, 1, 2, 3),
        classes=None, n_classes=65, epochs=10, **_NATURAL_TOP1,
        layout="{root}/OfficeHomeDataset/{train,test}/{domain}/{Class_Name}/*.jpg; the 'Real World' "
               "domain folder may also be spelled 'Real_World' (not both)",
        split_rule=_SPLIT_80_20, split_seed=17, aliases=(("Real World", "Real_World"),),
        notes="Released reader: 'Real World'; released preparation script: 'Real_World'."),
    _spec(
        name="TerraIncognita", display_name="TerraIncognita", directory="terra_incognita", reader="folders",
        domains=("location_38", "location_46", "location_100", "location_43"), iteration_order=(0, 1, 2, 3),
        classes=("bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel"),
        n_classes=10, epochs=15, **_NATURAL_TOP1,
        layout="{root}/terra_incognita/{train,test}/location_{L}/{category}/*.jpg, from Caltech Camera "
               "Traps (ECCV'18 images eccv_18_all_images_sm and its five annotation files)",
        split_rule="per location, annotation rows shuffled with Python's random.Random(17), first 80% "
                   "train (seed added after the paper; split_files uses torch's rule instead)",
        split_seed=17),
    _spec(
        name="FedISIC", display_name="Fed-ISIC2019", directory="HAM10000/fed_isic2019", reader="fedisic_csv",
        domains=("BCN", "HAM_vidir_molemax", "HAM_vidir_modern", "HAM_rosendahl", "MSK", "HAM_vienna_dias"),
        iteration_order=(0, 1, 2, 3, 4, 5),
        classes=("Melanoma", "Melanocytic nevus", "Basal cell carcinoma", "Actinic keratosis",
                 "Benign keratosis", "Dermatofibroma", "Vascular lesion", "Squamous cell carcinoma"),
        n_classes=8, epochs=20, **_MEDICAL,
        layout="{root}/HAM10000/fed_isic2019/ISIC_2019_Training_Input/{image}.jpg (raw ISIC 2019 images) "
               "and {root}/HAM10000/fed_isic2019/train_test_split.csv with columns image, target, fold, "
               "fold2 (fold: train|test; fold2: {fold}_{center}, center 0-5 in domain order)",
        split_rule="FLamby's fixed split (train/test per center, external: 9930/2483, 3163/791, 2691/672, "
                   "1807/452, 655/164, 351/88)",
        split_seed=None,
        notes="Domains are FLamby's centers 0-5; label = the CSV target (FLamby's class index)."),
    _spec(
        name="RetinaDomains", display_name="RetinaDomains", directory="retina_domain", reader="folders",
        domains=("aptos2019", "DDR", "idrid_retina", "messidor2"), iteration_order=(0, 1, 2, 3),
        classes=("No_Diabetic_Retinopathy", "Mild_Diabetic_Retinopathy", RETINA_MODERATE,
                 "Severe_Diabetic_Retinopathy", "Proliferative_Diabetic_Retinopathy"),
        n_classes=5, epochs=20, **_MEDICAL,
        layout="{root}/retina_domain/{train,test}/{domain}/{Grade}_Diabetic_Retinopathy/* with Grade in No, "
               "Mild, Moderate, Severe, Proliferative ('Modetate', the released misspelling, also accepted)",
        split_rule="APTOS: given train_1+valid -> train, test -> test; IDRiD: official train/test; DDR and "
                   "Messidor-2: shuffle with random_state 42, 80/20",
        split_seed=42, aliases=((RETINA_MODERATE, "Modetate_Diabetic_Retinopathy"),),
        notes="Default 4 classes (Moderate dropped, as the released code does); retina_classes=5 keeps it."),
)}


def get_dg_dataset(name: str) -> DGDatasetSpec:
    return lookup(DG_DATASETS, "DG dataset", name)


# ----------------------------------------------------------------------------- splits
T = TypeVar("T")


def split_files(items: Sequence[T], train_fraction: float = 0.8, seed: int = 17) -> tuple[list[T], list[T]]:
    """Deterministic random split: ``int(train_fraction * n)`` training items, the rest test.

    The same permutation as ``torch.utils.data.random_split(items, [k, n - k],
    generator=torch.Generator().manual_seed(seed))``, the rule of SCORE's released preparation
    scripts (seed 17 since 2026-05-30). Both lists keep the permutation's order.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ParameterValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    k = int(train_fraction * len(items))
    return [items[i] for i in order[:k]], [items[i] for i in order[k:]]


# ----------------------------------------------------------------------------- helpers
def _as_spec(dataset: str | DGDatasetSpec) -> DGDatasetSpec:
    return dataset if isinstance(dataset, DGDatasetSpec) else get_dg_dataset(dataset)


def _prompt(on_disk: str) -> str:
    return on_disk.replace("_", " ")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _check_arguments(spec: DGDatasetSpec, domain: str, split: str, retina_classes: int, pacs_test: str) -> None:
    lookup(dict.fromkeys(spec.domains), f"{spec.name} domain", domain)
    if split not in SPLITS:
        raise ParameterValueError(f"split must be 'train' or 'test', got {split!r}")
    if retina_classes not in (4, 5):
        raise ParameterValueError(
            f"retina_classes must be 4 (Moderate dropped, as released) or 5, got {retina_classes!r}")
    if pacs_test not in PACS_TEST_CHOICES:
        raise ParameterValueError(f"pacs_test must be one of {PACS_TEST_CHOICES}, got {pacs_test!r}")


def _dataset_dir(spec: DGDatasetSpec, root: Path) -> Path:
    if not root.is_dir():
        raise DataLayoutError(f"{spec.name}: data root {root} does not exist; pass the folder that holds "
                              f"{spec.directory}/ (expected layout: {spec.layout})")
    path = root / spec.directory
    if not path.is_dir():
        raise DataLayoutError(f"{spec.name}: dataset folder {path} is missing; prepare the data so that the "
                              f"layout is {spec.layout}")
    return path


def _find_folder(spec: DGDatasetSpec, parent: Path, name: str) -> Path | None:
    """The folder ``parent/name`` under any accepted spelling; None if absent."""
    found = [parent / s for s in spec.spellings(name) if (parent / s).is_dir()]
    if len(found) > 1:
        raise AmbiguousFolderError(f"{spec.name}: both {found[0]} and {found[1]} exist; they are two spellings of "
                                   f"the same folder. Keep one (merge their contents) and remove the other")
    return found[0] if found else None


def _existing_dir(spec: DGDatasetSpec, path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataLayoutError(f"{spec.name}: {what} {path} is missing; expected layout: {spec.layout}")
    return path


def _domain_dir(spec: DGDatasetSpec, root: Path, domain: str, split: str) -> Path:
    split_dir = _existing_dir(spec, _dataset_dir(spec, root) / split, f"{split} folder")
    found = _find_folder(spec, split_dir, domain)
    if found is None:
        raise DataLayoutError(f"{spec.name}: domain folder {split_dir / domain} is missing ({split} split); "
                              f"expected layout: {spec.layout}")
    return found


def _tolerated(spec: DGDatasetSpec, domain: str, split: str, on_disk: str) -> bool:
    return (domain, split, on_disk) in spec.tolerated_missing


def _fixed_folder_classes(spec: DGDatasetSpec, retina_classes: int) -> tuple[str, ...]:
    if spec.name == "RetinaDomains" and retina_classes == 4:
        return tuple(c for c in spec.classes if c != RETINA_MODERATE)
    return spec.classes


def _class_dirs(spec: DGDatasetSpec, root: Path, domain: str, split: str,
                retina_classes: int) -> list[tuple[ClassName, Path]]:
    """Class folders of one domain and split of a folder dataset, sorted by (canonical) name."""
    if spec.reader == "imagenet_r":
        parent = _existing_dir(spec, _dataset_dir(spec, root) / split, f"{split} folder")
    else:
        parent = _domain_dir(spec, root, domain, split)
    if spec.classes is None:
        pairs = [(path.name, path) for path in parent.iterdir() if path.is_dir()]
    else:
        pairs = []
        for on_disk in _fixed_folder_classes(spec, retina_classes):
            path = _find_folder(spec, parent, on_disk)
            if path is not None:
                pairs.append((on_disk, path))
            elif not _tolerated(spec, domain, split, on_disk):
                raise DataLayoutError(
                    f"{spec.name}: class folder {parent / on_disk} is missing (domain {domain!r}, {split} split); "
                    f"the classes of {spec.name} are fixed to {list(spec.classes)}. Restore the folder by "
                    f"preparing the data again, or, if the data genuinely lack this class there, add "
                    f"({domain!r}, {split!r}, {on_disk!r}) to the spec's tolerated_missing")
    return [(ClassName(name, _prompt(name)), path) for name, path in sorted(pairs)]


def _check_listed_images(spec: DGDatasetSpec, paths: Sequence[Path], source: Path, domain: str, split: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        raise MissingImagesError(
            f"{spec.name}: {len(missing)} of {len(paths)} images listed in {source} for domain {domain!r} "
            f"({split} split) do not exist, first ones: {shown}. Extract the images so that the layout is "
            f"{spec.layout}")


# ----------------------------------------------------------------------------- readers
def _read_folders(spec, root, domain, split, retina_classes, pacs_test):
    classes, paths, labels = [], [], []
    for label, (name, folder) in enumerate(_class_dirs(spec, root, domain, split, retina_classes)):
        classes.append(name)
        if spec.reader == "imagenet_r":  # the domain is the file-name prefix
            files = [p for p in sorted(folder.iterdir()) if p.name.startswith(domain + "_") and _is_image(p)]
        else:
            files = [p for p in sorted(folder.iterdir()) if _is_image(p)]
        paths += files
        labels += [label] * len(files)
    return classes, paths, labels


def _read_pacs_list(spec: DGDatasetSpec, list_file: Path) -> list[tuple[str, int]]:
    if not list_file.is_file():
        raise DataLayoutError(f"{spec.name}: split list {list_file} is missing; expected layout: {spec.layout}")
    entries = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= len(spec.classes):
            raise DataLayoutError(f"{spec.name}: {list_file} line {number} is {line!r}; each line must be "
                                  f"'<relative image path> <label 1-{len(spec.classes)}>'")
        entries.append((parts[0], int(parts[1]) - 1))
    return entries


def _read_pacs(spec, root, domain, split, retina_classes, pacs_test):
    base = _dataset_dir(spec, root)
    list_file = base / f"{domain}_{split}_kfold.txt"
    entries = _read_pacs_list(spec, list_file)
    if split == "test" and pacs_test == "held_out":
        seen = {path for path, _ in _read_pacs_list(spec, base / f"{domain}_train_kfold.txt")}
        entries = [(path, label) for path, label in entries if path not in seen]
    paths = [base / "kfold" / path for path, _ in entries]
    _check_listed_images(spec, paths, list_file, domain, split)
    return [ClassName(c, _prompt(c)) for c in spec.classes], paths, [label for _, label in entries]


def _read_fedisic(spec, root, domain, split, retina_classes, pacs_test):
    base = _dataset_dir(spec, root)
    table = base / "train_test_split.csv"
    if not table.is_file():
        raise DataLayoutError(f"{spec.name}: split table {table} is missing; expected layout: {spec.layout}")
    center = spec.domains.index(domain)
    with table.open(newline="") as handle:
        reader = csv.DictReader(handle)
        absent = {"image", "target", "fold", "fold2"} - set(reader.fieldnames or ())
        if absent:
            raise DataLayoutError(f"{spec.name}: {table} lacks the columns {sorted(absent)}; it must be FLamby's "
                                  f"train_test_split file (columns image, target, fold, fold2)")
        rows = [r for r in reader if r["fold"] == split and r["fold2"] == f"{split}_{center}"]
    bad = [r["target"] for r in rows if not r["target"].isdigit() or int(r["target"]) >= len(spec.classes)]
    if bad:
        raise DataLayoutError(f"{spec.name}: {table} has targets {sorted(set(bad))[:5]} outside "
                              f"0-{len(spec.classes) - 1} (FLamby's class indices)")
    paths = [base / "ISIC_2019_Training_Input" / f"{r['image']}.jpg" for r in rows]
    _check_listed_images(spec, paths, table, domain, split)
    classes = [ClassName(str(i), name) for i, name in enumerate(spec.classes)]
    return classes, paths, [int(r["target"]) for r in rows]


_READERS = {"folders": _read_folders, "imagenet_r": _read_folders, "pacs_lists": _read_pacs,
            "fedisic_csv": _read_fedisic}


# ----------------------------------------------------------------------------- public readers
def domain_classes(dataset: str | DGDatasetSpec, root: str | Path, domain: str, split: str = "train", *,
                   retina_classes: int = 4) -> tuple[ClassName, ...]:
    """The classes of one domain and split, in label order (on-disk and prompt names)."""
    spec, root = _as_spec(dataset), Path(root)
    _check_arguments(spec, domain, split, retina_classes, PACS_TEST_CHOICES[0])
    if spec.reader in ("pacs_lists", "fedisic_csv"):
        _dataset_dir(spec, root)
        on_disk = spec.classes if spec.reader == "pacs_lists" else [str(i) for i in range(len(spec.classes))]
        return tuple(ClassName(d, _prompt(c)) for d, c in zip(on_disk, spec.classes))
    return tuple(name for name, _ in _class_dirs(spec, root, domain, split, retina_classes))


def domain_classnames(dataset: str | DGDatasetSpec, root: str | Path, domain: str, split: str = "train", *,
                      retina_classes: int = 4) -> tuple[str, ...]:
    """Prompt names (``_`` -> space) of one domain and split, in label order: the zero-shot head's classes."""
    return tuple(c.prompt for c in domain_classes(dataset, root, domain, split, retina_classes=retina_classes))


def load_domain(dataset: str | DGDatasetSpec, root: str | Path, domain: str, split: str, *,
                retina_classes: int = 4, pacs_test: str = "whole_domain") -> ImageFileSet:
    """One domain's ``"train"`` or ``"test"`` split as an :class:`~mergelib.data.files.ImageFileSet` named ``dataset/domain/split``.

    ``classnames`` are the prompt names in label order (:func:`domain_classnames`).
    ``retina_classes`` (RetinaDomains only): 4 drops the Moderate grade as the released code does,
    5 keeps it. ``pacs_test`` (PACS only): ``"whole_domain"`` (released) or ``"held_out"``.
    """
    spec, root = _as_spec(dataset), Path(root)
    _check_arguments(spec, domain, split, retina_classes, pacs_test)
    classes, paths, labels = _READERS[spec.reader](spec, root, domain, split, retina_classes, pacs_test)
    if not paths:
        raise DataLayoutError(f"{spec.name}: domain {domain!r} has no images in its {split} split under "
                              f"{root / spec.directory}; expected layout: {spec.layout}")
    return ImageFileSet(tuple(paths), torch.tensor(labels, dtype=torch.int64),
                        tuple(c.prompt for c in classes), f"{spec.name}/{domain}/{split}")


# ----------------------------------------------------------------------------- whole-dataset check
@dataclass(frozen=True)
class DatasetReport:
    """What :func:`check_dataset` found: images and classes per (domain, split)."""

    name: str
    counts: dict[tuple[str, str], int]
    classes: dict[tuple[str, str], tuple[str, ...]]  # on-disk class names, label order
    tolerated: tuple[tuple[str, str, str], ...] = ()  # documented absences seen

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.total} images"]
        lines += [f"  {d}/{s}: {n} images, {len(self.classes[d, s])} classes" for (d, s), n in self.counts.items()]
        lines += [f"  tolerated: {d}/{s} has no class {c!r} (documented)" for d, s, c in self.tolerated]
        return "\n".join(lines)


def check_dataset(dataset: str | DGDatasetSpec, root: str | Path, *, retina_classes: int = 4,
                  pacs_test: str = "whole_domain") -> DatasetReport:
    """Read every domain and split; raise unless all share one class list (up to documented absences)."""
    spec, root = _as_spec(dataset), Path(root)
    counts, classes = {}, {}
    for domain in spec.domains:
        for split in SPLITS:
            files = load_domain(spec, root, domain, split, retina_classes=retina_classes, pacs_test=pacs_test)
            counts[domain, split] = len(files)
            classes[domain, split] = tuple(
                c.on_disk for c in domain_classes(spec, root, domain, split, retina_classes=retina_classes))
    union = set().union(*classes.values())
    tolerated, problems = [], []
    for (domain, split), names in classes.items():
        for absent in sorted(union - set(names)):
            if _tolerated(spec, domain, split, absent):
                tolerated.append((domain, split, absent))
            else:
                problems.append(f"{domain}/{split} lacks {absent!r}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ClassMismatchError(
            f"{spec.name}: the class folders differ between domains or splits under {root / spec.directory}: "
            f"{shown}. Every domain and split must hold the same classes; restore the missing folders, or, "
            f"if an absence is a genuine property of the data, add (domain, split, class) to the spec's "
            f"tolerated_missing")
    return DatasetReport(spec.name, counts, classes, tuple(tolerated))
