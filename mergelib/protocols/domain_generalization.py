"""Leave-one-domain-out merging (SCORE's protocol, arXiv 2603.05768) on any backbone and benchmark.

For every domain ``t``: merge the task vectors of the *other* domains' experts with each method,
add the result to the pretrained encoder with each global coefficient, and evaluate on ``t``'s
test split with the benchmark's zero-shot head. Baselines, as in the paper: the zero-shot model,
the task expert of ``t`` itself (an upper bound, since it saw ``t``), each other expert alone
(reported as their mean and best), and the logit ensemble of the other experts (mean logits).

The held-out domain's expert is never passed to a merge or to the ensemble: every merge input is
built by :func:`leave_one_out`, and the tests check it.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from mergelib.data import ImageSet
from mergelib.data.files import ImageFileSet
from mergelib.models.evaluation import EncoderEvaluator, classification_metrics, classification_outcomes
from mergelib.models.heads import ClassificationHead
from mergelib.methods.grid import merge_grid
from mergelib.methods import MethodSpec, parse_method_spec
from mergelib.task_vectors import StateDict, apply_task_vector

ZERO_SHOT = "zero-shot"
OWN_EXPERT = "task expert (own domain)"
OTHER_EXPERTS_MEAN = "other experts (mean)"
OTHER_EXPERTS_BEST = "other experts (best)"
ENSEMBLE = "logit ensemble"
BASELINES = (ZERO_SHOT, OTHER_EXPERTS_MEAN, OTHER_EXPERTS_BEST, ENSEMBLE, OWN_EXPERT)

# Parameters of a merge that depend on the fold: called with the source domains, in order
# (ESM's activation subspaces of the source experts, for instance).
FoldParameters = Callable[[Sequence[str]], Mapping]
# Receives a result row, which examples that model got right (numpy bools) and their labels.
OnCorrect = Callable[[dict, np.ndarray, torch.Tensor], None]


def leave_one_out(names: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """Yield ``(held_out, sources)`` for every name, ``sources`` being all the other names in order."""
    if len(set(names)) != len(names):
        raise ValueError(f"domain names must be unique: {list(names)}")
    if len(names) < 2:
        raise ValueError("leave-one-domain-out needs at least two domains")
    for held_out in names:
        yield held_out, [name for name in names if name != held_out]


def evaluate_leave_one_domain_out(
    evaluator: EncoderEvaluator,
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    task_vectors: Mapping[str, StateDict],
    head: ClassificationHead | Mapping[str, ClassificationHead],
    test_sets: Mapping[str, ImageSet | ImageFileSet],
    methods: Sequence[str | MethodSpec],
    coefficients: Sequence[float] | Mapping[str, Sequence[float]],
    *,
    fold_parameters: Mapping[str, FoldParameters] | None = None,
    held_out: Sequence[str] | None = None,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
    on_correct: OnCorrect | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the protocol; return the results (in the schema of :mod:`mergelib.protocols.results`)
    and the expert-by-domain accuracy matrix.

    Args:
        head: one zero-shot head for every domain, or one per domain (the released code builds
            each domain's head from that domain's class folders).
        methods: method specs, ``"tsv_m"`` or ``"score[keep=diagonal]"`` (see
            :func:`mergelib.methods.registry.parse_method_spec`); results are labelled with the spec.
        coefficients: the global coefficients to evaluate every method at, or a mapping from
            spec label to its coefficients.
        fold_parameters: per method *name*, a function of the fold's source domains returning
            more parameters for the merge (e.g. ESM's subspaces of those experts).
        held_out: run only these folds (default: every domain of ``test_sets``); each fold still
            merges all the other domains. The expert matrix then covers these domains only.
            Running the folds one at a time gives the same rows as running them together.

    Results have one row per (held-out domain, method, coefficient) with ``n_examples``,
    ``accuracy`` and ``balanced_accuracy``; baselines have ``coefficient`` NaN.
    ``on_correct(row, correct, labels)`` receives, beside each row of a single model (merges,
    zero-shot, own expert, ensemble; not the mean or best of the other experts), which test
    examples it got right, for the paired intervals of :mod:`mergelib.analysis.stats`.

    The merges go through :func:`mergelib.methods.grid.merge_grid` (each source expert decomposed once for
    all folds; the same merges, bitwise, as one at a time). Within a fold the grid merges methods
    that share factors together, so ``on_row`` may see a fold's methods in that order; the
    returned table keeps the order of ``methods``. Each method may be listed once.
    """
    domains = list(test_sets)
    folds = domains if held_out is None else list(held_out)
    unknown = [d for d in folds if d not in domains]
    if unknown:
        raise ValueError(f"held_out domains {unknown} have no test set; the domains are {domains}")
    heads = head if isinstance(head, Mapping) else {domain: head for domain in domains}
    missing_heads = [d for d in folds if d not in heads]
    if missing_heads:
        raise ValueError(f"no zero-shot head for the domains {missing_heads}")
    specs = [m if isinstance(m, MethodSpec) else parse_method_spec(m) for m in methods]
    per_method = {spec.label: tuple(coefficients[spec.label] if isinstance(coefficients, Mapping) else coefficients)
                  for spec in specs}
    fold_parameters = fold_parameters or {}
    rows: list[dict] = []

    def record(outcome: tuple[dict, np.ndarray] | None = None, labels: torch.Tensor | None = None, **row) -> None:
        if outcome is not None:
            row.update(outcome[0])
            if on_correct is not None:
                on_correct(row, outcome[1], labels)
        rows.append(row)
        if on_row is not None:
            on_row(row)

    # Every expert on every domain: gives the own-domain upper bound, the single-expert
    # transfer, and (by averaging logits) the ensemble, without recomputing anything.
    expert_logits: dict[tuple[str, str], torch.Tensor] = {}
    matrix = []
    pairs = [(e, d) for e in experts for d in folds]
    for expert, domain in tqdm(pairs, desc="evaluate experts", disable=not progress, leave=False):
        logits = evaluator.logits(experts[expert], heads[domain], test_sets[domain])
        expert_logits[expert, domain] = logits
        matrix.append({"expert": expert, "domain": domain, **classification_metrics(logits, test_sets[domain].labels)})
    matrix = pd.DataFrame(matrix)

    # Every (fold, method) merge through one grid: each source expert is decomposed once for all
    # folds, each fold's shared basis once for all methods (results identical to one merge at a time).
    fold_sources = [(target, sources) for target, sources in leave_one_out(domains) if target in folds]
    merges = (merge_grid(task_vectors, [sources for _, sources in fold_sources], specs, fold_parameters=fold_parameters)
              if specs and fold_sources else iter(()))
    total = len(folds) * sum(len(c) for c in per_method.values())
    bar = tqdm(total=total, desc="merge and evaluate", disable=not progress, leave=False)
    for target, sources in fold_sources:
        labels = test_sets[target].labels
        n = len(labels)
        zero_shot = classification_outcomes(evaluator.logits(pretrained, heads[target], test_sets[target]), labels)
        record(zero_shot, labels, held_out=target, method=ZERO_SHOT, coefficient=float("nan"), n_examples=n)
        if target in experts:
            own = classification_outcomes(expert_logits[target, target], labels)
            record(own, labels, held_out=target, method=OWN_EXPERT, coefficient=float("nan"), n_examples=n)
        singles = matrix[(matrix.domain == target) & matrix.expert.isin(sources)]
        for name, pick in ((OTHER_EXPERTS_MEAN, singles.mean(numeric_only=True)), (OTHER_EXPERTS_BEST, singles.max(numeric_only=True))):
            record(held_out=target, method=name, coefficient=float("nan"), n_examples=n,
                   accuracy=float(pick["accuracy"]), balanced_accuracy=float(pick["balanced_accuracy"]))
        ensemble = torch.stack([expert_logits[s, target] for s in sources]).mean(0)
        record(classification_outcomes(ensemble, labels), labels, held_out=target, method=ENSEMBLE,
               coefficient=float("nan"), n_examples=n)
        merge_rows: dict[str, list[dict]] = {}  # the grid's order; the table keeps the order of ``methods``
        for _ in specs:
            _, spec, merged = next(merges)
            for coefficient in per_method[spec.label]:
                state = apply_task_vector(pretrained, merged, alpha=coefficient)
                metrics, correct = classification_outcomes(evaluator.logits(state, heads[target], test_sets[target]), labels)
                row = dict(held_out=target, method=spec.label, coefficient=float(coefficient), n_examples=n, **metrics)
                merge_rows.setdefault(spec.label, []).append(row)
                if on_correct is not None:
                    on_correct(row, correct, labels)
                if on_row is not None:
                    on_row(row)
                bar.update()
            del merged
        rows.extend(row for spec in specs for row in merge_rows.get(spec.label, []))
    bar.close()
    return pd.DataFrame(rows), matrix
