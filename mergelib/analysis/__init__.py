"""Analyses behind the book's figures: subspace overlap, SCORE's projected matrices, ESD
truncation and CKA, and the numerical behaviour of the merges. Pure functions of task vectors
(and, for the ESD, of layer inputs collected from a model), and :mod:`~mergelib.analysis.stats`,
the uncertainty of every comparison of two results (paired bootstrap intervals and the verdicts
the book prints); the notebooks call them.

Imports :mod:`mergelib.methods`, :mod:`mergelib.io` and :mod:`mergelib.models`, never the
protocols or experiments."""

from mergelib.analysis.esd import layer_truncation_table, linear_cka, truncated_output_cka, truncation_curves, truncation_error
from mergelib.analysis.numerics import flipped_signs, perturbation_sensitivity, precision_gap, relative_change, sign_convention_effect
from mergelib.analysis.subspaces import (
    cumulative_energy,
    energy_rank,
    interference_per_layer,
    layer_info,
    off_diagonal_entries,
    projected_task_matrices,
    projection_statistics,
    sar_matrix,
    sar_per_layer,
    singular_spectra,
    singular_task_interference,
    visual_matrix_keys,
)

__all__ = [
    "flipped_signs", "perturbation_sensitivity", "precision_gap", "relative_change", "sign_convention_effect",
    "layer_truncation_table", "linear_cka", "truncated_output_cka", "truncation_curves", "truncation_error",
    "cumulative_energy", "energy_rank", "interference_per_layer", "layer_info", "off_diagonal_entries",
    "projected_task_matrices", "projection_statistics", "sar_matrix", "sar_per_layer", "singular_spectra",
    "singular_task_interference", "visual_matrix_keys",
]
