"""Task vectors: fine-tuned minus pretrained weights of the image encoder (Ilharco et al., arXiv 2212.04089).

State dicts of the image encoder use open_clip's full-model names (``visual.conv1.weight``, ...),
so task vectors read and written here match open_clip checkpoints. Only floating-point tensors
have task vectors; integer buffers are skipped, as in the papers' code.

Exactness: a float32 difference ``fl(b - a)`` is rounded whenever a weight moves by more than
its own magnitude's precision allows (e.g. it crosses zero), so ``a + fl(b - a)`` need not give
``b`` back. ``task_vector(..., dtype=torch.float64)`` keeps the difference of float32 weights
exactly, and :func:`apply_task_vector` adds in the wider of the two dtypes, so applying such a
task vector with coefficient 1 restores the fine-tuned weights bit for bit. The default is the
weights' own dtype (float32), as in the papers' code, at half the memory.

:class:`TaskVector` is the same dict with the arithmetic of the task-vectors paper's class
(``+``, ``-``, scalar ``*``, :meth:`TaskVector.apply_to`); being a ``dict``, it is accepted
wherever a task vector is (``mergelib.merge``, ``mergelib.apply``, the checkpoint writers).
"""

from __future__ import annotations

from numbers import Real
from typing import Mapping

import torch
from torch import nn

from mergelib.errors import ParameterError, TensorError
from mergelib.methods.common import VISUAL_PREFIX, StateDict, check_number, check_tensor, non_finite_count, require_keys

PREFIX = VISUAL_PREFIX


def encoder_state(image_encoder: nn.Module) -> StateDict:
    """A detached copy of the image encoder's state dict with open_clip names (``visual.*``)."""
    return {PREFIX + k: v.detach().clone() for k, v in image_encoder.state_dict().items()}


def load_encoder_state(image_encoder: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a ``visual.*`` state dict into an image encoder (strict: every key must match)."""
    stripped = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state.items()}
    image_encoder.load_state_dict(stripped, strict=True)


def task_vector(
    finetuned: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None
) -> StateDict:
    """``finetuned - pretrained`` for every floating-point tensor of ``pretrained``.

    ``dtype``: that of the result (default: the pretrained tensor's); float64 makes the round
    trip through :func:`apply_task_vector` exact for float32 weights.

    Refused, naming the key: a pretrained key the fine-tuned state lacks, a different shape, a
    fine-tuned tensor that is not floating point where the pretrained one is, NaN or Inf, meta
    tensors, and a state without any floating-point tensor.
    """
    _check_state(pretrained, "pretrained")
    _check_state(finetuned, "fine-tuned state")
    require_keys(finetuned, pretrained, what="the fine-tuned state")
    vector = {}
    for key, base in pretrained.items():
        check_tensor(f"pretrained[{key!r}]", base)
        if not base.is_floating_point():
            continue
        tuned = check_tensor(f"fine-tuned[{key!r}]", finetuned[key])
        if tuned.shape != base.shape:
            raise TensorError(f"{key!r}: fine-tuned shape {tuple(tuned.shape)} != pretrained {tuple(base.shape)}")
        if not tuned.is_floating_point():
            raise TensorError(f"{key!r}: fine-tuned tensor is {tuned.dtype} where the pretrained one is {base.dtype}")
        wide = dtype or base.dtype
        vector[key] = tuned.to(wide) - base.to(wide)
    if not vector:
        raise TensorError(f"pretrained has no floating-point tensor among its {len(pretrained)} key(s): no task vector")
    return vector


def _check_state(state: object, what: str) -> None:
    if not isinstance(state, Mapping):
        raise ParameterError(f"{what} must be a dict of tensors (a state dict), got {type(state).__name__}")


def apply_task_vector(
    pretrained: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor], alpha: float = 1.0
) -> StateDict:
    """``pretrained + alpha * vector``; keys without a task vector are copied unchanged.

    Refused, naming the key: a task-vector key the pretrained state lacks, an update whose shape
    differs from the weight's (no broadcasting), an update that is not floating point or has NaN
    or Inf, an update of an integer buffer, meta tensors, a sum that is not finite (e.g. it
    overflows float16), and an ``alpha`` that is not a finite number (bools included).
    """
    alpha = check_number("alpha", alpha)
    _check_state(pretrained, "pretrained")
    _check_state(vector, "task vector")
    require_keys(pretrained, vector, what="the pretrained state (for the task vector's keys)")
    out = {}
    for key, base in pretrained.items():
        delta = vector.get(key)
        if delta is None:
            out[key] = base.clone()
            continue
        check_tensor(f"pretrained[{key!r}]", base)
        check_tensor(f"task vector[{key!r}]", delta)
        if delta.shape != base.shape:
            raise TensorError(f"{key!r}: the update has shape {tuple(delta.shape)}, the weight {tuple(base.shape)}")
        if not delta.is_floating_point():
            raise TensorError(f"{key!r}: the update is {delta.dtype}; task vectors are floating point")
        if not base.is_floating_point():
            raise TensorError(
                f"{key!r}: the pretrained tensor is an integer buffer ({base.dtype}), which task vectors leave "
                "out; remove this key from the task vector")
        wide = torch.promote_types(base.dtype, delta.dtype)
        out[key] = torch.add(base.to(wide), delta.to(wide), alpha=alpha).to(base.dtype)
        bad = non_finite_count(out[key])
        if bad:
            raise TensorError(
                f"{key!r}: pretrained + alpha * update has {bad} NaN or Inf values in {base.dtype} (alpha = {alpha:g})")
    return out


class TaskVector(dict):
    """A task vector ``tau = theta_ft - theta_0``: a ``dict`` from parameter names to tensors, with
    the arithmetic of the task-vectors paper's class (Ilharco et al., arXiv 2212.04089).

    Build it with :meth:`from_states` or :meth:`from_models` (or ``TaskVector(mapping)`` from tensors
    at hand). ``a + b`` and ``a - b`` need the same keys and shapes on both sides (either may be a
    plain dict of tensors); ``c * a``, ``a * c`` and ``-a`` scale by a finite number (a bool is
    refused); ``sum(vectors)`` works. Every result is a new :class:`TaskVector` of new tensors.
    :meth:`apply_to` gives ``theta_0 + alpha * tau`` with the checks of :func:`apply_task_vector`.
    Since it is a ``dict``, ``mergelib.merge(name, [a, b])`` and ``mergelib.apply(state, a)``
    accept it as they accept plain dicts, with identical results.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None, /) -> None:
        tensors = {} if tensors is None else tensors
        _check_state(tensors, "a task vector")
        super().__init__(tensors)
        for key, tensor in self.items():
            if not isinstance(tensor, torch.Tensor):
                raise ParameterError(f"task vector[{key!r}] is a {type(tensor).__name__}, not a tensor")

    @classmethod
    def from_states(
        cls, finetuned: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor], *,
        dtype: torch.dtype | None = None,
    ) -> TaskVector:
        """``finetuned - pretrained`` of two state dicts, as :func:`task_vector` computes it (same
        checks; ``dtype=torch.float64`` makes :meth:`apply_to` restore float32 weights exactly)."""
        return cls(task_vector(finetuned, pretrained, dtype=dtype))

    @classmethod
    def from_models(cls, finetuned: nn.Module, pretrained: nn.Module, *, dtype: torch.dtype | None = None) -> TaskVector:
        """The task vector of two image encoders (e.g. ``clip_model.visual``), with open_clip's
        names (:func:`encoder_state`)."""
        return cls.from_states(encoder_state(finetuned), encoder_state(pretrained), dtype=dtype)

    def apply_to(self, pretrained: Mapping[str, torch.Tensor], alpha: float = 1.0) -> StateDict:
        """``pretrained + alpha * self`` (:func:`apply_task_vector`: keys without a task vector are
        copied; unknown keys, shapes, non-finite sums and a non-finite ``alpha`` are refused)."""
        return apply_task_vector(pretrained, self, alpha)

    def _combine(self, other: object, operation: str, reflected: bool = False):
        if not isinstance(other, Mapping):
            return NotImplemented
        left, right = (other, self) if reflected else (self, other)
        if left.keys() != right.keys():
            only_left, only_right = sorted(set(left) - set(right)), sorted(set(right) - set(left))
            raise TensorError(
                f"task vector {operation}: the two sides have different keys; only on the left: "
                f"{len(only_left)} {only_left[:3]}, only on the right: {len(only_right)} {only_right[:3]}")
        out = {}
        for key in left:
            a, b = left[key], right[key]
            if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
                raise ParameterError(f"task vector {operation}: {key!r} is not a tensor on both sides")
            if a.shape != b.shape:
                raise TensorError(
                    f"task vector {operation}: {key!r} has shape {tuple(a.shape)} on the left, {tuple(b.shape)} on the right")
            out[key] = a + b if operation == "+" else a - b
        return TaskVector(out)

    def __add__(self, other: Mapping[str, torch.Tensor]) -> TaskVector:
        return self._combine(other, "+")

    def __radd__(self, other: object) -> TaskVector:
        if type(other) is int and other == 0:  # sum(vectors) starts from 0
            return TaskVector({key: tensor.clone() for key, tensor in self.items()})
        return self._combine(other, "+", reflected=True)

    def __sub__(self, other: Mapping[str, torch.Tensor]) -> TaskVector:
        return self._combine(other, "-")

    def __rsub__(self, other: Mapping[str, torch.Tensor]) -> TaskVector:
        return self._combine(other, "-", reflected=True)

    def __mul__(self, scalar: float) -> TaskVector:
        if not isinstance(scalar, Real):  # bools are Real, and refused by check_number
            return NotImplemented
        scalar = check_number("the coefficient of a task vector", scalar)
        return TaskVector({key: tensor * scalar for key, tensor in self.items()})

    __rmul__ = __mul__

    def __neg__(self) -> TaskVector:
        return TaskVector({key: -tensor for key, tensor in self.items()})

    def copy(self) -> TaskVector:
        """A shallow copy (the same tensors), as a :class:`TaskVector`."""
        return TaskVector(self)

    def __repr__(self) -> str:
        count = sum(tensor.numel() for tensor in self.values())
        return f"TaskVector({len(self)} tensors, {count} values)"
