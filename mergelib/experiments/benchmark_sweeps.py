"""The papers' benchmarks as sweeps: fine-tuning and merge/evaluation jobs for :mod:`mergelib.experiments.sweep`.

Job kinds (registered on import; submitit workers import this module):

* ``dg-finetune``: one expert of SCORE's leave-one-domain-out benchmark, per (backbone, dataset,
  domain), with :meth:`mergelib.experiments.replication.DGExperiment.finetune_expert`;
* ``dg-fold``: one held-out domain, after every expert of its (backbone, dataset) is done: the
  merges of the other domains' experts and the baselines, with :meth:`mergelib.experiments.replication.DGExperiment.evaluate`;
* ``dg-collect``: per (backbone, dataset), after its folds: the result store that
  :func:`mergelib.experiments.replication.replicate_domain_generalization` writes (one CSV per method,
  ``matrix.csv``, ``provenance.json``), which the book's results chapter reads;
* ``mt-finetune``: one task expert of the 8/14/20-task suites, per (backbone, task), with
  :func:`mergelib.experiments.replication.finetune_task_expert` (skipped when the experts are imported);
* ``mt-merge``: one method on one suite, per (backbone, method): merge, choose alpha on the
  validation splits and evaluate, with :func:`mergelib.experiments.replication.replicate_multitask`.

The jobs run the same functions as the one-process commands (``replicate-dg``,
``replicate-multitask``) with the same cache keys, so a sweep and a direct run share experts and
give the same numbers (the tests check it). :func:`dg_sweep` and :func:`multitask_sweep` plan
the jobs and their dependencies; ``mergelib sweep dg|multitask`` runs them through submitit
(SLURM on a cluster, subprocesses here) and resumes a killed sweep without redoing finished jobs.
The fine-tuning jobs take the expert's lock like the one-process commands
(:func:`mergelib.experiments.replication.cached_expert`), so an expert that a ``replicate-*`` run or another
sweep is fine-tuning is waited for and loaded, never trained twice at once.

Not from a paper: this is infrastructure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from mergelib.io.checkpoints import atomic_write
from mergelib.errors import ParameterValueError
from mergelib.experiments.sweep import Job, check_job_params, plan_sweep, register_job_kind
from mergelib.analysis.stats import load_correctness, save_correctness

#: Options of the leave-one-domain-out jobs (keyword arguments of prepare_dg_experiment).
DG_OPTIONS = ("weights", "device", "precision", "epochs", "batch_size", "accumulation_steps", "num_workers",
              "eval_batch_size", "esm_proxy_count", "finetune_overrides", "loader_options")
#: Options of the task fine-tuning jobs (keyword arguments of finetune_task_expert, with weights).
MT_FINETUNE_OPTIONS = ("weights", "device", "precision", "epochs", "batch_size", "accumulation_steps", "num_workers",
                       "finetune_overrides", "emnist_rotate_flip")
#: Options of the multi-task merge jobs (keyword arguments of replicate_multitask).
MT_MERGE_OPTIONS = ("weights", "device", "precision", "eval_batch_size", "num_workers", "esm_proxy_count",
                    "emnist_rotate_flip", "normalize_with")


def _options(params: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {k: params[k] for k in names if k in params}


def _portable(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as JSON job parameters: paths as absolute strings (workers may start elsewhere)."""
    out = dict(options)
    weights = out.get("weights")
    if isinstance(weights, Path) or (isinstance(weights, str) and Path(weights).is_file()):
        out["weights"] = str(Path(weights).resolve())
    return out


# --------------------------------------------------------------------- domain generalization

_DG_BASE = ("backbone", "dataset", "data_root", "checkpoint_dir")


def _experiment(params: Mapping[str, Any], domains: Sequence[str] | None):
    from mergelib.experiments.replication import prepare_dg_experiment

    return prepare_dg_experiment(params["backbone"], params["dataset"], data_root=params["data_root"],
                                 checkpoint_dir=params["checkpoint_dir"], domains=domains, **_options(params, DG_OPTIONS))


@register_job_kind("dg-finetune")
def dg_finetune_job(params: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Fine-tune (or find cached) the expert of ``params["domain"]``; outputs its file and hash."""
    check_job_params("dg-finetune", params, (*_DG_BASE, "domain"), DG_OPTIONS)
    experiment = _experiment(params, [params["domain"]])
    manifest = experiment.finetune_expert(params["domain"], progress=False)
    return {"expert": str(experiment.expert_path(params["domain"]).resolve()), "sha256": manifest["sha256"],
            "n_train": manifest.get("n_train"), "final_loss": manifest.get("final_loss")}


@register_job_kind("dg-fold")
def dg_fold_job(params: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Evaluate held-out domain ``params["held_out"]`` (merges of the other ``domains``' experts
    with ``methods``, and the baselines); writes ``results.csv`` and ``matrix.csv``."""
    check_job_params("dg-fold", params, (*_DG_BASE, "domains", "held_out", "methods"), DG_OPTIONS)
    experiment = _experiment(params, params["domains"])
    results, matrix, timings, correctness = experiment.evaluate(params["methods"], held_out=[params["held_out"]],
                                                                progress=False)
    paths = {name: Path(workdir) / f"{name}.csv" for name in ("results", "matrix")}
    for name, table in (("results", results), ("matrix", matrix)):
        atomic_write(paths[name], lambda tmp, t=table: t.to_csv(tmp, index=False))
    save_correctness(Path(workdir) / "correctness.npz", correctness, {"job": "dg-fold", "params": params})
    return {"results": str(paths["results"].resolve()), "matrix": str(paths["matrix"].resolve()),
            "correctness": str((Path(workdir) / "correctness.npz").resolve()),
            "value": results.set_index("method")["value"].to_dict(), "timings": timings}


@register_job_kind("dg-collect")
def dg_collect_job(params: dict[str, Any], workdir: Path, *, inputs: Mapping[str, dict]) -> dict[str, Any]:
    """Write the result store of one (backbone, dataset) from its fold jobs, in the layout and
    row order of :func:`mergelib.experiments.replication.replicate_domain_generalization`."""
    from mergelib.io.provenance import git_state

    check_job_params("dg-collect", params, (*_DG_BASE, "domains", "methods", "results_dir"), DG_OPTIONS)
    experiment = _experiment(params, params["domains"])
    folds = {r["params"]["held_out"]: r for r in inputs.values() if r["kind"] == "dg-fold"}
    missing = [d for d in experiment.domains if d not in folds]
    if missing:
        raise ParameterValueError(f"dg-collect job: no fold results for held-out domains {missing}")
    experts = {r["params"]["domain"]: r["outputs"]["sha256"] for r in inputs.values() if r["kind"] == "dg-finetune"}
    results = pd.concat([pd.read_csv(folds[d]["outputs"]["results"]) for d in experiment.domains], ignore_index=True)
    matrix = pd.concat([pd.read_csv(folds[d]["outputs"]["matrix"]) for d in experiment.domains], ignore_index=True)
    order = {d: i for i, d in enumerate(experiment.domains)}
    matrix = (matrix.assign(_e=matrix["expert"].map(order), _d=matrix["domain"].map(order))
              .sort_values(["_e", "_d"], kind="stable").drop(columns=["_e", "_d"]).reset_index(drop=True))
    timings: dict[str, float] = {}
    for record in inputs.values():
        for stage, seconds in (record["outputs"].get("timings") or {}).items():
            timings[stage] = timings.get(stage, 0.0) + seconds
    stored = [folds[d]["outputs"].get("correctness") for d in experiment.domains]  # absent: a fold of mergelib < 0.2
    correctness = (pd.concat([load_correctness(path)[0] for path in stored], ignore_index=True)
                   if all(stored) else None)
    out = experiment.store(results, matrix, params["results_dir"], methods=params["methods"], git=git_state(),
                           timings=timings, experts=experts, correctness=correctness)
    means = results.groupby("method", sort=False)["value"].mean()
    return {"store": str(out.resolve()), "mean_value": means.to_dict(), "n_folds": len(folds)}


def dg_sweep(
    backbones: Sequence[str],
    datasets: Sequence[str],
    *,
    data_root: str | Path,
    checkpoint_dir: str | Path,
    results_dir: str | Path,
    methods: Sequence[str] | None = None,
    domains: Mapping[str, Sequence[str]] | None = None,
    **options: Any,
) -> list[Job]:
    """The jobs of SCORE's benchmark over ``backbones x datasets``: a ``dg-finetune`` per domain,
    a ``dg-fold`` per held-out domain (after all fine-tunes of its backbone and dataset) and a
    ``dg-collect`` per (backbone, dataset). ``domains`` restricts a dataset's domains
    (``{"PACS": ["photo", "sketch", ...]}``); ``options`` are :data:`DG_OPTIONS`. Paths are made
    absolute (workers may start elsewhere). Every name (backbones, datasets, domains, methods and
    their parameters, options) is checked before any job is planned."""
    from mergelib.data.dg_datasets import get_dg_dataset
    from mergelib.models.evaluation import check_precision_name
    from mergelib.experiments.replication import PAPER_DG_METHODS, check_backbones, dg_domains, method_specs

    unknown = sorted(set(options) - set(DG_OPTIONS))
    if unknown:
        raise ParameterValueError(f"unknown options {unknown} for the domain-generalization sweep; valid: {', '.join(DG_OPTIONS)}")
    backbones = check_backbones(backbones)
    datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    stray = sorted(set(domains or {}) - set(datasets))
    if stray:
        raise ParameterValueError(f"domains are given for {stray}, which are not among the sweep's datasets {datasets}")
    methods = [spec.label for spec in method_specs(methods or PAPER_DG_METHODS)]
    check_precision_name(options.get("precision", "fp32"))
    chosen_domains = {dataset: dg_domains(dataset, (domains or {}).get(dataset) or None) for dataset in datasets}
    options = _portable(options)
    jobs: list[Job] = []
    for dataset in datasets:
        spec = get_dg_dataset(dataset)
        chosen = chosen_domains[dataset]
        for backbone in backbones:
            base = {"backbone": backbone, "dataset": spec.name, "data_root": str(Path(data_root).resolve()),
                    "checkpoint_dir": str(Path(checkpoint_dir).resolve()), **options}
            experts = [Job("dg-finetune", {**base, "domain": d}) for d in chosen]
            folds = [Job("dg-fold", {**base, "domains": chosen, "held_out": d, "methods": methods}, tuple(experts))
                     for d in chosen]
            collect = Job("dg-collect", {**base, "domains": chosen, "methods": methods,
                                         "results_dir": str(Path(results_dir).resolve())}, (*experts, *folds))
            jobs += [*experts, *folds, collect]
    return plan_sweep(jobs)


# --------------------------------------------------------------------------- multi-task

@register_job_kind("mt-finetune")
def mt_finetune_job(params: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Fine-tune (or find cached) task ``params["task"]``'s expert into the experts folder."""
    from mergelib.models.backbones import create_clip
    from mergelib.methods.common import resolve_device
    from mergelib.experiments.replication import finetune_task_expert

    check_job_params("mt-finetune", params, ("backbone", "task", "data_root", "experts_dir"), MT_FINETUNE_OPTIONS)
    options = _options(params, MT_FINETUNE_OPTIONS)
    device = resolve_device(options.pop("device", "auto"))
    clip = create_clip(params["backbone"], weights=options.pop("weights", "published"), device=device)
    manifest = finetune_task_expert(clip, params["task"], data_root=params["data_root"], experts_dir=params["experts_dir"],
                                    device=device, progress=False, **options)
    path = Path(params["experts_dir"]) / params["backbone"] / f"{params['task']}.safetensors"
    return {"expert": str(path.resolve()), "sha256": manifest["sha256"], "n_train": manifest.get("n_train"),
            "final_loss": manifest.get("final_loss")}


@register_job_kind("mt-merge")
def mt_merge_job(params: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """One method on one suite with its released alpha rule; writes ``{method}.csv`` and
    ``{method}.provenance.json`` into the result store."""
    from mergelib.experiments.replication import method_file_name, replicate_multitask

    check_job_params("mt-merge", params, ("backbone", "tasks", "method", "data_root", "experts_dir", "results_dir"),
                MT_MERGE_OPTIONS)
    label = params["method"]
    results = replicate_multitask(params["backbone"], params["tasks"], data_root=params["data_root"],
                            experts_dir=params["experts_dir"], results_dir=params["results_dir"], methods=[label],
                            provenance_name=f"{method_file_name(label)}.provenance.json", progress=False,
                            **_options(params, MT_MERGE_OPTIONS))
    test = results[(results["split"] == "test") & (results["method"] == label)]
    return {"coefficient": float(test["coefficient"].iloc[0]), "absolute": float(test["accuracy"].mean()),
            "normalized": float(test["normalized_accuracy"].mean()), "tasks": len(test)}


def multitask_sweep(
    backbones: Sequence[str],
    tasks: int | Sequence[str],
    *,
    data_root: str | Path,
    experts_dir: str | Path,
    results_dir: str | Path,
    methods: Sequence[str] | None = None,
    finetune: bool = True,
    **options: Any,
) -> list[Job]:
    """The jobs of the 8/14/20-task benchmark: with ``finetune``, an ``mt-finetune`` per (backbone,
    task); an ``mt-merge`` per (backbone, method), after its backbone's fine-tunes. Without
    ``finetune`` the experts must be in ``experts_dir`` already (``mergelib import``). ``options``
    are :data:`MT_FINETUNE_OPTIONS` and :data:`MT_MERGE_OPTIONS`; each job takes those it knows."""
    from mergelib.experiments.replication import PAPER_MT_METHODS, check_backbones, check_multitask_run, method_specs, task_names

    unknown = sorted(set(options) - set(MT_FINETUNE_OPTIONS) - set(MT_MERGE_OPTIONS))
    if unknown:
        raise ParameterValueError(f"unknown options {unknown} for the multi-task sweep; valid: "
                                  f"{', '.join(sorted(set(MT_FINETUNE_OPTIONS) | set(MT_MERGE_OPTIONS)))}")
    methods = [spec.label for spec in method_specs(methods or PAPER_MT_METHODS)]
    backbones, names = check_backbones(backbones), task_names(tasks)
    for backbone in backbones:  # without fine-tuning, every expert must be there already
        check_multitask_run(backbone, names, precision=options.get("precision", "fp32"),
                            normalize_with=options.get("normalize_with", "published"),
                            experts_dir=None if finetune else experts_dir)
    options = _portable(options)
    paths = {"data_root": str(Path(data_root).resolve()), "experts_dir": str(Path(experts_dir).resolve())}
    jobs: list[Job] = []
    for backbone in backbones:
        experts = [Job("mt-finetune", {"backbone": backbone, "task": t, **paths, **_options(options, MT_FINETUNE_OPTIONS)})
                   for t in names] if finetune else []
        merges = [Job("mt-merge", {"backbone": backbone, "tasks": names, "method": m, **paths,
                                   "results_dir": str(Path(results_dir).resolve()), **_options(options, MT_MERGE_OPTIONS)},
                      tuple(experts))
                  for m in methods]
        jobs += [*experts, *merges]
    return plan_sweep(jobs)


__all__ = ["DG_OPTIONS", "MT_FINETUNE_OPTIONS", "MT_MERGE_OPTIONS", "dg_collect_job", "dg_finetune_job", "dg_fold_job",
           "dg_sweep", "mt_finetune_job", "mt_merge_job", "multitask_sweep"]
