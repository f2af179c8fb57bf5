"""Replicating the papers' benchmarks on real backbones and datasets, one call per (backbone, dataset).

:func:`replicate_domain_generalization` is SCORE's experiment (arXiv 2603.05768, Sec. 4 and the
released ``finetune_domain_splitted.py`` / ``merge_domain_splitted_leave_one_out.py``): fine-tune
one expert per domain of a dataset of :mod:`mergelib.data.dg_datasets` with the released recipe,
then merge the other domains' experts for each held-out domain at coefficient 1 and evaluate
them, with zero-shot, the own-domain expert and the logit ensemble as baselines. Following the
released code rather than the paper's text: the warm-up is 500 *steps* whatever the dataset's
size, each domain's zero-shot head is built from that domain's class folders, and SCORE's
trimming threshold is zσ/T on the natural-image datasets and zσ on FedISIC and RetinaDomains
(the spec's ``trim_divide_by_tasks``).

:func:`replicate_multitask` is the 8/14/20-task protocol of TSV, Iso and ESM on imported experts
(:mod:`mergelib.models.importers`): merge all experts, choose the global coefficient on the TALL
validation split with the method's released search (:mod:`mergelib.protocols.coefficients`), report
absolute and normalized accuracy on the test splits.

Both write their results under ``results_dir/{backbone}/...`` as CSV, one file per (dataset,
method), with a provenance record (commit, parameters, seeds, versions), atomically, so that the
book's results chapter picks them up. Experts are cached as safetensors with manifests
(:mod:`mergelib.io.checkpoints`): a rerun reuses every finished expert and result. Each expert is
fine-tuned under a lock beside its file (:func:`~mergelib.experiments.replication.cached_expert`): two runs sharing a checkpoint
folder never train the same expert at once; the second waits for it and loads it.

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

from mergelib.models.backbones import Clip, create_clip
from mergelib.io.checkpoints import atomic_write, cached_state, config_hash, expect_shapes, legacy_manifest, load_state
from mergelib.data.files import ImageFileSet
from mergelib.protocols.domain_generalization import evaluate_leave_one_domain_out
from mergelib.models.evaluation import EncoderEvaluator
from mergelib.models.finetune import PAPER_FINETUNE, FinetuneConfig, finetune_image_encoder
from mergelib.models.heads import ClassificationHead, zero_shot_head
from mergelib.methods import MethodSpec, parse_method_spec
from mergelib.methods.common import resolve_device
from mergelib.methods.esm import needs_essential_subspaces
from mergelib.io.locks import DEFAULT_POLL_SECONDS, DEFAULT_WAIT_SECONDS, OwnerLock
from mergelib.io.provenance import git_state, provenance, write_json
from mergelib.errors import CorruptCheckpointError, MergelibError, ParameterValueError, lookup
from mergelib.task_vectors import PREFIX, StateDict, encoder_state, task_vector
from mergelib.protocols.multitask import FINE_TUNED, ZERO_SHOT, evaluate_multitask
from mergelib.protocols.results import DOMAIN_GENERALIZATION, MULTITASK, CorrectnessCollector, conform
from mergelib.analysis.stats import save_correctness
from mergelib._moved import renamed

__getattr__ = renamed(__name__, {"run_domain_generalization": "replicate_domain_generalization",
                                 "run_multitask": "replicate_multitask"})

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


def method_specs(methods: str | MethodSpec | Sequence[str | MethodSpec]) -> list[MethodSpec]:
    """The method specs of a run, every one parsed and checked (method names, parameter names and
    values: :func:`mergelib.methods.check_method_parameters`, also for a :class:`MethodSpec`
    built in Python) before any work; a single spec (``"score"``) is one method, never read
    letter by letter."""
    from mergelib.methods import check_method_parameters

    if isinstance(methods, (str, MethodSpec)):
        methods = [methods]
    specs = [method if isinstance(method, MethodSpec) else parse_method_spec(method) for method in methods]
    for spec in specs:  # a MethodSpec built in Python is checked like a parsed one
        check_method_parameters(spec.name, spec.params)
    return specs


def check_backbones(backbones: str | Sequence[str]) -> list[str]:
    """Registered backbone names (:data:`mergelib.models.backbones.BACKBONES`), checked before any work."""
    from mergelib.models.backbones import BACKBONES

    names = [backbones] if isinstance(backbones, str) else list(backbones)
    for name in names:
        lookup(BACKBONES, "backbone", name)
    return names


def dg_domains(dataset: str, domains: str | Sequence[str] | None = None) -> list[str]:
    """The domains of a leave-one-domain-out run, in the dataset's released order: all of them
    (``None``) or the named ones, each checked against the dataset's domains."""
    from mergelib.data.dg_datasets import get_dg_dataset

    spec = get_dg_dataset(dataset)
    if domains is None:
        return list(spec.domains_in_iteration_order)
    chosen = [domains] if isinstance(domains, str) else list(domains)
    unknown = [d for d in chosen if d not in spec.domains]
    if unknown:
        raise ParameterValueError(f"{dataset} has no domains {unknown}; its domains are {list(spec.domains)}")
    return [d for d in spec.domains_in_iteration_order if d in chosen]


def check_dg_run(backbone: str, dataset: str, *, methods: Any = None, domains: Sequence[str] | None = None,
                 precision: str = "fp32") -> list[str]:
    """Every name of one leave-one-domain-out run checked before any checkpoint is loaded or any
    expert fine-tuned: the backbone, the dataset, its domains, the method specs (when given) and
    the precision. Returns the domains (see :func:`dg_domains`)."""
    _check_run_settings(backbone, methods, precision)
    return dg_domains(dataset, domains)


def _check_run_settings(backbone: str, methods: Any, precision: str) -> None:
    """The checks every replication run shares: the backbone, the method specs (when given), the precision."""
    from mergelib.models.evaluation import check_precision_name

    check_backbones([backbone])
    if methods is not None:
        method_specs(methods)
    check_precision_name(precision)


def _method_specs(methods: Sequence[str | MethodSpec], trim_divide_by_tasks: bool) -> list[MethodSpec]:
    """Method specs, SCORE's given the dataset's released threshold unless the spec sets it."""
    specs = []
    for spec in method_specs(methods):
        if spec.name == "score" and "divide_by_tasks" not in spec.params:
            spec = MethodSpec(spec.label, spec.name, {**spec.params, "divide_by_tasks": trim_divide_by_tasks})
        specs.append(spec)
    return specs


def _proxy_inputs(files: ImageFileSet, clip: Clip, count: int, seed: int) -> torch.Tensor:
    picked = files.subset(min(count, len(files)), seed).with_transform(clip.preprocess_val)
    return torch.stack([picked[i][0] for i in range(len(picked))])


def write_results(results: pd.DataFrame, directory: Path, record: dict[str, Any], *,
                  provenance_name: str = "provenance.json") -> list[Path]:
    """One CSV per method (``method`` column) under ``directory`` and the provenance record, atomically."""
    written = []
    for method, table in results.groupby("method", sort=False):
        path = directory / f"{method_file_name(str(method))}.csv"
        atomic_write(path, lambda tmp, t=table: t.to_csv(tmp, index=False))
        written.append(path)
    write_json(directory / provenance_name, record)
    return written


def _pretrained_id(pretrained: StateDict) -> str:
    """A short identifier of pretrained weights (shapes and sums), recorded in every expert's key."""
    return config_hash({k: [list(v.shape), float(v.double().sum())] for k, v in pretrained.items()})[:16]


def cached_expert(
    path: Path,
    key: str,
    build: Callable[[], tuple[StateDict, dict[str, Any]]],
    *,
    what: str,
    lock_timeout: float = DEFAULT_WAIT_SECONDS,
    poll: float = DEFAULT_POLL_SECONDS,
    check: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
) -> tuple[StateDict, dict[str, Any]]:
    """:func:`mergelib.io.checkpoints.cached_state` for an expert, built once by one process at a time.
    ``check``: as cached_state's (a cached expert that fails it is rebuilt).

    A valid cached expert is returned without locking. Otherwise the expert is built under the
    lock ``{path stem}.lock`` beside it (:class:`mergelib.io.locks.OwnerLock`): a second process
    (another ``replicate-*`` run or sweep job on the same folder) waits for the one fine-tuning
    it, with a notice, up to ``lock_timeout`` seconds, then loads the finished expert instead of
    training it again; a stale lock (its process killed) is taken over with a notice.
    """
    path = Path(path)
    lock = OwnerLock(path.with_suffix(".lock"), f"fine-tuning {what}", hint=(
        f"Rerun when it has finished (it writes {path}), or pass a longer lock_timeout"))
    try:
        state, manifest = load_state(path, key=key)  # finished before: no lock needed
        if check is not None:
            check(state)
        if lock.path.exists():  # left by a run killed after it wrote the expert
            lock.clear_stale()
        return state, manifest
    except CorruptCheckpointError:
        pass  # missing, being written, stale or corrupt: decided under the lock
    with lock.acquire(wait=lock_timeout, poll=poll):
        return cached_state(path, key, build, check=check)


class DGExperiment:
    """SCORE's leave-one-domain-out experiment for one backbone and dataset, in parts.

    Made by :func:`prepare_dg_experiment`. :meth:`finetune_expert` fine-tunes (or finds in the
    checkpoint folder) one domain's expert, :meth:`evaluate` runs some or all folds on the
    finished experts; :func:`replicate_domain_generalization` does everything in one process, and the
    sweep kinds of :mod:`mergelib.experiments.benchmark_sweeps` run the same parts as separate jobs, so both
    produce the same experts (same cache keys) and the same numbers.
    """

    def __init__(self, backbone: str, dataset: str, *, clip: Clip, device: torch.device, domains: Sequence[str],
                 train: Mapping[str, ImageFileSet], test: Mapping[str, ImageFileSet], recipe: FinetuneConfig,
                 checkpoint_dir: Path, parameters: Mapping[str, Any], num_workers: int, eval_batch_size: int,
                 precision: str, esm_proxy_count: int):
        from mergelib.data.dg_datasets import get_dg_dataset

        self.backbone, self.dataset, self.spec = backbone, dataset, get_dg_dataset(dataset)
        self.clip, self.device, self.domains = clip, device, list(domains)
        self.train, self.test, self.recipe = dict(train), dict(test), recipe
        self.pretrained = encoder_state(clip.model.visual)
        self.pretrained_id = _pretrained_id(self.pretrained)
        self.expert_dir = Path(checkpoint_dir) / backbone / "domain_generalization" / dataset
        self.parameters = {**parameters, "pretrained_id": self.pretrained_id}
        self.num_workers, self.eval_batch_size, self.precision = num_workers, eval_batch_size, precision
        self.esm_proxy_count = esm_proxy_count
        self._heads: dict[tuple[str, ...], ClassificationHead] = {}

    def head(self, classnames: Sequence[str]) -> ClassificationHead:
        """The zero-shot head of these class names with the dataset's templates (built once)."""
        key = tuple(classnames)
        if key not in self._heads:
            self._heads[key] = zero_shot_head(self.clip, key, self.spec.templates)
        return self._heads[key]

    def expert_path(self, domain: str) -> Path:
        return self.expert_dir / f"{domain}.safetensors"

    def expert_key(self, domain: str) -> str:
        return config_hash({"backbone": self.backbone, "pretrained": self.pretrained_id, "dataset": self.dataset,
                            "domain": domain, "data": self.train[domain].fingerprint(),
                            "templates": list(self.spec.templates), "finetune": self.recipe.as_dict()})

    def _check_domain(self, domain: str) -> None:
        if domain not in self.domains:
            raise ValueError(f"{self.dataset}: domain {domain!r} is not in this experiment's domains {self.domains}")

    def finetune_expert(self, domain: str, *, progress: bool = True,
                        lock_timeout: float = DEFAULT_WAIT_SECONDS) -> dict[str, Any]:
        """Fine-tune ``domain``'s expert with the recipe unless a valid one is cached; its manifest.
        If another process is fine-tuning it, wait for it (up to ``lock_timeout`` seconds) and load
        it (:func:`~mergelib.experiments.replication.cached_expert`)."""
        self._check_domain(domain)

        def build():
            state, losses = finetune_image_encoder(
                self.clip, self.head(self.train[domain].classnames), self.train[domain], self.recipe,
                device=self.device, description=f"fine-tune {self.dataset}/{domain}", progress=progress,
                num_workers=self.num_workers)
            return state, {"backbone": self.backbone, "dataset": self.dataset, "domain": domain,
                           "hyperparameters": self.recipe.as_dict(), "seed": self.recipe.seed,
                           "n_train": len(self.train[domain]), "final_loss": losses[-1] if losses else None}

        return cached_expert(self.expert_path(domain), self.expert_key(domain), build,
                             what=f"the {self.backbone} expert of {self.dataset}/{domain}", lock_timeout=lock_timeout,
                             check=self._fits_backbone)[1]

    def _fits_backbone(self, state: Mapping[str, torch.Tensor]) -> None:
        """:class:`~mergelib.errors.CorruptCheckpointError` unless ``state`` has the pretrained encoder's keys and shapes."""
        expect_shapes({k: v.shape for k, v in self.pretrained.items()}, f"the {self.backbone} image encoder")(state)

    def load_expert(self, domain: str) -> StateDict:
        """A finished expert (a clear error naming the file if it is missing, stale or corrupt)."""
        self._check_domain(domain)
        path = self.expert_path(domain)
        if not path.exists():
            raise FileNotFoundError(f"{self.dataset}/{domain}: no expert at {path}; fine-tune it first "
                                    "(replicate_domain_generalization or the sweep's dg-finetune jobs)")
        state = load_state(path, key=self.expert_key(domain))[0]
        try:
            self._fits_backbone(state)
        except CorruptCheckpointError as error:
            raise CorruptCheckpointError(f"checkpoint {path}: {error}; fine-tune it again") from None
        return state

    def evaluate(self, methods: Sequence[str | MethodSpec] = PAPER_DG_METHODS, *, held_out: Sequence[str] | None = None,
                 progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float], pd.DataFrame]:
        """The folds of ``held_out`` (default: every domain) at coefficient 1 with the baselines:
        results (in the result schema, :mod:`mergelib.protocols.results`, ``benchmark`` being the
        dataset and ``metric`` its headline metric), the expert-by-domain matrix over those
        domains, timings, and which test images each single model got right (the correctness
        table of :mod:`mergelib.analysis.stats`)."""
        timings: dict[str, float] = {}
        experts = LazyStates(self.domains, self.load_expert, keep=2)
        vectors = LazyStates(self.domains, lambda d: task_vector(experts[d], self.pretrained), keep=len(self.domains))
        specs = _method_specs(methods, self.spec.trim_divide_by_tasks)
        folds = self.domains if held_out is None else list(held_out)
        for domain in folds:
            self._check_domain(domain)
        sources = sorted({s for d in folds for s in self.domains if s != d}, key=self.domains.index)

        fold = {}
        if any(map(needs_essential_subspaces, specs)):
            from mergelib.models.essential import essential_subspaces

            clock = time.perf_counter()
            subspaces = {d: essential_subspaces(self.clip.model.visual, self.pretrained, vectors[d],
                                                _proxy_inputs(self.train[d], self.clip, self.esm_proxy_count, self.recipe.seed),
                                                device=self.device)
                         for d in sources}
            fold["esm"] = lambda names: {"subspaces": [subspaces[s] for s in names]}
            timings["ESM subspaces"] = time.perf_counter() - clock

        clock = time.perf_counter()
        heads = {d: self.head(self.test[d].classnames) for d in folds}
        evaluator = EncoderEvaluator(self.clip, device=self.device, batch_size=self.eval_batch_size,
                                     num_workers=self.num_workers, precision=self.precision)
        collector = CorrectnessCollector(lambda split, domain: self.test[domain].fingerprint(), benchmark=self.dataset)
        results, matrix = evaluate_leave_one_domain_out(evaluator, self.pretrained, experts, vectors, heads, self.test, specs,
                                                        (1.0,), fold_parameters=fold, held_out=folds, progress=progress,
                                                        on_correct=collector)
        timings["merge and evaluate"] = time.perf_counter() - clock
        metric = "balanced_accuracy" if self.spec.metric == "balanced_accuracy" else "accuracy"
        results = conform(results, setting=DOMAIN_GENERALIZATION, benchmark=self.dataset, backbone=self.backbone,
                          metric=metric)
        return results, matrix, timings, collector.frame()

    def method_parameters(self, methods: Sequence[str | MethodSpec]) -> dict[str, Any]:
        specs = _method_specs(methods, self.spec.trim_divide_by_tasks)
        return {"methods": [s.label for s in specs], "method_params": {s.label: dict(s.params) for s in specs}}

    def store(self, results: pd.DataFrame, matrix: pd.DataFrame, results_dir: str | Path, *,
              methods: Sequence[str | MethodSpec], git: Mapping[str, Any], timings: Mapping[str, float],
              experts: Mapping[str, str | None], correctness: pd.DataFrame | None = None) -> Path:
        """Write the result store ``{results_dir}/{backbone}/domain_generalization/{dataset}/``:
        one CSV per method, ``matrix.csv``, ``correctness.npz`` (when given) and
        ``provenance.json``, atomically."""
        out = Path(results_dir) / self.backbone / "domain_generalization" / self.dataset
        record = provenance({**self.parameters, **self.method_parameters(methods)}, git=dict(git),
                            seeds={"finetune": self.recipe.seed, "esm_proxies": self.recipe.seed},
                            timings=dict(timings), device=str(self.device), experts=dict(experts))
        atomic_write(out / "matrix.csv", lambda tmp: matrix.to_csv(tmp, index=False))
        if correctness is not None:
            save_correctness(out / "correctness.npz", correctness, record)
        write_results(results, out, record)
        return out


def prepare_dg_experiment(
    backbone: str,
    dataset: str,
    *,
    data_root: str | Path,
    checkpoint_dir: str | Path,
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
) -> DGExperiment:
    """Load the backbone and the dataset's domains (file lists; no pixels read) for a
    :class:`DGExperiment`. ``domains``: some of the dataset's (kept in the released order; a
    fine-tuning job may name a single one, the evaluation needs at least two); ``weights``: for
    :func:`mergelib.models.backbones.create_clip`; ``epochs``: overrides the dataset's released count;
    ``finetune_overrides``: other fields of the recipe (:func:`paper_recipe`); ``loader_options``:
    for :func:`mergelib.data.dg_datasets.load_domain`."""
    from mergelib.data.dg_datasets import get_dg_dataset, load_domain

    domains = check_dg_run(backbone, dataset, domains=domains, precision=precision)
    spec = get_dg_dataset(dataset)
    torch_device = resolve_device(device)
    options = dict(loader_options or {})
    train = {d: load_domain(dataset, data_root, d, "train", **options) for d in domains}
    test = {d: load_domain(dataset, data_root, d, "test", **options) for d in domains}
    clip = create_clip(backbone, weights=weights, device=torch_device)
    recipe = paper_recipe(spec.epochs if epochs is None else epochs, precision=precision, batch_size=batch_size,
                          accumulation_steps=accumulation_steps, **dict(finetune_overrides or {}))
    parameters = {"backbone": backbone, "dataset": dataset, "weights": str(weights), "finetune": recipe.as_dict(),
                  "precision": precision, "esm_proxy_count": esm_proxy_count, "domains": list(domains),
                  "data_root": str(data_root), "loader_options": options}
    return DGExperiment(backbone, dataset, clip=clip, device=torch_device, domains=domains, train=train, test=test,
                        recipe=recipe, checkpoint_dir=Path(checkpoint_dir), parameters=parameters,
                        num_workers=num_workers, eval_batch_size=eval_batch_size, precision=precision,
                        esm_proxy_count=esm_proxy_count)


def replicate_domain_generalization(
    backbone: str,
    dataset: str,
    *,
    data_root: str | Path,
    checkpoint_dir: str | Path,
    results_dir: str | Path,
    methods: Sequence[str | MethodSpec] = PAPER_DG_METHODS,
    progress: bool = True,
    **options: Any,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """SCORE's leave-one-domain-out experiment for one backbone and dataset.

    Fine-tunes (or reuses from ``checkpoint_dir``) one expert per domain, evaluates every method
    at coefficient 1 plus the baselines, writes
    ``results_dir/{backbone}/domain_generalization/{dataset}/{method}.csv`` and returns the results
    and the expert-by-domain accuracy matrix. ``options`` are those of
    :func:`prepare_dg_experiment`: ``domains`` (some of the dataset's, kept in the released order),
    ``weights`` (passed to :func:`mergelib.models.backbones.create_clip`: ``"published"``, a path for
    local weights, or ``None`` for a random initialisation, which only tests use), ``device``,
    ``precision``, ``epochs`` (overrides the dataset's released count), ``batch_size``,
    ``accumulation_steps``, ``num_workers``, ``eval_batch_size``, ``esm_proxy_count``,
    ``finetune_overrides`` and ``loader_options``. Every name (backbone, dataset, domains,
    methods and their parameters) is checked before anything is loaded or fine-tuned.
    """
    check_dg_run(backbone, dataset, methods=methods, domains=options.get("domains"),
                 precision=options.get("precision", "fp32"))
    started = git_state()
    clock = time.perf_counter()
    experiment = prepare_dg_experiment(backbone, dataset, data_root=data_root, checkpoint_dir=checkpoint_dir, **options)
    timings = {"load backbone and data": time.perf_counter() - clock}
    clock = time.perf_counter()
    manifests = {d: experiment.finetune_expert(d, progress=progress) for d in experiment.domains}
    timings["fine-tune experts"] = time.perf_counter() - clock
    results, matrix, evaluation_timings, correctness = experiment.evaluate(methods, progress=progress)
    timings.update(evaluation_timings)
    experiment.store(results, matrix, results_dir, methods=methods, git=started, timings=timings,
                     experts={d: m.get("sha256") for d, m in manifests.items()}, correctness=correctness)
    return results, matrix


def miniature_weights(cache_dir: str | Path | None = None, *, progress: bool = True) -> Path:
    """The safetensors file of the miniature's pretrained ``tiny-clip`` (pretrained now if not
    cached), to pass as ``weights`` when the replication code runs on the tiny backbone."""
    from mergelib.experiments.miniature import MiniatureConfig, default_cache_dir
    from mergelib.models.pretrain import pretrained_tiny_clip

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    _, manifest = pretrained_tiny_clip(MiniatureConfig().pretrain, cache, progress=progress)
    return cache / "pretrained" / manifest["file"]


# ----------------------------------------------------------------------------- multi-task (TSV, Iso, ESM)
#: The released coefficient rule of each method (:mod:`mergelib.protocols.coefficients`); others use the
#: Task Arithmetic grid of the TSV code.
ALPHA_RULES = {"tsv_m": "tsv", "iso_c": "iso", "iso_cts": "iso", "esm": "esm"}
PAPER_MT_METHODS = ("task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts", "esm")


def task_split_fingerprint(task: str, dataset: torch.utils.data.Dataset, classnames: Sequence[str]) -> str:
    """What identifies a loaded split of a suite task: its size, the TALL subset's indices (if a
    ``Subset``), the labels and the class names. Like :meth:`ImageFileSet.fingerprint` it names
    the split, not the pixels."""
    indices = list(dataset.indices) if isinstance(dataset, torch.utils.data.Subset) else None
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    return config_hash({"task": task, "n_items": len(base), "indices": indices, "classnames": list(classnames),
                        "labels": dataset_labels(dataset).tolist()})


FINETUNED_TASK_EXPERT = "finetuned_task_expert"


class MissingExpertsError(MergelibError, FileNotFoundError):
    """Task experts that a multi-task run needs are not in the experts folder."""


def task_names(tasks: int | str | Sequence[str]) -> list[str]:
    """The tasks of a multi-task run, each checked: a suite size (8, 14, 20, also as ``"8"`` or
    ``["8"]``) gives its tasks in the released order; a task name or a list of them gives those
    (:data:`mergelib.data.task_suites.TASKS`), never read letter by letter."""
    from mergelib.data.task_suites import TASKS, suite_tasks

    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, int) and len(tasks) == 1 and str(tasks[0]).strip().isdigit():
        tasks = int(str(tasks[0]).strip())
    if isinstance(tasks, int) and not isinstance(tasks, bool):
        return list(suite_tasks(tasks))
    names = [lookup(TASKS, "task", t).name for t in tasks]
    if not names:
        raise ParameterValueError("no tasks given; name a suite (8, 14 or 20) or tasks of mergelib.data.task_suites.TASKS")
    return names


def check_task_experts(experts_dir: str | Path, backbone: str, tasks: Sequence[str]) -> None:
    """Raise :class:`MissingExpertsError` naming every task whose expert is not in
    ``experts_dir/{backbone}/{task}.safetensors`` and how to get them."""
    folder = Path(experts_dir) / backbone
    missing = [t for t in tasks if not (folder / f"{t}.safetensors").is_file()]
    if missing:
        raise MissingExpertsError(
            f"no experts for {len(missing)} of the {len(tasks)} tasks in {folder}: {', '.join(missing)} "
            f"(expected {folder}/<task>.safetensors). Import the public checkpoints once with "
            f"`mergelib import <folder of checkpoints> {experts_dir} --backbone {backbone} --trust-pickle`, "
            "or fine-tune them with `mergelib replicate-multitask ... --finetune` "
            "(Python: mergelib.experiments.replication.finetune_task_experts)")


def check_multitask_run(backbone: str, tasks: int | str | Sequence[str], *, methods: Any = None,
                        experts_dir: str | Path | None = None, precision: str = "fp32",
                        normalize_with: str = "published") -> list[str]:
    """Every name of a multi-task run checked before any checkpoint is loaded or any expert
    fine-tuned: the backbone, the tasks, the method specs (when given), the precision and
    ``normalize_with``; with ``experts_dir``, that every task's expert is there. Returns the
    task names (see :func:`task_names`)."""
    names = task_names(tasks)
    _check_run_settings(backbone, methods, precision)
    if normalize_with not in ("published", "experts"):
        raise ParameterValueError(f"normalize_with must be 'published' or 'experts', got {normalize_with!r}")
    if experts_dir is not None:
        check_task_experts(experts_dir, backbone, names)
    return names


def finetune_task_expert(
    clip: Clip,
    task: str,
    *,
    data_root: str | Path,
    experts_dir: str | Path,
    epochs: int | None = None,
    precision: str = "fp32",
    batch_size: int = 128,
    accumulation_steps: int = 1,
    num_workers: int = 4,
    finetune_overrides: Mapping[str, Any] | None = None,
    emnist_rotate_flip: bool = False,
    device: str | torch.device = "auto",
    progress: bool = True,
    lock_timeout: float = DEFAULT_WAIT_SECONDS,
) -> dict[str, Any]:
    """Fine-tune one task expert of the 8/14/20-task suites as the released ``finetune.py`` does,
    unless a valid one is cached; return its manifest. If another process is fine-tuning it, wait
    for it (up to ``lock_timeout`` seconds) and load it (:func:`~mergelib.experiments.replication.cached_expert`).

    The recipe is SCORE's and TALL's (AdamW lr 1e-5, wd 0.1, batch 128, 500 warm-up steps, cosine,
    clip 1.0) with the task's released epochs (``TaskDatasetSpec.epochs``; ``epochs``
    overrides), on the TALL *training* part (90 % of train, capped validation), with the frozen
    zero-shot head of the task's templates. The released task code sets no seed; we use the
    recipe's seed 5. Writes ``{experts_dir}/{backbone}/{task}.safetensors``, the layout of
    :func:`mergelib.models.importers.import_directory`, so :func:`replicate_multitask` reads both alike; an
    imported checkpoint already there is never overwritten.
    """
    from mergelib.data.task_suites import TASKS, load_task
    from mergelib.errors import lookup

    spec = lookup(TASKS, "task", task)
    backbone = clip.spec.name
    torch_device = resolve_device(device)
    loaded = load_task(task, data_root, "train", transform=clip.preprocess_train, emnist_rotate_flip=emnist_rotate_flip)
    recipe = paper_recipe(spec.epochs if epochs is None else epochs, precision=precision, batch_size=batch_size,
                          accumulation_steps=accumulation_steps, **dict(finetune_overrides or {}))
    pretrained_id = _pretrained_id({PREFIX + k: v for k, v in clip.model.visual.state_dict().items()})  # no copy
    key = config_hash({"backbone": backbone, "pretrained": pretrained_id, "task": task,
                       "data": task_split_fingerprint(task, loaded.dataset, loaded.classnames),
                       "templates": list(spec.templates), "finetune": recipe.as_dict(),
                       "emnist_rotate_flip": bool(emnist_rotate_flip and task == "EMNIST")})
    path = Path(experts_dir) / backbone / f"{task}.safetensors"
    if path.exists():
        from mergelib.models.importers import load_manifest

        try:
            kind = load_manifest(path).get("kind")
        except CorruptCheckpointError:  # unreadable: cached_state reports it; an older mergelib's import: refused too
            kind = (legacy_manifest(path) or {}).get("kind")
        if kind == "imported_checkpoint":
            raise FileExistsError(f"{path} is an imported checkpoint; fine-tune into another experts_dir, or delete it first")

    def build():
        head = zero_shot_head(clip, loaded.classnames, spec.templates)
        state, losses = finetune_image_encoder(clip, head, loaded.dataset, recipe, device=torch_device,
                                               description=f"fine-tune {task}", progress=progress, num_workers=num_workers)
        return state, {"kind": FINETUNED_TASK_EXPERT, "backbone": backbone, "task": task, "pretrained_id": pretrained_id,
                       "hyperparameters": recipe.as_dict(), "seed": recipe.seed, "n_train": len(loaded.dataset),
                       "emnist_rotate_flip": bool(emnist_rotate_flip), "final_loss": losses[-1] if losses else None,
                       "provenance": provenance({"task": task, "data_root": str(data_root), "finetune": recipe.as_dict()})}

    fits = expect_shapes({PREFIX + k: v.shape for k, v in clip.model.visual.state_dict().items()},
                         f"the {backbone} image encoder")
    return cached_expert(path, key, build, what=f"the {backbone} expert of task {task}", lock_timeout=lock_timeout,
                         check=fits)[1]


def finetune_task_experts(
    backbone: str,
    tasks: int | Sequence[str],
    *,
    data_root: str | Path,
    experts_dir: str | Path,
    weights: str | Path | None = "published",
    device: str = "auto",
    progress: bool = True,
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """:func:`finetune_task_expert` for every task of a suite (8, 14, 20) or list; manifests by task.
    The backbone, the task names and the options are checked before the backbone is loaded."""
    import inspect

    names = check_multitask_run(backbone, tasks, precision=options.get("precision", "fp32"))
    valid = [p for p in inspect.signature(finetune_task_expert).parameters
             if p not in ("clip", "task", "data_root", "experts_dir", "device", "progress")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ParameterValueError(f"unknown options {unknown} for finetune_task_experts; valid: {', '.join(valid)}")
    torch_device = resolve_device(device)
    clip = create_clip(backbone, weights=weights, device=torch_device)
    return {t: finetune_task_expert(clip, t, data_root=data_root, experts_dir=experts_dir, device=torch_device,
                                    progress=progress, **options) for t in names}


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


def replicate_multitask(
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
    provenance_name: str = "provenance.json",
    progress: bool = True,
) -> pd.DataFrame:
    """The 8/14/20-task protocol on imported experts (``experts_dir/{backbone}/{task}.safetensors``
    and ``zeroshot.safetensors``, written by :func:`mergelib.models.importers.import_directory`).

    Per method: merge all experts, choose alpha on the TALL validation splits with the method's
    released rule (:data:`ALPHA_RULES`), evaluate every test split at that alpha. Normalized
    accuracy divides by the published fine-tuned accuracies (``normalize_with="published"``, as
    the papers do; valid only for the public checkpoints of the real backbones) or by the
    imported experts' own accuracies (``"experts"``). Writes
    ``results_dir/{backbone}/multitask/{suite}/{method}.csv`` with every alpha evaluated, the
    per-example correctness of every evaluated model (``correctness.npz``, or
    ``{method}.correctness.npz`` beside ``{method}.provenance.json``) and the
    provenance record as ``provenance_name`` there (the sweep runs one method per job and gives
    each its own record). Experts fine-tuned by :func:`finetune_task_expert` record the pretrained
    weights they started from; evaluating them against other pretrained weights is an error.
    Every name (backbone, tasks, methods and their parameters) and the presence of every expert
    are checked before the backbone is loaded.
    """
    from mergelib.data.task_suites import TASKS, load_task, published_finetuned_accuracy
    from mergelib.models.importers import CheckpointMismatchError, load_imported

    names = check_multitask_run(backbone, tasks, methods=methods, experts_dir=experts_dir, precision=precision,
                                normalize_with=normalize_with)
    specs = method_specs(methods)
    started = git_state()
    suite = f"{len(names)}-tasks"
    torch_device = resolve_device(device)
    clip = create_clip(backbone, weights=weights, device=torch_device)
    folder = Path(experts_dir) / backbone
    zeroshot = folder / "zeroshot.safetensors"
    pretrained = load_imported(zeroshot, backbone)[0] if zeroshot.exists() else encoder_state(clip.model.visual)
    imported = {t: load_imported(folder / f"{t}.safetensors", backbone) for t in names}
    experts = {t: state for t, (state, _) in imported.items()}
    current = _pretrained_id(pretrained)
    foreign = [t for t, (_, manifest) in imported.items() if manifest.get("pretrained_id", current) != current]
    if foreign:
        raise CheckpointMismatchError(
            f"the experts of {foreign} were fine-tuned from other pretrained weights than {weights!r} "
            f"(pretrained id {current}); pass the weights they were fine-tuned from")
    vectors = {t: task_vector(experts[t], pretrained) for t in names}

    data = {}
    for split in ("val", "test"):
        for t in names:
            loaded = load_task(t, data_root, split, transform=clip.preprocess_val, emnist_rotate_flip=emnist_rotate_flip)
            data[split, t] = (loaded.dataset, dataset_labels(loaded.dataset), loaded.classnames)
    heads = {t: zero_shot_head(clip, data["test", t][2], TASKS[t].templates) for t in names}
    evaluator = EncoderEvaluator(clip, device=torch_device, batch_size=eval_batch_size, num_workers=num_workers,
                                 precision=precision)

    if normalize_with == "published":
        reference = {(split, t): published_finetuned_accuracy(backbone, t, split) for split in ("val", "test") for t in names}
    else:
        reference = None  # the experts' own accuracies, evaluated by the protocol

    def esm_subspaces(fold: list[str]) -> dict:
        """ESM's activation subspaces of the fold's experts on their proxy images."""
        from mergelib.models.essential import essential_subspaces

        proxies = {t: torch.stack([data["val", t][0][i][0] for i in range(min(esm_proxy_count, len(data["val", t][0])))])
                   for t in fold}
        return {"subspaces": [essential_subspaces(clip.model.visual, pretrained, vectors[t], proxies[t], device=torch_device)
                              for t in fold]}

    # every method through one grid (the experts' decompositions and the shared basis computed once),
    # its coefficient chosen on validation by the method's released search
    with_subspaces = {spec.label: esm_subspaces for spec in specs if needs_essential_subspaces(spec)}
    collector = CorrectnessCollector(lambda split, t: task_split_fingerprint(t, data[split, t][0], data[split, t][2]),
                                     benchmark=suite)
    merged, baselines = evaluate_multitask(
        evaluator, pretrained, experts if normalize_with == "experts" else None, vectors, heads,
        {t: data["test", t][0] for t in names}, specs, fold_parameters=with_subspaces,
        val_sets={t: data["val", t][0] for t in names},
        searches={spec.label: ALPHA_RULES.get(spec.name, "task_arithmetic") for spec in specs},
        reference_accuracy=reference, labels={(split, t): data[split, t][1] for split in ("val", "test") for t in names},
        progress=progress, on_correct=collector)
    zero = baselines[(baselines["method"] == FINE_TUNED) & (baselines["accuracy"] == 0)]
    if not zero.empty:
        raise ValueError(f"normalized accuracy is undefined: the experts of {list(zero['task'])} have accuracy 0 on "
                         "that split; use normalize_with='published' or larger splits")
    searches = merged.attrs["searches"]
    results = conform(pd.concat([baselines[baselines["method"] == ZERO_SHOT], merged], ignore_index=True),
                      setting=MULTITASK, benchmark=suite, backbone=backbone, tasks=len(names))
    parameters = {"backbone": backbone, "tasks": names, "methods": [s.label for s in specs], "precision": precision,
                  "normalize_with": normalize_with, "emnist_rotate_flip": emnist_rotate_flip,
                  "esm_proxy_count": esm_proxy_count, "experts_dir": str(experts_dir), "data_root": str(data_root)}
    record = provenance(parameters, git=started, seeds={"tall_validation_split": 0}, searches=searches,
                        device=str(torch_device))
    store = Path(results_dir) / backbone / "multitask" / suite
    save_correctness(store / provenance_name.replace("provenance.json", "correctness.npz"), collector.frame(), record)
    write_results(results, store, record, provenance_name=provenance_name)
    return results
