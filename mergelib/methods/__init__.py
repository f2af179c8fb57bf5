"""Merging methods, one module per family, all registered in :data:`~mergelib.methods.registry.METHODS` by name.

Every module of this package except the infrastructure (``registry``, ``common``, ``factors``,
``grid``, ``reference``) is a method family; importing the package imports them all, so each
registers its methods. ``factors`` caches the decompositions that several methods share,
``grid`` merges many (fold, method) pairs with them, ``reference`` holds the straightforward
float32 implementations of the released algorithms that tests and benchmarks compare against.

Pure mathematics on task vectors: imports only :mod:`mergelib.errors` and its own modules.
"""

import importlib
import pkgutil

from mergelib.methods.registry import (
    METHODS,
    CodeNote,
    MergeMethod,
    MethodSpec,
    check_method_parameters,
    check_task_vector_list,
    merge,
    parse_method_spec,
    parse_parameter_value,
    register,
    validate_task_vectors,
)

_INFRASTRUCTURE = {"registry", "common", "factors", "grid", "reference"}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _INFRASTRUCTURE and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["METHODS", "CodeNote", "MergeMethod", "MethodSpec", "check_method_parameters", "check_task_vector_list", "merge",
           "parse_method_spec", "parse_parameter_value", "register", "validate_task_vectors"]
