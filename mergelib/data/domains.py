"""Visual domains rendered from 28x28 grey images, and the Fashion-MNIST domain benchmark.

Each domain is a vectorised renderer ``gray uint8 [N, 28, 28] -> RGB uint8 [N, 32, 32, 3]``:
``photo`` (plain upscale), ``negative`` (inverted), ``texture`` (MNIST-M style: coloured object over
a tinted crop of scikit-image's bundled grass/brick/gravel photographs, BSD licence), ``sketch``
(Sobel outline, dark ink on paper), ``blur_noise`` (blurred, low contrast, noisy) and ``halftone``
(ink dots whose size follows intensity, on coloured paper).

:func:`make_domain_benchmark` renders disjoint Fashion-MNIST images (MIT licence) in each domain;
:func:`make_pretraining_pool` renders yet other ones for contrastive pretraining. Which indices
each consumer may use is fixed in :mod:`mergelib.data.fashion_mnist` (``FASHION_REGIONS``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from mergelib.data.fashion_mnist import BENCHMARK_SLOTS, FASHION_MNIST_CLASSES, FASHION_REGIONS, draw_from_region, load_fashion_mnist
from mergelib.data.imageset import ImageSet, derive_seed, resize_matrix, stable_int, to_imageset, unknown

__all__ = [
    "Domain", "DOMAINS", "DEFAULT_DOMAINS", "DOMAIN_BENCHMARK_TEMPLATES", "DomainBenchmark",
    "render_domain", "make_domain_benchmark", "make_pretraining_pool", "caption_for",
]

Renderer = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Domain:
    name: str
    description: str  # one sentence, for the book
    caption: str  # the style phrase of captions: "a {caption} of a {class}."
    render: Renderer = field(repr=False, compare=False)


# ----------------------------------------------------------------------------- helpers
_UP = resize_matrix(28, 32)


def _upscale(gray: np.ndarray) -> np.ndarray:
    """Bilinear 28 -> 32 of a batch, as float32 in [0, 1] (two matmuls: fast for 10^4 images)."""
    return _UP @ (gray.astype(np.float32) / 255.0) @ _UP.T


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    """float in [0, 1] -> uint8; in place, as the temporaries of 10^4 images cost more than the maths."""
    np.clip(rgb, 0.0, 1.0, out=rgb)
    rgb *= 255.0
    rgb += 0.5
    return rgb.astype(np.uint8)


def _grey_rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[..., None], 3, axis=-1)


def _mix(background: np.ndarray, foreground: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``background + alpha * (foreground - background)``; either is a per-image colour ``[N, 3]``
    or images ``[N, 32, 32, 3]``; ``alpha`` is ``[N, 32, 32]``. Written to avoid big temporaries."""
    if background.ndim == 2:
        background = background[:, None, None, :]
    if foreground.ndim == 2:
        foreground = foreground[:, None, None, :]
    out = np.empty(alpha.shape + (3,), np.float32)
    np.subtract(foreground, background, out=out)
    out *= alpha[..., None]
    out += background
    return out


@lru_cache(maxsize=1)
def _background_textures() -> np.ndarray:
    """grass, brick, gravel from scikit-image (bundled, no download) as float32 [3, 512, 512],
    contrast-stretched so every crop is busy."""
    from skimage import data

    out = []
    for image in (data.grass(), data.brick(), data.gravel()):
        x = image.astype(np.float32)
        lo, hi = np.percentile(x, [1, 99])
        out.append(np.clip((x - lo) / (hi - lo), 0, 1))
    return np.stack(out)


# ----------------------------------------------------------------------------- renderers
def _photo(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(_grey_rgb(_upscale(gray)))


def _negative(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(_grey_rgb(1.0 - _upscale(gray)))


def _texture(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x, n = _upscale(gray), len(gray)
    textures = _background_textures()
    which = rng.integers(0, len(textures), n)
    top, left = rng.integers(0, textures.shape[1] - 32, (2, n))
    r = np.arange(32)
    crops = textures[which[:, None, None], top[:, None, None] + r[:, None], left[:, None, None] + r]
    tint = rng.uniform(0.25, 1.0, (n, 3)).astype(np.float32)
    background = crops[..., None] * tint[:, None, None, :] * 0.8
    # object colour: the complement of the background's mean colour, jittered, so it stays visible
    colour = np.clip(1.0 - 0.4 * tint + rng.normal(0, 0.12, (n, 3)), 0, 1).astype(np.float32)
    return _to_uint8(_mix(background, colour, x))


def _sketch(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x, n = _upscale(gray), len(gray)
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    # Sobel on the batch by slicing (ndimage.sobel would also smooth across the batch axis)
    gx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2])
    gy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:])
    magnitude = np.hypot(gx, gy)
    scale = np.maximum(magnitude.max(axis=(1, 2), keepdims=True), 1e-3)
    line = np.clip(magnitude / (0.5 * scale) - 0.15, 0, 1)  # normalised, faint edges dropped
    paper = np.clip(np.array([0.94, 0.91, 0.83]) + rng.normal(0, 0.03, (n, 3)), 0, 1).astype(np.float32)
    ink = rng.uniform(0.05, 0.3, (n, 3)).astype(np.float32)
    grain = 0.02 * rng.standard_normal(x.shape, dtype=np.float32)[..., None]
    return _to_uint8(_mix(paper, ink, line) + grain)


def _blur_noise(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = gaussian_filter(_upscale(gray), sigma=(0, 1.6, 1.6), mode="nearest")  # sigma 0: never across images
    level = rng.uniform(0.3, 0.5, (len(gray), 1, 1, 1)).astype(np.float32)
    noise = 0.08 * rng.standard_normal(x.shape + (3,), dtype=np.float32)
    return _to_uint8(level + 0.45 * (_grey_rgb(x) - 0.5) + noise)


_CELL = 4  # halftone grid: 8 x 8 cells of 4 x 4 pixels
_offsets = np.arange(_CELL) + 0.5 - _CELL / 2
_DOT_DISTANCE = np.tile(np.hypot(_offsets[:, None], _offsets[None, :]), (32 // _CELL, 32 // _CELL)).astype(np.float32)


def _halftone(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x, n = _upscale(gray), len(gray)
    k = 32 // _CELL
    cell_mean = x.reshape(n, k, _CELL, k, _CELL).mean(axis=(2, 4))
    radius = (_CELL / np.sqrt(np.pi)) * np.sqrt(cell_mean)  # dot area proportional to intensity
    radius = np.repeat(np.repeat(radius, _CELL, axis=1), _CELL, axis=2)
    coverage = np.clip(radius - _DOT_DISTANCE + 0.5, 0, 1)  # anti-aliased disc edge
    paper = rng.uniform(0.55, 1.0, (n, 3)).astype(np.float32)
    ink = rng.uniform(0.0, 0.25, (n, 3)).astype(np.float32)
    return _to_uint8(_mix(paper, ink, coverage))


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("photo", "The grey image upscaled to 32x32, bright object on a black background.", "photo", _photo),
        Domain("negative", "Inverted intensities: a dark object on a white background.", "negative photo", _negative),
        Domain("texture", "MNIST-M style: the object in a random colour over a tinted crop of a natural "
               "texture (grass, brick or gravel).", "textured painting", _texture),
        Domain("sketch", "Outline only: Sobel edges drawn in dark ink on light paper.", "sketch", _sketch),
        Domain("blur_noise", "Strong Gaussian blur, low contrast and additive Gaussian noise.", "blurry photo",
               _blur_noise),
        Domain("halftone", "A halftone print: ink dots on a grid, sized by intensity, on coloured paper.",
               "halftone print", _halftone),
    )
}
#: The most training images a domain has (its slot of the benchmark's train region) and the most
#: test images (the whole test region, shared by the domains).
MAX_TRAIN_PER_DOMAIN = (FASHION_REGIONS["train"]["benchmark"][1] - FASHION_REGIONS["train"]["benchmark"][0]) // BENCHMARK_SLOTS
MAX_TEST_PER_DOMAIN = FASHION_REGIONS["test"]["benchmark"][1] - FASHION_REGIONS["test"]["benchmark"][0]
DEFAULT_DOMAINS = ("photo", "negative", "texture", "sketch", "blur_noise", "halftone")
# a domain's benchmark slot is its position here, so it never depends on which domains were requested
_SLOT = {name: i for i, name in enumerate(DOMAINS)}
assert len(DOMAINS) <= BENCHMARK_SLOTS and tuple(DOMAINS)[: len(DEFAULT_DOMAINS)] == DEFAULT_DOMAINS

DOMAIN_BENCHMARK_TEMPLATES = ("a photo of a {}.", "a negative photo of a {}.", "a textured painting of a {}.",
                              "an image of a {}.")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def caption_for(domain: str | Domain, classname: str) -> str:
    """``"a negative photo of an ankle boot."``: the pretraining caption of a class in a domain."""
    caption = (domain if isinstance(domain, Domain) else _domain(domain)).caption
    return f"{_article(caption)} {caption} of {_article(classname)} {classname}."


def _domain(name: str) -> Domain:
    try:
        return DOMAINS[name]
    except (KeyError, TypeError):
        raise unknown("domain", name, DOMAINS) from None


def render_domain(name: str, gray: np.ndarray, seed: int) -> np.ndarray:
    """Render grey ``uint8 [N, 28, 28]`` images in domain ``name``: ``uint8 [N, 32, 32, 3]``."""
    domain = _domain(name)
    gray = np.asarray(gray)
    if gray.dtype != np.uint8 or gray.ndim != 3 or gray.shape[1:] != (28, 28):
        raise ValueError(f"render_domain expects uint8 [N, 28, 28], got {gray.dtype} {list(gray.shape)}")
    out = domain.render(gray, np.random.default_rng([seed, stable_int(name)]))
    assert out.dtype == np.uint8 and out.shape == (len(gray), 32, 32, 3)
    return out


# ----------------------------------------------------------------------------- benchmark and pool
@dataclass(frozen=True, eq=False)
class DomainBenchmark:
    name: str
    domains: tuple[str, ...]
    classnames: tuple[str, ...]
    train: dict[str, ImageSet]
    test: dict[str, ImageSet]
    seed: int

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"{self.name}|{','.join(self.domains)}|{self.seed}".encode())
        for domain in self.domains:
            digest.update(self.train[domain].fingerprint().encode())
            digest.update(self.test[domain].fingerprint().encode())
        return digest.hexdigest()


def _check_domains(domains: Sequence[str]) -> tuple[str, ...]:
    if isinstance(domains, str):
        domains = (domains,)
    domains = tuple(domains)
    if not domains:
        raise ValueError("at least one domain is needed")
    if len(set(domains)) != len(domains):
        raise ValueError(f"duplicate domains in {domains}")
    for name in domains:
        _domain(name)
    return domains


def check_benchmark_sizes(n_train: int, n_test: int) -> None:
    """Refuse sizes the benchmark cannot give a domain (``ValueError`` naming the bound): at most
    ``MAX_TRAIN_PER_DOMAIN`` train images (each domain's own slot) and ``MAX_TEST_PER_DOMAIN`` test
    images (the test region, shared by the domains)."""
    if n_train > MAX_TRAIN_PER_DOMAIN:
        raise ValueError(f"n_train={n_train} is too large: the benchmark holds {MAX_TRAIN_PER_DOMAIN} Fashion-MNIST "
                         f"train images per domain ({BENCHMARK_SLOTS} disjoint slots of the train split); "
                         f"use n_train <= {MAX_TRAIN_PER_DOMAIN}")
    if n_test > MAX_TEST_PER_DOMAIN:
        raise ValueError(f"n_test={n_test} is too large: the benchmark's test region holds {MAX_TEST_PER_DOMAIN} "
                         f"Fashion-MNIST test images, shared by the domains; use n_test <= {MAX_TEST_PER_DOMAIN}")


def _render_split(domain: str, split: str, n: int, seed: int, purpose: str) -> ImageSet:
    start, end = FASHION_REGIONS[split]["benchmark"]
    if split == "train":
        # each domain trains on its own garments, so no expert has seen another domain's images
        first = start + _SLOT[domain] * MAX_TRAIN_PER_DOMAIN
        index = draw_from_region(split, first, first + MAX_TRAIN_PER_DOMAIN, n, seed, f"{purpose}/{domain}/{split}")
    else:
        # every domain is tested on the same garments (the whole benchmark region of the test split,
        # up to its size), rendered in its own style: larger test sets, and domains compared on equal content
        index = draw_from_region(split, start, end, n, seed, f"{purpose}/{split}")
    images, labels = load_fashion_mnist(split)
    rgb = render_domain(domain, images[index], derive_seed(seed, purpose, split))
    return to_imageset(rgb, labels[index], FASHION_MNIST_CLASSES, f"fashion-domains/{domain}/{split}", index)


def make_domain_benchmark(
    domains: Sequence[str] = DEFAULT_DOMAINS, n_train: int = 2000, n_test: int = 1000, seed: int = 0
) -> DomainBenchmark:
    """Fashion-MNIST rendered in each domain: disjoint training garments across domains, the same
    test garments in every domain (each rendered in the domain's style).

    A domain's images depend only on (domain, sizes, seed), not on the other domains requested.
    At most 4000 train images per domain (a sixth of the benchmark's train region) and 7500 test
    images (the benchmark's whole test region; the other 2500 Fashion-MNIST test images belong to
    the ``fashion`` task).
    """
    domains = _check_domains(domains)
    check_benchmark_sizes(n_train, n_test)
    train = {d: _render_split(d, "train", n_train, seed, "benchmark") for d in domains}
    test = {d: _render_split(d, "test", n_test, seed, "benchmark") for d in domains}
    return DomainBenchmark("fashion-domains", domains, FASHION_MNIST_CLASSES, train, test, seed)


def make_pretraining_pool(domains: Sequence[str], n_per_domain: int, seed: int) -> tuple[ImageSet, tuple[str, ...]]:
    """Fashion-MNIST train images (disjoint from every benchmark and ``fashion`` task image) rendered
    in ``domains``, ``n_per_domain`` each; returns the set and the domain name of every item."""
    domains = _check_domains(domains)
    start, end = FASHION_REGIONS["train"]["pool"]
    total = len(domains) * n_per_domain
    if n_per_domain < 1 or total > end - start:
        raise ValueError(f"the pretraining pool holds at most {end - start} images in all; asked for "
                         f"{len(domains)} domains x {n_per_domain}")
    index = draw_from_region("train", start, end, total, seed, "pool")
    images, labels = load_fashion_mnist("train")
    chunks = np.split(index, len(domains))
    rgb = np.concatenate([render_domain(d, images[c], derive_seed(seed, "pool")) for d, c in zip(domains, chunks)])
    pool = to_imageset(rgb, labels[index], FASHION_MNIST_CLASSES, "fashion-pool", index)
    return pool, tuple(d for d in domains for _ in range(n_per_domain))
