"""Analyses behind the book's figures: subspace overlap, SCORE's projected matrices, ESD
truncation and CKA, and the numerical behaviour of the merges. Pure functions of task vectors
(and, for the ESD, of layer inputs); the notebooks call them."""

from .esd import layer_truncation_table, linear_cka, truncated_output_cka, truncation_curves, truncation_error
from .numerics import flipped_signs, perturbation_sensitivity, precision_gap, relative_change, sign_convention_effect
from .subspaces import (
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
