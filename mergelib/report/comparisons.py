"""The results chapter's tables: the papers' numbers beside this project's runs, and the difference.

Runs are read from the result store that :mod:`mergelib.experiments.replication` writes
(``{results_dir}/{backbone}/domain_generalization/{dataset}/*.csv`` and
``{results_dir}/{backbone}/multitask/{suite}/*.csv``); the papers' numbers come from
:mod:`mergelib.report.published`. A cell with no run says "not run"; an average over fewer datasets
than the paper's says over how many, and is not compared, because an average over a different
set of datasets is a different quantity.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mergelib.protocols.results import load_results, reported
from mergelib.report.published import domain_generalization_table, multitask_table

DG_DATASET_COUNT = 8  # SCORE averages over its eight benchmarks
NOT_RUN = "not run"


def load_runs(results_dir: str | Path, backbone: str, setting: str) -> pd.DataFrame:
    """Every result row stored for ``backbone`` and ``setting`` (``domain_generalization`` or
    ``multitask``), read by :func:`mergelib.protocols.results.load_results`; empty when nothing
    was run."""
    return load_results(Path(results_dir) / backbone / setting)


def dg_averages(runs: pd.DataFrame) -> pd.DataFrame:
    """Per method: the mean over held-out domains per dataset (in %), then over datasets;
    ``datasets`` counts the datasets behind each average."""
    if runs.empty:
        return pd.DataFrame(columns=["method", "ours", "datasets"])
    per_dataset = reported(runs).groupby(["method", "benchmark"])["value"].mean().mul(100).reset_index()
    return (per_dataset.groupby("method")
            .agg(ours=("value", "mean"), datasets=("benchmark", "nunique"))
            .reset_index())


def dg_comparison(results_dir: str | Path, backbone: str) -> pd.DataFrame:
    """SCORE's published averages for ``backbone`` beside ours: ``method, paper, ours, difference,
    datasets, status``. ``ours`` is shown for any number of datasets, ``difference`` only when all
    eight were run."""
    paper = domain_generalization_table().query("backbone == @backbone")[["method", "accuracy"]].rename(columns={"accuracy": "paper"})
    ours = dg_averages(load_runs(results_dir, backbone, "domain_generalization"))
    table = paper.merge(ours, on="method", how="outer")
    complete = table["datasets"] == DG_DATASET_COUNT
    table["difference"] = (table["ours"] - table["paper"]).where(complete)
    table["status"] = [NOT_RUN if pd.isna(n) else ("all 8 datasets" if n == DG_DATASET_COUNT else f"{int(n)} of 8 datasets")
                       for n in table["datasets"]]
    return table[["method", "paper", "ours", "difference", "status"]].sort_values(
        ["paper", "ours"], ascending=False, na_position="last").reset_index(drop=True)


def multitask_comparison(results_dir: str | Path, backbone: str) -> pd.DataFrame:
    """The published 8/14/20-task table for ``backbone`` beside ours (absolute and normalized, %)."""
    paper = multitask_table().query("backbone == @backbone").drop(columns=["backbone", "source"])
    runs = load_runs(results_dir, backbone, "multitask")
    if runs.empty:
        ours = pd.DataFrame(columns=["method", "tasks", "ours_absolute", "ours_normalized"])
    else:
        test = reported(runs)
        ours = (test.groupby(["method", "tasks"])
                .agg(ours_absolute=("accuracy", "mean"), ours_normalized=("normalized_accuracy", "mean"))
                .mul(100).reset_index())
    table = paper.merge(ours, on=["method", "tasks"], how="outer")
    table["difference"] = table["ours_absolute"] - table["absolute"]
    table["status"] = table["ours_absolute"].map(lambda v: NOT_RUN if pd.isna(v) else "run")
    return table.sort_values(["tasks", "absolute"], ascending=[True, False], na_position="last").reset_index(drop=True)
