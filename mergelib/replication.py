"""Replicating the papers' benchmarks on real backbones and datasets, one call per (backbone, dataset).

:func:`run_domain_generalization` is SCORE's experiment (arXiv 2603.05768, Sec. 4 and the
released ``finetune_domain_splitted.py`` / ``merge_domain_splitted_leave_one_out.py``): fine-tune
one expert per domain of a dataset of :mod:`mergelib.data.dg_datasets` with the released recipe,
then merge the other domains' experts for each held-out domain at coefficient 1 and evaluate
them, with zero-shot, the own-domain expert and the logit ensemble as baselines. Following the
released code rather than the paper's text: the warm-up is 500 *steps* whatever the dataset's
size, each domain's zero-shot head is built from that domain's class folders, and SCORE's
trimming threshold is zσ/T on the natural-image datasets and zσ on FedISIC and RetinaDomains
(the spec's ``trim_divide_by_tasks``).

:func:`run_multitask` is the 8/14/20-task protocol of TSV, Iso and ESM on imported experts
(:mod:`mergelib.importers`): merge all experts, choose the global coefficient on the TALL
validation split with the method's released search (:mod:`mergelib.coefficients`), report
absolute and normalized accuracy on the test splits.

Both write their results under ``results_dir/{backbone}/...`` as CSV, one file per (dataset,
method), with a provenance record (commit, parameters, seeds, versions), atomically, so that the
book's results chapter picks them up. Experts are cached as safetensors with manifests
(:mod:`mergelib.checkpoints`): a rerun reuses every finished expert and result.

The same code runs the miniature's ``tiny-clip`` on the generated stand-in folders of
:mod:`mergelib.data.standins`, which is how the tests and the smoke build exercise it.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch

from .backbones import Clip, create_clip
from .checkpoints import atomic_write, cached_state, config_hash, load_state
from .data.files import ImageFileSet
from .dg import evaluate_leave_one_domain_out
from .evaluation import EncoderEvaluator
from .finetune import PAPER_FINETUNE, FinetuneConfig, finetune_image_encoder
from .heads import ClassificationHead, zero_shot_head
from .methods import MethodSpec, parse_method_spec
from .methods.common import resolve_device
from .methods.esm import needs_essential_subspaces
from .provenance import git_state, provenance, write_json
from .task_vectors import StateDict, encoder_state, task_vector

#: The methods of SCORE's comparison (its README's list plus SCORE and weight averaging).
PAPER_DG_METHODS = ("weight_average", "task_arithmetic", "ties", "magmax", "pcb", "iso_c", "iso_cts", "tsv_m", "score")


def method_file_name(label: str) -> str:
    """A file name for a method label such as ``score[keep=diagonal]``."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_") or "method"


class LazyStates(Mapping):
    """A read-only mapping whose values are computed on access and the last ``keep`` kept.

    Real experts do not fit in memory together (15 ViT-L/14 encoders are 18 GB); the protocols
    only need a few at a time.
    """

    def __init__(self, names: Sequence[str], load: Callable[[str], StateDict], keep: int = 2):
        self._names, self._load, self._keep = list(names), load, keep
        self._cache: OrderedDict[str, StateDict] = OrderedDict()

    def __getitem__(self, name: str) -> StateDict:
        if name not in self._names:
            raise KeyError(name)
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        state = self._load(name)
        self._cache[name] = state
        while len(self._cache) > self._keep:
            self._cache.popitem(last=False)
        return state

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def paper_recipe(epochs: int, *, precision: str = "fp32", batch_size: int = 128, accumulation_steps: int = 1,
                 **overrides: Any) -> FinetuneConfig:
    """SCORE's released recipe (AdamW lr 1e-5, wd 0.1, batch 128, 500 warm-up steps, cosine,
    clip 1.0, seed 5) with the dataset's epochs."""
    return replace(PAPER_FINETUNE, epochs=epochs, precision=precision, batch_size=batch_size,
                   accumulation_steps=accumulation_steps, **overrides)


def _method_specs(methods: Sequence[str | MethodSpec], trim_divide_by_tasks: bool) -> list[MethodSpec]:
    """Method specs, SCORE's given the dataset's released threshold unless the spec sets it."""
    specs = []
    for method in methods:
        spec = method if isinstance(method, MethodSpec) else parse_method_spec(method)
        if spec.name == "score" and "divide_by_tasks" not in spec.params:
            spec = MethodSpec(spec.label, spec.name, {**spec.params, "divide_by_tasks": trim_divide_by_tasks})
        specs.append(spec)
    return specs


def _proxy_inputs(files: ImageFileSet, clip: Clip, count: int, seed: int) -> torch.Tensor:
    picked = files.subset(min(count, len(files)), seed).with_transform(clip.preprocess_val)
    return torch.stack([picked[i][0] for i in range(len(picked))])


def write_results(results: pd.DataFrame, directory: Path, record: dict[str, Any]) -> list[Path]:
    """One CSV per method (``method`` column) under ``directory`` and ``provenance.json``, atomically."""
    written = []
    for method, table in results.groupby("method", sort=False):
        path = directory / f"{method_file_name(str(method))}.csv"
        atomic_write(path, lambda tmp, t=table: t.to_csv(tmp, index=False))
        written.append(path)
    write_json(directory / "provenance.json", record)
    return written


def run_domain_generalization(
    backbone: str,
    dataset: str,
    *,
    data_root: str | Path,
    checkpoint_dir: str | Path,
    results_dir: str | Path,
    methods: Sequence[str | MethodSpec] = PAPER_DG_METHODS,
    domains: Sequence[str] | None = None,
    weights: str | Path | None = "published",
    device: str = "auto",
    precision: str = "fp32",
    epochs: int | None = None,
    batch_size: int = 128,
    accumulation_steps: int = 1,
    num_workers: int = 4,
    eval_batch_size: int = 128,
    esm_proxy_count: int = 32,
    finetune_overrides: Mapping[str, Any] | None = None,
    loader_options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """SCORE's leave-one-domain-out experiment for one backbone and dataset.

    Fine-tunes (or reuses from ``checkpoint_dir``) one expert per domain, evaluates every method
    at coefficient 1 plus the baselines, writes
    ``results_dir/{backbone}/domain_generalization/{dataset}/{method}.csv`` and returns the results
    and the expert-by-domain accuracy matrix. ``weights`` is passed to
    :func:`mergelib.backbones.create_clip` (a path for local weights, ``None`` for a random
    initialisation, which only tests use). ``epochs`` overrides the dataset's released count;
    ``domains`` restricts the run to some of the dataset's domains (kept in the released order).
    """
    from .data.dg_datasets import get_dg_dataset, load_domain

    started = git_state()
    spec = get_dg_dataset(dataset)
    torch_device = resolve_device(device)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    clip = create_clip(backbone, weights=weights, device=torch_device)
    pretrained = encoder_state(clip.model.visual)
    pretrained_id = config_hash({k: [list(v.shape), float(v.double().sum())] for k, v in pretrained.items()})[:16]
    if domains is None:
        domains = list(spec.domains_in_iteration_order)
    else:
        unknown = [d for d in domains if d not in spec.domains]
        if unknown:
            raise ValueError(f"{dataset} has no domains {unknown}; its domains are {list(spec.domains)}")
        domains = [d for d in spec.domains_in_iteration_order if d in domains]
    options = dict(loader_options or {})
    train = {d: load_domain(dataset, data_root, d, "train", **options) for d in domains}
    test = {d: load_domain(dataset, data_root, d, "test", **options) for d in domains}
    heads: dict[str, ClassificationHead] = {}
    for d in domains:
        heads[d] = zero_shot_head(clip, test[d].classnames, spec.templates)
    train_heads = {d: heads[d] if train[d].classnames == test[d].classnames else zero_shot_head(clip, train[d].classnames, spec.templates)
                   for d in domains}
    timings["load data and heads"] = time.perf_counter() - clock

    recipe = paper_recipe(spec.epochs if epochs is None else epochs, precision=precision, batch_size=batch_size,
                          accumulation_steps=accumulation_steps, **dict(finetune_overrides or {}))
    expert_dir = Path(checkpoint_dir) / backbone / "domain_generalization" / dataset

    def expert_key(domain: str) -> str:
        return config_hash({"backbone": backbone, "pretrained": pretrained_id, "dataset": dataset, "domain": domain,
                            "data": train[domain].fingerprint(), "templates": list(spec.templates),
                            "finetune": recipe.as_dict()})

    clock = time.perf_counter()
    manifests = {}
    for domain in domains:
        def build(domain=domain):
            state, losses = finetune_image_encoder(clip, train_heads[domain], train[domain], recipe, device=torch_device,
                                                   description=f"fine-tune {dataset}/{domain}", progress=progress,
                                                   num_workers=num_workers)
            return state, {"backbone": backbone, "dataset": dataset, "domain": domain, "hyperparameters": recipe.as_dict(),
                           "seed": recipe.seed, "n_train": len(train[domain]), "final_loss": losses[-1] if losses else None}
        _, manifests[domain] = cached_state(expert_dir / f"{domain}.safetensors", expert_key(domain), build)
    timings["fine-tune experts"] = time.perf_counter() - clock

    def load_expert(domain: str) -> StateDict:
        return load_state(expert_dir / f"{domain}.safetensors", key=expert_key(domain))[0]

    experts = LazyStates(domains, load_expert, keep=2)
    vectors = LazyStates(domains, lambda d: task_vector(load_expert(d), pretrained), keep=len(domains))
    specs = _method_specs(methods, spec.trim_divide_by_tasks)

    fold = {}
    if any(map(needs_essential_subspaces, specs)):
        from .essential import essential_subspaces

        clock = time.perf_counter()
        subspaces = {d: essential_subspaces(clip.model.visual, pretrained, vectors[d],
                                            _proxy_inputs(train[d], clip, esm_proxy_count, recipe.seed), device=torch_device)
                     for d in domains}
        fold["esm"] = lambda sources: {"subspaces": [subspaces[s] for s in sources]}
        timings["ESM subspaces"] = time.perf_counter() - clock

    clock = time.perf_counter()
    evaluator = EncoderEvaluator(clip, device=torch_device, batch_size=eval_batch_size, num_workers=num_workers,
                                 precision=precision)
    results, matrix = evaluate_leave_one_domain_out(evaluator, pretrained, experts, vectors, heads, test, specs, (1.0,),
                                                    fold_parameters=fold, progress=progress)
    timings["merge and evaluate"] = time.perf_counter() - clock
    metric = "balanced_accuracy" if spec.metric == "balanced_accuracy" else "accuracy"
    results = results.assign(backbone=backbone, dataset=dataset, metric=metric, score=results[metric])
    parameters = {"backbone": backbone, "dataset": dataset, "weights": str(weights), "pretrained_id": pretrained_id,
                  "methods": [s.label for s in specs], "method_params": {s.label: dict(s.params) for s in specs},
                  "finetune": recipe.as_dict(), "precision": precision, "esm_proxy_count": esm_proxy_count,
                  "domains": domains, "data_root": str(data_root), "loader_options": options}
    out = Path(results_dir) / backbone / "domain_generalization" / dataset
    record = provenance(parameters, git=started, seeds={"finetune": recipe.seed, "esm_proxies": recipe.seed},
                        timings=timings, device=str(torch_device), experts={d: m.get("sha256") for d, m in manifests.items()})
    atomic_write(out / "matrix.csv", lambda tmp: matrix.to_csv(tmp, index=False))
    write_results(results, out, record)
    return results, matrix


def miniature_weights(cache_dir: str | Path | None = None, *, progress: bool = True) -> Path:
    """The safetensors file of the miniature's pretrained ``tiny-clip`` (pretrained now if not
    cached), to pass as ``weights`` when the replication code runs on the tiny backbone."""
    from .miniature import MiniatureConfig, default_cache_dir
    from .pretrain import pretrained_tiny_clip

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    _, manifest = pretrained_tiny_clip(MiniatureConfig().pretrain, cache, progress=progress)
    return cache / "pretrained" / manifest["file"]


# ----------------------------------------------------------------------------- multi-task (TSV, Iso, ESM)
#: The released coefficient rule of each method (:mod:`mergelib.coefficients`); others use the
#: Task Arithmetic grid of the TSV code.
ALPHA_RULES = {"tsv_m": "tsv", "iso_c": "iso", "iso_cts": "iso", "esm": "esm"}
PAPER_MT_METHODS = ("task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts", "esm")


def _ratio(accuracy: float, reference: float) -> float:
    return accuracy / reference if reference else float("nan")


def dataset_labels(dataset: torch.utils.data.Dataset) -> torch.Tensor:
    """The labels of a torchvision-style dataset without reading its images where possible."""
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    for attribute in ("targets", "labels", "_labels"):
        values = getattr(dataset, attribute, None)
        if values is not None and len(values) == len(dataset):
            return torch.as_tensor(list(values) if not isinstance(values, torch.Tensor) else values, dtype=torch.long)
    samples = getattr(dataset, "samples", None) or getattr(dataset, "_samples", None)
    if samples is not None and len(samples) == len(dataset):
        return torch.as_tensor([int(s[1]) for s in samples], dtype=torch.long)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def run_multitask(
    backbone: str,
    tasks: int | Sequence[str],
    *,
    data_root: str | Path,
    experts_dir: str | Path,
    results_dir: str | Path,
    methods: Sequence[str | MethodSpec] = PAPER_MT_METHODS,
    weights: str | Path | None = "published",
    device: str = "auto",
    precision: str = "fp32",
    eval_batch_size: int = 128,
    num_workers: int = 4,
    esm_proxy_count: int = 32,
    emnist_rotate_flip: bool = False,
    normalize_with: str = "published",
    progress: bool = True,
) -> pd.DataFrame:
    """The 8/14/20-task protocol on imported experts (``experts_dir/{backbone}/{task}.safetensors``
    and ``zeroshot.safetensors``, written by :func:`mergelib.importers.import_directory`).

    Per method: merge all experts, choose alpha on the TALL validation splits with the method's
    released rule (:data:`ALPHA_RULES`), evaluate every test split at that alpha. Normalized
    accuracy divides by the published fine-tuned accuracies (``normalize_with="published"``, as
    the papers do; valid only for the public checkpoints of the real backbones) or by the
    imported experts' own accuracies (``"experts"``). Writes
    ``results_dir/{backbone}/multitask/{suite}/{method}.csv`` with every alpha evaluated.
    """
    from .coefficients import search_alpha
    from .data.task_suites import TASKS, load_task, published_finetuned_accuracy, suite_tasks
    from .evaluation import classification_metrics
    from .importers import load_imported
    from .methods import merge
    from .task_vectors import apply_task_vector

    started = git_state()
    names = list(suite_tasks(tasks)) if isinstance(tasks, int) else list(tasks)
    suite = f"{len(names)}-tasks"
    if normalize_with not in ("published", "experts"):
        raise ValueError(f"normalize_with must be 'published' or 'experts', got {normalize_with!r}")
    torch_device = resolve_device(device)
    clip = create_clip(backbone, weights=weights, device=torch_device)
    folder = Path(experts_dir) / backbone
    zeroshot = folder / "zeroshot.safetensors"
    pretrained = load_imported(zeroshot, backbone)[0] if zeroshot.exists() else encoder_state(clip.model.visual)
    experts = {t: load_imported(folder / f"{t}.safetensors", backbone)[0] for t in names}
    vectors = {t: task_vector(experts[t], pretrained) for t in names}

    data = {}
    for split in ("val", "test"):
        for t in names:
            loaded = load_task(t, data_root, split, transform=clip.preprocess_val, emnist_rotate_flip=emnist_rotate_flip)
            data[split, t] = (loaded.dataset, dataset_labels(loaded.dataset), loaded.classnames)
    heads = {t: zero_shot_head(clip, data["test", t][2], TASKS[t].templates) for t in names}
    evaluator = EncoderEvaluator(clip, device=torch_device, batch_size=eval_batch_size, num_workers=num_workers,
                                 precision=precision)

    def accuracies(state: StateDict, split: str) -> dict[str, float]:
        return {t: classification_metrics(evaluator.logits(state, heads[t], data[split, t][0]), data[split, t][1])["accuracy"]
                for t in names}

    if normalize_with == "published":
        reference = {split: {t: published_finetuned_accuracy(backbone, t, split) for t in names} for split in ("val", "test")}
    else:
        reference = {split: {t: accuracies(experts[t], split)[t] for t in names} for split in ("val", "test")}

    rows = [{"method": "zero-shot", "alpha": float("nan"), "split": split, "task": t, "accuracy": a,
             "normalized_accuracy": _ratio(a, reference[split][t]), "selected": True}
            for split in ("val", "test") for t, a in accuracies(pretrained, split).items()]
    specs = [m if isinstance(m, MethodSpec) else parse_method_spec(m) for m in methods]
    searches = {}
    for spec in specs:
        extra = {}
        if needs_essential_subspaces(spec):
            from .essential import essential_subspaces

            proxies = {t: torch.stack([data["val", t][0][i][0] for i in range(min(esm_proxy_count, len(data["val", t][0])))])
                       for t in names}
            extra["subspaces"] = [essential_subspaces(clip.model.visual, pretrained, vectors[t], proxies[t], device=torch_device)
                                  for t in names]
        merged = merge(spec.name, [vectors[t] for t in names], **spec.params, **extra)
        evaluated: dict[float, dict[str, float]] = {}

        def evaluate(alpha: float) -> dict[str, float]:
            val = accuracies(apply_task_vector(pretrained, merged, alpha=alpha), "val")
            evaluated[alpha] = val
            return {"absolute": sum(val.values()) / len(val),
                    "normalized": sum(_ratio(val[t], reference["val"][t]) for t in names) / len(names)}

        search = search_alpha(ALPHA_RULES.get(spec.name, "task_arithmetic"), evaluate)
        searches[spec.label] = search.to_dict()
        for alpha, val in evaluated.items():
            rows += [{"method": spec.label, "alpha": alpha, "split": "val", "task": t, "accuracy": a,
                      "normalized_accuracy": _ratio(a, reference["val"][t]), "selected": alpha == search.alpha} for t, a in val.items()]
        test = accuracies(apply_task_vector(pretrained, merged, alpha=search.alpha), "test")
        rows += [{"method": spec.label, "alpha": search.alpha, "split": "test", "task": t, "accuracy": a,
                  "normalized_accuracy": _ratio(a, reference["test"][t]), "selected": True} for t, a in test.items()]
    results = pd.DataFrame(rows).assign(backbone=backbone, tasks=len(names))
    parameters = {"backbone": backbone, "tasks": names, "methods": [s.label for s in specs], "precision": precision,
                  "normalize_with": normalize_with, "emnist_rotate_flip": emnist_rotate_flip,
                  "esm_proxy_count": esm_proxy_count, "experts_dir": str(experts_dir), "data_root": str(data_root)}
    record = provenance(parameters, git=started, seeds={"tall_validation_split": 0}, searches=searches,
                        device=str(torch_device))
    write_results(results, Path(results_dir) / backbone / "multitask" / suite, record)
    return results
