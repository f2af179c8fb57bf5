"""A grid of merges over the same experts, each expert decomposed once: :func:`merge_grid`.

The papers' protocols merge the same experts many times: SCORE's leave-one-domain-out merges,
for each of D held-out domains, the other D - 1 experts with every method and ablation variant;
the multi-task protocol merges the same T experts with every method. :func:`merge_grid` runs
such a grid of (fold, method) merges through :func:`mergelib.methods.registry.merge` itself, inside one
:class:`mergelib.methods.factors.FactorCache`, so that

* each expert's truncated singular triplets are computed once per matrix, for the largest rank
  asked, and reused in every fold and for every smaller rank (under leave-one-out T, hence the
  rank per task, is the same in every fold; SCORE's ``rank_fraction`` variants ask for less);
* each fold's shared basis (the polar factors of the concatenated singular vectors) is computed
  once and shared by every SCORE variant and TSV-M, the completed basis once per rank;
* each task's projection into a basis, and its trimming statistics, are computed once and
  shared by SCORE's variants that change only what they keep or how they trim.

**Identical results.** Every merge is ``mergelib.merge(name, [task_vectors[n] for n in fold],
**params)``, the same code: the cache hands back the very tensors the computation gives, and
each expert's triplets are those it gets in a batch (:func:`mergelib.methods.common.truncated_svd`
is batch-invariant, bitwise on the CPU; tested). So the grid's results are bitwise equal to
merging one at a time on the CPU. (On a GPU the batched and single eigendecompositions may differ
in the last bits, and then the grid agrees to float round-off.)

**Order and memory.** Folds are merged in the order given, fold after fold (the experts'
triplets stay cached across folds: that is where most of the saving is). Within a fold, methods
that share factors are merged one after the other (SCORE and TSV-M by their rank per task, in the
order of first appearance; other methods after them, in their order), and the fold's shared
factors are dropped whenever the next group starts; an expert's factors are dropped before the
first fold after which no fold merges it. One merge at a time is produced and yielded: the memory
held is one merged task vector, the experts' spectra (``min(m, n) k`` float64 values per expert
and matrix on the Gram route, k the largest rank used, about a quarter of the matrix's float32
bytes at k = r / 4; ``(m + n) k`` float32 values otherwise) and one group's bases and projections
(``(m + n) r`` and ``T r^2`` per matrix), besides what one merge needs while it runs (one tensor
name's stack and the result so far). Methods without SVD work simply call ``merge``.

The inputs are checked before anything is computed: expert names, folds (non-empty, no name
twice, names known), method specs (parsed, parameters checked) and the task vectors.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import torch

from mergelib.errors import ParameterError, UnknownNameError
from mergelib.methods.common import is_list_like
from mergelib.methods.factors import FactorCache
from mergelib.methods.registry import MethodSpec, check_method_parameters, merge, parse_method_spec, validate_task_vectors

FoldParameters = Callable[[Sequence[str]], Mapping[str, Any]]


def factor_group(spec: MethodSpec) -> Hashable | None:
    """Which shared factors a method uses (methods of the same group share them), or ``None``.

    SCORE (every variant) and TSV-M use the polar factors of the concatenated top-k triplets,
    with k set by SCORE's ``rank_fraction`` (TSV-M: 1); ESM's SVD decomposition uses the experts'
    triplets at its own rank budget. Only the grid's order and its eviction depend on this; the
    results do not.
    """
    if spec.name == "score":
        return ("concatenated triplets", float(spec.params.get("rank_fraction", 1.0)))
    if spec.name == "tsv_m":
        return ("concatenated triplets", 1.0)
    if spec.name == "esm" and spec.params.get("decomposition", "esd") == "svd":
        return ("esm svd", spec.params.get("rank_budget", "output"))
    return None


def grid_order(specs: Sequence[MethodSpec]) -> list[int]:
    """The positions of ``specs`` in the order the grid merges them within a fold: groups of
    :func:`factor_group` in order of first appearance, methods without a group last, each in
    the order given."""
    groups: dict[Hashable, list[int]] = {}
    rest = []
    for index, spec in enumerate(specs):
        group = factor_group(spec)
        (rest if group is None else groups.setdefault(group, [])).append(index)
    return [i for members in groups.values() for i in members] + rest


def _check_folds(task_vectors: Mapping[str, Mapping[str, torch.Tensor]], folds) -> list[list[str]]:
    if not is_list_like(folds):
        raise ParameterError(f"folds must be a list of lists of expert names, got {type(folds).__name__}")
    if not folds:
        raise ParameterError("folds is empty: give at least one list of expert names to merge")
    checked = []
    for index, fold in enumerate(folds):
        if not is_list_like(fold):
            raise ParameterError(f"fold {index} must be a list of expert names, got {fold!r}")
        if not fold:
            raise ParameterError(f"fold {index} is empty: a merge needs at least one expert")
        unknown = [name for name in fold if name not in task_vectors]
        if unknown:
            raise UnknownNameError(f"expert (fold {index})", unknown[0], task_vectors)
        repeated = sorted({name for name in fold if list(fold).count(name) > 1})
        if repeated:
            raise ParameterError(f"fold {index} names the expert(s) {repeated} more than once")
        checked.append(list(fold))
    return checked


def _fold_parameters(parameters: Mapping[str, FoldParameters] | None, spec: MethodSpec) -> FoldParameters | None:
    """The fold parameters of ``spec``: by its label first, then by its method name."""
    if not parameters:
        return None
    return parameters.get(spec.label, parameters.get(spec.name))


def merge_grid(
    task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
    folds: Sequence[Sequence[str]],
    methods: Sequence[str | MethodSpec],
    *,
    device: str | torch.device | None = None,
    fold_parameters: Mapping[str, FoldParameters] | None = None,
) -> Iterator[tuple[Sequence[str], str | MethodSpec, dict[str, torch.Tensor]]]:
    """Merge every fold with every method, each expert decomposed once; yield the merges one at a time.

    Args:
        task_vectors: expert name -> task vector (dict of tensors), identical keys and shapes.
        folds: lists of expert names; each is merged (in its order) with every method.
        methods: method specs, ``"score"``, ``"score[keep=diagonal]"``, ``"tsv_m"``,
            ``"esm[decomposition=svd]"`` or :class:`~mergelib.methods.registry.MethodSpec`; each
            at most once.
        device: the compute device, as for :func:`mergelib.methods.registry.merge`.
        fold_parameters: more parameters of a merge that depend on the fold (ESM's activation
            subspaces of the fold's experts), a function of the fold's names, keyed by spec label
            or by method name (the label wins).

    Yields ``(fold, method, merged)`` with ``fold`` and ``method`` as given; ``merged`` is what
    ``mergelib.merge(method, [task_vectors[n] for n in fold], **params)`` returns, bitwise on the
    CPU. Folds come in the order given; within a fold, the methods in ``grid_order``.
    Bad inputs raise here, before anything is decomposed.
    """
    if not isinstance(task_vectors, Mapping):
        raise ParameterError(f"task_vectors must be a dict (expert name -> task vector), got {type(task_vectors).__name__}")
    checked_folds = _check_folds(task_vectors, folds)
    if isinstance(methods, (str, MethodSpec)) or not isinstance(methods, Sequence):
        raise ParameterError(f"methods must be a list of method specs such as ['score', 'tsv_m'], got {methods!r}")
    if not methods:
        raise ParameterError("methods is empty: give at least one method spec")
    specs = [m if isinstance(m, MethodSpec) else parse_method_spec(m) for m in methods]
    labels = [s.label for s in specs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ParameterError(f"methods lists {repeated} more than once")
    for spec in specs:
        check_method_parameters(spec.name, spec.params)
    used = list(dict.fromkeys(name for fold in checked_folds for name in fold))
    validate_task_vectors([task_vectors[name] for name in used])
    return _run(task_vectors, folds, checked_folds, list(methods), specs, device, fold_parameters)


def _run(task_vectors, folds, checked_folds, methods, specs, device, fold_parameters) -> Iterator:
    cache = FactorCache()
    order = grid_order(specs)
    try:
        for position, (given, fold) in enumerate(zip(folds, checked_folds)):
            later = {name for other in checked_folds[position:] for name in other}
            cache.release(t for name in later for t in task_vectors[name].values())  # no later fold merges the rest
            vectors = [task_vectors[name] for name in fold]
            group = object()
            for index in order:
                spec = specs[index]
                if factor_group(spec) != group:
                    cache.end_fold()  # the previous group's (or fold's) bases and projections
                    group = factor_group(spec)
                function = _fold_parameters(fold_parameters, spec)
                extra = dict(function(fold)) if function is not None else {}
                with cache.activated():
                    merged = merge(spec.name, vectors, device=device, **spec.params, **extra)
                yield given, methods[index], merged
                del merged
            cache.end_fold()
    finally:
        cache.clear()
