"""Exceptions with messages that say what is wrong and how to fix it."""

from __future__ import annotations

from typing import Iterable


class MergelibError(Exception):
    """Base class of the errors raised on purpose by mergelib."""

    def __str__(self) -> str:  # plain message, never repr-quoted (KeyError quotes its argument)
        return str(self.args[0]) if self.args else ""


class UnknownNameError(MergelibError, KeyError):
    """A registry lookup with a name that is not registered."""

    def __init__(self, kind: str, name: object, valid: Iterable[str]):
        valid = sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind} names: {', '.join(valid)}")
        self.kind, self.name, self.valid = kind, name, valid


class BackboneUnavailableError(MergelibError, RuntimeError):
    """The backbone's pretrained weights cannot be obtained (typically: offline)."""


class ParameterError(MergelibError, TypeError):
    """A run parameter (papermill or function argument) has the wrong type or value."""


class ParameterValueError(MergelibError, ValueError):
    """A method or run parameter has a value outside its valid range or choices."""


class CorruptCheckpointError(MergelibError, ValueError):
    """A checkpoint file cannot be used: unreadable (truncated, empty, not safetensors, not a
    regular file), without mergelib's provenance, or not matching it (edited, another key)."""


class OutputRefusedError(MergelibError, ValueError):
    """mergelib refuses to write an output: it is one of the inputs, a file mergelib did not
    write (without ``overwrite``), or a location that cannot be written."""


class TensorError(MergelibError, ValueError):
    """Tensors that cannot be computed on: NaN or Inf, mismatched shapes, dtypes or devices, meta
    tensors (no data), no tensors at all, or a result that overflows its dtype."""


class StateKeyError(MergelibError, KeyError, ValueError):
    """A state dict or task vector lacks the keys a function needs, or has keys outside the naming
    convention it works on (open_clip's full-model names, ``visual.*``). A ``KeyError`` and, as an
    argument with a wrong value, a ``ValueError``."""


def lookup(registry: dict, kind: str, name: str):
    """``registry[name]`` or an :class:`UnknownNameError` that lists the valid names."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise UnknownNameError(kind, name, registry) from None
