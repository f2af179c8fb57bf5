"""The one result schema: every protocol, the miniature, the replication store and the studies.

One row is one model evaluated on one evaluation set. The protocols
(:func:`~mergelib.protocols.domain_generalization.evaluate_leave_one_domain_out`,
:func:`~mergelib.protocols.multitask.evaluate_multitask`) write the evaluation columns; the
experiments add the identification columns with :func:`conform` before they store a table; the
book and users read any stored table, or folder of tables, with :func:`load_results`.

Leave-one-domain-out rows are keyed by ``held_out``, multi-task rows by ``task``: a table holding
both has the other key empty. Baselines (zero-shot, task experts, ensembles) are rows like the
merges, with ``coefficient`` empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from mergelib.analysis.stats import correctness_frame, correctness_record
from mergelib.errors import ParameterValueError

DOMAIN_GENERALIZATION = "domain_generalization"
MULTITASK = "multitask"
SETTINGS = (DOMAIN_GENERALIZATION, MULTITASK)
#: The column naming the evaluation set of each setting.
KEY = {DOMAIN_GENERALIZATION: "held_out", MULTITASK: "task"}

#: Every column, in the order stored tables have them, with its meaning.
COLUMNS: dict[str, str] = {
    "setting": "'domain_generalization' (SCORE's leave-one-domain-out) or 'multitask' (merge all, test each task)",
    "benchmark": "the dataset (PACS, ..., 'fashion-domains') or task suite ('8-tasks', 'mini-suite')",
    "backbone": "the CLIP image encoder ('ViT-B-32', ..., 'tiny-clip')",
    "method": "a method spec label ('score', 'score[keep=diagonal]') or a baseline ('zero-shot', 'logit ensemble', ...)",
    "coefficient": "the global coefficient the merged task vector was added with; empty for baselines",
    "selected": "whether the protocol reports this row: the coefficient chosen on validation (multi-task), "
                "or the fixed coefficient 1 of leave-one-domain-out; baselines always",
    "split": "'test', or 'val' for the rows a coefficient was chosen on",
    "held_out": "leave-one-domain-out: the unseen domain the merge of all the other experts is tested on",
    "task": "multi-task: the task the merged model is tested on, with its own zero-shot head",
    "n_examples": "the number of examples evaluated",
    "accuracy": "top-1 accuracy, a fraction",
    "balanced_accuracy": "mean per-class recall, a fraction (the headline metric of FedISIC and RetinaDomains)",
    "normalized_accuracy": "multi-task: accuracy divided by the task's fine-tuned reference (TSV's Eq. 9)",
    "metric": "the benchmark's headline metric: 'accuracy' or 'balanced_accuracy'",
    "value": "that metric's value in this row: what the book's tables average",
    "seed": "the seed of the run's data (the miniature)",
}
__doc__ += "\nThe columns, in stored order (:data:`COLUMNS`):\n\n" + "\n".join(
    f"* ``{name}``: {meaning}" for name, meaning in COLUMNS.items()) + "\n"

#: Columns every stored table has.
REQUIRED = ("setting", "benchmark", "backbone", "method", "coefficient", "selected", "split", "n_examples",
            "accuracy", "metric", "value")
#: Names of earlier mergelib versions, read by :func:`load_results`.
LEGACY_NAMES = {"n_test": "n_examples", "n": "n_examples", "alpha": "coefficient", "score": "value"}
METRICS = ("accuracy", "balanced_accuracy")


def _check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise ParameterValueError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}")


def fixed_coefficient_selected(frame: pd.DataFrame, coefficient: float = 1.0) -> pd.Series:
    """``selected`` for a protocol that reports one fixed coefficient: baselines and that coefficient."""
    return frame["coefficient"].isna() | (frame["coefficient"] == coefficient)


def conform(frame: pd.DataFrame, *, setting: str, benchmark: str, backbone: str, metric: str = "accuracy",
            **constants: Any) -> pd.DataFrame:
    """``frame`` (rows of a protocol) in the schema: identification columns added, ``metric`` and
    ``value`` filled from the benchmark's headline metric, ``split`` and ``selected`` defaulted
    (leave-one-domain-out: the test split, coefficient 1), columns in :data:`COLUMNS` order and any
    others after them. ``constants`` become columns too (a study's ``variant``, seeds)."""
    _check_setting(setting)
    if metric not in METRICS:
        raise ParameterValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric not in frame.columns:
        raise ParameterValueError(f"the results have no {metric!r} column; they have {', '.join(frame.columns)}")
    if KEY[setting] not in frame.columns:
        raise ParameterValueError(f"{setting} results need a {KEY[setting]!r} column; they have {', '.join(frame.columns)}")
    table = frame.rename(columns=LEGACY_NAMES).copy()
    for name, value in {"setting": setting, "benchmark": benchmark, "backbone": backbone, **constants}.items():
        table[name] = value
    if "split" not in table.columns:
        table["split"] = "test"
    if "selected" not in table.columns:
        table["selected"] = fixed_coefficient_selected(table)
    table["metric"] = metric
    table["value"] = table[metric]
    return order_columns(table)


def order_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The schema's columns first, in :data:`COLUMNS` order, then any others."""
    known = [c for c in COLUMNS if c in table.columns]
    return table[known + [c for c in table.columns if c not in COLUMNS]]


def check_results(table: pd.DataFrame, what: str = "results") -> pd.DataFrame:
    """Raise naming the missing columns unless ``table`` is in the schema; return it."""
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise ParameterValueError(f"{what} lack the columns {', '.join(missing)} of the result schema "
                                  "(mergelib.protocols.results.COLUMNS); write them with conform()")
    settings = set(table["setting"].dropna().unique())
    if not settings <= set(SETTINGS):
        raise ParameterValueError(f"{what}: unknown settings {sorted(settings - set(SETTINGS))}")
    for setting in settings:
        if KEY[setting] not in table.columns:
            raise ParameterValueError(f"{what}: {setting} rows need a {KEY[setting]!r} column")
    return table


def _csv_files(path: Path) -> Iterable[Path]:
    if path.is_file():
        return [path]
    # expert-by-domain matrices and per-example stores sit beside the results; they are other tables
    return [p for p in sorted(path.rglob("*.csv")) if not p.name.endswith("matrix.csv")]


def load_results(path: str | Path, **conform_options: Any) -> pd.DataFrame:
    """Every result row stored at ``path`` (a CSV file, or a folder searched recursively, expert
    matrices excepted), in the schema; empty (with the schema's columns) when there is none.

    Tables written by earlier mergelib versions are read with their columns renamed
    (:data:`LEGACY_NAMES`); tables without identification columns need them as
    ``conform_options`` (``setting``, ``benchmark``, ``backbone``, ``metric``).
    """
    path = Path(path)
    if not path.exists():
        return pd.DataFrame(columns=list(COLUMNS))
    frames = []
    for file in _csv_files(path):
        frame = pd.read_csv(file).rename(columns=LEGACY_NAMES)
        if "setting" not in frame.columns and conform_options:
            frame = conform(frame, **conform_options)
        frames.append(check_results(order_columns(frame), what=str(file)))
    if not frames:
        return pd.DataFrame(columns=list(COLUMNS))
    return order_columns(pd.concat(frames, ignore_index=True))


def reported(table: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """The rows a protocol reports: ``selected`` ones of ``split``."""
    return table[(table["split"] == split) & table["selected"].astype(bool)]


#: The keys a correctness row carries from its result row.
CORRECTNESS_KEYS = ("benchmark", "method", "coefficient", "split", "held_out", "task")


class CorrectnessCollector:
    """The ``on_correct`` callback of the protocols: keeps, per evaluated model, which examples
    it got right, and gives them as a correctness table (:func:`mergelib.analysis.stats.correctness_frame`)
    for :func:`mergelib.analysis.stats.save_correctness`.

    ``identify(split, name)``: the fingerprint of the evaluation set of ``name`` (a held-out
    domain or task) on ``split``, recorded so that only evaluations on the same examples are
    paired; ``constants`` are keys added to every row (``benchmark``, for instance).
    """

    def __init__(self, identify: Callable[[str, str], str | None] | None = None, **constants: Any):
        self.identify = identify
        self.constants = constants
        self.records: list[dict[str, Any]] = []

    def __call__(self, row: dict, correct: np.ndarray, labels: Any) -> None:
        keys = {**self.constants, **{k: row[k] for k in CORRECTNESS_KEYS if k in row}}
        split, name = row.get("split", "test"), row.get("held_out", row.get("task"))
        test_set = self.identify(split, name) if self.identify is not None else None
        self.records.append(correctness_record(correct, labels, test_set=test_set, **keys))

    def frame(self) -> pd.DataFrame:
        return correctness_frame(self.records)


__all__ = ["COLUMNS", "CORRECTNESS_KEYS", "CorrectnessCollector", "DOMAIN_GENERALIZATION", "KEY", "LEGACY_NAMES", "METRICS", "MULTITASK", "REQUIRED", "SETTINGS",
           "check_results", "conform", "fixed_coefficient_selected", "load_results", "order_columns", "reported"]
