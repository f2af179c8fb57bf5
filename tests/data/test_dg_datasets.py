"""SCORE's DG dataset registry, readers of the real layouts (on generated stand-ins), splits, templates."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from torchvision.transforms.functional import to_tensor

from mergelib.data.dg_datasets import (
    DG_DATASETS,
    AmbiguousFolderError,
    ClassMismatchError,
    MissingImagesError,
    check_dataset,
    domain_classes,
    domain_classnames,
    get_dg_dataset,
    load_domain,
    split_files,
)
from mergelib.data.files import DataLayoutError
from mergelib.data.standins import make_dg_standin
from mergelib.data.templates import IMAGENET_TEMPLATES, TERRA_INCOGNITA_TEMPLATES
from mergelib.errors import ParameterValueError, UnknownNameError

IPC = 2  # images per class
N_FOLDER_CLASSES = 3  # stand-in size for the datasets whose classes come from folder names
NAMES = ("PACS", "DomainNet", "ImageNetR", "NICOpp", "OfficeHome", "TerraIncognita", "FedISIC", "RetinaDomains")


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("dg")
    return {name: make_dg_standin(name, base / name, images_per_class=IPC, n_classes=N_FOLDER_CLASSES)
            for name in NAMES}


def fresh(tmp_path: Path, name: str, **kwargs) -> Path:
    return make_dg_standin(name, tmp_path / name, images_per_class=IPC, n_classes=N_FOLDER_CLASSES, **kwargs)


def expected_count(name: str, domain: str, split: str) -> int:
    """Images per (domain, split) that the stand-in writes, counted from its documented rules."""
    if name == "PACS":
        return 7 * IPC * (2 if split == "test" else 1)  # test list = the whole domain
    if name == "DomainNet" and (domain, split) == ("painting", "train"):
        return (N_FOLDER_CLASSES - 1) * IPC  # no t-shirt folder there
    fixed = {"TerraIncognita": 10, "FedISIC": 8, "RetinaDomains": 4}  # Retina default: Moderate dropped
    return fixed.get(name, N_FOLDER_CLASSES) * IPC


# ----------------------------------------------------------------------------- registry and templates
def test_registry_covers_the_eight_datasets_and_49_domains():
    assert tuple(DG_DATASETS) == NAMES
    assert sum(len(spec.domains) for spec in DG_DATASETS.values()) == 49
    for spec in DG_DATASETS.values():
        assert sorted(spec.iteration_order) == list(range(len(spec.domains)))
        assert len(set(spec.domains)) == len(spec.domains)
    assert get_dg_dataset("DomainNet").domains_in_iteration_order == (
        "clipart", "sketch", "real", "infograph", "quickdraw", "painting")
    assert get_dg_dataset("ImageNetR").domains_in_iteration_order[:2] == ("tattoo", "sketch")


def test_metrics_epochs_and_trim_rule_per_dataset():
    medical = {"FedISIC", "RetinaDomains"}
    for name, spec in DG_DATASETS.items():
        assert spec.metric == ("balanced_accuracy" if name in medical else "top1")
        assert spec.trim_divide_by_tasks == (name not in medical)
    epochs = {name: spec.epochs for name, spec in DG_DATASETS.items()}
    assert epochs == {"PACS": 10, "DomainNet": 10, "ImageNetR": 10, "NICOpp": 15, "OfficeHome": 10,
                      "TerraIncognita": 15, "FedISIC": 20, "RetinaDomains": 20}
    fixed = [len(s.classes) if s.classes else None for s in DG_DATASETS.values()]
    assert fixed == [7, None, None, None, None, 10, 8, 5]


def test_template_counts_and_placeholders():
    counts = {name: len(spec.templates) for name, spec in DG_DATASETS.items()}
    assert counts == {"PACS": 2, "DomainNet": 80, "ImageNetR": 80, "NICOpp": 80, "OfficeHome": 80,
                      "TerraIncognita": 38, "FedISIC": 2, "RetinaDomains": 4}
    for spec in DG_DATASETS.values():
        assert all(t.count("{}") == 1 and "{c}" not in t for t in spec.templates)
        assert len(set(spec.templates)) == len(spec.templates)
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    # TerraIncognita: photo templates only, a subsequence of the ImageNet list, as released
    positions = [IMAGENET_TEMPLATES.index(t) for t in TERRA_INCOGNITA_TEMPLATES]
    assert positions == sorted(positions) and all("photo" in t for t in TERRA_INCOGNITA_TEMPLATES)
    assert TERRA_INCOGNITA_TEMPLATES[0] == "a bad photo of a {}."
    assert TERRA_INCOGNITA_TEMPLATES[-1] == "a dark photo of a {}."
    assert all(not t.endswith(".") for t in get_dg_dataset("RetinaDomains").templates)
    assert get_dg_dataset("FedISIC").templates[1].format("Melanoma") == "This is dermoscopy of Melanoma."


def test_unknown_dataset_and_domain_names_list_the_valid_ones(standins):
    with pytest.raises(UnknownNameError, match="valid DG dataset names: DomainNet, FedISIC"):
        get_dg_dataset("Office-Home")
    with pytest.raises(UnknownNameError, match="art_painting, cartoon, photo, sketch"):
        load_domain("PACS", standins["PACS"], "photos", "train")
    with pytest.raises(ParameterValueError, match="split"):
        load_domain("PACS", standins["PACS"], "photo", "val")
    with pytest.raises(ParameterValueError, match="retina_classes"):
        load_domain("RetinaDomains", standins["RetinaDomains"], "DDR", "train", retina_classes=3)


# ----------------------------------------------------------------------------- reading every dataset
@pytest.mark.parametrize("name", NAMES)
def test_stand_in_reads_back_with_exact_counts_and_consistent_labels(standins, name):
    spec, root = DG_DATASETS[name], standins[name]
    for domain in spec.domains:
        for split in ("train", "test"):
            files = load_domain(name, root, domain, split)
            assert files.name == f"{name}/{domain}/{split}"
            assert len(files) == expected_count(name, domain, split), (domain, split)
            assert not files.missing_files()
            # the head's classes, in label order, are the classes of this split
            assert files.classnames == domain_classnames(name, root, domain, split)
            assert torch.equal(files.labels.unique(), torch.arange(len(files.classnames)))
            if spec.reader in ("folders", "imagenet_r"):
                folders = sorted(p.name for p in {path.parent for path in files.paths})
                assert files.classnames == tuple(f.replace("_", " ") for f in folders)  # ImageFolder order
                for path, label in zip(files.paths, files.labels.tolist()):
                    assert path.parent.name.replace("_", " ") == files.classnames[label]
            if spec.reader == "imagenet_r":
                assert all(p.name.startswith(domain + "_") for p in files.paths)
            if name == "PACS":
                assert files.classnames == spec.classes
                assert all(p.parent.name == spec.classes[y] for p, y in zip(files.paths, files.labels.tolist()))


def test_fedisic_labels_are_the_csv_targets_of_the_center(standins):
    root = standins["FedISIC"]
    table = pd.read_csv(root / "HAM10000/fed_isic2019/train_test_split.csv")
    files = load_domain("FedISIC", root, "HAM_rosendahl", "test")  # FLamby center 3
    expected = table[table.fold2 == "test_3"]
    assert [p.stem for p in files.paths] == expected.image.tolist()
    assert files.labels.tolist() == expected.target.tolist()
    assert files.classnames[0] == "Melanoma"
    assert [c.on_disk for c in domain_classes("FedISIC", root, "MSK")] == [str(i) for i in range(8)]


def test_pacs_test_is_the_whole_domain_unless_held_out_is_asked(standins):
    root = standins["PACS"]
    train = set(load_domain("PACS", root, "cartoon", "train").paths)
    whole = set(load_domain("PACS", root, "cartoon", "test").paths)
    held_out = set(load_domain("PACS", root, "cartoon", "test", pacs_test="held_out").paths)
    assert train < whole and held_out == whole - train and len(held_out) == 7 * IPC


def test_retina_drops_moderate_by_default_and_keeps_it_on_request(standins):
    root = standins["RetinaDomains"]
    four = load_domain("RetinaDomains", root, "idrid_retina", "train")
    five = load_domain("RetinaDomains", root, "idrid_retina", "train", retina_classes=5)
    assert four.classnames == ("Mild Diabetic Retinopathy", "No Diabetic Retinopathy",
                               "Proliferative Diabetic Retinopathy", "Severe Diabetic Retinopathy")
    assert five.classnames[1] == "Moderate Diabetic Retinopathy" and len(five) == 5 * IPC
    assert all(p.suffix == ".png" for p in five.paths)


def test_imagenet_r_keeps_classes_without_images_of_the_domain(tmp_path):
    root = fresh(tmp_path, "ImageNetR")
    for image in (root / "imagenet-r/train/class_001").glob("cartoon_*"):
        image.unlink()
    files = load_domain("ImageNetR", root, "cartoon", "train")
    assert len(files.classnames) == N_FOLDER_CLASSES and len(files) == (N_FOLDER_CLASSES - 1) * IPC
    assert 1 not in files.labels.tolist()


def test_check_dataset_tolerates_only_documented_absences(standins):
    report = check_dataset("DomainNet", standins["DomainNet"])
    assert report.tolerated == (("painting", "train", "t-shirt"),)
    assert report.counts["painting", "train"] == (N_FOLDER_CLASSES - 1) * IPC
    assert "t-shirt" in report.classes["painting", "test"]
    strict = dataclasses.replace(get_dg_dataset("DomainNet"), tolerated_missing=())
    with pytest.raises(ClassMismatchError, match=r"painting/train lacks 't-shirt'.*tolerated_missing"):
        check_dataset(strict, standins["DomainNet"])
    for name in NAMES:
        assert check_dataset(name, standins[name]).total == sum(
            expected_count(name, d, s) for d in DG_DATASETS[name].domains for s in ("train", "test"))


def test_stand_in_is_deterministic_and_can_be_limited(tmp_path):
    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for path in sorted(root.rglob("*")):
            if path.is_file():
                h.update(str(path.relative_to(root)).encode() + path.read_bytes())
        return h.hexdigest()

    first = make_dg_standin("PACS", tmp_path / "a", images_per_class=1, domains=["photo"], seed=3)
    second = make_dg_standin("PACS", tmp_path / "b", images_per_class=1, domains=["photo"], seed=3)
    other = make_dg_standin("PACS", tmp_path / "c", images_per_class=1, domains=["photo"], seed=4)
    assert digest(first) == digest(second) != digest(other)
    image, label = load_domain("PACS", first, "photo", "train").with_transform(to_tensor)[1]
    assert image.shape == (3, 32, 40) and label == 1  # (width, height) = (40, 32); one image per class
    assert sorted(p.name for p in (first / "PACS").glob("*.txt")) == ["photo_test_kfold.txt", "photo_train_kfold.txt"]
    with pytest.raises(ParameterValueError, match="n_classes"):
        make_dg_standin("DomainNet", tmp_path / "d", n_classes=346)


# ----------------------------------------------------------------------------- splits
def test_split_files_is_seeded_disjoint_and_matches_random_split():
    items = [f"img_{i}.jpg" for i in range(103)]
    train, test = split_files(items, 0.8, seed=17)
    assert (train, test) == split_files(items, 0.8, seed=17)
    assert train != split_files(items, 0.8, seed=18)[0]
    assert len(train) == int(0.8 * 103) == 82 and len(test) == 21
    assert not set(train) & set(test) and set(train) | set(test) == set(items)
    reference = torch.utils.data.random_split(items, [82, 21], generator=torch.Generator().manual_seed(17))
    assert train == [items[i] for i in reference[0].indices] and test == [items[i] for i in reference[1].indices]
    with pytest.raises(ParameterValueError, match="train_fraction"):
        split_files(items, 1.0)


# ----------------------------------------------------------------------------- bad layouts
def test_missing_root_dataset_folder_and_domain_folder(tmp_path):
    with pytest.raises(DataLayoutError, match="data root .*does not exist"):
        load_domain("NICOpp", tmp_path / "nowhere", "dim", "train")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(DataLayoutError, match=r"dataset folder .*NICOpp_track1 is missing"):
        load_domain("NICOpp", tmp_path / "empty_root", "dim", "train")
    root = fresh(tmp_path, "OfficeHome")
    shutil.rmtree(root / "OfficeHomeDataset/test/Clipart")
    with pytest.raises(DataLayoutError, match=r"domain folder .*test/Clipart is missing \(test split\)"):
        load_domain("OfficeHome", root, "Clipart", "test")
    assert len(load_domain("OfficeHome", root, "Clipart", "train")) == N_FOLDER_CLASSES * IPC


def test_missing_fixed_class_folder(tmp_path):
    root = fresh(tmp_path, "TerraIncognita", domains=["location_46"])
    shutil.rmtree(root / "terra_incognita/train/location_46/coyote")
    with pytest.raises(DataLayoutError, match=r"class folder .*location_46/coyote is missing.*tolerated_missing"):
        load_domain("TerraIncognita", root, "location_46", "train")


def test_listed_images_that_do_not_exist(tmp_path):
    root = fresh(tmp_path, "PACS", domains=["sketch"])
    gone = root / "PACS/kfold/sketch/horse/pic_000.jpg"
    gone.unlink()
    message = r"1 of 14 images listed in .*sketch_train_kfold.txt.*horse/pic_000.jpg"
    with pytest.raises(MissingImagesError, match=message):
        load_domain("PACS", root, "sketch", "train")
    root = fresh(tmp_path, "FedISIC", domains=["MSK"])
    (root / "HAM10000/fed_isic2019/ISIC_2019_Training_Input/ISIC_0000000.jpg").unlink()
    with pytest.raises(MissingImagesError, match="ISIC_0000000.jpg"):
        load_domain("FedISIC", root, "MSK", "train")


def test_malformed_pacs_list_line(tmp_path):
    root = fresh(tmp_path, "PACS", domains=["photo"])
    with (root / "PACS/photo_train_kfold.txt").open("a") as handle:
        handle.write("photo/dog/pic_000.jpg 8\n")
    with pytest.raises(DataLayoutError, match=r"photo_train_kfold.txt line 15 .*label 1-7"):
        load_domain("PACS", root, "photo", "train")


def test_class_lists_that_differ_between_domains(tmp_path):
    root = fresh(tmp_path, "NICOpp")
    shutil.rmtree(root / "NICOpp_track1/test/rock/class_002")
    with pytest.raises(ClassMismatchError, match=r"NICOpp: .*rock/test lacks 'class_002'"):
        check_dataset("NICOpp", root)


def test_empty_domain(tmp_path):
    root = fresh(tmp_path, "DomainNet", domains=["quickdraw"])
    for image in (root / "domainnet/train/quickdraw").rglob("*.jpg"):
        image.unlink()
    with pytest.raises(DataLayoutError, match="'quickdraw' has no images in its train split"):
        load_domain("DomainNet", root, "quickdraw", "train")


def test_two_spellings_of_one_folder(tmp_path):
    root = fresh(tmp_path, "OfficeHome", domains=["Real World"])
    split_dir = root / "OfficeHomeDataset/train"
    (split_dir / "Real World").rename(split_dir / "Real_World")  # the released preparation script's name
    assert len(load_domain("OfficeHome", root, "Real World", "train")) == N_FOLDER_CLASSES * IPC
    shutil.copytree(split_dir / "Real_World", split_dir / "Real World")
    with pytest.raises(AmbiguousFolderError, match=r"both .*Real.World and .*Real.World exist"):
        load_domain("OfficeHome", root, "Real World", "train")

    root = fresh(tmp_path, "RetinaDomains", domains=["DDR"])
    domain_dir = root / "retina_domain/test/DDR"
    (domain_dir / "Moderate_Diabetic_Retinopathy").rename(domain_dir / "Modetate_Diabetic_Retinopathy")
    five = load_domain("RetinaDomains", root, "DDR", "test", retina_classes=5)
    assert "Moderate Diabetic Retinopathy" in five.classnames and len(five) == 5 * IPC
    shutil.copytree(domain_dir / "Modetate_Diabetic_Retinopathy", domain_dir / "Moderate_Diabetic_Retinopathy")
    with pytest.raises(AmbiguousFolderError, match="Modetate"):
        load_domain("RetinaDomains", root, "DDR", "test", retina_classes=5)
