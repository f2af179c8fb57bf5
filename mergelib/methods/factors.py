"""The factors that SVD-based merges share, computed once: one place that owns the work per tensor.

For one matrix name and a set of merged experts (a *fold*), SCORE and TSV-M (and ESM's SVD
variant) need:

* each expert's top-k singular triplets (:func:`task_triplets`); with k = int(r / T) they depend
  on the expert and on T only, so under leave-one-out (T fixed) they are the same in every fold.
  The cache keeps each expert's :class:`~mergelib.methods.common.Spectrum` (the top of its
  spectrum, for the largest k asked so far) and gives the triplets for any smaller k from it, so
  SCORE's ``rank_fraction`` variants do not decompose the experts again;
* the polar factors of the fold's concatenated singular vectors (:func:`concatenation_polars`),
  TSV-M's whole merge and the first T k directions of SCORE's shared basis;
* SCORE's shared basis ``U*, V*`` (:func:`shared_basis_of`), completed or not;
* each task's projection ``U*^T Delta_t V*`` into it (:func:`projection`), shared by every SCORE
  variant that changes only what is kept or how it is trimmed, and what those variants derive
  from it alone (the trimming statistics, :func:`fold_value`).

The methods compute these through the functions here, always. Outside a :class:`FactorCache`
they simply compute them (a merge is then what it always was); inside ``with FactorCache():``
each is computed once and reused: :func:`mergelib.methods.common.stacked` tells the cache which
source tensors a stack holds, so a stack built again from the same experts, in another merge
(another method, another fold), finds its factors. A cached result is the very tensor the
computation gives, so merging inside the cache is bitwise equal to merging outside it; the
per-expert triplets rely on :func:`mergelib.methods.common.truncated_svd` giving each matrix of a
batch what it gives alone, and what :func:`~mergelib.methods.common.spectrum_triplets` gives from a
spectrum of any size >= k (bitwise on the CPU; tested).

**Keys and invalidation.** An expert's spectrum is keyed by the identity of its source tensor
and the stack's dtype, device and shape, and holds the source's version counter (bumped by every
in-place change) and a reference to the source tensor, so its identity cannot be reused while the
entry lives. A tensor changed in place, or replaced, is decomposed afresh. (A change through ``.data``
bypasses the version counter; don't.) Fold entries are keyed by the tuple of the fold's
source keys. Caching stays off for stacks that were modified after they were built.

**Memory.** Spectra live until :meth:`FactorCache.release` drops those of experts that no later
fold merges, or :meth:`FactorCache.clear`; on the Gram route a spectrum is ``short x k`` float64
values, about a quarter of the expert's float32 matrix at k = r / 4, and the long side is
recomputed (one product) when a fold asks for the triplets. Fold entries (polars, bases,
projections, statistics) live until :meth:`FactorCache.end_fold`, which
:func:`mergelib.methods.grid.merge_grid` calls whenever it moves to another fold or another group
of methods; a completed basis replaces the polar factors it extends (they become views of its first
columns), so the two are not held twice. ``nbytes`` and ``live_tensors`` say what is held.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from typing import Callable, Hashable, Iterable, Iterator, Sequence

import torch

from mergelib.methods.common import (
    ACTIVE_FACTOR_CACHE,
    Spectrum,
    complete_basis,
    concatenated_singular_vectors,
    is_all_zero,
    polar,
    spectrum,
    spectrum_triplets,
    truncated_svd,
)

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Spectrum):
        return value.tensors()
    if isinstance(value, (tuple, list)):
        return [t for part in value for t in _tensors(part)]
    return []


class FactorCache:
    """A context manager holding the shared factors of SVD-based merges (see the module docstring).

    ``counts`` tallies, per kind (``"triplets"``: an expert's spectrum, ``"polars"``, ``"basis"``,
    ``"projection"``, ``"trim statistics"``), how many were ``computed`` and ``reused`` (keys
    ``"<kind> computed"``, ``"<kind> reused"``).
    """

    def __init__(self) -> None:
        self._spectra: dict[tuple, tuple[torch.Tensor, int, Spectrum]] = {}
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
        """Drop the fold entries (polars, bases, projections, statistics); keep the experts' spectra."""
        self._fold.clear()

    def release(self, keep: Iterable[torch.Tensor]) -> None:
        """Drop the spectra of every source tensor not in ``keep`` (by identity): those of experts
        that no later merge needs."""
        kept = {id(t) for t in keep}
        for slot in [slot for slot, (source, _, _) in self._spectra.items() if id(source) not in kept]:
            del self._spectra[slot]

    def clear(self) -> None:
        """Drop everything."""
        self._fold.clear()
        self._spectra.clear()
        self._stack = None

    def cached_tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (spectra and fold entries, not the referenced sources), views
        included (``nbytes`` counts each storage once)."""
        held = [t for _, _, entry in self._spectra.values() for t in entry.tensors()]
        return held + [t for value in self._fold.values() for t in _tensors(value)]

    @property
    def live_tensors(self) -> int:
        return len(self.cached_tensors())

    @property
    def nbytes(self) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.cached_tensors()}
        return sum(storages.values())

    # --------------------------------------------------------------- lookups
    def triplets(self, stack: torch.Tensor, k: int, signature: tuple) -> Triplets:
        """Each task's top-k triplets, stacked, from each expert's cached spectrum where it is
        current and holds at least k directions (bitwise what ``truncated_svd(stack, k)`` gives)."""
        _, _, _, sources = self._stack
        parts = []
        for t, entry in enumerate(signature):
            slot = entry[:2] + entry[3:]  # the version is checked, not keyed: a changed tensor replaces its entry
            held = self._spectra.get(slot)
            if held is None or held[0] is not sources[t] or held[1] != sources[t]._version or held[2].size < k:
                held = (sources[t], sources[t]._version, spectrum(stack[t], k))
                self._spectra[slot] = held
                self.counts["triplets computed"] += 1
            else:
                self.counts["triplets reused"] += 1
            parts.append(spectrum_triplets(stack[t], held[2], k))
        return tuple(torch.stack(part) for part in zip(*parts))

    def fold_entry(self, kind: str, signature: tuple, params: Hashable, compute: Callable[[], object]):
        slot = (kind, signature, params)
        if slot in self._fold:
            self.counts[f"{kind} reused"] += 1
            return self._fold[slot]
        value = compute()
        self._fold[slot] = value
        self.counts[f"{kind} computed"] += 1
        return value

    def update_fold_entry(self, kind: str, signature: tuple, params: Hashable, update: Callable[[object], object]):
        """Replace a fold entry, if held, by ``update(entry)``: the same numbers, held differently."""
        slot = (kind, signature, params)
        if slot in self._fold:
            self._fold[slot] = update(self._fold[slot])


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
        u_star, vh_star = compute()  # in a cache, possibly views of a completed basis: given the layout of
        return u_star.contiguous(), vh_star.contiguous()  # fresh factors, so the products are bitwise the same
    computed = cache.counts["basis computed"]
    u_star, vh_star = cache.fold_entry("basis", signature, (k, rank), compute)
    if cache.counts["basis computed"] > computed:  # the polar factors are the basis's first T k directions:
        def as_views(polars):  # held once, as views of the basis (TSV-M reads the same numbers)
            width = polars[1].shape[0]
            return u_star[:, :width], polars[1], vh_star[:width]

        cache.update_fold_entry("polars", signature, k, as_views)
    return u_star, vh_star


def project(stack: torch.Tensor, u_star: torch.Tensor, vh_star: torch.Tensor) -> torch.Tensor:
    """``U*^T Delta_t V*`` for each task of the ``[T, m, n]`` stack: ``[T, rank, rank]``."""
    out = stack.new_empty(stack.shape[0], u_star.shape[1], vh_star.shape[0])
    tall = stack.shape[-2] >= stack.shape[-1]
    for t, delta in enumerate(stack):  # one task at a time, long side first: the intermediate is rank x short
        if tall:
            torch.mm(u_star.T @ delta, vh_star.T, out=out[t])
        else:
            torch.mm(u_star.T, delta @ vh_star.T, out=out[t])
    return out


def projection(
    stack: torch.Tensor, u_star: torch.Tensor, vh_star: torch.Tensor, basis_id: Hashable | None
) -> torch.Tensor:
    """Each task matrix in the shared basis, ``U*^T Delta_t V*`` (``[T, rank, rank]``, :func:`project`);
    once per fold and basis (``basis_id`` names the basis among those of this stack; ``None``: not cached)."""
    return fold_value(stack, "projection", basis_id, lambda: project(stack, u_star, vh_star))


def all_zero(stack: torch.Tensor) -> bool:
    """:func:`mergelib.methods.common.is_all_zero`, once per fold (a pass over the whole stack)."""
    return fold_value(stack, "all zero", True, lambda: is_all_zero(stack))


def fold_value(stack: torch.Tensor, kind: str, params: Hashable | None, compute: Callable[[], object]):
    """``compute()``, once per fold within a :class:`FactorCache`: for what a method derives from
    the fold's stack alone (``params`` names it among the values of its ``kind``; ``None``: not cached)."""
    cache, signature = _active(stack)
    if cache is None or params is None:
        return compute()
    return cache.fold_entry(kind, signature, params, compute)
