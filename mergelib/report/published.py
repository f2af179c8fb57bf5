"""The papers' own numbers, as data, each with its source, for the book's results chapter.

These are the only numbers in the book that were not computed by this project's code. They are
quoted with their source (the ``*_SOURCE`` strings below, shown beside every table in the book):
SCORE's and ESM's CVPR texts were only available through secondary notes on the papers, TSV's
and Iso's tables come from the papers, ESM's code-era table from its repository's README. A cell
that no source gives is absent, never guessed.

Accuracies are percentages. Domain generalization: the average over SCORE's eight benchmarks of
the leave-one-domain-out accuracy (balanced accuracy on FedISIC and RetinaDomains). Multi-task:
absolute accuracy averaged over the tasks, and normalized accuracy where published.
"""

from __future__ import annotations

import pandas as pd

SCORE_SOURCE = "SCORE, arXiv 2603.05768 (CVPR 2026), via secondary notes on the paper"
TSV_SOURCE = "TSV, Gargiulo et al., CVPR 2025, Table 2"
ISO_SOURCE = "Iso-C / Iso-CTS, Marczak et al., ICML 2025, Table 1"
ESM_CVPR_SOURCE = "ESM, arXiv 2602.20208 (CVPR 2026), via secondary notes on the paper"
ESM_CODE_SOURCE = "ESM's released repository README (extended version's table)"
FINETUNED_SOURCE = "fine-tuned accuracies of the tall_masks/TSV/Iso results file (the papers' 'Fine-tuned' rows)"

_DG = [
    # backbone, method, average accuracy over the 8 benchmarks
    ("ViT-B-32", "score", 65.69), ("ViT-B-32", "tsv_m", 64.95), ("ViT-B-32", "logit ensemble", 64.57),
    ("ViT-B-32", "task expert (own domain)", 78.63), ("ViT-B-32", "zero-shot", 55.63),
    ("ViT-B-16", "score", 69.97), ("ViT-B-16", "logit ensemble", 68.07),
    ("ViT-L-14", "score", 73.04), ("ViT-L-14", "ties", 72.46), ("ViT-L-14", "logit ensemble", 71.81),
    # SCORE's ablation of what the projected matrices keep (its code's ours_v2, v3, v4, v1)
    ("ViT-B-32", "score[keep=diagonal]", 63.62), ("ViT-B-32", "score[keep=off_diagonal]", 58.41),
    ("ViT-B-32", "score[keep=released_full]", 7.59),
    ("ViT-B-16", "score[keep=diagonal]", 67.38), ("ViT-B-16", "score[keep=off_diagonal]", 62.41),
    ("ViT-B-16", "score[keep=released_full]", 7.66),
    ("ViT-L-14", "score[keep=diagonal]", 71.50), ("ViT-L-14", "score[keep=off_diagonal]", 67.46),
    ("ViT-L-14", "score[keep=released_full]", 7.70),
]

_MT = [
    # backbone, method, tasks, absolute, normalized (None: not published), source
    ("ViT-B-32", "zero-shot", 8, 48.26, 53.59, TSV_SOURCE), ("ViT-B-32", "zero-shot", 14, 57.21, 63.69, TSV_SOURCE),
    ("ViT-B-32", "zero-shot", 20, 56.10, 62.41, TSV_SOURCE),
    ("ViT-B-16", "zero-shot", 8, 55.34, 59.34, TSV_SOURCE), ("ViT-B-16", "zero-shot", 14, 61.28, 66.19, TSV_SOURCE),
    ("ViT-B-16", "zero-shot", 20, 59.73, 64.52, TSV_SOURCE),
    ("ViT-L-14", "zero-shot", 8, 64.70, 68.00, TSV_SOURCE), ("ViT-L-14", "zero-shot", 14, 68.20, 72.15, TSV_SOURCE),
    ("ViT-L-14", "zero-shot", 20, 65.23, 68.99, TSV_SOURCE),
    ("ViT-B-32", "task_arithmetic", 8, 70.79, 76.55, TSV_SOURCE), ("ViT-B-32", "task_arithmetic", 14, 65.32, 72.09, TSV_SOURCE),
    ("ViT-B-32", "task_arithmetic", 20, 60.52, 66.79, TSV_SOURCE),
    ("ViT-B-16", "task_arithmetic", 8, 75.41, 79.58, TSV_SOURCE), ("ViT-B-16", "task_arithmetic", 14, 70.52, 75.89, TSV_SOURCE),
    ("ViT-B-16", "task_arithmetic", 20, 65.78, 70.76, TSV_SOURCE),
    ("ViT-L-14", "task_arithmetic", 8, 84.93, 88.65, TSV_SOURCE), ("ViT-L-14", "task_arithmetic", 14, 79.41, 83.95, TSV_SOURCE),
    ("ViT-L-14", "task_arithmetic", 20, 74.01, 78.07, TSV_SOURCE),
    ("ViT-B-32", "tsv_m", 8, 85.86, 92.31, TSV_SOURCE), ("ViT-B-32", "tsv_m", 14, 80.06, 87.88, TSV_SOURCE),
    ("ViT-B-32", "tsv_m", 20, 77.07, 84.29, TSV_SOURCE),
    ("ViT-B-16", "tsv_m", 8, 89.01, 93.94, TSV_SOURCE), ("ViT-B-16", "tsv_m", 14, 84.58, 91.01, TSV_SOURCE),
    ("ViT-B-16", "tsv_m", 20, 80.57, 86.45, TSV_SOURCE),
    ("ViT-L-14", "tsv_m", 8, 92.98, 96.98, TSV_SOURCE), ("ViT-L-14", "tsv_m", 14, 89.17, 94.43, TSV_SOURCE),
    ("ViT-L-14", "tsv_m", 20, 87.72, 92.50, TSV_SOURCE),
    ("ViT-B-32", "iso_c", 8, 86.3, 92.9, ISO_SOURCE), ("ViT-B-32", "iso_c", 14, 80.3, 88.1, ISO_SOURCE),
    ("ViT-B-32", "iso_c", 20, 75.5, 82.5, ISO_SOURCE),
    ("ViT-B-16", "iso_c", 8, 90.6, 95.6, ISO_SOURCE), ("ViT-B-16", "iso_c", 14, 84.8, 91.1, ISO_SOURCE),
    ("ViT-B-16", "iso_c", 20, 79.6, 85.4, ISO_SOURCE),
    ("ViT-L-14", "iso_c", 8, 94.2, 98.3, ISO_SOURCE), ("ViT-L-14", "iso_c", 14, 89.3, 94.5, ISO_SOURCE),
    ("ViT-L-14", "iso_c", 20, 87.6, 92.2, ISO_SOURCE),
    ("ViT-B-32", "iso_cts", 8, 86.2, 92.8, ISO_SOURCE), ("ViT-B-32", "iso_cts", 14, 81.7, 89.7, ISO_SOURCE),
    ("ViT-B-32", "iso_cts", 20, 78.1, 85.5, ISO_SOURCE),
    ("ViT-B-16", "iso_cts", 8, 91.1, 96.1, ISO_SOURCE), ("ViT-B-16", "iso_cts", 14, 86.4, 92.8, ISO_SOURCE),
    ("ViT-B-16", "iso_cts", 20, 82.4, 88.4, ISO_SOURCE),
    ("ViT-L-14", "iso_cts", 8, 94.7, 98.8, ISO_SOURCE), ("ViT-L-14", "iso_cts", 14, 91.0, 96.3, ISO_SOURCE),
    ("ViT-L-14", "iso_cts", 20, 90.1, 94.9, ISO_SOURCE),
    ("ViT-B-16", "esm", 8, 91.8, None, ESM_CVPR_SOURCE), ("ViT-B-16", "esm", 14, 87.4, None, ESM_CVPR_SOURCE),
    ("ViT-B-16", "esm", 20, 84.9, None, ESM_CVPR_SOURCE),
    ("ViT-L-14", "esm", 8, 94.8, None, ESM_CVPR_SOURCE), ("ViT-L-14", "esm", 14, 91.3, None, ESM_CVPR_SOURCE),
    ("ViT-L-14", "esm", 20, 90.4, None, ESM_CVPR_SOURCE),
    ("ViT-B-32", "esm (released code)", 8, 88.6, 95.4, ESM_CODE_SOURCE),
    ("ViT-B-32", "esm (released code)", 14, 83.9, 92.4, ESM_CODE_SOURCE),
    ("ViT-B-32", "esm (released code)", 20, 82.3, 90.1, ESM_CODE_SOURCE),
    ("ViT-B-16", "esm (released code)", 8, 91.6, 96.7, ESM_CODE_SOURCE),
    ("ViT-B-16", "esm (released code)", 14, 87.6, 94.4, ESM_CODE_SOURCE),
    ("ViT-B-16", "esm (released code)", 20, 85.3, 91.6, ESM_CODE_SOURCE),
    ("ViT-L-14", "esm (released code)", 8, 94.7, 98.8, ESM_CODE_SOURCE),
    ("ViT-L-14", "esm (released code)", 14, 91.3, 96.8, ESM_CODE_SOURCE),
    ("ViT-L-14", "esm (released code)", 20, 90.7, 95.7, ESM_CODE_SOURCE),
    ("ViT-B-32", "task expert", 8, 92.83, 100.0, FINETUNED_SOURCE), ("ViT-B-32", "task expert", 14, 90.88, 100.0, FINETUNED_SOURCE),
    ("ViT-B-32", "task expert", 20, 91.37, 100.0, FINETUNED_SOURCE),
    ("ViT-B-16", "task expert", 8, 94.64, 100.0, FINETUNED_SOURCE), ("ViT-B-16", "task expert", 14, 92.76, 100.0, FINETUNED_SOURCE),
    ("ViT-B-16", "task expert", 20, 93.17, 100.0, FINETUNED_SOURCE),
    ("ViT-L-14", "task expert", 8, 95.81, 100.0, FINETUNED_SOURCE), ("ViT-L-14", "task expert", 14, 94.29, 100.0, FINETUNED_SOURCE),
    ("ViT-L-14", "task expert", 20, 94.73, 100.0, FINETUNED_SOURCE),
]


def domain_generalization_table() -> pd.DataFrame:
    """SCORE's published averages: ``backbone, method, accuracy, source`` (method names as mergelib's
    labels; the baselines as :mod:`mergelib.protocols.domain_generalization` names them)."""
    return pd.DataFrame([{"backbone": b, "method": m, "accuracy": a, "source": SCORE_SOURCE} for b, m, a in _DG])


def multitask_table() -> pd.DataFrame:
    """The 8/14/20-task tables: ``backbone, method, tasks, absolute, normalized, source``."""
    return pd.DataFrame([{"backbone": b, "method": m, "tasks": t, "absolute": a, "normalized": n, "source": s}
                         for b, m, t, a, n, s in _MT])
