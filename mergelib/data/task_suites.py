"""The 8/14/20-task CLIP benchmark of TSV, Iso and ESM as a registry of torchvision datasets.

Sources. The suites, the per-dataset loaders, templates, class names, fine-tuning epochs and the
``{Task}Val`` rule come from the code lineage shared by these papers (read, not copied):
``mlfoundations/task_vectors`` (Ilharco et al., arXiv 2212.04089) -> ``nik-dim/tall_masks``
(Wang et al., arXiv 2405.07813; ``src/datasets/*.py``, ``src/datasets/registry.py``,
``src/datasets/templates.py``, ``finetune.py``) -> ``AntoAndGar/task_singular_vectors`` (TSV,
arXiv 2412.00081) -> ``danielm1405/iso-merging`` (Iso, arXiv 2502.04959) and ``kiddo127/ESM``
(ESM, arXiv 2602.20208). The fine-tuned accuracies are the ``results/single_task/<model>/
nonlinear_ft_accuracies.json`` files, identical in tall_masks, TSV and Iso, quoted at full
precision (the tests check them against an independent transcription rounded to 0.01 %).

Everything here follows the released code rather than the paper texts:

* **Order.** The suites are prefixes of :data:`TASK_ORDER` (the papers list the added datasets in
  another order; the code takes ``ALL_DATASETS[:n]``).
* **Validation split** (:func:`tall_validation_split`): ``val = min(int(n * 0.1), 5000)`` items of
  the official train split, drawn by ``torch.utils.data.random_split(train, [n - val, val],
  generator=torch.Generator().manual_seed(0))``: the *training part is listed first*, so it takes
  the first ``n - val`` entries of ``randperm(n)`` and the validation part the rest.
  Fine-tuning used the training part; the alpha searches and ESM's proxy images use the
  validation part. The released code checks ``train.indices[0] == 36044`` for MNIST; so does
  the test of this module.
* **EuroSAT** is the exception: the code has its own ``EuroSATVal`` class, whose training part is
  the whole ``EuroSAT_splits/train`` folder and whose validation part is the separate
  ``EuroSAT_splits/val`` folder (270 images per class), not a random split.
* **Folders.** DTD, EuroSAT, SUN397 and RESISC45 are ``ImageFolder`` trees prepared beforehand
  (DTD: ``labels/train1.txt`` -> ``dtd/train``, ``labels/test1.txt`` -> ``dtd/val``, which the code
  uses as the *test* split; SUN397: ``Training_01``/``Testing_01`` -> ``sun397/train``/``val``;
  EuroSAT: a random 270/270 val/test split per class; RESISC45: the train/val/test file lists of
  Neumann et al. 2019). Cars and GTSRB use the released copies of torchvision's StanfordCars and
  GTSRB, whose on-disk layouts equal torchvision's. PCAM, EMNIST, FashionMNIST and KMNIST are
  read from ``~/data/<Name>`` whatever the configured location: the root sub-folders below keep
  that layout (``root/<Name>/<Name>/raw`` for the MNIST family).
* **FER2013**: the released code reads the Hugging Face dataset ``Jeneral/fer-2013``; here it is
  torchvision's ``FER2013`` over ``fer2013/fer2013.csv`` (train = ``Training`` rows, 28,709;
  test = ``PublicTest`` + ``PrivateTest``, 7,178: the sizes the released accuracies imply).
  Whether the row *order* equals the Hugging Face copy's, on which the random validation split
  depends, is unverified.
* **Class names** (``classname_source``): ``"torchvision"`` = the dataset's ``.classes``
  unchanged (Food101 therefore keeps its underscores, as released); ``"underscores"`` = folder or
  ``.classes`` names with ``_`` -> space (Cars, DTD); ``"sun397"`` = folder name without its
  two-character prefix, ``_`` -> space; ``"eurosat"`` = folder name mapped to the OpenAI CLIP
  names; ``"fixed"`` = a cleaned list of the released code (GTSRB and Flowers102 from CLIP's
  prompts, MNIST/SVHN digits, RESISC45, PCAM, FER2013). The released FER2013 names are lists of
  synonyms that the released head builder formats with Python's ``str(list)``, so the prompt reads
  ``a photo of a ['happy', 'smiling'] looking face.``; :data:`FER2013_CLASS_SYNONYMS` keeps the
  lists and the class names are their ``str()``, so a head built here sees the released prompts.
* **Templates** are those of tall_masks ``src/datasets/templates.py`` (the lineage that built the
  released heads). ESM's copy differs for two datasets (:data:`ESM_TEMPLATE_DIFFERENCES`).
* **EMNIST orientation.** TSV and ESM rotate EMNIST images by -90 degrees and flip them
  horizontally after the CLIP preprocessing; tall_masks and Iso do not (:data:`EMNIST_ROTATE_FLIP_BY_REPO`).
  Which convention the released checkpoints were fine-tuned with is not documented; the ESM README
  says a mismatch ruins EMNIST accuracy. :func:`load_task` takes ``emnist_rotate_flip`` explicitly
  (default ``False``, the tall_masks/Iso convention); check against the published 99.78 % (B/32).
* **DTD.** The released DTD test accuracy (~98 %) is far above its validation accuracy (~79-85 %).
  The validation accuracies are k/564 for all three backbones, i.e. ``int(0.1 n) = 564``: the
  ``dtd/train`` folder behind them held 5,640-5,649 images (all of DTD, 5,640), not the 1,880 of
  ``train1.txt``, so the 1,880 test images were probably among the fine-tuning images. This is our
  inference from the numbers. We keep the normalizers as published.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch.utils.data import Dataset, Subset

from mergelib._moved import renamed
from mergelib.errors import MergelibError, ParameterValueError, lookup
from mergelib.data.files import DataLayoutError

__all__ = [
    "PAPER_BACKBONES", "DatasetCall", "TaskDatasetSpec", "TASK_ORDER", "TASKS", "SUITES", "suite_tasks",
    "TALL_VAL_FRACTION", "TALL_VAL_CAP", "TALL_VAL_SEED", "tall_validation_split", "tall_validation_size",
    "LoadedTask", "load_task", "class_names_for", "MissingDependencyError",
    "published_finetuned_accuracy", "normalized_accuracy", "mean_normalized_accuracy",
    "FINETUNED_ACCURACY_SOURCE", "EMNIST_ROTATE_FLIP_BY_REPO", "ESM_TEMPLATE_DIFFERENCES",
    "FER2013_CLASS_SYNONYMS", "emnist_orientation",
]

#: Backbones of the published accuracy tables (names of :data:`mergelib.models.backbones.BACKBONES`).
PAPER_BACKBONES = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
_BACKBONE_ALIASES = {"B/32": "ViT-B-32", "B/16": "ViT-B-16", "L/14": "ViT-L-14",
                     "ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14"}

#: Where the published fine-tuned accuracies come from.
FINETUNED_ACCURACY_SOURCE = (
    "tall_masks/TSV/Iso results JSON (results/single_task/<model>/nonlinear_ft_accuracies.json)"
)

#: The released TALL validation rule: 10 % of the official train split, capped at 5000, seed 0.
TALL_VAL_FRACTION = 0.1
TALL_VAL_CAP = 5000
TALL_VAL_SEED = 0

#: Whether EMNIST images are rotated by -90 degrees and flipped horizontally
#: after preprocessing, per repository (as each repository's dataset code does).
EMNIST_ROTATE_FLIP_BY_REPO = {"tall_masks": False, "iso-merging": False, "task_singular_vectors": True, "ESM": True}


class MissingDependencyError(MergelibError, ImportError):
    """A dataset needs an optional Python package that is not installed."""


# --------------------------------------------------------------------------------------------
# Data: templates, fixed class names
# --------------------------------------------------------------------------------------------

_CIFAR_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
    "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
    "a photo of the small {}.", "a photo of the big {}.",
)

#: Per-dataset prompt templates (tall_masks ``src/datasets/templates.py``), each with one ``{}``.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "Cars": ("a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
             "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}."),
    "DTD": ("a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.", "a photo of a {} object.",
            "a photo of the {} texture.", "a photo of the {} pattern.", "a photo of the {} thing.",
            "a photo of the {} object."),
    "EuroSAT": ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."),
    "GTSRB": ('a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
              'a close up photo of a "{}" traffic sign.'),
    "MNIST": ('a photo of the number: "{}".',),
    "RESISC45": ("satellite imagery of {}.", "aerial imagery of {}.", "satellite photo of {}.", "aerial photo of {}.",
                 "satellite view of {}.", "aerial view of {}.", "satellite imagery of a {}.", "aerial imagery of a {}.",
                 "satellite photo of a {}.", "aerial photo of a {}.", "satellite view of a {}.", "aerial view of a {}.",
                 "satellite imagery of the {}.", "aerial imagery of the {}.", "satellite photo of the {}.",
                 "aerial photo of the {}.", "satellite view of the {}.", "aerial view of the {}."),
    "SVHN": ('a photo of the number: "{}".',),
    "SUN397": ("a photo of a {}.", "a photo of the {}."),
    "STL10": ("a photo of a {}.", "a photo of the {}."),
    "OxfordIIITPet": ("a photo of a {}, a type of pet.",),
    "Flowers102": ("a photo of a {}, a type of flower.",),
    "CIFAR100": _CIFAR_TEMPLATES,
    "PCAM": ("this is a photo of {}",),
    "FER2013": ("a photo of a {} looking face.", "a photo of a face showing the emotion: {}.",
                "a photo of a face looking {}.", "a face that looks {}.", "they look {}.", "look at how {} they are."),
    "CIFAR10": _CIFAR_TEMPLATES,
    "Food101": ("a photo of {}, a type of food.",),
    "FashionMNIST": ("a photo of a {}.", "a photo of the {}."),
    "RenderedSST2": ("a {} review of a movie.",),
    "EMNIST": ('a photo of the digit character: "{}".',),
    "KMNIST": ("a photo of the character {}.",),
}

#: Where ESM's ``src/datasets/templates.py`` differs from tall_masks' (heads built from scratch
#: with ESM's code would use these; the released heads come from the tall_masks lineage).
ESM_TEMPLATE_DIFFERENCES: dict[str, tuple[str, ...]] = {
    "STL10": _CIFAR_TEMPLATES,
    "EMNIST": ('a photo of the number: "{}".',),
}

_DIGITS = tuple(str(d) for d in range(10))

#: GTSRB class names of OpenAI CLIP's ``data/prompts.md`` as used by the released code (typos kept).
GTSRB_CLASSNAMES = (
    "red and white circle 20 kph speed limit", "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit", "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit", "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit", "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit", "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing", "red and white triangle road intersection warning",
    "white and yellow diamond priority road", "red and white upside down triangle yield right-of-way", "stop",
    "empty red and white circle", "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry", "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning", "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning", "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning", "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning", "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit", "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory", "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory", "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory", "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)

#: Flowers102 class names in label order (CLIP's prompts, as released).
FLOWERS102_CLASSNAMES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold", "tiger lily",
    "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot", "king protea",
    "spear thistle", "yellow iris", "globe flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink and yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania",
    "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "air plant", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)

#: RESISC45 classes (folder names of NWPU-RESISC45, sorted) with ``_`` -> space, as released.
RESISC45_CLASSNAMES = tuple(name.replace("_", " ") for name in (
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral", "church",
    "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert", "forest", "freeway",
    "golf_course", "ground_track_field", "harbor", "industrial_area", "intersection", "island", "lake", "meadow",
    "medium_residential", "mobile_home_park", "mountain", "overpass", "palace", "parking_lot", "railway",
    "railway_station", "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship", "snowberg",
    "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace", "thermal_power_station", "wetland",
))

#: EuroSAT folder name -> OpenAI CLIP class name (the released code splits the CamelCase folder
#: name into words and maps the result through the same table).
EUROSAT_FOLDER_TO_CLASSNAME = {
    "AnnualCrop": "annual crop land", "Forest": "forest", "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road", "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments", "River": "river", "SeaLake": "lake or sea",
}

PCAM_CLASSNAMES = ("lymph node", "lymph node containing metastatic tumor tissue")

#: The released FER2013 class names, synonym lists in label order.
FER2013_CLASS_SYNONYMS = (
    ("angry",), ("disgusted",), ("fearful",), ("happy", "smiling"), ("sad", "depressed"),
    ("surprised", "shocked", "spooked"), ("neutral", "bored"),
)
#: What the released head builder puts into the templates: ``str`` of each Python list.
FER2013_CLASSNAMES = tuple(str(list(synonyms)) for synonyms in FER2013_CLASS_SYNONYMS)

# Published fine-tuned accuracies (fractions), per backbone: task -> (test, val). Full precision of
# the JSON files; val = the "{Task}Val" entry (accuracy on the TALL validation part).
_FINETUNED: dict[str, dict[str, tuple[float, float]]] = {
    "ViT-B-32": {
        "Cars": (0.7818679268747668, 0.7800982800982801), "DTD": (0.9797872340425532, 0.7854609929078015),
        "EuroSAT": (0.9892592592592593, 0.9903703703703703), "GTSRB": (0.9914489311163895, 0.9992492492492493),
        "MNIST": (0.9969, 0.9956), "RESISC45": (0.957936507936508, 0.9624338624338624),
        "SVHN": (0.9756837738168408, 0.9638), "SUN397": (0.7534508816120907, 0.7541561712846347),
        "STL10": (0.97975, 0.984), "OxfordIIITPet": (0.9111474516216953, 0.9239130434782609),
        "Flowers102": (0.9050252073507887, 0.9509803921568627), "CIFAR100": (0.8927, 0.8952),
        "PCAM": (0.878753662109375, 0.9736), "FER2013": (0.7294511005851212, 0.735191637630662),
        "CIFAR10": (0.9791, 0.9788), "Food101": (0.890970297029703, 0.8462), "FashionMNIST": (0.953, 0.9552),
        "RenderedSST2": (0.7435475013728721, 0.7138728323699421), "EMNIST": (0.997825, 0.9982),
        "KMNIST": (0.9863, 0.995),
    },
    "ViT-B-16": {
        "Cars": (0.8761348091033454, 0.8648648648648649), "DTD": (0.9829787234042553, 0.8209219858156028),
        "EuroSAT": (0.9888888888888889, 0.9925925925925926), "GTSRB": (0.9900237529691212, 0.9992492492492493),
        "MNIST": (0.9975, 0.995), "RESISC45": (0.9693650793650793, 0.9703703703703703),
        "SVHN": (0.9782191149354641, 0.9676), "SUN397": (0.788110831234257, 0.7758186397984886),
        "STL10": (0.986, 0.996), "OxfordIIITPet": (0.9449441264649768, 0.9483695652173914),
        "Flowers102": (0.9375508212717515, 0.9705882352941176), "CIFAR100": (0.9071, 0.9108),
        "PCAM": (0.891815185546875, 0.9786), "FER2013": (0.7475619949846753, 0.7526132404181185),
        "CIFAR10": (0.9853, 0.9842), "Food101": (0.9287920792079208, 0.8956), "FashionMNIST": (0.9565, 0.9528),
        "RenderedSST2": (0.7918725974739155, 0.773121387283237), "EMNIST": (0.997925, 0.9978),
        "KMNIST": (0.9879, 0.9974),
    },
    "ViT-L-14": {
        "Cars": (0.9226464370103221, 0.9287469287469288), "DTD": (0.9851063829787234, 0.851063829787234),
        "EuroSAT": (0.9925925925925926, 0.9929629629629629), "GTSRB": (0.9915281076801267, 0.9996246246246246),
        "MNIST": (0.9979, 0.997), "RESISC45": (0.9731746031746031, 0.973015873015873),
        "SVHN": (0.9812922556853104, 0.9724), "SUN397": (0.8208564231738035, 0.8241813602015113),
        "STL10": (0.995125, 0.994), "OxfordIIITPet": (0.9553011719814664, 0.9592391304347826),
        "Flowers102": (0.9786957228817694, 0.9901960784313726), "CIFAR100": (0.9333, 0.9368),
        "PCAM": (0.902679443359375, 0.9804), "FER2013": (0.770130955697966, 0.7735191637630662),
        "CIFAR10": (0.992, 0.9906), "Food101": (0.9546138613861386, 0.9306), "FashionMNIST": (0.9581, 0.9566),
        "RenderedSST2": (0.8544755628775398, 0.8251445086705202), "EMNIST": (0.9981, 0.9978),
        "KMNIST": (0.9875, 0.9974),
    },
}


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetCall:
    """How one split is built: ``torchvision.datasets.<class_name>(root / root_subdir, **kwargs)``.

    ``probe``: the path under the dataset root that must exist (the folder torchvision reads).
    ``split_list``: for RESISC45, a file (under the root) naming the images of the split; the
    ``ImageFolder`` keeps only files whose base name it lists. ``downloadable``: torchvision can
    fetch the files (``download=True``); for the others the registry says how to get them.
    """

    class_name: str
    root_subdir: str
    kwargs: tuple[tuple[str, Any], ...]
    probe: str
    downloadable: bool = False
    split_list: str | None = None

    @property
    def constructor_kwargs(self) -> dict[str, Any]:
        return dict(self.kwargs)


@dataclass(frozen=True)
class TaskDatasetSpec:
    """One task of the benchmark, as the released code loads it (see the module docstring).

    ``val`` is ``None`` for the TALL random split of ``train``; EuroSAT has a dedicated folder.
    ``n_train`` / ``n_test``: sizes of the official splits that the released accuracies imply
    (every published accuracy times its split size is an integer); DTD's ``n_train`` is implied
    by ``int(0.1 n) = 564`` (see the module docstring). ``epochs``: fine-tuning epochs of the
    released checkpoints (``finetune.py``).
    """

    name: str
    train: DatasetCall
    test: DatasetCall
    val: DatasetCall | None
    n_train: int
    n_test: int
    epochs: int
    templates: tuple[str, ...]
    classname_source: str
    how_to_get: str
    fixed_classnames: tuple[str, ...] | None = None
    n_val: int | None = None  # only for a dedicated val folder (EuroSAT)

    def published_accuracy(self, backbone: str, split: str = "test") -> float:
        return published_finetuned_accuracy(backbone, self.name, split)

    @property
    def finetuned_accuracies(self) -> dict[str, dict[str, float]]:
        """The published fine-tuned accuracies as fractions, ``{backbone: {"test": ..., "val": ...}}``."""
        return {b: {s: published_finetuned_accuracy(b, self.name, s) for s in ("test", "val")} for b in PAPER_BACKBONES}


CLASSNAME_SOURCES = ("torchvision", "underscores", "sun397", "eurosat", "fixed")


def _tv(class_name: str, subdir: str, probe: str, *, downloadable: bool = True, **kwargs: Any) -> DatasetCall:
    return DatasetCall(class_name, subdir, tuple(sorted(kwargs.items())), probe, downloadable)


def _folder(path: str) -> DatasetCall:
    return DatasetCall("ImageFolder", path, (), path, False)


def _spec(name: str, train: DatasetCall, test: DatasetCall, n_train: int, n_test: int, epochs: int,
          classname_source: str, how_to_get: str, *, fixed: Sequence[str] | None = None,
          val: DatasetCall | None = None, n_val: int | None = None) -> TaskDatasetSpec:
    return TaskDatasetSpec(name, train, test, val, n_train, n_test, epochs, TEMPLATES[name], classname_source,
                           how_to_get, tuple(fixed) if fixed is not None else None, n_val)


_MNIST_FAMILY_HELP = "torchvision downloads it with download=True on a machine with network access"

_SPECS = (
    _spec("Cars", _tv("StanfordCars", "", "stanford_cars", downloadable=False, split="train"),
          _tv("StanfordCars", "", "stanford_cars", downloadable=False, split="test"), 8144, 8041, 35, "underscores",
          "put the Stanford Cars files in <root>/stanford_cars/ (devkit/ with cars_meta.mat and cars_train_annos.mat, "
          "cars_train/, cars_test/, cars_test_annos_withlabels.mat); the original URLs are gone, use a mirror"),
    _spec("DTD", _folder("dtd/train"), _folder("dtd/val"), 5640, 1880, 76, "underscores",
          "download DTD (dtd-r1.0.1) and copy the images of labels/train1.txt to <root>/dtd/train/<class>/ and "
          "those of labels/test1.txt to <root>/dtd/val/<class>/ (the released code tests on dtd/val)"),
    _spec("EuroSAT", _folder("EuroSAT_splits/train"), _folder("EuroSAT_splits/test"), 21600, 2700, 12, "eurosat",
          "split EuroSAT RGB (folder 2750/) per class into 270 val, 270 test and the rest train images under "
          "<root>/EuroSAT_splits/{train,val,test}/<class>/",
          val=_folder("EuroSAT_splits/val"), n_val=2700),
    _spec("GTSRB", _tv("GTSRB", "", "gtsrb/GTSRB/Training", split="train"),
          _tv("GTSRB", "", "gtsrb/GTSRB/Final_Test/Images", split="test"), 26640, 12630, 11, "fixed",
          _MNIST_FAMILY_HELP, fixed=GTSRB_CLASSNAMES),
    _spec("MNIST", _tv("MNIST", "", "MNIST/raw", train=True), _tv("MNIST", "", "MNIST/raw", train=False),
          60000, 10000, 5, "fixed", _MNIST_FAMILY_HELP, fixed=_DIGITS),
    _spec("RESISC45",
          DatasetCall("ImageFolder", "resisc45/NWPU-RESISC45", (), "resisc45/NWPU-RESISC45", False,
                      "resisc45/resisc45-train.txt"),
          DatasetCall("ImageFolder", "resisc45/NWPU-RESISC45", (), "resisc45/NWPU-RESISC45", False,
                      "resisc45/resisc45-test.txt"),
          18900, 6300, 15, "fixed",
          "extract NWPU-RESISC45 to <root>/resisc45/NWPU-RESISC45/<class>/ and put resisc45-{train,val,test}.txt "
          "(storage.googleapis.com/remote_sensing_representations/) in <root>/resisc45/", fixed=RESISC45_CLASSNAMES),
    _spec("SVHN", _tv("SVHN", "svhn", "svhn", split="train"), _tv("SVHN", "svhn", "svhn", split="test"),
          73257, 26032, 4, "fixed", _MNIST_FAMILY_HELP, fixed=_DIGITS),
    _spec("SUN397", _folder("sun397/train"), _folder("sun397/val"), 19850, 19850, 14, "sun397",
          "download SUN397 and copy the images of Partitions/Training_01.txt to <root>/sun397/train/<class>/ and "
          "Testing_01.txt to <root>/sun397/val/<class>/, class folder = path parts joined by '_' (e.g. a_abbey)"),
    _spec("STL10", _tv("STL10", "stl10", "stl10/stl10_binary", split="train"),
          _tv("STL10", "stl10", "stl10/stl10_binary", split="test"), 5000, 8000, 60, "torchvision", _MNIST_FAMILY_HELP),
    _spec("OxfordIIITPet", _tv("OxfordIIITPet", "OxfordIIITPet", "OxfordIIITPet/oxford-iiit-pet", split="trainval"),
          _tv("OxfordIIITPet", "OxfordIIITPet", "OxfordIIITPet/oxford-iiit-pet", split="test"), 3680, 3669, 82,
          "torchvision", _MNIST_FAMILY_HELP),
    _spec("Flowers102", _tv("Flowers102", "flowers102", "flowers102/flowers-102", split="train"),
          _tv("Flowers102", "flowers102", "flowers102/flowers-102", split="test"), 1020, 6149, 147, "fixed",
          _MNIST_FAMILY_HELP, fixed=FLOWERS102_CLASSNAMES),
    _spec("CIFAR100", _tv("CIFAR100", "", "cifar-100-python", train=True),
          _tv("CIFAR100", "", "cifar-100-python", train=False), 50000, 10000, 6, "torchvision", _MNIST_FAMILY_HELP),
    _spec("PCAM", _tv("PCAM", "PCAM", "PCAM/pcam", split="train"), _tv("PCAM", "PCAM", "PCAM/pcam", split="test"),
          262144, 32768, 1, "fixed", _MNIST_FAMILY_HELP + " (needs h5py and gdown)", fixed=PCAM_CLASSNAMES),
    _spec("FER2013", _tv("FER2013", "", "fer2013", downloadable=False, split="train"),
          _tv("FER2013", "", "fer2013", downloadable=False, split="test"), 28709, 7178, 10, "fixed",
          "put fer2013.csv (Kaggle 'challenges-in-representation-learning-facial-expression-recognition-challenge', "
          "with the Usage column) in <root>/fer2013/", fixed=FER2013_CLASSNAMES),
    _spec("CIFAR10", _tv("CIFAR10", "", "cifar-10-batches-py", train=True),
          _tv("CIFAR10", "", "cifar-10-batches-py", train=False), 50000, 10000, 6, "torchvision", _MNIST_FAMILY_HELP),
    _spec("Food101", _tv("Food101", "food101", "food101/food-101", split="train"),
          _tv("Food101", "food101", "food101/food-101", split="test"), 75750, 25250, 4, "torchvision", _MNIST_FAMILY_HELP),
    _spec("FashionMNIST", _tv("FashionMNIST", "FashionMNIST", "FashionMNIST/FashionMNIST/raw", train=True),
          _tv("FashionMNIST", "FashionMNIST", "FashionMNIST/FashionMNIST/raw", train=False), 60000, 10000, 5,
          "torchvision", _MNIST_FAMILY_HELP),
    _spec("RenderedSST2", _tv("RenderedSST2", "RenderedSST2", "RenderedSST2/rendered-sst2", split="train"),
          _tv("RenderedSST2", "RenderedSST2", "RenderedSST2/rendered-sst2", split="test"), 6920, 1821, 39,
          "torchvision", _MNIST_FAMILY_HELP),
    _spec("EMNIST", _tv("EMNIST", "EMNIST", "EMNIST/EMNIST/raw", split="digits", train=True),
          _tv("EMNIST", "EMNIST", "EMNIST/EMNIST/raw", split="digits", train=False), 240000, 40000, 2, "torchvision",
          _MNIST_FAMILY_HELP),
    _spec("KMNIST", _tv("KMNIST", "KMNIST", "KMNIST/KMNIST/raw", train=True),
          _tv("KMNIST", "KMNIST", "KMNIST/KMNIST/raw", train=False), 60000, 10000, 5, "torchvision", _MNIST_FAMILY_HELP),
)

#: The 20 task names in the released order (``ALL_DATASETS`` of the code).
TASK_ORDER: tuple[str, ...] = tuple(spec.name for spec in _SPECS)
#: Task name -> spec, in the released order.
TASKS: dict[str, TaskDatasetSpec] = {spec.name: spec for spec in _SPECS}
#: Suite size -> task names (first N of :data:`TASK_ORDER`).
SUITES: dict[int, tuple[str, ...]] = {n: TASK_ORDER[:n] for n in (8, 14, 20)}

# Optional packages a loader needs (torchvision imports them lazily and fails late).
_REQUIRES = {"StanfordCars": ("scipy",), "Flowers102": ("scipy",), "PCAM": ("h5py",), "SVHN": ("scipy",)}


def suite_tasks(n: int) -> tuple[str, ...]:
    """The task names of the ``n``-task suite (8, 14 or 20), in the released order."""
    if n not in SUITES:
        raise ParameterValueError(f"no {n!r}-task suite; the benchmark has suites of {sorted(SUITES)} tasks")
    return SUITES[n]


def _spec_for(name: str) -> TaskDatasetSpec:
    return lookup(TASKS, "task", name)


# --------------------------------------------------------------------------------------------
# The TALL validation split
# --------------------------------------------------------------------------------------------

def tall_validation_size(n_train_items: int, *, fraction: float = TALL_VAL_FRACTION, cap: int | None = TALL_VAL_CAP) -> int:
    """``min(int(n * fraction), cap)``: the released size of the ``{Task}Val`` validation part."""
    if isinstance(n_train_items, bool) or not isinstance(n_train_items, int) or n_train_items < 2:
        raise ParameterValueError(f"n_train_items must be an integer >= 2, got {n_train_items!r}")
    if not 0.0 < fraction < 1.0:
        raise ParameterValueError(f"fraction must lie in (0, 1) as in the released code, got {fraction!r}")
    size = int(n_train_items * fraction)
    if cap is not None:
        if cap < 1:
            raise ParameterValueError(f"cap must be >= 1 or None, got {cap!r}")
        size = min(size, cap)
    if size < 1 or size >= n_train_items:
        raise ParameterValueError(
            f"a validation part of {size} items out of {n_train_items} leaves one part empty; "
            f"raise fraction ({fraction}) or use more items")
    return size


def tall_validation_split(
    n_train_items: int, *, fraction: float = TALL_VAL_FRACTION, cap: int | None = TALL_VAL_CAP, seed: int = TALL_VAL_SEED
) -> tuple[list[int], list[int]]:
    """``(train_indices, val_indices)`` of the released ``{Task}Val`` split of ``n_train_items`` items.

    Equal to ``torch.utils.data.random_split(range(n), [n - v, v],
    generator=torch.Generator().manual_seed(seed))`` with ``v = min(int(n * fraction), cap)``: the
    training part is listed first, so it is the first ``n - v`` entries of ``randperm(n)``.
    """
    val_size = tall_validation_size(n_train_items, fraction=fraction, cap=cap)
    order = torch.randperm(n_train_items, generator=torch.Generator().manual_seed(seed)).tolist()
    n_fit = n_train_items - val_size
    return order[:n_fit], order[n_fit:]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

class LoadedTask(NamedTuple):
    """A split of a task: a torch ``Dataset`` of ``(image, label)`` and the class names."""

    dataset: Dataset
    classnames: tuple[str, ...]


def emnist_orientation(image):
    """TSV's and ESM's EMNIST fix: rotate by -90 degrees, then flip horizontally (PIL or tensor)."""
    from torchvision.transforms import functional as F

    return F.hflip(F.rotate(image, -90))


def _compose(first: Callable | None, second: Callable) -> Callable:
    if first is None:
        return second
    from torchvision import transforms

    return transforms.Compose([first, second])


def _check_requirements(spec: TaskDatasetSpec, call: DatasetCall) -> None:
    for module in _REQUIRES.get(call.class_name, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingDependencyError(
                f"{spec.name}: torchvision's {call.class_name} needs the Python package {module!r}; "
                f"install it (pip install {module})") from None


def _missing_message(spec: TaskDatasetSpec, call: DatasetCall, root: Path, problem: str) -> str:
    fetch = " (or pass download=True on a machine with network access)" if call.downloadable else ""
    return (f"{spec.name}: {problem}; expected folder {root / call.probe} (under root {root}). "
            f"How to get it: {spec.how_to_get}{fetch}.")


def _image_folder(call: DatasetCall, root: Path, transform: Callable | None):
    from torchvision.datasets import ImageFolder

    is_valid_file = None
    if call.split_list is not None:
        listed = {line.strip() for line in (root / call.split_list).read_text().splitlines() if line.strip()}
        is_valid_file = lambda path: Path(path).name in listed  # noqa: E731 (RESISC45 lists base names)
    return ImageFolder(str(root / call.root_subdir), transform=transform, is_valid_file=is_valid_file)


def _build(spec: TaskDatasetSpec, call: DatasetCall, root: Path, transform: Callable | None, download: bool):
    import torchvision.datasets as tv

    _check_requirements(spec, call)
    fetch = download and call.downloadable
    if not fetch and not (root / call.probe).exists():
        raise DataLayoutError(_missing_message(spec, call, root, "dataset not found"))
    if call.split_list is not None and not (root / call.split_list).is_file():
        raise DataLayoutError(_missing_message(spec, call, root, f"split list {root / call.split_list} not found"))
    try:
        if call.class_name == "ImageFolder":
            return _image_folder(call, root, transform)
        constructor = getattr(tv, call.class_name)
        extra = {"download": True} if fetch else {}
        return constructor(str(root / call.root_subdir), transform=transform, **call.constructor_kwargs, **extra)
    except (RuntimeError, FileNotFoundError) as error:  # torchvision's "Dataset not found or corrupted"
        raise DataLayoutError(_missing_message(spec, call, root, f"torchvision cannot read it ({error})")) from error


def class_names_for(name: str, dataset: Dataset | None = None) -> tuple[str, ...]:
    """The class names the released code gives task ``name`` (``dataset``: the loaded split,
    needed unless the task has a fixed list; for a ``Subset``, its underlying dataset)."""
    spec = _spec_for(name)
    if spec.classname_source == "fixed":
        return spec.fixed_classnames  # type: ignore[return-value]
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise ParameterValueError(f"{name}: its class names come from the dataset's .classes; pass the loaded dataset")
    if spec.classname_source == "torchvision":
        return tuple(str(c) for c in classes)
    if spec.classname_source == "underscores":
        return tuple(str(c).replace("_", " ") for c in classes)
    if spec.classname_source == "sun397":
        return tuple(str(c)[2:].replace("_", " ") for c in classes)
    unknown = [c for c in classes if c not in EUROSAT_FOLDER_TO_CLASSNAME]
    if unknown:
        raise DataLayoutError(f"EuroSAT: unexpected class folders {unknown}; expected {sorted(EUROSAT_FOLDER_TO_CLASSNAME)}")
    return tuple(EUROSAT_FOLDER_TO_CLASSNAME[c] for c in classes)


def _check_class_count(spec: TaskDatasetSpec, dataset: Dataset, classnames: tuple[str, ...], root: Path) -> None:
    classes = getattr(dataset, "classes", None)
    if spec.classname_source == "fixed" and classes is not None and len(classes) != len(classnames):
        raise DataLayoutError(
            f"{spec.name}: the dataset under {root} has {len(classes)} classes, the released class-name list "
            f"{len(classnames)}; check the folder layout")


def load_task(
    name: str,
    root: str | Path,
    split: str,
    *,
    transform: Callable | None = None,
    download: bool = False,
    emnist_rotate_flip: bool = False,
    val_fraction: float = TALL_VAL_FRACTION,
    val_cap: int | None = TALL_VAL_CAP,
    seed: int = TALL_VAL_SEED,
) -> LoadedTask:
    """Split ``split`` ("train", "val" or "test") of task ``name`` under dataset folder ``root``.

    "train" and "val" are the two parts of :func:`tall_validation_split` of the official train
    split (``Subset`` objects), except EuroSAT (full ``EuroSAT_splits/train`` and the ``val``
    folder). "test" is the official test split. ``download`` is off by default (offline
    machines); a missing dataset raises :class:`~mergelib.data.files.DataLayoutError` naming the expected folder and
    how to get it. ``emnist_rotate_flip`` applies TSV/ESM's EMNIST orientation fix after
    ``transform`` (EMNIST only; ignored for the other tasks).
    """
    spec = _spec_for(name)
    if split not in ("train", "val", "test"):
        raise ParameterValueError(f"{name}: split must be 'train', 'val' or 'test', got {split!r}")
    root = Path(root).expanduser()
    if name == "EMNIST" and emnist_rotate_flip:
        transform = _compose(transform, emnist_orientation)

    if split == "test":
        dataset = _build(spec, spec.test, root, transform, download)
    elif spec.val is not None:
        dataset = _build(spec, spec.train if split == "train" else spec.val, root, transform, download)
    else:
        full = _build(spec, spec.train, root, transform, download)
        fit, held_out = tall_validation_split(len(full), fraction=val_fraction, cap=val_cap, seed=seed)
        dataset = Subset(full, fit if split == "train" else held_out)
    classnames = class_names_for(name, dataset)
    _check_class_count(spec, dataset.dataset if isinstance(dataset, Subset) else dataset, classnames, root)
    return LoadedTask(dataset, classnames)


# --------------------------------------------------------------------------------------------
# Published accuracies and normalized accuracy
# --------------------------------------------------------------------------------------------

def _canonical_backbone(backbone: str) -> str:
    return _BACKBONE_ALIASES.get(backbone, backbone)


def published_finetuned_accuracy(backbone: str, task: str, split: str = "test") -> float:
    """The published accuracy (a fraction) of the released fine-tuned ``task`` checkpoint.

    ``split``: "test" (the normalizer of the results tables) or "val" (the ``{Task}Val`` entry,
    the normalizer during the alpha search). Source: :data:`FINETUNED_ACCURACY_SOURCE`.
    """
    table = lookup(_FINETUNED, "backbone", _canonical_backbone(backbone))
    test, val = lookup(table, "task", task)
    if split not in ("test", "val"):
        raise ParameterValueError(f"published accuracies exist for split 'test' or 'val', not {split!r}")
    return test if split == "test" else val


def normalized_accuracy(accuracies: Mapping[str, float], backbone: str, split: str = "test") -> dict[str, float]:
    """Per task, ``accuracy / published fine-tuned accuracy`` (TSV eq. 9; the code's normalizer).

    ``accuracies`` are fractions in [0, 1] keyed by task name; the released code divides each
    ``{Task}:top1`` by the JSON entry of the same split.
    """
    if not accuracies:
        raise ParameterValueError("normalized_accuracy needs at least one task accuracy")
    out = {}
    for task, accuracy in accuracies.items():
        value = float(accuracy)
        if not 0.0 <= value <= 1.0:
            raise ParameterValueError(
                f"{task}: accuracy {accuracy!r} is not a fraction in [0, 1] (pass 0.9 for 90 %)")
        out[task] = value / published_finetuned_accuracy(backbone, task, split)
    return out


def mean_normalized_accuracy(accuracies: Mapping[str, float], backbone: str, split: str = "test") -> float:
    """The mean over tasks of :func:`normalized_accuracy` (the tables' "normalized" column)."""
    return fmean(normalized_accuracy(accuracies, backbone, split).values())


__getattr__ = renamed(__name__, {"BACKBONES": "PAPER_BACKBONES"})  # the old name warns until mergelib 0.3
