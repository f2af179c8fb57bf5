"""The registry of merging methods and the checks every merge goes through.

A method is a pure function ``f(task_vectors, *, device, param=default, ...) -> merged task
vector`` over a list of dicts (parameter name -> tensor). :func:`register` records it under a
name with its paper, arXiv id, equation, defaults (read from the keyword-only parameters), the
places where it follows the released code rather than the paper's text (one :class:`CodeNote`
each: the one record of those differences, from which the book and ``mergelib methods`` render
them), and one check per parameter (:mod:`mergelib.methods.common`'s ``Number``, ``Fraction``, ``Choice``, ``Flag``, ...).
:func:`check_method_parameters` checks names and values without any task vectors;
:func:`merge` calls it and :func:`validate_task_vectors` before any computation, so the method
bodies hold no parameter checks of their own. A registered function called directly checks its
parameters the same way. The result is the merged task vector before
any global coefficient, which :func:`mergelib.task_vectors.apply_task_vector` (or
:func:`mergelib.task_vectors.apply_task_vector` (exported as ``mergelib.apply``)) adds to the pretrained weights.

Half-precision inputs are merged in float32 (each method widens one tensor name at a time, see
:mod:`mergelib.methods.common`) and returned in their own dtype, on their own device.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, Callable, Mapping, Sequence

import torch

from mergelib.errors import ParameterError, ParameterValueError, TensorError, lookup
from mergelib.methods.common import (
    HALF_DTYPES, Flag, Integer, Number, StateDict, Text, check_tensor, is_list_like, non_finite_count, resolve_device,
)

#: A parameter check: ``check(name, value)`` raises a ParameterValueError naming the parameter.
Check = Callable[[str, Any], None]



@dataclass(frozen=True)
class CodeNote:
    """One place where a method's released code differs from its paper's text.

    ``topic``: what it is about; ``paper``: what the text says; ``released``: what the released
    code does, which mergelib follows by default; ``switch``: the parameters that give the paper's
    version, written as in ``--param`` and ``score[...]`` (``"divide_by_tasks=False"``, several
    separated by commas), or None when there is none; ``mergelib``: what mergelib does where that
    is not simply the released behaviour (a deterministic choice, the paper's side, a fix), else "".
    """

    topic: str
    paper: str
    released: str
    switch: str | None = None
    mergelib: str = ""

    def switch_parameters(self) -> dict[str, Any]:
        """The ``switch`` as parameters (``{"divide_by_tasks": False}``; ``{}`` without a switch)."""
        params: dict[str, Any] = {}
        for pair in filter(None, (p.strip() for p in (self.switch or "").split(","))):
            key, equals, value = pair.partition("=")
            if not equals or not key.strip():
                raise ValueError(f"code note {self.topic!r}: switch {self.switch!r} must be NAME=VALUE[, ...]")
            params[key.strip()] = parse_parameter_value(value)
        return params


def check_code_notes(name: str, notes: Sequence[CodeNote]) -> None:
    """Raise a ValueError unless every note of method ``name`` is a :class:`CodeNote` with a
    non-empty ``topic``, ``paper`` and ``released``, and its ``switch`` (if any) names parameters
    of the method with values :func:`check_method_parameters` accepts, other than the defaults."""
    for note in notes:
        if not isinstance(note, CodeNote):
            raise ValueError(f"merge method {name!r}: code notes must be CodeNote(topic, paper, released, switch), "
                             f"got {type(note).__name__}")
        empty = [f for f in ("topic", "paper", "released") if not (isinstance(getattr(note, f), str) and getattr(note, f).strip())]
        if empty or (note.switch is not None and not note.switch.strip()):
            raise ValueError(f"merge method {name!r}: code note {note.topic!r} has empty {empty or ['switch']}")
        switch = note.switch_parameters()
        try:
            check_method_parameters(name, switch)
        except (ParameterError, ParameterValueError) as error:
            raise ValueError(f"merge method {name!r}: the switch of code note {note.topic!r} is refused: {error}") from None
        if switch and all(METHODS[name].defaults[key] == value for key, value in switch.items()):
            raise ValueError(f"merge method {name!r}: the switch of code note {note.topic!r} gives the defaults")


@dataclass(frozen=True)
class MergeMethod:
    name: str
    function: Callable[..., StateDict]
    paper: str
    arxiv: str | None
    equation: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    code_notes: tuple[CodeNote, ...] = ()  # where it follows the released code rather than the paper
    checks: Mapping[str, Check] = field(default_factory=dict)  # one per parameter
    relation: Callable[[Mapping[str, Any]], None] | None = None  # checks between parameters

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.function) or ""
        return doc.split("\n\n")[0].replace("\n", " ")

    def valid_values(self) -> dict[str, str]:
        """Each parameter's valid values in words (``{"z": "a finite number > 0", ...}``)."""
        return {key: describe_check(check) for key, check in self.checks.items()}


def describe_check(check: Check) -> str:
    """A check in words: its ``str`` for the checks of :mod:`mergelib.methods.common`, else the
    first sentence of its docstring."""
    if type(check).__str__ is not object.__str__:
        return str(check)
    return (inspect.getdoc(check) or "checked").split("\n\n")[0].replace("\n", " ")


#: The registry of merging methods by name, filled by :func:`register`.
METHODS: dict[str, MergeMethod] = {}


def _inferred_check(default: Any) -> Check | None:
    """The check of a parameter registered without one: the type of its default."""
    if isinstance(default, bool):
        return Flag()
    if isinstance(default, Integral):
        return Integer()
    if isinstance(default, Real):
        return Number()
    if isinstance(default, str):
        return Text()
    return None


def register(
    name: str,
    *,
    paper: str,
    arxiv: str | None,
    equation: str,
    code_notes: Sequence[CodeNote] = (),
    checks: Mapping[str, Check] | None = None,
    relation: Callable[[Mapping[str, Any]], None] | None = None,
) -> Callable:
    """Decorator: register ``function`` as merging method ``name``.

    ``function`` takes the task vectors and keyword-only parameters, each with a default; the
    keyword ``device`` (the compute device chosen by :func:`merge`) is not a parameter.
    ``checks`` maps each parameter to its check (``check(name, value)`` raises a
    :class:`~mergelib.errors.ParameterValueError`); a parameter without one must have a bool,
    int, float or str default, whose type is then checked. ``relation(params)`` checks rules
    between parameters on the complete parameters (defaults filled in). The defaults must pass.
    ``code_notes``: one :class:`CodeNote` per difference between the released code and the paper;
    each switch must be accepted by :func:`check_method_parameters`.
    The returned function checks its parameters like :func:`merge` does, then calls ``function``.
    """

    def decorator(function: Callable[..., StateDict]) -> Callable[..., StateDict]:
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
        declared = dict(checks or {})
        stray = sorted(set(declared) - set(defaults))
        if stray:
            raise ValueError(f"merge method {name!r}: checks for parameters it does not have: {stray}")
        complete = {key: declared.get(key) or _inferred_check(default) for key, default in defaults.items()}
        unchecked = [key for key, check in complete.items() if check is None]
        if unchecked:
            raise ValueError(f"merge method {name!r}: parameters {unchecked} need a check (register(..., checks=...))")
        for key, default in defaults.items():
            complete[key](key, default)
        if relation is not None:
            relation(defaults)
        METHODS[name] = MergeMethod(
            name, function, paper, arxiv, equation, defaults, tuple(code_notes), complete, relation)
        try:
            check_code_notes(name, METHODS[name].code_notes)
        except ValueError:
            del METHODS[name]
            raise

        @functools.wraps(function)
        def checked(task_vectors: Sequence[StateDict], *, device: torch.device | None = None, **params: Any):
            return function(task_vectors, device=device, **check_method_parameters(name, params))

        return checked

    return decorator


def check_method_parameters(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check a method's parameters, names and values, without any task vectors; return the complete
    parameters (defaults filled in).

    Raises :class:`~mergelib.errors.UnknownNameError` for an unknown method,
    :class:`~mergelib.errors.ParameterError` for a parameter it does not have and
    :class:`~mergelib.errors.ParameterValueError` for a value it refuses (a bool where a number is
    expected, NaN or Inf, a number out of range, a wrong type, a word not among the choices, or
    values that contradict each other); each message names the parameter.
    """
    method = lookup(METHODS, "merge method", name)
    if not isinstance(params, Mapping):
        raise ParameterError(f"parameters of {name!r} must be a dict (name -> value), got {type(params).__name__}")
    unknown = sorted(set(params) - set(method.defaults))
    if unknown:
        valid = ", ".join(sorted(method.defaults)) or "none"
        raise ParameterError(f"merge method {name!r} has no parameter(s) {unknown}; valid parameters: {valid}")
    for key, value in params.items():
        method.checks[key](key, value)
    complete = {**method.defaults, **params}
    if method.relation is not None:
        method.relation(complete)
    return complete


def check_task_vector_list(
    task_vectors: Sequence[Mapping[str, torch.Tensor]], minimum: int = 1, purpose: str = "merge"
) -> list[Mapping[str, torch.Tensor]]:
    """``task_vectors`` as a list, after checking the container: a sequence (not one dict) of at
    least ``minimum`` dicts, one per task. ``purpose`` completes the messages ("cannot merge an
    empty list ...", "need at least 2 task vectors to compare subspaces, ...").

    Raises :class:`~mergelib.errors.ParameterError` for a container or an element of the wrong
    type, :class:`~mergelib.errors.TensorError` for an empty list and
    :class:`~mergelib.errors.ParameterValueError` for too few task vectors. The tensors are checked
    by :func:`validate_task_vectors` (every tensor, to merge) or by the caller (the layers it uses).
    """
    if not is_list_like(task_vectors):
        raise ParameterError(f"task_vectors must be a sequence of dicts (one per task: parameter name -> tensor), "
                             f"not a {type(task_vectors).__name__}")
    vectors = list(task_vectors)
    if not vectors:
        at_least = "one" if minimum == 1 else minimum
        raise TensorError(f"cannot {purpose} an empty list of task vectors; give at least {at_least}")
    if len(vectors) < minimum:
        raise ParameterValueError(f"need at least {minimum} task vectors to {purpose}, got {len(vectors)}")
    for index, vector in enumerate(vectors):
        if not isinstance(vector, Mapping):
            raise ParameterError(f"task vector {index} is a {type(vector).__name__}, not a dict of tensors")
    return vectors


def validate_task_vectors(task_vectors: Sequence[Mapping[str, torch.Tensor]]) -> list[Mapping[str, torch.Tensor]]:
    """Check that the task vectors can be merged; return them as a list.

    They must be a non-empty sequence of dicts (:func:`check_task_vector_list`) with identical
    keys (at least one), shapes, dtypes and devices, of floating-point tensors with data (not meta
    tensors) and without NaN or Inf.
    """
    vectors = check_task_vector_list(task_vectors)
    first = vectors[0]
    for index, vector in enumerate(vectors):
        if not vector:
            raise TensorError(f"task vector {index} has no tensors; a task vector maps parameter names to tensors")
        if vector.keys() != first.keys():
            extra, missing = sorted(set(vector) - set(first)), sorted(set(first) - set(vector))
            raise TensorError(
                f"task vector {index} has different keys from task vector 0: "
                f"extra {extra[:3]}, missing {missing[:3]}"
            )
        for key, tensor in vector.items():
            ref = first[key]
            check_tensor(f"task vector {index}[{key!r}]", tensor)
            if tensor.shape != ref.shape:
                raise TensorError(f"{key!r}: task vector {index} has shape {tuple(tensor.shape)}, task vector 0 {tuple(ref.shape)}")
            if tensor.dtype != ref.dtype:
                raise TensorError(f"{key!r}: task vector {index} has dtype {tensor.dtype}, task vector 0 {ref.dtype}")
            if tensor.device != ref.device:
                raise TensorError(
                    f"{key!r}: task vector {index} is on {tensor.device}, task vector 0 on {ref.device}; "
                    "move the task vectors to one device (the result comes back on it)")
            if not tensor.is_floating_point():
                raise TensorError(f"{key!r}: task vectors must be floating point, got {tensor.dtype}")
    return vectors


def check_finite_result(name: str, merged: Mapping[str, torch.Tensor]) -> None:
    """Raise a :class:`~mergelib.errors.TensorError` naming the first tensor of a merge result with
    NaN or Inf (typically a half-precision result that overflows its dtype)."""
    for key, tensor in merged.items():
        bad = non_finite_count(tensor)
        if bad:
            hint = (f" (the float32 result does not fit {tensor.dtype}: merge float32 task vectors)"
                    if tensor.dtype in HALF_DTYPES else "")
            raise TensorError(f"merge method {name!r} gave NaN or Inf for {key!r} ({bad} values){hint}")


def merge(
    name: str,
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    *,
    device: str | torch.device | None = None,
    **params: Any,
) -> StateDict:
    """Merge ``task_vectors`` with the registered method ``name``.

    Args:
        name: a key of :data:`METHODS` (``mergelib methods`` lists them).
        task_vectors: one dict (parameter name -> tensor) per task, identical keys, shapes, dtypes.
        device: where to compute (``None``/``"auto"``: CUDA when available, else the CPU); the
            result comes back on the inputs' device.
        **params: the method's parameters; unknown names and refused values are an error
            (:func:`check_method_parameters`), raised before any computation.

    Half-precision inputs are merged in float32 and returned in their own dtype; a result with
    NaN or Inf (e.g. one that overflows float16) is an error naming the tensor.
    """
    method = lookup(METHODS, "merge method", name)
    complete = check_method_parameters(name, params)
    compute = resolve_device(device)
    vectors = validate_task_vectors(task_vectors)
    merged = method.function(vectors, device=compute, **complete)
    first = vectors[0]
    result = {key: merged[key].to(device=first[key].device, dtype=first[key].dtype) for key in first}
    check_finite_result(name, result)
    return result


@dataclass(frozen=True)
class MethodSpec:
    """A method with parameters, written ``name`` or ``name[param=value, ...]`` (e.g. in papermill
    parameters): ``score[keep=diagonal]``. ``label`` is the text as given, used in results."""

    label: str
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)


_INTEGER = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\.?inf(?:inity)?|\.?nan)", re.IGNORECASE)


def parse_parameter_value(text: str) -> Any:
    """A parameter value written as text (``--param z=2e0``, ``score[z=2e0]``), read one way everywhere.

    ``true``/``false`` (any case) are bools; ``null`` and ``~`` None; integers (``3``, ``-1``) ints;
    decimal and scientific numbers (``1.5``, ``2e0``, ``1E-3``, ``.5``) and ``inf``, ``nan``
    (also YAML's ``.inf``, ``.nan``) floats, which the parameter checks then refuse where a finite
    number is needed; text in matching quotes is that text; any other word a string. Unlike
    YAML 1.1, ``2e0`` is the number 2, ``yes``/``on`` stay words, and ``012`` is 12.
    """
    if not isinstance(text, str):
        raise ParameterError(f"a parameter value must be given as text here, got {type(text).__name__}")
    value = text.strip()
    if not value:
        raise ParameterValueError(f"empty parameter value {text!r}; write NAME=VALUE")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    lower = value.lower()
    if lower in ("true", "false"):
        return lower == "true"
    if lower in ("null", "~"):
        return None
    if _INTEGER.fullmatch(value):
        return int(value)
    if _FLOAT.fullmatch(value):
        return float(lower.replace(".inf", "inf").replace(".nan", "nan"))
    return value


def parse_method_spec(text: str) -> MethodSpec:
    """Parse ``"score[keep=diagonal, z=1.5]"``; the name, parameter names and values are checked
    (:func:`check_method_parameters`), values read by :func:`parse_parameter_value`."""
    if not isinstance(text, str):
        raise ParameterError(f"a method must be given as a string like 'score' or 'score[keep=diagonal]', got {text!r}")
    name, bracket, rest = text.strip().partition("[")
    name = name.strip()
    lookup(METHODS, "merge method", name)  # an unknown name first, before its parameters
    params: dict[str, Any] = {}
    if bracket:
        if not rest.endswith("]"):
            raise ParameterError(f"method {text!r}: parameters must be closed by ']'")
        for pair in filter(None, (p.strip() for p in rest[:-1].split(","))):
            key, equals, value = pair.partition("=")
            if not equals or not key.strip():
                raise ParameterError(f"method {text!r}: expected NAME=VALUE, got {pair!r}")
            params[key.strip()] = parse_parameter_value(value)
    try:
        check_method_parameters(name, params)
    except (ParameterError, ParameterValueError) as error:
        raise type(error)(f"method {text!r}: {error}") from None
    return MethodSpec(text.strip(), name, params)
