"""Analyses behind the book's figures: numerical behaviour of the merges (and, later, subspaces)."""

from .numerics import (
    flipped_signs,
    perturbation_sensitivity,
    precision_gap,
    relative_change,
    sign_convention_effect,
)

__all__ = ["flipped_signs", "perturbation_sensitivity", "precision_gap", "relative_change", "sign_convention_effect"]
