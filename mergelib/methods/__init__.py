"""Merging methods, one module per family, all registered in :data:`METHODS` by name."""

from . import task_arithmetic  # noqa: F401  (registers its methods)
from .registry import METHODS, MergeMethod, merge, register, validate_task_vectors

__all__ = ["METHODS", "MergeMethod", "merge", "register", "validate_task_vectors"]
