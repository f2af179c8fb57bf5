"""Building blocks shared by the merging methods: the matrix rule, per-key streaming, SVD helpers.

**The matrix rule** (as in the released code of TSV-M, Iso, SCORE and ESM): a tensor takes the
*matrix path* of the SVD-based methods when it is 2-D and its name does not contain
``text_projection``; every other tensor (biases, LayerNorms, the class embedding, the 4-D patch
embedding, ``logit_scale``, ``text_projection``) is averaged over the tasks. For open_clip ViT
image encoders the matrices are, per block, ``attn.in_proj_weight``, ``attn.out_proj.weight``,
``mlp.c_fc.weight`` and ``mlp.c_proj.weight``, plus ``visual.positional_embedding`` and
``visual.proj``.

**Streaming.** :func:`merge_per_key` merges one tensor name at a time: it stacks the T task
tensors of that name on the compute device (float32, or float64 on request), calls the method's
per-key function and moves the result back, so at most one name's stack lives on the device.

**Deterministic signs.** A singular triplet ``(u, s, v)`` can be replaced by ``(-u, s, -v)``
without changing the matrix, and which of the two an SVD routine returns depends on the
linear-algebra library. :func:`svd` fixes the choice: each triplet is flipped so that the
largest-magnitude entry of its left singular vector is positive (the first such entry on ties).
SCORE's trimming statistics depend on these signs, so with this rule its output is a function
of its inputs on every machine.
"""

from __future__ import annotations

import math
import re
import types
import typing
from contextvars import ContextVar
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from mergelib.errors import ParameterError, ParameterValueError, StateKeyError, TensorError

#: Parameter names to tensors, as in a state dict or a plain task vector (the methods' inputs and
#: results), of which :class:`mergelib.task_vectors.TaskVector` is a subclass with arithmetic.
StateDict = dict[str, torch.Tensor]
#: The :class:`mergelib.methods.factors.FactorCache` in effect, if any (set by its context manager):
#: :func:`stacked` tells it which source tensors each stack holds.
ACTIVE_FACTOR_CACHE: ContextVar = ContextVar("mergelib_factor_cache", default=None)
EXCLUDED_FROM_MATRIX_PATH = "text_projection"
HALF_DTYPES = (torch.float16, torch.bfloat16)

#: The prefix of open_clip's full-model names of the image tower, which every state dict and task
#: vector of mergelib uses; its residual blocks' names start with ``BLOCK_PREFIX``
#: (e.g. ``visual.transformer.resblocks.0.attn.in_proj_weight``).
VISUAL_PREFIX = "visual."
BLOCK_PREFIX = VISUAL_PREFIX + "transformer.resblocks."
BLOCK_KEY_PATTERN = BLOCK_PREFIX + "<i>.<layer>"
_BLOCK_KEY = re.compile(re.escape(BLOCK_PREFIX) + r"(\d+)\.(.+)$")


def is_matrix(key: str, tensor: torch.Tensor) -> bool:
    """Whether ``key`` takes the matrix path: 2-D and not ``text_projection``."""
    return tensor.ndim == 2 and EXCLUDED_FROM_MATRIX_PATH not in key


def block_layer(key: str) -> tuple[int, str] | None:
    """``(block index, layer name within the block)`` of a parameter of the image tower's residual
    blocks (``visual.transformer.resblocks.3.mlp.c_fc.weight`` -> ``(3, "mlp.c_fc.weight")``), else None.

    The one definition of the block naming convention, used by ESM and the analyses.
    """
    match = _BLOCK_KEY.match(key)
    return (int(match.group(1)), match.group(2)) if match else None


def describe_keys(keys: Iterable[str]) -> str:
    """``"12 keys, e.g. ['a', 'b', 'c']"`` (or ``"no keys"``), for error messages."""
    keys = list(keys)
    return f"{len(keys)} key(s), e.g. {keys[:3]}" if keys else "no keys"


def prefix_hint(wanted: Iterable[str], keys: Iterable[str]) -> str:
    """A hint for messages when the ``wanted`` names and the ``keys`` at hand differ by the
    ``visual.`` prefix, or ``keys`` look like the image encoder's own names (no ``visual.``)."""
    present, wanted = set(keys), list(wanted)
    stripped = {k[len(VISUAL_PREFIX):] for k in present if k.startswith(VISUAL_PREFIX)}
    differ = any(
        (k.startswith(VISUAL_PREFIX) and k[len(VISUAL_PREFIX):] in present) or k in stripped for k in wanted)
    own_names = bool(present) and not stripped and any(k.startswith(BLOCK_PREFIX[len(VISUAL_PREFIX):]) for k in present)
    if differ or own_names:
        return (f"; the names differ by open_clip's {VISUAL_PREFIX!r} prefix: mergelib uses full-model names "
                "(visual.*, as mergelib.task_vectors.encoder_state gives them)")
    return ""


def require_keys(mapping: Mapping[str, object], keys: Iterable[str], *, what: str) -> None:
    """Raise a :class:`~mergelib.errors.StateKeyError` naming the ``keys`` that ``mapping`` (called ``what``) lacks."""
    keys = list(keys)
    missing = [key for key in keys if key not in mapping]
    if missing:
        raise StateKeyError(
            f"{what} lacks {len(missing)} of the {len(keys)} key(s) needed, e.g. {missing[:3]}; it has "
            f"{describe_keys(mapping)}{prefix_hint(missing, mapping)}"
        )


# ------------------------------------------------------------------------- parameter checks
# One check per kind of value; the methods declare theirs at registration (see the classes below)
# and the analyses call them directly. Each raises ParameterValueError naming the parameter.


def is_list_like(value: object) -> bool:
    """Whether an argument is a list of items: a sequence (list, tuple, ...), not a string, bytes or
    a mapping (which a plain ``isinstance(value, Sequence)`` would let through or read item by item)."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, Mapping))


def check_fraction(name: str, value: object, *, zero_ok: bool, one_ok: bool) -> None:
    """Raise unless ``value`` is a finite number (not a bool) in the interval given by the two flags."""
    low, high = ("[" if zero_ok else "("), ("]" if one_ok else ")")
    number = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    inside = number and (0 <= value if zero_ok else 0 < value) and (value <= 1 if one_ok else value < 1)
    if not inside:
        raise ParameterValueError(f"{name} must be a number in {low}0, 1{high}, got {value!r}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """Raise unless ``value`` is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ParameterValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_number(name: str, value: object, *, minimum: float | None = None, strict: bool = False) -> float:
    """``value`` as a float; raise unless it is a finite number (not a bool) at least ``minimum``
    (above it with ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ParameterValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ParameterValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return value


def check_integer(name: str, value: object, *, minimum: int | None = None) -> int:
    """``value`` as an int; raise unless it is an integer (not a bool) at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ParameterValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ParameterValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_flag(name: str, value: object) -> None:
    """Raise unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ParameterValueError(f"{name} must be True or False, got {value!r}")


def check_text(name: str, value: object) -> None:
    """Raise unless ``value`` is a string."""
    if not isinstance(value, str):
        raise ParameterValueError(f"{name} must be a string, got {value!r}")


def describe_type(hint: Any) -> str:
    """``list[float]`` -> ``'a list of float'``, for messages."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(option) for option in typing.get_args(hint))
    if origin in (tuple, list):
        return f"a list of {describe_type(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def coerce_parameter(name: str, value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (``str``, ``int``, ``float``, ``bool``, ``dict``,
    ``tuple[X, ...]``, ``list[X]`` or a union of them), or a :class:`~mergelib.errors.ParameterError` naming the
    parameter, the expected type and the value.

    A list parameter given a single value gets a one-element list (a string is never read letter
    by letter); an int is accepted for a float; a bool is never accepted for a number.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if typing.get_origin(option) in (tuple, list) and not isinstance(value, (list, tuple)):
                continue  # a single value: try the scalar options first, the list ones below
            try:
                return coerce_parameter(name, value, option)
            except ParameterError:
                pass
        for option in typing.get_args(hint):
            if typing.get_origin(option) in (tuple, list):
                return coerce_parameter(name, value, option)
        raise ParameterError(f"parameter {name!r} must be {describe_type(hint)}, got {type(value).__name__} {value!r}")
    if origin in (tuple, list):
        item_type = typing.get_args(hint)[0]
        items = value if isinstance(value, (list, tuple)) else [value]
        coerced = [coerce_parameter(f"{name}[{i}]", item, item_type) for i, item in enumerate(items)]
        return tuple(coerced) if origin is tuple else coerced
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint in (int, float) and isinstance(value, bool)):
        raise ParameterError(f"parameter {name!r} must be {describe_type(hint)}, got {type(value).__name__} {value!r}")
    return value


@dataclass(frozen=True)
class Number:
    """Parameter check: a finite number, at least ``minimum`` (above it with ``strict``)."""

    minimum: float | None = None
    strict: bool = False

    def __call__(self, name: str, value: object) -> None:
        check_number(name, value, minimum=self.minimum, strict=self.strict)

    def __str__(self) -> str:
        bound = "" if self.minimum is None else f" {'>' if self.strict else '>='} {self.minimum:g}"
        return f"a finite number{bound}"


@dataclass(frozen=True)
class Integer:
    """Parameter check: an integer, at least ``minimum``."""

    minimum: int | None = None

    def __call__(self, name: str, value: object) -> None:
        check_integer(name, value, minimum=self.minimum)

    def __str__(self) -> str:
        return "an integer" + ("" if self.minimum is None else f" >= {self.minimum}")


@dataclass(frozen=True)
class Fraction:
    """Parameter check: a number in ``[0, 1]``, the ends included as the flags say."""

    zero_ok: bool
    one_ok: bool

    def __call__(self, name: str, value: object) -> None:
        check_fraction(name, value, zero_ok=self.zero_ok, one_ok=self.one_ok)

    def __str__(self) -> str:
        return f"a number in {'[' if self.zero_ok else '('}0, 1{']' if self.one_ok else ')'}"


@dataclass(frozen=True)
class Choice:
    """Parameter check: one of the strings ``choices``."""

    choices: tuple[str, ...]

    def __call__(self, name: str, value: object) -> None:
        check_choice(name, value, self.choices)

    def __str__(self) -> str:
        return "one of " + ", ".join(map(repr, self.choices))


@dataclass(frozen=True)
class Flag:
    """Parameter check: True or False."""

    def __call__(self, name: str, value: object) -> None:
        check_flag(name, value)

    def __str__(self) -> str:
        return "True or False"


@dataclass(frozen=True)
class Text:
    """Parameter check: any string (for parameters whose values are not a fixed set)."""

    def __call__(self, name: str, value: object) -> None:
        check_text(name, value)

    def __str__(self) -> str:
        return "a string"


# ----------------------------------------------------------------------------- tensors and devices
def non_finite_count(tensor: torch.Tensor) -> int:
    """How many entries of ``tensor`` are NaN or Inf (0 for integer and bool tensors)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def check_tensor(label: str, tensor: object) -> torch.Tensor:
    """Raise unless ``tensor`` is a tensor torch can compute on: it holds data (not a meta tensor)
    and, if floating point, has no NaN or Inf. ``label`` names it in the message."""
    if not isinstance(tensor, torch.Tensor):
        raise ParameterError(f"{label} is a {type(tensor).__name__}, not a tensor")
    if tensor.is_meta:
        raise TensorError(
            f"{label} is a meta tensor (a shape without data); load real weights first, e.g. "
            "module.to_empty(device='cpu') then load_state_dict, or load_state_dict(..., assign=True)"
        )
    bad = non_finite_count(tensor)
    if bad:
        raise TensorError(f"{label} contains NaN or Inf ({bad} of {tensor.numel()} values)")
    return tensor


def valid_devices() -> list[str]:
    """The compute devices this machine can use, as :func:`resolve_device` accepts them."""
    valid = ["auto", "cpu"]
    if torch.cuda.is_available():
        valid += ["cuda"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        valid.append("mps")
    return valid


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The compute device: ``None`` or ``"auto"``: CUDA when available, else the CPU; otherwise a
    device this machine has (see :func:`valid_devices`), else a :class:`~mergelib.errors.ParameterValueError`."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = device if isinstance(device, torch.device) else torch.device(device) if isinstance(device, str) else None
    except RuntimeError:
        parsed = None
    if parsed is None:
        raise ParameterValueError(
            f"device {device!r} is not a device name; valid on this machine: {', '.join(valid_devices())}")
    if parsed.type == "cpu":
        return parsed
    usable = {
        "cuda": torch.cuda.is_available() and (parsed.index is None or parsed.index < torch.cuda.device_count()),
        "mps": torch.backends.mps.is_available(),
    }.get(parsed.type, False)
    if not usable:
        raise ParameterValueError(
            f"device {str(parsed)!r} is not available on this machine; valid here: {', '.join(valid_devices())}")
    return parsed


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is merged in: half precision is widened to float32."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def stacked(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    key: str,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The T tensors of ``key`` as one ``[T, *shape]`` tensor on ``device`` (half widened to float32)."""
    first = task_vectors[0][key]
    target = dtype or compute_dtype(first.dtype)
    out = torch.empty((len(task_vectors), *first.shape), dtype=target, device=resolve_device(device))
    for index, vector in enumerate(task_vectors):
        out[index].copy_(vector[key])
    cache = ACTIVE_FACTOR_CACHE.get()
    if cache is not None:  # let the factor cache know which experts' tensors this stack holds
        cache.note_stack(key, out, [vector[key] for vector in task_vectors])
    return out


def merge_per_key(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    function: Callable[[str, torch.Tensor], torch.Tensor],
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    keys: Sequence[str] | None = None,
) -> StateDict:
    """Apply ``function(key, stack)`` to each key's ``[T, *shape]`` stack, one key at a time.

    Results come back on the device of the inputs, in the inputs' own dtype.
    """
    device = resolve_device(device)
    out: StateDict = {}
    for key in keys if keys is not None else task_vectors[0]:
        source = task_vectors[0][key]
        stack = stacked(task_vectors, key, device=device, dtype=dtype)
        out[key] = function(key, stack).to(device=source.device, dtype=source.dtype)
        del stack
    return out


def mean_over_tasks(key: str, stack: torch.Tensor) -> torch.Tensor:
    """The per-key function of the non-matrix path: the arithmetic mean over tasks."""
    return stack.mean(dim=0)


def is_all_zero(stack: torch.Tensor) -> bool:
    """True when every task's tensor is exactly zero (e.g. CLIP's untouched text-side weights).

    The SVD-based methods map such a stack to zero, so they skip its SVDs.
    """
    return not bool(stack.any())


def rank_per_task(key: str, rank: int, tasks: int) -> int:
    """``int(r / T)`` singular directions per task, as in the released TSV-M and SCORE code.

    Raises a clear error when a matrix is too small for the number of tasks (k = 0).
    """
    k = int(rank / tasks)
    if k < 1:
        raise ValueError(
            f"{key!r}: a matrix of rank at most {rank} cannot give each of {tasks} tasks a singular "
            f"direction (int(r / T) = 0); merge fewer tasks or exclude this tensor"
        )
    return k


def fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular triplets so the largest-magnitude entry of each left vector is positive.

    ``u`` is ``[..., m, r]`` (vectors in columns), ``vh`` is ``[..., r, n]`` (vectors in rows).
    ``argmax`` returns the first maximal entry, which settles ties.
    """
    pivot = u.abs().argmax(dim=-2, keepdim=True)  # [..., 1, r]
    signs = torch.sign(torch.gather(u, -2, pivot))
    signs[signs == 0] = 1
    return u * signs, vh * signs.transpose(-2, -1)


def svd(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``A = U diag(S) Vh`` of a matrix or a batch, with deterministic signs.

    Wide matrices are decomposed through their transpose: LAPACK's divide-and-conquer SVD is
    several times slower on the wide layout (and pathologically so when batched on the CPU).
    """
    if matrices.shape[-2] < matrices.shape[-1]:
        v, s, uh = torch.linalg.svd(matrices.mT, full_matrices=False)
        u, vh = uh.mT, v.mT
    else:
        u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    u, vh = fix_signs(u, vh)
    return u, s, vh


GRAM_ASPECT = 1.5  # the Gram route pays off when one side is at least this much longer than the other


@dataclass(frozen=True, eq=False)  # tensors: compared by identity, not entry by entry
class Spectrum:
    """The top ``size`` singular directions of one matrix: what :func:`spectrum_triplets` needs to
    give its top-k triplets for every ``k <= size`` (and what the factor cache keeps per expert).

    On the Gram route (``gram``), ``values`` are the eigenvalues of the float64 Gram matrix of the
    short side, descending, and ``vectors`` the short side's singular vectors (float64,
    ``[short, size]``); the long side costs one product per request. Otherwise ``values``,
    ``vectors`` and ``rows`` are a signed SVD's ``S``, ``U [m, size]`` and ``Vh [size, n]``.
    """

    gram: bool
    values: torch.Tensor
    vectors: torch.Tensor
    rows: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.values.shape[-1]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.values, self.vectors, self.rows) if t is not None]


def _uses_gram(matrix: torch.Tensor) -> bool:
    m, n = matrix.shape[-2:]
    return matrix.dtype == torch.float32 and max(m, n) >= GRAM_ASPECT * min(m, n)


GRAM_CHUNK = 1 << 18  # entries of the float64 row blocks of the Gram route (2 MiB): never a whole matrix widened


def _float64_row_blocks(matrix: torch.Tensor) -> typing.Iterator[torch.Tensor]:
    """The rows of ``matrix`` (long side first) in float64 blocks of about GRAM_CHUNK entries."""
    tall = matrix.mT if matrix.shape[-2] < matrix.shape[-1] else matrix
    for block in tall.split(max(1, GRAM_CHUNK // tall.shape[-1])):
        yield block.double()


def _gram_spectrum(matrix: torch.Tensor, size: int) -> Spectrum:
    short = min(matrix.shape[-2:])
    gram = matrix.new_zeros(short, short, dtype=torch.float64)
    for block in _float64_row_blocks(matrix):
        gram.addmm_(block.mT, block)
    values, vectors = torch.linalg.eigh(gram)  # ascending
    return Spectrum(True, values[-size:].flip(-1), vectors[:, -size:].flip(-1))


def _gram_triplets(matrix: torch.Tensor, spectrum: Spectrum, k: int):
    values = spectrum.values[:k]
    floor = values[:1] * (torch.finfo(torch.float64).eps * max(matrix.shape[-2:])) ** 2
    if bool((values <= floor).any()):  # a (numerically) zero singular value among the top k
        u, s, vh = svd(matrix)
        return u[:, :k], s[:k], vh[:k]
    vectors = spectrum.vectors[:, :k].contiguous()  # one layout whatever the spectrum's size: bitwise the same product
    singular = values.sqrt()
    # the other side's singular vectors, A v / s, block by block
    long_side = torch.cat([block @ vectors for block in _float64_row_blocks(matrix)]).div_(singular)
    u, vh = (vectors, long_side.mT) if matrix.shape[-2] < matrix.shape[-1] else (long_side, vectors.mT)
    u, vh = fix_signs(u, vh)
    return u.to(matrix.dtype), singular.to(matrix.dtype), vh.to(matrix.dtype)


def spectrum(matrix: torch.Tensor, size: int) -> Spectrum:
    """The top ``size`` singular directions of one 2-D matrix (:class:`Spectrum`), on the route
    :func:`truncated_svd` takes for it."""
    if not _uses_gram(matrix):
        u, s, vh = svd(matrix)
        return Spectrum(False, s[:size].clone(), u[:, :size].clone(), vh[:size].clone())
    return _gram_spectrum(matrix, size)


def spectrum_triplets(
    matrix: torch.Tensor, spectrum: Spectrum, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``k`` triplets of ``matrix`` from its :class:`Spectrum` (``k <= spectrum.size``):
    bitwise what ``truncated_svd(matrix, k)`` gives, whatever size the spectrum was computed for."""
    if k > spectrum.size:
        raise ValueError(f"a spectrum of {spectrum.size} directions cannot give the top {k}")
    if not spectrum.gram:
        return spectrum.vectors[:, :k], spectrum.values[:k], spectrum.rows[:k]
    return _gram_triplets(matrix, spectrum, k)


def truncated_svd(matrices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``k`` singular triplets of a matrix or batch, with deterministic signs.

    Returns ``U [..., m, k]``, ``S [..., k]``, ``Vh [..., k, n]``. For float32 (or widened half)
    matrices whose long side is at least 1.5 times the short one, the triplets come from the
    eigendecomposition of the small Gram matrix (``A^T A`` or ``A A^T``) computed in float64:
    several times cheaper than an SVD of the rectangular matrix, and, since the Gram of float32
    values is formed in float64, more accurate than a float32 SVD for every singular value above
    about 1e-8 of the largest. Square-ish and float64 matrices use the thin SVD of :func:`svd`.
    A matrix whose top-k contains a (numerically) zero singular value falls back to the SVD, whose
    null directions are then the LAPACK routine's choice.

    A batch is decomposed one matrix at a time (the float64 copy is one matrix, not the batch), so
    each matrix gets exactly the triplets it gets alone, and those that :func:`spectrum` followed by
    :func:`spectrum_triplets` give for any spectrum size ``>= k``: the factor cache
    (:mod:`mergelib.methods.factors`) relies on this to decompose each expert once for every k.
    """
    if matrices.dim() > 2:
        shape = matrices.shape
        parts = [truncated_svd(matrix, k) for matrix in matrices.reshape(-1, *shape[-2:])]
        return tuple(torch.stack(part).reshape(*shape[:-2], *part[0].shape) for part in zip(*parts))
    if not _uses_gram(matrices):
        u, s, vh = svd(matrices)
        return u[:, :k], s[:k], vh[:k]
    return _gram_triplets(matrices, _gram_spectrum(matrices, k), k)


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``P Q^T`` of ``A = P S Q^T`` (the closest matrix with
    orthonormal columns or rows, in Frobenius norm); batched over leading dimensions."""
    if matrix.shape[-2] < matrix.shape[-1]:
        return polar(matrix.mT).mT
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def orthonormal_completion(basis: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` orthonormal columns orthogonal to the orthonormal columns of ``basis`` (m x p).

    Deterministic: column-pivoted Gram-Schmidt over the standard basis, each step taking the axis
    with the largest component outside the span so far (the first one on ties), re-orthogonalised
    once when that component has lost more than half its square norm to the projection (the
    criterion of Daniel, Gragg, Kaufman and Stewart, 1976), and the sign rule of :func:`fix_signs`.
    """
    m, p = basis.shape
    if p + count > m:
        raise ValueError(f"cannot complete {p} orthonormal columns of length {m} with {count} more")
    # the columns so far are kept as rows of one buffer: each step reads a contiguous prefix, and
    # nothing is concatenated (a copy of the whole basis per added vector)
    rows = basis.new_empty(p + count, m)
    rows[:p] = basis.T
    outside = (1.0 - (basis * basis).sum(dim=1)).clamp_min(0)  # |(I - Q Q^T) e_j|^2 for every axis j
    for step in range(count):
        done = rows[: p + step]
        axis = int(torch.argmax(outside))
        vector = -(done.T @ done[:, axis])
        vector[axis] += 1.0
        norm = vector.norm()
        if norm * norm < 0.5:  # cancellation: project once more (when m >> p the component stays large, one pass)
            vector -= done.T @ (done @ vector)
            norm = vector.norm()
        vector /= norm
        if vector[vector.abs().argmax()] < 0:
            vector = -vector
        rows[p + step] = vector
        outside = (outside - vector * vector).clamp_min(0)
    return rows[p:].T


def concatenated_singular_vectors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each task's first ``k`` singular triplets side by side: ``[m, T k]``, ``[T k]``, ``[T k, n]``.

    ``u``, ``s``, ``vh`` are a batched SVD over tasks (``[T, m, r]``, ``[T, r]``, ``[T, r, n]``);
    task ``t`` fills slots ``t k .. (t+1) k - 1``, as in the released TSV-M and SCORE code (which
    then pads the ``r - T k`` remaining slots with zeros).
    """
    tasks, m, _ = u.shape
    n = vh.shape[-1]
    left = u[:, :, :k].permute(1, 0, 2).reshape(m, tasks * k)
    right = vh[:, :k, :].reshape(tasks * k, n)
    return left, s[:, :k].reshape(tasks * k), right


def shared_basis(left: torch.Tensor, right: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared orthonormal bases ``U* (m x rank)`` and ``V*^T (rank x n)`` of TSV-M and SCORE.

    ``left`` (m x p) and ``right`` (p x n) are the concatenated singular vectors. Their polar
    factors span the first p slots; when p < rank (T does not divide r) the released code pads
    with zero vectors and lets the SVD routine complete the polar factor with arbitrary orthonormal
    vectors; here :func:`orthonormal_completion` fills those slots deterministically.
    """
    return complete_basis(polar(left), polar(right), rank)


def complete_basis(u_polar: torch.Tensor, vh_polar: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal ``u_polar (m x p)`` and ``vh_polar (p x n)`` extended to ``rank`` directions by
    :func:`orthonormal_completion` (returned as they are when ``rank <= p``)."""
    missing = rank - u_polar.shape[1]
    if missing <= 0:
        return u_polar, vh_polar
    return (torch.cat([u_polar, orthonormal_completion(u_polar, missing)], dim=1),
            torch.cat([vh_polar, orthonormal_completion(vh_polar.T, missing).T], dim=0))
