"""The factors that SVD-based merges share, computed once: one place that owns the work per tensor.

For one matrix name and a set of merged experts (a *fold*), SCORE and TSV-M (and ESM's SVD
variant) need:

* each expert's top-k singular triplets (:func:`task_triplets`); with k = int(r / T) they depend
  on the expert and on T only, so under leave-one-out (T fixed) they are the same in every fold;
* the polar factors of the fold's concatenated singular vectors (:func:`concatenation_polars`),
  TSV-M's whole merge and the first T k directions of SCORE's shared basis;
* SCORE's shared basis ``U*, V*`` (:func:`shared_basis_of`), completed or not;
* each task's projection ``U*^T Delta_t V*`` into it (:func:`projection`), shared by every SCORE
  variant that changes only what is kept or how it is trimmed.

The methods compute these through the functions here, always. Outside a :class:`FactorCache`
they simply compute them (a merge is then what it always was); inside ``with FactorCache():``
each is computed once and reused: :func:`mergelib.methods.common.stacked` tells the cache which
source tensors a stack holds, so a stack built again from the same experts, in another merge
(another method, another fold), finds its factors. A cached result is the very tensor the
computation gives, so merging inside the cache is bitwise equal to merging outside it; the
per-expert triplets rely on :func:`mergelib.methods.common.truncated_svd` giving each matrix of a
batch what it gives alone (bitwise on the CPU; tested).

**Keys and invalidation.** An expert's triplets are keyed by the identity of its source tensor,
its version counter (bumped by every in-place change) and the stack's dtype, device and k; the
entry holds a reference to the source tensor, so its identity cannot be reused while the entry
lives. A tensor changed in place, or replaced, is decomposed afresh. (A change through ``.data``
bypasses the version counter; don't.) Fold entries are keyed by the tuple of the fold's
source keys. Caching stays off for stacks that were modified after they were built.

**Memory.** Triplets live until :meth:`FactorCache.clear`; fold entries (polars, bases,
projections) until :meth:`FactorCache.end_fold`, which :func:`mergelib.methods.grid.merge_grid` calls
whenever it moves to another fold or another group of methods. ``nbytes`` and ``live_tensors``
say what is held.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from typing import Callable, Hashable, Iterator, Sequence

import torch

from mergelib.methods.common import ACTIVE_FACTOR_CACHE, complete_basis, concatenated_singular_vectors, polar, truncated_svd

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for part in value for t in _tensors(part)]
    return []


class FactorCache:
    """A context manager holding the shared factors of SVD-based merges (see the module docstring).

    ``counts`` tallies, per kind (``"triplets"``, ``"polars"``, ``"basis"``, ``"projection"``),
    how many were ``computed`` and ``reused`` (keys ``"<kind> computed"``, ``"<kind> reused"``).
    """

    def __init__(self) -> None:
        self._triplets: dict[tuple, tuple[torch.Tensor, int, Triplets]] = {}
        self._fold: dict[tuple, object] = {}
        self._stack: tuple | None = None  # (weakref to the last stack, its version, its source keys)
        self.counts: Counter = Counter()
        self._token = None

    @contextlib.contextmanager
    def activated(self) -> Iterator["FactorCache"]:
        """Make this the cache that merges use, within the block; keep its entries after it."""
        token = ACTIVE_FACTOR_CACHE.set(self)
        try:
            yield self
        finally:
            ACTIVE_FACTOR_CACHE.reset(token)

    def __enter__(self) -> "FactorCache":
        """``with FactorCache() as cache:``: active within the block, emptied at its end."""
        if self._token is not None:
            raise RuntimeError("a FactorCache cannot be entered twice at once")
        self._token = ACTIVE_FACTOR_CACHE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        ACTIVE_FACTOR_CACHE.reset(self._token)
        self._token = None
        self.clear()

    # --------------------------------------------------------------- bookkeeping
    def note_stack(self, key: str, stack: torch.Tensor, sources: Sequence[torch.Tensor]) -> None:
        """Record that ``stack`` (just built) holds ``sources``, in order (called by ``stacked``)."""
        signature = tuple((key, id(t), t._version, stack.dtype, str(stack.device), tuple(stack.shape[1:]))
                          for t in sources)
        self._stack = (weakref.ref(stack), stack._version, signature, tuple(sources))

    def sources_of(self, stack: torch.Tensor) -> tuple | None:
        """The source signature of ``stack`` if it is the last stack noted and still unmodified."""
        if self._stack is None:
            return None
        ref, version, signature, _ = self._stack
        return signature if ref() is stack and stack._version == version else None

    def end_fold(self) -> None:
        """Drop the fold entries (polars, bases, projections); keep the experts' triplets."""
        self._fold.clear()

    def clear(self) -> None:
        """Drop everything."""
        self._fold.clear()
        self._triplets.clear()
        self._stack = None

    def cached_tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (triplets and fold entries, not the referenced sources)."""
        held = [t for _, _, triplets in self._triplets.values() for t in triplets]
        return held + [t for value in self._fold.values() for t in _tensors(value)]

    @property
    def live_tensors(self) -> int:
        return len(self.cached_tensors())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cached_tensors())

    # --------------------------------------------------------------- lookups
    def triplets(self, stack: torch.Tensor, k: int, signature: tuple) -> Triplets:
        """Each task's top-k triplets, stacked, from cached per-expert entries where possible."""
        _, _, _, sources = self._stack
        keys = [(entry, k) for entry in signature]
        missing = [t for t, slot in enumerate(keys)
                   if not (slot in self._triplets and self._triplets[slot][0] is sources[t]
                           and self._triplets[slot][1] == sources[t]._version)]
        if missing:
            computed = truncated_svd(stack[missing], k)
            for i, t in enumerate(missing):
                self._triplets[keys[t]] = (sources[t], sources[t]._version, tuple(part[i].clone() for part in computed))
        self.counts["triplets computed"] += len(missing)
        self.counts["triplets reused"] += len(keys) - len(missing)
        parts = [self._triplets[slot][2] for slot in keys]
        return tuple(torch.stack([p[i] for p in parts]) for i in range(3))

    def fold_entry(self, kind: str, signature: tuple, params: Hashable, compute: Callable[[], object]):
        slot = (kind, signature, params)
        if slot in self._fold:
            self.counts[f"{kind} reused"] += 1
            return self._fold[slot]
        value = compute()
        self._fold[slot] = value
        self.counts[f"{kind} computed"] += 1
        return value


def _active(stack: torch.Tensor) -> tuple[FactorCache | None, tuple | None]:
    cache = ACTIVE_FACTOR_CACHE.get()
    if cache is None:
        return None, None
    signature = cache.sources_of(stack)
    return (cache, signature) if signature is not None else (None, None)


# ------------------------------------------------------------------- the shared factors
def task_triplets(stack: torch.Tensor, k: int) -> Triplets:
    """Each task's top-k singular triplets of the ``[T, m, n]`` stack: ``U [T, m, k]``,
    ``S [T, k]``, ``Vh [T, k, n]`` (:func:`mergelib.methods.common.truncated_svd`), per expert once."""
    cache, signature = _active(stack)
    if cache is None:
        return truncated_svd(stack, k)
    return cache.triplets(stack, k, signature)


def concatenation_polars(stack: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``polar([U_1 .. U_T])`` (m x T k), the concatenated singular values (T k) and
    ``polar([V_1 .. V_T]^T)`` (T k x n) of the tasks' top-k triplets; once per fold and k."""
    def compute():
        left, values, right = concatenated_singular_vectors(*task_triplets(stack, k), k)
        return polar(left), values, polar(right)

    cache, signature = _active(stack)
    return compute() if cache is None else cache.fold_entry("polars", signature, k, compute)


def shared_basis_of(stack: torch.Tensor, k: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SCORE's shared basis ``U* (m x rank)``, ``V*^T (rank x n)`` from the tasks' top-k triplets;
    once per fold, k and rank (``rank`` = T k: no completion, no copy)."""
    def compute():
        u_polar, _, vh_polar = concatenation_polars(stack, k)
        return complete_basis(u_polar, vh_polar, rank)

    cache, signature = _active(stack)
    if cache is None or rank <= stack.shape[0] * k:
        return compute()
    return cache.fold_entry("basis", signature, (k, rank), compute)


def projection(stack: torch.Tensor, u_star: torch.Tensor, vh_star: torch.Tensor, basis_id: Hashable | None) -> torch.Tensor:
    """Each task matrix in the shared basis, ``U*^T Delta_t V*`` (``[T, rank, rank]``); once per
    fold and basis (``basis_id`` names the basis among those of this stack; ``None``: not cached)."""
    cache, signature = _active(stack)
    if cache is None or basis_id is None:
        return u_star.T @ stack @ vh_star.T
    return cache.fold_entry("projection", signature, basis_id, lambda: u_star.T @ stack @ vh_star.T)
