"""Deterministic small image benchmarks (32x32 RGB uint8) generated from real offline images.

* :mod:`.fashion_mnist`: Fashion-MNIST (Zalando, MIT licence) from the Debian package
  ``dataset-fashion-mnist`` or ``$MERGELIB_FASHION_MNIST``; the fixed partition that keeps the
  benchmark, the pretraining pool and the ``fashion`` task disjoint.
* :mod:`.domains`: six visual domains rendered from grey images, the domain-generalisation
  benchmark and the contrastive pretraining pool (textures: scikit-image data, BSD licence).
* :mod:`.suite`: the mini multi-task suite (Fashion-MNIST; scikit-learn's digits; the animal
  silhouettes of the ``animal-mnist`` wheel, MIT licence; scikit-image texture patches).
* ``imageset``: the ``ImageSet`` container.
* :mod:`.dg_datasets`, :mod:`.task_suites`, :mod:`.files`, ``templates``: the real
  benchmarks' folder layouts (the papers' eight domain-generalisation benchmarks and the 8/14/20-task
  suites), their prompt templates, and :mod:`.standins`, small generated copies of those layouts.

Imports only :mod:`mergelib.errors`; nothing here knows about models or merging.
"""

from mergelib.data.domains import (
    DEFAULT_DOMAINS,
    DOMAIN_BENCHMARK_TEMPLATES,
    DOMAINS,
    Domain,
    DomainBenchmark,
    MAX_TEST_PER_DOMAIN,
    MAX_TRAIN_PER_DOMAIN,
    caption_for,
    check_benchmark_sizes,
    make_domain_benchmark,
    make_pretraining_pool,
    render_domain,
)
from mergelib.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_REGIONS, DatasetNotFoundError, load_fashion_mnist
from mergelib.data.imageset import ImageSet, UnknownNameError
from mergelib._moved import renamed
from mergelib.data.suite import MINI_SUITE_TASKS, TaskSpec, make_task

__all__ = [
    "ImageSet", "UnknownNameError", "DatasetNotFoundError",
    "DOMAINS", "DEFAULT_DOMAINS", "Domain", "render_domain", "caption_for", "DOMAIN_BENCHMARK_TEMPLATES",
    "make_domain_benchmark", "make_pretraining_pool", "DomainBenchmark", "MAX_TEST_PER_DOMAIN", "MAX_TRAIN_PER_DOMAIN",
    "check_benchmark_sizes",
    "MINI_SUITE_TASKS", "TaskSpec", "make_task",
    "load_fashion_mnist", "FASHION_MNIST_CLASSES", "FASHION_REGIONS",
]

__getattr__ = renamed(__name__, {"TASKS": "MINI_SUITE_TASKS"})  # the old name warns until mergelib 0.3
