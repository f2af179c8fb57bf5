"""The multi-task protocol (TSV, Iso and ESM's): merge every task expert, evaluate on every task.

All T task vectors are merged into one; the merged model is evaluated on each task's test split
with that task's own zero-shot head. Reported per (method, coefficient, task): accuracy, balanced
accuracy and the *normalized* accuracy of TSV's Eq. 9, the merged model's accuracy divided by the
task's own expert's (the fine-tuned reference). The expert table gives, per task, the zero-shot
and the own-expert accuracies, the two ends of the scale.

With validation sets, every merged model is also evaluated on them (``split`` column) and each
method's global coefficient is chosen there: by the method's released search (TSV's grid,
Iso's early-stopped grid, ESM's golden section; :mod:`mergelib.protocols.coefficients`) or, on
a given grid, by the mean validation accuracy; the chosen rows are ``selected``
(:func:`select_on_validation` returns the test rows at that coefficient).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from mergelib.data import ImageSet
from mergelib.data.files import ImageFileSet
from mergelib.protocols.domain_generalization import FoldParameters, OnCorrect
from mergelib.models.evaluation import EncoderEvaluator, classification_outcomes
from mergelib.protocols.coefficients import search_alpha
from mergelib.models.heads import ClassificationHead
from mergelib.methods.grid import merge_grid
from mergelib.methods import MethodSpec, parse_method_spec
from mergelib.task_vectors import StateDict, apply_task_vector

ZERO_SHOT = "zero-shot"
FINE_TUNED = "task expert"


def evaluate_multitask(
    evaluator: EncoderEvaluator,
    pretrained: StateDict,
    experts: Mapping[str, StateDict] | None,
    task_vectors: Mapping[str, StateDict],
    heads: Mapping[str, ClassificationHead],
    test_sets: Mapping[str, ImageSet | ImageFileSet | Dataset],
    methods: Sequence[str | MethodSpec],
    coefficients: Sequence[float] | Mapping[str, Sequence[float]] = (1.0,),
    *,
    fold_parameters: Mapping[str, FoldParameters] | None = None,
    val_sets: Mapping[str, ImageSet | ImageFileSet | Dataset] | None = None,
    searches: Mapping[str, str] | None = None,
    reference_accuracy: Mapping[tuple[str, str], float] | None = None,
    labels: Mapping[tuple[str, str], torch.Tensor] | None = None,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
    on_correct: OnCorrect | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merge all task vectors with each method and evaluate on every task.

    ``methods``, ``coefficients`` and ``fold_parameters`` as in
    :func:`mergelib.protocols.domain_generalization.evaluate_leave_one_domain_out` (here the one
    "fold" has every task as a source). Returns two tables in the result schema
    (:mod:`mergelib.protocols.results`; ``method, coefficient, selected, split, task, n_examples,
    accuracy, balanced_accuracy, normalized_accuracy``): the merges, and the reference rows (the
    zero-shot model and, when ``experts`` are given, each task's own expert). ``split`` is
    ``"test"``, or also ``"val"`` when ``val_sets`` are given.

    Coefficients, as TSV, Iso and ESM choose them:

    * a method in ``searches`` (spec label -> rule of :func:`mergelib.protocols.coefficients.search_alpha`,
      e.g. ``{"tsv_m": "tsv", "esm": "esm"}``) gets its coefficient from that released search on
      the validation sets; its validation rows are the coefficients the search evaluated, its
      test rows only the chosen one (the search records are in ``results.attrs["searches"]``);
    * the others are evaluated at each of their ``coefficients`` on every split; with validation
      sets the one with the best mean validation accuracy (the smallest on ties) is ``selected``,
      without them a single coefficient is.

    ``normalized_accuracy`` divides by ``reference_accuracy[(split, task)]`` (e.g. the published
    fine-tuned accuracies), by default the own expert's accuracy on that split. ``labels``: the
    labels of ``(split, task)`` when a set is a torchvision-style dataset without ``labels``.
    ``on_correct(row, correct, labels)`` receives each model's per-example correctness (numpy
    bools) beside its row, for :mod:`mergelib.analysis.stats`.

    The merges go through :func:`mergelib.methods.grid.merge_grid` (one fold: every task), which shares
    the experts' decompositions and the shared basis between methods; ``on_row`` sees the methods
    in the grid's order, the returned table keeps the order of ``methods``.
    """
    tasks = list(test_sets)
    splits = {"test": test_sets, **({"val": val_sets} if val_sets is not None else {})}
    missing = [t for t in tasks if t not in heads or (experts is not None and t not in experts)]
    if missing:
        raise ValueError(f"tasks {missing} lack an expert or a head")
    specs = [m if isinstance(m, MethodSpec) else parse_method_spec(m) for m in methods]
    searches = dict(searches or {})
    unknown = sorted(set(searches) - {s.label for s in specs})
    if unknown:
        raise ValueError(f"searches name methods {unknown} that are not among {[s.label for s in specs]}")
    if searches and val_sets is None:
        raise ValueError("a coefficient search needs val_sets")
    if experts is None and reference_accuracy is None:
        raise ValueError("without experts, pass reference_accuracy to normalize by")
    per_method = {s.label: tuple(coefficients[s.label] if isinstance(coefficients, Mapping) else coefficients)
                  for s in specs if s.label not in searches}
    fold_parameters = fold_parameters or {}
    labels_of = {(split, task): (labels or {}).get((split, task), getattr(sets[task], "labels", None))
                 for split, sets in splits.items() for task in tasks}
    absent = [key for key, value in labels_of.items() if value is None]
    if absent:
        raise ValueError(f"no labels for {absent}: pass labels={{(split, task): tensor}}")
    normalizer = dict(reference_accuracy or {})

    def evaluate(state: StateDict, split: str, method: str, coefficient: float,
                 on: Sequence[str] = tasks) -> list[dict]:
        rows = []
        for task in on:
            truth = labels_of[split, task]
            metrics, correct = classification_outcomes(evaluator.logits(state, heads[task], splits[split][task]), truth)
            own = normalizer.get((split, task))
            row = {"method": method, "coefficient": coefficient, "split": split, "task": task, "n_examples": len(truth),
                   **metrics, "normalized_accuracy": metrics["accuracy"] / own if own else float("nan")}
            rows.append(row)
            if on_correct is not None:
                on_correct(row, correct, truth)
        return rows

    reference_rows = []
    for split in splits:
        own_rows = []
        if experts is not None:  # first: their accuracies normalize every other row of the split
            own_rows = [row for task in tasks for row in evaluate(experts[task], split, FINE_TUNED, float("nan"), [task])]
            for row in own_rows:
                own = normalizer.setdefault((split, row["task"]), row["accuracy"])
                row["normalized_accuracy"] = row["accuracy"] / own if own else float("nan")
        reference_rows += evaluate(pretrained, split, ZERO_SHOT, float("nan")) + own_rows
    reference = pd.DataFrame(reference_rows).assign(selected=True)

    rows_of: dict[str, list[dict]] = {}  # the grid's order; the table keeps the order of ``methods``
    searched: dict[str, dict] = {}
    bar = tqdm(total=len(specs), desc="merge and evaluate (multi-task)", disable=not progress, leave=False)
    merges = merge_grid(task_vectors, [tasks], specs, fold_parameters=fold_parameters) if specs else ()
    for _, spec, merged in merges:
        rows = rows_of.setdefault(spec.label, [])
        if spec.label in searches:
            evaluated: dict[float, list[dict]] = {}

            def objective(alpha: float) -> dict[str, float]:
                val = evaluated[alpha] = evaluate(apply_task_vector(pretrained, merged, alpha=alpha), "val",
                                                  spec.label, float(alpha))
                return {"absolute": sum(r["accuracy"] for r in val) / len(val),
                        "normalized": sum(r["normalized_accuracy"] for r in val) / len(val)}

            search = search_alpha(searches[spec.label], objective)
            searched[spec.label] = search.to_dict()
            rows += [dict(r, selected=alpha == search.alpha) for alpha, val in evaluated.items() for r in val]
            rows += [dict(r, selected=True) for r in evaluate(apply_task_vector(pretrained, merged, alpha=search.alpha),
                                                              "test", spec.label, float(search.alpha))]
        else:
            for coefficient in per_method[spec.label]:
                state = apply_task_vector(pretrained, merged, alpha=coefficient)
                for split in splits:
                    rows += evaluate(state, split, spec.label, float(coefficient))
            chosen = _chosen_coefficient(rows, len(per_method[spec.label]))
            for row in rows:
                row["selected"] = row["coefficient"] == chosen
        if on_row is not None:
            for row in rows:
                on_row(row)
        bar.update()
        del merged
    bar.close()
    results = pd.DataFrame([row for spec in specs for row in rows_of.get(spec.label, [])],
                           columns=[*reference.columns])
    results.attrs["searches"] = {spec.label: searched[spec.label] for spec in specs if spec.label in searched}
    return results, reference


def _chosen_coefficient(rows: Sequence[dict], count: int) -> float | None:
    """The coefficient with the best mean validation accuracy (the smallest on ties); without
    validation rows, the only coefficient, if there is one."""
    val = pd.DataFrame([r for r in rows if r["split"] == "val"])
    if val.empty:
        return rows[0]["coefficient"] if count == 1 else None
    means = val.groupby("coefficient")["accuracy"].mean()
    return float(means[means == means.max()].index.min())


def select_on_validation(results: pd.DataFrame) -> pd.DataFrame:
    """The test rows at each method's selected coefficient (``selected``, chosen on validation by
    :func:`evaluate_multitask`; for rows without that column, chosen here by the same rule), with
    a ``selected_coefficient`` column."""
    if "val" not in set(results["split"]):
        raise ValueError("select_on_validation needs results evaluated on validation sets (val_sets=...)")
    if "selected" not in results:
        chosen = {method: _chosen_coefficient(rows.to_dict("records"), rows["coefficient"].nunique())
                  for method, rows in results.groupby("method", sort=False)}
        results = results.assign(selected=results["coefficient"] == results["method"].map(chosen))
    test = results[(results["split"] == "test") & results["selected"].astype(bool)]
    return test.assign(selected_coefficient=test["coefficient"]).reset_index(drop=True)
