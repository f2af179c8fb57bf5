"""The multi-task protocol (TSV, Iso and ESM's): merge every task expert, evaluate on every task.

All T task vectors are merged into one; the merged model is evaluated on each task's test split
with that task's own zero-shot head. Reported per (method, coefficient, task): accuracy, balanced
accuracy and the *normalized* accuracy of TSV's Eq. 9, the merged model's accuracy divided by the
task's own expert's (the fine-tuned reference). The expert table gives, per task, the zero-shot
and the own-expert accuracies, the two ends of the scale.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import pandas as pd
from tqdm import tqdm

from .data import ImageSet
from .dg import FoldParameters
from .evaluation import EncoderEvaluator, classification_metrics
from .heads import ClassificationHead
from .methods import MethodSpec, merge, parse_method_spec
from .task_vectors import StateDict, apply_task_vector

ZERO_SHOT = "zero-shot"
FINE_TUNED = "task expert"


def evaluate_multitask(
    evaluator: EncoderEvaluator,
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    task_vectors: Mapping[str, StateDict],
    heads: Mapping[str, ClassificationHead],
    test_sets: Mapping[str, ImageSet],
    methods: Sequence[str | MethodSpec],
    coefficients: Sequence[float] | Mapping[str, Sequence[float]],
    *,
    fold_parameters: Mapping[str, FoldParameters] | None = None,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merge all task vectors with each method and evaluate on every task.

    ``methods``, ``coefficients`` and ``fold_parameters`` as in
    :func:`mergelib.dg.evaluate_leave_one_domain_out` (here the one "fold" has every task as a
    source). Returns the tidy results (``method, coefficient, task, accuracy, balanced_accuracy,
    normalized_accuracy``) and the reference table (``task, method, accuracy, ...``) with the
    zero-shot and own-expert rows.
    """
    tasks = list(test_sets)
    missing = [t for t in tasks if t not in experts or t not in heads]
    if missing:
        raise ValueError(f"tasks {missing} lack an expert or a head")
    specs = [m if isinstance(m, MethodSpec) else parse_method_spec(m) for m in methods]
    per_method = {s.label: tuple(coefficients[s.label] if isinstance(coefficients, Mapping) else coefficients) for s in specs}
    fold_parameters = fold_parameters or {}

    reference_rows = []
    own: dict[str, float] = {}
    for task in tasks:
        labels = test_sets[task].labels
        for name, state in ((ZERO_SHOT, pretrained), (FINE_TUNED, experts[task])):
            metrics = classification_metrics(evaluator.logits(state, heads[task], test_sets[task]), labels)
            reference_rows.append({"task": task, "method": name, "n_test": len(labels), **metrics})
            if name == FINE_TUNED:
                own[task] = metrics["accuracy"]
    reference = pd.DataFrame(reference_rows)

    rows = []
    sources = list(task_vectors)
    vectors = [task_vectors[t] for t in sources]
    bar = tqdm(total=sum(len(c) for c in per_method.values()) * len(tasks), desc="merge and evaluate (multi-task)",
               disable=not progress, leave=False)
    for spec in specs:
        extra = fold_parameters[spec.name](sources) if spec.name in fold_parameters else {}
        merged = merge(spec.name, vectors, **spec.params, **extra)
        for coefficient in per_method[spec.label]:
            state = apply_task_vector(pretrained, merged, alpha=coefficient)
            for task in tasks:
                labels = test_sets[task].labels
                metrics = classification_metrics(evaluator.logits(state, heads[task], test_sets[task]), labels)
                row = {"method": spec.label, "coefficient": float(coefficient), "task": task, "n_test": len(labels),
                       **metrics, "normalized_accuracy": metrics["accuracy"] / own[task] if own[task] else float("nan")}
                rows.append(row)
                if on_row is not None:
                    on_row(row)
                bar.update()
    bar.close()
    return pd.DataFrame(rows), reference
