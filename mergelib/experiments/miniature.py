"""The embedded miniature, end to end: data, backbone, heads, experts, and the two protocols.

* :func:`prepare_domain_experts` and :func:`prepare_task_experts` give the tiny CLIP (pretrained
  here), the data and one fine-tuned expert per domain of the domain benchmark or per task of the
  multi-task suite, as an :class:`Experts` bundle that the analyses and notebooks share.
* :func:`evaluate_domain_experts` (SCORE's leave-one-domain-out protocol) and
  :func:`evaluate_task_experts` (the multi-task protocol of TSV, Iso and ESM) evaluate any
  registered methods on them, cached, with results in the schema of
  :mod:`mergelib.protocols.results`; :func:`run_miniature_domain_generalization` is the book's
  first chapter.

Every expensive stage is cached: pretraining and each expert by a hash of everything that
determines them, evaluations by the hash of the experts, data, methods and the code's own
fingerprint, so a second build only reads tables. Results are tidy CSV with provenance.
"""

from __future__ import annotations

import os
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch

from mergelib.models.backbones import BACKBONES, Clip, create_clip
from mergelib.io.checkpoints import cached_state, cached_tables, config_hash, expect_shapes
from mergelib.data import (DEFAULT_DOMAINS, DOMAIN_BENCHMARK_TEMPLATES, DOMAINS, MINI_SUITE_TASKS, ImageSet,
                           check_benchmark_sizes, make_domain_benchmark, make_task)
from mergelib.protocols.domain_generalization import evaluate_leave_one_domain_out
from mergelib.errors import ParameterError, lookup
from mergelib.models.evaluation import EncoderEvaluator
from mergelib.models.finetune import MINIATURE_FINETUNE, FinetuneConfig, finetune_image_encoder
from mergelib.models.heads import ClassificationHead, zero_shot_head
from mergelib.models.essential import subspaces_of_experts
from mergelib.methods import parse_method_spec
from mergelib.methods.common import check_choice, coerce_parameter, resolve_device
from mergelib.methods.esm import needs_essential_subspaces
from mergelib.protocols.multitask import evaluate_multitask
from mergelib.protocols.results import DOMAIN_GENERALIZATION, MULTITASK, CorrectnessCollector, conform
from mergelib.analysis.stats import load_correctness, save_correctness
from mergelib.models.pretrain import PretrainConfig, pretrained_tiny_clip
from mergelib.io.provenance import REPO_ROOT, StageTimer, code_fingerprint, git_state, provenance, write_json
from mergelib.task_vectors import StateDict, encoder_state, task_vector
from mergelib._moved import renamed

__getattr__ = renamed(__name__, {"leave_one_domain_out": "evaluate_domain_experts", "multitask": "evaluate_task_experts",
                                 "run_domain_generalization": "run_miniature_domain_generalization"})


# Every registered method, in the order the book presents them: the baselines, then the subspace methods.
ALL_METHODS = ("weight_average", "task_arithmetic", "ties", "dare", "breadcrumbs", "magmax", "pcb",
               "tsv_m", "iso_c", "iso_cts", "score", "esm")


# A budget small enough for CI (2 cores) yet exercising every stage of the real pipeline: the
# tests and the notebooks' smoke runs use it.
SMOKE_PARAMETERS: dict[str, Any] = dict(
    domains=["photo", "negative", "sketch"], n_train=192, n_test=96, epochs=1, lr=3e-4, warmup_steps=1,
    batch_size=64, pretrain_epochs=1, pretrain_per_domain=300, pretrain_per_task=100,
    pretrain_domains=["photo", "negative"], coefficients=[0.5, 1.0], task_n_train=128, task_n_val=32, task_n_test=64,
    task_epochs=1,
)


def default_cache_dir() -> Path:
    """``$MERGELIB_CACHE``, else ``~/.cache/mergelib``."""
    return Path(os.environ.get("MERGELIB_CACHE") or Path.home() / ".cache" / "mergelib")


@dataclass(frozen=True)
class MiniatureConfig:
    """Parameters of a miniature run; the notebooks' papermill parameters map onto these fields."""

    backbone: str = "tiny-clip"
    domains: tuple[str, ...] = DEFAULT_DOMAINS
    seed: int = 0  # the data's draw; the pretraining and fine-tuning seeds are offset by it
    finetune_seed: int = MINIATURE_FINETUNE.seed  # fine-tuning's initial state and data order (plus seed)
    pretrain_seed: int = 0  # the tiny CLIP's pretraining (plus seed)
    epochs: int = 3
    methods: tuple[str, ...] = ALL_METHODS  # specs: "score" or "score[keep=diagonal]"; evaluated at lambda = 1
    sweep_methods: tuple[str, ...] = ("weight_average", "task_arithmetic")  # also evaluated at every coefficient
    coefficients: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
    n_train: int = 4000
    n_test: int = 2500  # the same garments in every domain; up to 7500 (see MAX_TEST_PER_DOMAIN)
    lr: float = MINIATURE_FINETUNE.lr
    batch_size: int = MINIATURE_FINETUNE.batch_size
    warmup_steps: int = MINIATURE_FINETUNE.warmup_steps
    pretrain_epochs: int = 3
    pretrain_per_domain: int = 6000
    pretrain_per_task: int = 1000
    pretrain_domains: tuple[str, ...] = ("photo", "negative", "texture")
    fine_caption_fraction: float = PretrainConfig.fine_caption_fraction
    esm_proxy_count: int = 32  # proxy images per expert for ESM's essential subspaces (its own domain)
    tasks: tuple[str, ...] = ("fashion", "digits", "animals", "textures")  # the multi-task suite
    task_n_train: int = 2000
    task_epochs: int = 5  # the task experts need a stronger recipe: pretraining already saw these tasks
    task_lr: float = 1e-3
    task_n_val: int = 100  # drawn from the task's test pool, disjoint from its test images
    task_n_test: int = 400
    device: str = "auto"
    cache_dir: str = ""  # "" means default_cache_dir()

    @classmethod
    def from_parameters(cls, **params: Any) -> "MiniatureConfig":
        """Build a config from loosely typed values (papermill, YAML), checking every one.

        Values are coerced as the notebooks' parameters are
        (:func:`mergelib.methods.common.coerce_parameter`): lists become tuples, a single
        value given for a list is a one-element list, ints are accepted for floats; anything else
        of the wrong type, an unknown parameter, or an unknown backbone, domain or method name
        raises a clear error.
        """
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ParameterError(f"unknown parameter(s) {unknown}; valid parameters: {', '.join(sorted(known))}")
        values = {name: coerce_parameter(name, value, hints[name]) for name, value in params.items()}
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        lookup(BACKBONES, "backbone", self.backbone)
        for domain in (*self.domains, *self.pretrain_domains):
            lookup(DOMAINS, "domain", domain)
        for method in (*self.methods, *self.sweep_methods):
            parse_method_spec(method)
        missing = [m for m in self.sweep_methods if m not in self.methods]
        if missing:
            raise ParameterError(f"sweep_methods {missing} must also be listed in 'methods'")
        for task in self.tasks:
            lookup(MINI_SUITE_TASKS, "task", task)
        if len(self.domains) < 2:
            raise ParameterError("parameter 'domains' needs at least two domains for leave-one-domain-out")
        for name in ("epochs", "n_train", "n_test", "batch_size", "pretrain_epochs", "pretrain_per_domain",
                     "task_n_train", "task_n_val", "task_n_test", "esm_proxy_count", "task_epochs"):
            if getattr(self, name) < 1:
                raise ParameterError(f"parameter {name!r} must be at least 1, got {getattr(self, name)}")
        try:
            check_benchmark_sizes(self.n_train, self.n_test)
        except ValueError as error:
            raise ParameterError(f"parameter {str(error)}") from None

    @property
    def finetune(self) -> FinetuneConfig:
        return replace(MINIATURE_FINETUNE, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                       warmup_steps=self.warmup_steps, seed=self.finetune_seed + self.seed)

    @property
    def task_finetune(self) -> FinetuneConfig:
        """Recipe of the task experts, which is the domain experts' one with ``task_epochs`` and ``task_lr``."""
        return replace(self.finetune, epochs=self.task_epochs, lr=self.task_lr)

    @property
    def pretrain(self) -> PretrainConfig:
        return PretrainConfig(pool_domains=self.pretrain_domains, n_per_domain=self.pretrain_per_domain,
                              n_per_task=self.pretrain_per_task, epochs=self.pretrain_epochs,
                              fine_caption_fraction=self.fine_caption_fraction, seed=self.pretrain_seed + self.seed)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Backbone:
    """A loaded backbone with the key that identifies its pretrained weights (for caches)."""

    clip: Clip
    key: str
    manifest: dict = field(default_factory=dict)


def load_backbone(config: MiniatureConfig, cache_dir: Path, device: torch.device, progress: bool = True) -> Backbone:
    spec = lookup(BACKBONES, "backbone", config.backbone)
    if spec.pretrained_tag is None:
        clip, manifest = pretrained_tiny_clip(config.pretrain, cache_dir, device=device, progress=progress)
        return Backbone(clip, manifest["key"], manifest)
    clip = create_clip(config.backbone, weights="published", device=device)
    return Backbone(clip, config_hash({"open_clip": spec.open_clip_name, "tag": spec.pretrained_tag}))


def expert_state(
    backbone: Backbone,
    head: ClassificationHead,
    train: ImageSet,
    finetune: FinetuneConfig,
    cache_dir: Path,
    *,
    dataset: str,
    domain: str,
    templates: tuple[str, ...],
    device: torch.device,
    progress: bool = True,
) -> tuple[StateDict, dict]:
    """The fine-tuned image encoder of one domain (or task), from the cache or trained now."""
    spec = backbone.clip.spec
    key = config_hash({
        "backbone": spec.name, "pretrained": backbone.key, "dataset": dataset, "domain": domain,
        "data": train.fingerprint(), "templates": list(templates), "finetune": finetune.as_dict(),
    })
    path = cache_dir / "experts" / spec.name / dataset / f"{domain}-{key[:16]}.safetensors"

    def build():
        state, losses = finetune_image_encoder(backbone.clip, head, train, finetune, device=device,
                                               description=f"fine-tune {domain}", progress=progress)
        return state, {"backbone": spec.name, "dataset": dataset, "domain": domain, "n_train": len(train),
                       "hyperparameters": finetune.as_dict(), "seed": finetune.seed,
                       "losses": [round(x, 5) for x in losses]}

    # tensors that do not fit the image encoder (an edited architecture, same key) are rebuilt
    fits = expect_shapes({f"visual.{k}": v.shape for k, v in backbone.clip.model.visual.state_dict().items()},
                         f"the {spec.name} image encoder")
    return cached_state(path, key, build, check=fits)


@dataclass
class Experts:
    """A pretrained backbone and its fine-tuned experts, with the data they were trained and are
    evaluated on: one expert per domain of the domain benchmark, or per task of the suite."""

    config: MiniatureConfig
    backbone: Backbone
    kind: str  # "domains" or "tasks"
    names: tuple[str, ...]
    train: dict[str, ImageSet]
    test: dict[str, ImageSet]
    heads: dict[str, ClassificationHead]  # the frozen zero-shot head of each domain or task
    val: dict[str, ImageSet]  # validation sets (the task suite's; empty for domains, where none exists)
    pretrained: StateDict
    experts: dict[str, StateDict]
    task_vectors: dict[str, StateDict]
    manifests: dict[str, dict]
    data_fingerprint: str
    timings: dict[str, float]

    @property
    def clip(self) -> Clip:
        return self.backbone.clip

    def stack(self, key: str, names: Sequence[str] | None = None) -> torch.Tensor:
        """The task vectors of ``key`` as a ``[T, *shape]`` float32 stack (all names by default)."""
        return torch.stack([self.task_vectors[n][key].float() for n in (names or self.names)])

    def result_key(self) -> dict[str, Any]:
        """What any evaluation of these experts depends on (for result caches)."""
        return {"pretrained": self.backbone.key, "data": self.data_fingerprint, "code": code_fingerprint(),
                "experts": {n: m.get("sha256") for n, m in self.manifests.items()}}


def _cache_dir(config: MiniatureConfig) -> Path:
    return Path(config.cache_dir) if config.cache_dir else default_cache_dir()


def _fine_tune_all(
    config: MiniatureConfig, backbone: Backbone, recipe: FinetuneConfig, names: Sequence[str], train: Mapping[str, ImageSet],
    heads: Mapping[str, ClassificationHead], templates: Mapping[str, tuple[str, ...]], dataset: Mapping[str, str],
    device: torch.device, progress: bool,
) -> tuple[dict[str, StateDict], dict[str, dict]]:
    experts, manifests = {}, {}
    for name in names:
        experts[name], manifests[name] = expert_state(
            backbone, heads[name], train[name], recipe, _cache_dir(config), dataset=dataset[name],
            domain=name, templates=templates[name], device=device, progress=progress)
    return experts, manifests


def prepare_domain_experts(config: MiniatureConfig = MiniatureConfig(), *, progress: bool = True) -> Experts:
    """The miniature's domain benchmark, backbone, zero-shot head and one expert per domain
    (pretrained and fine-tuned now, or loaded from the cache)."""
    config.validate()
    timer = StageTimer(verbose=progress)
    device = resolve_device(config.device)
    with timer.stage("data"):
        benchmark = make_domain_benchmark(config.domains, n_train=config.n_train, n_test=config.n_test, seed=config.seed)
    with timer.stage("backbone (pretrain or load)"):
        backbone = load_backbone(config, _cache_dir(config), device, progress)
    with timer.stage("zero-shot head"):
        templates = tuple(DOMAIN_BENCHMARK_TEMPLATES)
        head = zero_shot_head(backbone.clip, benchmark.classnames, templates)
    names = tuple(config.domains)
    with timer.stage("fine-tune experts"):
        experts, manifests = _fine_tune_all(
            config, backbone, config.finetune, names, benchmark.train, {d: head for d in names}, {d: templates for d in names},
            {d: benchmark.name for d in names}, device, progress)
    pretrained = encoder_state(backbone.clip.model.visual)
    return Experts(config, backbone, "domains", names, dict(benchmark.train), dict(benchmark.test),
                   {d: head for d in names}, {}, pretrained, experts,
                   {d: task_vector(state, pretrained) for d, state in experts.items()}, manifests,
                   benchmark.fingerprint(), dict(timer.seconds))


def prepare_task_experts(config: MiniatureConfig = MiniatureConfig(), *, progress: bool = True) -> Experts:
    """The miniature's multi-task suite (``config.tasks``), each task with its own zero-shot head
    from its templates, and one expert per task, from the same pretrained backbone."""
    config.validate()
    timer = StageTimer(verbose=progress)
    device = resolve_device(config.device)
    names = tuple(config.tasks)
    with timer.stage("data"):
        splits = {}
        for t in names:
            train, pool = make_task(t, n_train=config.task_n_train, n_test=config.task_n_val + config.task_n_test, seed=config.seed)
            if len(pool) < config.task_n_val + 1:
                raise ParameterError(f"task {t!r} has only {len(pool)} test images; task_n_val must be smaller")
            val = ImageSet(pool.images[: config.task_n_val], pool.labels[: config.task_n_val], pool.classnames, f"{pool.name}/val")
            test = ImageSet(pool.images[config.task_n_val:], pool.labels[config.task_n_val:], pool.classnames, pool.name)
            splits[t] = (train, val, test)
    with timer.stage("backbone (pretrain or load)"):
        backbone = load_backbone(config, _cache_dir(config), device, progress)
    with timer.stage("zero-shot heads"):
        templates = {t: tuple(MINI_SUITE_TASKS[t].caption_templates) for t in names}
        heads = {t: zero_shot_head(backbone.clip, splits[t][0].classnames, templates[t]) for t in names}
    train = {t: splits[t][0] for t in names}
    with timer.stage("fine-tune experts"):
        experts, manifests = _fine_tune_all(config, backbone, config.task_finetune, names, train, heads, templates,
                                            {t: f"suite-{t}" for t in names}, device, progress)
    pretrained = encoder_state(backbone.clip.model.visual)
    fingerprint = config_hash({t: [part.fingerprint() for part in splits[t]] for t in names})
    return Experts(config, backbone, "tasks", names, train, {t: splits[t][2] for t in names}, heads,
                   {t: splits[t][1] for t in names}, pretrained, experts, {t: task_vector(state, pretrained) for t, state in experts.items()}, manifests,
                   fingerprint, dict(timer.seconds))


PROXY_SOURCES = ("own", "others")


def proxy_subspaces(
    prepared: Experts, *, count: int = 32, seed: int = 0, source: str = "own", names: Sequence[str] | None = None
) -> dict[str, dict]:
    """ESM's essential subspaces of each expert, from ``count`` proxy images drawn with ``seed``.

    ``source="own"``: the expert's own training images (in distribution; never a held-out
    domain's). ``"others"``: the other experts' training images pooled (out of distribution for
    this expert, the miniature's counterpart of ESM's ImageNet proxies).
    """
    check_choice("source", source, PROXY_SOURCES)
    names = tuple(names or prepared.names)
    pools = {n: prepared.train[n].images if source == "own"
             else torch.cat([prepared.train[o].images for o in prepared.names if o != n]) for n in names}
    return subspaces_of_experts(prepared.clip, prepared.pretrained, {n: prepared.task_vectors[n] for n in names},
                                pools, count=count, seed=seed, device=resolve_device(prepared.config.device))


def esm_fold_parameters(subspaces: Mapping[str, dict]) -> dict[str, Any]:
    """``fold_parameters`` for the protocols: ESM receives the subspaces of exactly the merged experts."""
    return {"esm": lambda sources: {"subspaces": [subspaces[s] for s in sources]}}


def _correctness_path(prepared: Experts, key: Mapping[str, Any]) -> Path:
    return _cache_dir(prepared.config) / "results" / f"{config_hash(key)[:20]}-correct.npz"


def _cached_protocol(
    prepared: Experts, protocol: str, methods: Sequence[str], coefficients: Sequence[float] | Mapping[str, Sequence[float]],
    esm_proxy_count: int | None, esm_proxy_source: str, evaluate: Callable[..., tuple[pd.DataFrame, ...]],
    with_correctness: bool,
) -> tuple[pd.DataFrame, ...]:
    """Run ``evaluate(evaluator, per_method, fold_parameters, on_correct)`` cached by everything a
    protocol's tables depend on: the experts, data and code (:meth:`Experts.result_key`), the
    methods and their coefficients, and ESM's proxy images when a method needs them. Beside the
    tables, which test examples each model got right is cached (``-correct.npz``,
    :func:`mergelib.analysis.stats.save_correctness`); ``with_correctness`` appends that table."""
    config = prepared.config
    count = config.esm_proxy_count if esm_proxy_count is None else esm_proxy_count
    per_method = {m: tuple(coefficients[m] if isinstance(coefficients, Mapping) else coefficients) for m in methods}
    key = {"protocol": protocol, **prepared.result_key(), "methods": per_method,
           "esm_proxies": [count, esm_proxy_source, config.seed] if any(map(needs_essential_subspaces, methods)) else None}
    correctness_path = _correctness_path(prepared, key)
    test_sets = {**{("test", n): s for n, s in prepared.test.items()}, **{("val", n): s for n, s in prepared.val.items()}}

    def compute():
        fold = {}
        if key["esm_proxies"]:
            fold = esm_fold_parameters(proxy_subspaces(prepared, count=count, seed=config.seed, source=esm_proxy_source))
        evaluator = EncoderEvaluator(prepared.clip, device=resolve_device(config.device))
        collector = CorrectnessCollector(lambda split, name: test_sets[split, name].fingerprint())
        tables = evaluate(evaluator, per_method, fold, collector)
        # written before the tables, whose manifest marks the cache entry complete
        save_correctness(correctness_path, collector.frame(), {"key": key, "code": code_fingerprint()})
        return tables

    tables = cached_tables(_cache_dir(config) / "results", key, compute)
    if not with_correctness:
        return tables
    if not correctness_path.exists():  # an entry from before the store: evaluate again
        raise FileNotFoundError(f"{correctness_path} is missing; delete {_cache_dir(config) / 'results'} to rebuild it")
    return (*tables, load_correctness(correctness_path)[0])


def _in_schema(prepared: Experts, setting: str, tables: Sequence[pd.DataFrame], count: int) -> tuple[pd.DataFrame, ...]:
    """The first ``count`` tables in the result schema, the others as they are."""
    benchmark = "fashion-domains" if setting == DOMAIN_GENERALIZATION else "mini-suite"
    return tuple(conform(table, setting=setting, benchmark=benchmark, backbone=prepared.config.backbone,
                         seed=prepared.config.seed) if i < count else table for i, table in enumerate(tables))


def evaluate_domain_experts(
    prepared: Experts, methods: Sequence[str], coefficients: Sequence[float] | Mapping[str, Sequence[float]] = (1.0,),
    *, esm_proxy_count: int | None = None, esm_proxy_source: str = "own", progress: bool = True,
    with_correctness: bool = False,
) -> tuple[pd.DataFrame, ...]:
    """SCORE's leave-one-domain-out protocol on prepared domain experts, cached by everything it
    depends on (experts, data, methods, coefficients, proxies, code): the results (in the schema
    of :mod:`mergelib.protocols.results`) and the expert matrix, and with ``with_correctness``
    the per-example correctness table of every single model (for :mod:`mergelib.analysis.stats`)."""

    def evaluate(evaluator, per_method, fold, on_correct):
        return evaluate_leave_one_domain_out(evaluator, prepared.pretrained, prepared.experts, prepared.task_vectors,
                                             prepared.heads[prepared.names[0]], prepared.test, methods, per_method,
                                             fold_parameters=fold, progress=progress, on_correct=on_correct)

    tables = _cached_protocol(prepared, "leave-one-domain-out", methods, coefficients, esm_proxy_count, esm_proxy_source,
                              evaluate, with_correctness)
    return _in_schema(prepared, DOMAIN_GENERALIZATION, tables, 1)


def evaluate_task_experts(
    prepared: Experts, methods: Sequence[str], coefficients: Sequence[float] | Mapping[str, Sequence[float]] = (1.0,),
    *, esm_proxy_count: int | None = None, esm_proxy_source: str = "own", progress: bool = True,
    with_correctness: bool = False,
) -> tuple[pd.DataFrame, ...]:
    """The multi-task protocol (all task experts merged, evaluated on every task with its head),
    cached like :func:`evaluate_domain_experts`: the results and the reference rows (zero-shot and
    own experts), both in the result schema, and with ``with_correctness`` the correctness table."""

    def evaluate(evaluator, per_method, fold, on_correct):
        return evaluate_multitask(evaluator, prepared.pretrained, prepared.experts, prepared.task_vectors,
                                  prepared.heads, prepared.test, methods, per_method, fold_parameters=fold,
                                  val_sets=prepared.val or None, progress=progress, on_correct=on_correct)

    tables = _cached_protocol(prepared, "multi-task", methods, coefficients, esm_proxy_count, esm_proxy_source, evaluate,
                              with_correctness)
    return _in_schema(prepared, MULTITASK, tables, 2)


@dataclass
class MiniatureRun:
    config: MiniatureConfig
    results: pd.DataFrame
    expert_matrix: pd.DataFrame
    pretrain_manifest: dict
    expert_manifests: dict[str, dict]
    timings: dict[str, float]
    provenance: dict
    results_dir: Path | None
    correctness: pd.DataFrame | None = None


def run_miniature_domain_generalization(
    config: MiniatureConfig = MiniatureConfig(),
    *,
    results_dir: Path | None = REPO_ROOT / "results" / "miniature" / "domain_generalization",
    progress: bool = True,
) -> MiniatureRun:
    """Run the miniature leave-one-domain-out experiment; write and return its results.

    Writes ``results.csv`` (the result schema), ``expert_matrix.csv``, ``correctness.npz`` (which
    test images each model got right, :func:`mergelib.analysis.stats.load_correctness`) and
    ``provenance.json`` to ``results_dir``."""
    config.validate()
    started_at = git_state()
    prepared = prepare_domain_experts(config, progress=progress)
    timer = StageTimer(verbose=progress)
    timer.seconds.update(prepared.timings)
    coefficients = {m: (config.coefficients if m in config.sweep_methods else (1.0,)) for m in config.methods}
    with timer.stage("evaluate (leave-one-domain-out)"):
        results, matrix, correctness = evaluate_domain_experts(prepared, config.methods, coefficients,
                                                               progress=progress, with_correctness=True)
    matrix.insert(0, "backbone", config.backbone)
    matrix.insert(0, "benchmark", "fashion-domains")
    matrix["seed"] = config.seed
    record = provenance(
        config.as_dict(),
        git=started_at,
        seeds={"data": config.seed, "pretrain": config.pretrain.seed, "finetune": config.finetune.seed},
        pretrained_key=prepared.backbone.key,
        experts={d: {"file": m.get("file"), "sha256": m.get("sha256")} for d, m in prepared.manifests.items()},
        benchmark_fingerprint=prepared.data_fingerprint,
        timings_seconds={k: round(v, 2) for k, v in timer.seconds.items()},
    )
    if results_dir is not None:
        results_dir = Path(results_dir)
        results_dir.mkdir(parents=True, exist_ok=True)
        results.to_csv(results_dir / "results.csv", index=False)
        matrix.to_csv(results_dir / "expert_matrix.csv", index=False)
        save_correctness(results_dir / "correctness.npz", correctness, record)
        write_json(results_dir / "provenance.json", record)
    return MiniatureRun(config, results, matrix, prepared.backbone.manifest, prepared.manifests, dict(timer.seconds),
                        record, results_dir, correctness)


# The recipe variants behind the miniature's defaults (see the first chapter). Each is a set of
# overrides of MiniatureConfig; "default" is the configuration the book runs.
RECIPE_VARIANTS: dict[str, dict[str, Any]] = {
    "fine captions, lr 3e-4, 2000/domain": dict(fine_caption_fraction=1.0, lr=3e-4, n_train=2000),
    "fine captions, lr 3e-5, 2000/domain": dict(fine_caption_fraction=1.0, lr=3e-5, n_train=2000),
    "fine captions, 1 pretraining epoch, lr 1e-4": dict(fine_caption_fraction=1.0, pretrain_epochs=1, lr=1e-4, n_train=2000),
    "coarse captions only, lr 1e-4, 2000/domain": dict(fine_caption_fraction=0.0, lr=1e-4, n_train=2000),
    "10 % fine captions, lr 1e-4, 2000/domain": dict(fine_caption_fraction=0.1, lr=1e-4, n_train=2000),
    "25 % fine captions, lr 1e-4, 2000/domain": dict(fine_caption_fraction=0.25, lr=1e-4, n_train=2000),
    "default: 25 % fine captions, lr 1e-4, 4000/domain": {},
}
STUDY_DIR = REPO_ROOT / "results" / "studies" / "miniature_recipe"


def run_recipe_study(
    base: MiniatureConfig = MiniatureConfig(methods=("weight_average",), sweep_methods=(), coefficients=(1.0,)),
    variants: dict[str, dict[str, Any]] = RECIPE_VARIANTS,
    *,
    results_dir: Path | None = STUDY_DIR,
    progress: bool = True,
) -> pd.DataFrame:
    """Run the leave-one-domain-out experiment for each recipe variant; return the tidy results."""
    frames, configs, started_at = [], {}, git_state()
    for name, overrides in variants.items():
        config = replace(base, **overrides)
        if progress:
            print(f"[mergelib] recipe variant: {name}", flush=True)
        run = run_miniature_domain_generalization(config, results_dir=None, progress=progress)
        frames.append(run.results.assign(variant=name))
        configs[name] = config.as_dict()
    results = pd.concat(frames, ignore_index=True)
    if results_dir is not None:
        Path(results_dir).mkdir(parents=True, exist_ok=True)
        results.to_csv(Path(results_dir) / "results.csv", index=False)
        write_json(Path(results_dir) / "provenance.json", provenance(base.as_dict(), git=started_at, variants=configs))
    return results
