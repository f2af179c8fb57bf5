"""The registry of merging methods and the checks every merge goes through.

A method is a pure function ``f(task_vectors, *, device, param=default, ...) -> merged task
vector`` over a list of dicts (parameter name -> tensor). :func:`register` records it under a
name with its paper, arXiv id, equation, defaults (read from the keyword-only parameters) and
the places where it follows the released code rather than the paper's text; :func:`merge`
validates the inputs and parameters and calls it. The result is the merged task vector before
any global coefficient, which :func:`mergelib.task_vectors.apply_task_vector` (or
:func:`mergelib.task_vectors.apply_task_vector` (exported as ``mergelib.apply``)) adds to the pretrained weights.

Half-precision inputs are merged in float32 (each method widens one tensor name at a time, see
:mod:`mergelib.methods.common`) and returned in their own dtype, on their own device.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import ParameterError, lookup
from .common import TaskVector, resolve_device



@dataclass(frozen=True)
class MergeMethod:
    name: str
    function: Callable[..., TaskVector]
    paper: str
    arxiv: str | None
    equation: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    code_notes: tuple[str, ...] = ()  # where it follows the released code rather than the paper

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.function) or ""
        return doc.split("\n\n")[0].replace("\n", " ")


#: The registry of merging methods by name, filled by :func:`register`.
METHODS: dict[str, MergeMethod] = {}


def register(
    name: str, *, paper: str, arxiv: str | None, equation: str, code_notes: Sequence[str] = ()
) -> Callable:
    """Decorator: register ``function`` as merging method ``name``.

    ``function`` takes the task vectors and keyword-only parameters, each with a default; the
    keyword ``device`` (the compute device chosen by :func:`merge`) is not a parameter.
    """

    def decorator(function: Callable[..., TaskVector]) -> Callable[..., TaskVector]:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        signature = inspect.signature(function)
        defaults = {
            p.name: p.default
            for p in signature.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "device"
        }
        missing = [k for k, v in defaults.items() if v is inspect.Parameter.empty]
        if missing:
            raise ValueError(f"merge method {name!r}: keyword parameters need defaults: {missing}")
        METHODS[name] = MergeMethod(name, function, paper, arxiv, equation, defaults, tuple(code_notes))
        return function

    return decorator


def validate_task_vectors(task_vectors: Sequence[Mapping[str, torch.Tensor]]) -> list[Mapping[str, torch.Tensor]]:
    """Check that the task vectors can be merged; return them as a list.

    They must be a non-empty sequence of dicts with identical keys, shapes and dtypes, of
    floating-point tensors without NaN or Inf.
    """
    if isinstance(task_vectors, Mapping):
        raise TypeError("task_vectors must be a sequence of dicts (one per task), not a single dict")
    vectors = list(task_vectors)
    if not vectors:
        raise ValueError("cannot merge an empty list of task vectors")
    first = vectors[0]
    for index, vector in enumerate(vectors):
        if not isinstance(vector, Mapping):
            raise TypeError(f"task vector {index} is a {type(vector).__name__}, not a dict of tensors")
        if vector.keys() != first.keys():
            extra, missing = sorted(set(vector) - set(first)), sorted(set(first) - set(vector))
            raise ValueError(
                f"task vector {index} has different keys from task vector 0: "
                f"extra {extra[:3]}, missing {missing[:3]}"
            )
        for key, tensor in vector.items():
            ref = first[key]
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"task vector {index}[{key!r}] is a {type(tensor).__name__}, not a tensor")
            if tensor.shape != ref.shape:
                raise ValueError(f"{key!r}: task vector {index} has shape {tuple(tensor.shape)}, task vector 0 {tuple(ref.shape)}")
            if tensor.dtype != ref.dtype:
                raise ValueError(f"{key!r}: task vector {index} has dtype {tensor.dtype}, task vector 0 {ref.dtype}")
            if not tensor.is_floating_point():
                raise TypeError(f"{key!r}: task vectors must be floating point, got {tensor.dtype}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{key!r}: task vector {index} contains NaN or Inf")
    return vectors


def merge(
    name: str,
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    *,
    device: str | torch.device | None = None,
    **params: Any,
) -> TaskVector:
    """Merge ``task_vectors`` with the registered method ``name``.

    Args:
        name: a key of :data:`METHODS` (``mergelib methods`` lists them).
        task_vectors: one dict (parameter name -> tensor) per task, identical keys, shapes, dtypes.
        device: where to compute (``None``/``"auto"``: CUDA when available, else the CPU); the
            result comes back on the inputs' device.
        **params: the method's parameters; unknown names are an error.

    Half-precision inputs are merged in float32 and returned in their own dtype.
    """
    method = lookup(METHODS, "merge method", name)
    unknown = sorted(set(params) - set(method.defaults))
    if unknown:
        valid = ", ".join(sorted(method.defaults)) or "none"
        raise ParameterError(f"merge method {name!r} has no parameter(s) {unknown}; valid parameters: {valid}")
    vectors = validate_task_vectors(task_vectors)
    merged = method.function(vectors, device=resolve_device(device), **{**method.defaults, **params})
    first = vectors[0]
    return {key: merged[key].to(device=first[key].device, dtype=first[key].dtype) for key in first}


@dataclass(frozen=True)
class MethodSpec:
    """A method with parameters, written ``name`` or ``name[param=value, ...]`` (e.g. in papermill
    parameters): ``score[keep=diagonal]``. ``label`` is the text as given, used in results."""

    label: str
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)


def parse_method_spec(text: str) -> MethodSpec:
    """Parse ``"score[keep=diagonal, z=1.5]"``; the name and parameter names are checked.

    Values are read as YAML scalars (``1.5`` a float, ``true`` a bool, ``diagonal`` a string).
    """
    import yaml

    if not isinstance(text, str):
        raise ParameterError(f"a method must be given as a string like 'score' or 'score[keep=diagonal]', got {text!r}")
    name, bracket, rest = text.strip().partition("[")
    name = name.strip()
    method = lookup(METHODS, "merge method", name)
    params: dict[str, Any] = {}
    if bracket:
        if not rest.endswith("]"):
            raise ParameterError(f"method {text!r}: parameters must be closed by ']'")
        for pair in filter(None, (p.strip() for p in rest[:-1].split(","))):
            key, equals, value = pair.partition("=")
            if not equals:
                raise ParameterError(f"method {text!r}: expected NAME=VALUE, got {pair!r}")
            params[key.strip()] = yaml.safe_load(value.strip())
    unknown = sorted(set(params) - set(method.defaults))
    if unknown:
        valid = ", ".join(sorted(method.defaults)) or "none"
        raise ParameterError(f"method {text!r}: {name!r} has no parameter(s) {unknown}; valid parameters: {valid}")
    return MethodSpec(text.strip(), name, params)
