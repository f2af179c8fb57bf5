"""The seeds study: how far the miniature's accuracies move when only the randomness changes.

A single build of the book trains one set of experts with one seed; the test-set intervals of
:mod:`mergelib.analysis.stats` say how much its numbers would move with other test images, not with other
training runs. This study reruns the part of the miniature that does not need a new pretraining
(fine-tuning every expert, merging, evaluating) for several *fine-tuning seeds* (the experts'
data order and augmentation; the data and the pretrained tiny CLIP stay fixed), and, as a
separate factor, for other *pretraining seeds* of the tiny CLIP (with the default fine-tuning
seed). Both protocols are run: SCORE's leave-one-domain-out at coefficient 1 and the multi-task
protocol with the coefficient chosen on validation.

Results are rows of the result schema (:mod:`mergelib.protocols.results`; one per setting,
factor, seed, method, held-out domain or task) under
``results/studies/miniature_seeds/`` with a provenance record, and :func:`seed_spread` turns them
into the mean and spread across seeds of each method's mean accuracy, which the chapters show
beside their single-run numbers. ``make seeds-study`` (``mergelib seeds-study``) reruns it.

Not from a paper: neither SCORE nor ESM (nor their baselines' papers) report a spread over
seeds; this is the book's own measurement.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import pandas as pd

from mergelib.errors import ParameterError
from mergelib.methods import parse_method_spec
from mergelib.experiments.miniature import ALL_METHODS, MiniatureConfig, evaluate_domain_experts, evaluate_task_experts, prepare_domain_experts, prepare_task_experts
from mergelib.protocols.results import order_columns, reported
from mergelib.io.provenance import REPO_ROOT, git_state, provenance, write_json

#: SCORE's released variants besides its default, so the ablation chapter can read their spread.
SCORE_VARIANTS = ("score[keep=diagonal]", "score[keep=off_diagonal]", "score[keep=full]")
STUDY_METHODS = (*ALL_METHODS, *SCORE_VARIANTS)
#: The default fine-tuning seed (that of the book's run) and two more.
FINETUNE_SEEDS = (MiniatureConfig.finetune_seed, MiniatureConfig.finetune_seed + 1, MiniatureConfig.finetune_seed + 2)
#: The default pretraining seed and one more.
PRETRAIN_SEEDS = (MiniatureConfig.pretrain_seed, MiniatureConfig.pretrain_seed + 1)
MULTITASK_COEFFICIENTS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # the ESM chapter's grid
SEEDS_STUDY_DIR = REPO_ROOT / "results" / "studies" / "miniature_seeds"
FACTORS = ("fine-tuning", "pretraining")


def seed_runs(base: MiniatureConfig, finetune_seeds: Sequence[int], pretrain_seeds: Sequence[int]) -> list[tuple[str, MiniatureConfig]]:
    """``(factor, config)`` of every run: each fine-tuning seed with ``base``'s pretraining seed,
    then each *other* pretraining seed with ``base``'s fine-tuning seed. The base run belongs to
    both factors; it is run once and listed under both."""
    for name, seeds, default in (("finetune_seeds", finetune_seeds, base.finetune_seed),
                                 ("pretrain_seeds", pretrain_seeds, base.pretrain_seed)):
        if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
            raise ParameterError(f"{name} must be distinct integers, got {list(seeds)!r}")
        if default not in seeds:
            raise ParameterError(f"{name} must include the book's own seed {default} so the study contains its run")
    runs = [("fine-tuning", replace(base, finetune_seed=s)) for s in finetune_seeds]
    runs += [("pretraining", replace(base, pretrain_seed=s)) for s in pretrain_seeds]
    return runs


def _protocol_rows(config: MiniatureConfig, methods: Sequence[str], coefficients: Sequence[float], progress: bool) -> pd.DataFrame:
    """The rows both protocols report for one configuration, in the result schema."""
    domains = prepare_domain_experts(config, progress=progress)
    dg, _ = evaluate_domain_experts(domains, methods, (1.0,), progress=progress)
    tasks = prepare_task_experts(config, progress=progress)
    mt, reference = evaluate_task_experts(tasks, methods, coefficients, progress=progress)
    return pd.concat([reported(dg), reported(mt), reported(reference)], ignore_index=True)


def run_seeds_study(
    base: MiniatureConfig = MiniatureConfig(),
    *,
    finetune_seeds: Sequence[int] = FINETUNE_SEEDS,
    pretrain_seeds: Sequence[int] = PRETRAIN_SEEDS,
    methods: Sequence[str] = STUDY_METHODS,
    multitask_coefficients: Sequence[float] = MULTITASK_COEFFICIENTS,
    results_dir: str | Path | None = SEEDS_STUDY_DIR,
    progress: bool = True,
) -> pd.DataFrame:
    """Run both protocols for every seed of :func:`seed_runs`; write and return the tidy rows.

    Rows: what each protocol reports (:func:`mergelib.protocols.results.reported`), in the result
    schema, with ``factor, finetune_seed, pretrain_seed``. Every stage is cached (experts by their configuration,
    evaluations by the code's fingerprint), so a rerun only reads tables.
    """
    base.validate()
    for method in methods:
        parse_method_spec(method)  # every spec checked before any training
    runs = seed_runs(base, finetune_seeds, pretrain_seeds)
    started_at, frames, done = git_state(), [], {}
    for factor, config in runs:
        seeds = (config.finetune_seed, config.pretrain_seed)
        if seeds not in done:
            if progress:
                print(f"[mergelib] seeds study: fine-tuning seed {seeds[0]}, pretraining seed {seeds[1]}", flush=True)
            done[seeds] = _protocol_rows(config, methods, multitask_coefficients, progress)
        frames.append(done[seeds].assign(factor=factor, finetune_seed=seeds[0], pretrain_seed=seeds[1]))
    results = order_columns(pd.concat(frames, ignore_index=True))
    if results_dir is not None:
        directory = Path(results_dir)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / "provenance.json", provenance(
            base.as_dict(), git=started_at, finetune_seeds=list(finetune_seeds), pretrain_seeds=list(pretrain_seeds),
            methods=list(methods), multitask_coefficients=list(multitask_coefficients)))
        results.to_csv(directory / "results.csv", index=False)
    return results


def seed_spread(results: pd.DataFrame, *, factor: str = "fine-tuning") -> pd.DataFrame:
    """Per (setting, method): the mean over held-out domains or tasks of each seed's run, then the
    mean, sample standard deviation, minimum and maximum of that number across the seeds of
    ``factor`` (in percent), and the number of seeds."""
    if factor not in FACTORS:
        raise ParameterError(f"factor must be one of {FACTORS}, got {factor!r}")
    rows = results[results["factor"] == factor]
    if rows.empty:
        raise ParameterError(f"the study has no run of the factor {factor!r}")
    seed = "finetune_seed" if factor == "fine-tuning" else "pretrain_seed"
    per_seed = 100 * rows.groupby(["setting", "method", seed])["value"].mean()
    spread = per_seed.groupby(["setting", "method"]).agg(["mean", "std", "min", "max", "count"])
    return spread.rename(columns={"count": "seeds"}).reset_index()
