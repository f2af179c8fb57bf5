"""The multi-task protocol (TSV, Iso and ESM's): merge every task expert, evaluate on every task.

All T task vectors are merged into one; the merged model is evaluated on each task's test split
with that task's own zero-shot head. Reported per (method, coefficient, task): accuracy, balanced
accuracy and the *normalized* accuracy of TSV's Eq. 9, the merged model's accuracy divided by the
task's own expert's (the fine-tuned reference). The expert table gives, per task, the zero-shot
and the own-expert accuracies, the two ends of the scale.

With validation sets, every merged model is also evaluated on them (``split`` column), and
:func:`select_on_validation` picks each method's global coefficient by its mean validation
accuracy, as TSV, Iso and ESM choose alpha (the released code normalises by the validation
accuracy of the experts; both are reported), then reports the test accuracy at that coefficient.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import pandas as pd
from tqdm import tqdm

from mergelib.data import ImageSet
from mergelib.data.files import ImageFileSet
from mergelib.protocols.domain_generalization import FoldParameters
from mergelib.models.evaluation import EncoderEvaluator, classification_metrics
from mergelib.models.heads import ClassificationHead
from mergelib.methods.grid import merge_grid
from mergelib.methods import MethodSpec, parse_method_spec
from mergelib.task_vectors import StateDict, apply_task_vector

ZERO_SHOT = "zero-shot"
FINE_TUNED = "task expert"


def evaluate_multitask(
    evaluator: EncoderEvaluator,
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    task_vectors: Mapping[str, StateDict],
    heads: Mapping[str, ClassificationHead],
    test_sets: Mapping[str, ImageSet | ImageFileSet],
    methods: Sequence[str | MethodSpec],
    coefficients: Sequence[float] | Mapping[str, Sequence[float]],
    *,
    fold_parameters: Mapping[str, FoldParameters] | None = None,
    val_sets: Mapping[str, ImageSet | ImageFileSet] | None = None,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merge all task vectors with each method and evaluate on every task.

    ``methods``, ``coefficients`` and ``fold_parameters`` as in
    :func:`mergelib.protocols.domain_generalization.evaluate_leave_one_domain_out` (here the one "fold" has every task as a
    source). Returns the tidy results (``method, coefficient, split, task, accuracy,
    balanced_accuracy, normalized_accuracy``) and the reference table (``split, task, method,
    accuracy, ...``) with the zero-shot and own-expert rows; ``split`` is ``"test"``, or also
    ``"val"`` when ``val_sets`` are given.

    The merges go through :func:`mergelib.methods.grid.merge_grid` (one fold: every task), which shares
    the experts' decompositions and the shared basis between methods; ``on_row`` sees the methods
    in the grid's order, the returned table keeps the order of ``methods``.
    """
    tasks = list(test_sets)
    splits = {"test": test_sets, **({"val": val_sets} if val_sets is not None else {})}
    missing = [t for t in tasks if t not in experts or t not in heads]
    if missing:
        raise ValueError(f"tasks {missing} lack an expert or a head")
    specs = [m if isinstance(m, MethodSpec) else parse_method_spec(m) for m in methods]
    per_method = {s.label: tuple(coefficients[s.label] if isinstance(coefficients, Mapping) else coefficients) for s in specs}
    fold_parameters = fold_parameters or {}

    reference_rows = []
    own: dict[tuple[str, str], float] = {}
    for split, sets in splits.items():
        for task in tasks:
            labels = sets[task].labels
            for name, state in ((ZERO_SHOT, pretrained), (FINE_TUNED, experts[task])):
                metrics = classification_metrics(evaluator.logits(state, heads[task], sets[task]), labels)
                reference_rows.append({"split": split, "task": task, "method": name, "n": len(labels), **metrics})
                if name == FINE_TUNED:
                    own[split, task] = metrics["accuracy"]
    reference = pd.DataFrame(reference_rows)

    rows_of: dict[str, list[dict]] = {}  # the grid's order; the table keeps the order of ``methods``
    sources = list(task_vectors)
    bar = tqdm(total=sum(len(c) for c in per_method.values()) * len(tasks) * len(splits),
               desc="merge and evaluate (multi-task)", disable=not progress, leave=False)
    merges = merge_grid(task_vectors, [sources], specs, fold_parameters=fold_parameters) if specs else ()
    for _, spec, merged in merges:
        rows = rows_of.setdefault(spec.label, [])
        for coefficient in per_method[spec.label]:
            state = apply_task_vector(pretrained, merged, alpha=coefficient)
            for split, sets in splits.items():
                for task in tasks:
                    labels = sets[task].labels
                    metrics = classification_metrics(evaluator.logits(state, heads[task], sets[task]), labels)
                    reference_accuracy = own[split, task]
                    row = {"method": spec.label, "coefficient": float(coefficient), "split": split, "task": task,
                           "n": len(labels), **metrics,
                           "normalized_accuracy": metrics["accuracy"] / reference_accuracy if reference_accuracy else float("nan")}
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
                    bar.update()
        del merged
    bar.close()
    return pd.DataFrame([row for spec in specs for row in rows_of.get(spec.label, [])]), reference


def select_on_validation(results: pd.DataFrame, *, by: str = "accuracy") -> pd.DataFrame:
    """Per method, the coefficient with the best mean validation ``by`` (the smallest on ties) and
    the test rows at that coefficient, with a ``selected_coefficient`` column."""
    if "val" not in set(results["split"]):
        raise ValueError("select_on_validation needs results evaluated on validation sets (val_sets=...)")
    val = results[results["split"] == "val"].groupby(["method", "coefficient"])[by].mean().reset_index()
    best = val.sort_values(["method", by, "coefficient"], ascending=[True, False, True]).groupby("method").head(1)
    chosen = dict(zip(best["method"], best["coefficient"]))
    test = results[(results["split"] == "test") & (results["coefficient"] == results["method"].map(chosen))]
    return test.assign(selected_coefficient=test["method"].map(chosen)).reset_index(drop=True)
