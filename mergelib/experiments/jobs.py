"""General-purpose job kinds for :mod:`mergelib.experiments.sweep`.

``"merge-files"`` (:func:`merge_files_job`): merge safetensors checkpoints with a registered
method (:mod:`mergelib.io.merge_files`), writing the merged file and the norms of the task vectors.
The sweep imports this module when it meets a kind it does not know yet
(:data:`~mergelib.experiments.sweep.BUILT_IN_KIND_MODULES`), so ``Job("merge-files", ...)`` works
without importing it, in this process and on every worker. The benchmarks' kinds live in
:mod:`mergelib.experiments.benchmark_sweeps`.

Not from a paper: this is infrastructure, following no released code.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from mergelib.errors import ParameterValueError
from mergelib.experiments.sweep import check_job_params, register_job_kind

#: The parameters of a ``"merge-files"`` job (``method``, ``pretrained`` and ``experts`` are required).
MERGE_FILES_PARAMETERS = {"method", "pretrained", "experts", "parameters", "alpha", "prefix", "device"}


@register_job_kind("merge-files")
def merge_files_job(params: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Merge safetensors experts into a pretrained file with a registered method.

    params: ``method`` (a name of :data:`mergelib.methods.registry.METHODS`), ``pretrained`` (path), ``experts``
    (paths), optional ``parameters`` (the method's), ``alpha`` (1.0), ``prefix`` ("": every
    floating-point tensor; "visual." for the image encoder) and ``device``. Use absolute paths:
    workers may start elsewhere. Writes ``merged.safetensors`` (its manifest in its header) in the
    working directory, via :func:`mergelib.io.merge_files.merge_checkpoint_files`. Outputs: the merged
    file, its SHA-256, and the Frobenius norms of each expert's task vector and of the update
    applied to the pretrained weights (``merged - pretrained``, i.e. ``alpha`` times the merged
    task vector up to float rounding), over the merged tensors.
    """
    from mergelib.io.merge_files import load_safetensors, merge_checkpoint_files

    check_job_params("merge-files", params, ("method", "pretrained", "experts"), MERGE_FILES_PARAMETERS)
    experts = params["experts"]
    if isinstance(experts, str) or not experts:
        raise ParameterValueError(f"merge-files job: 'experts' must be a non-empty list of paths, got {experts!r}")
    prefix = params.get("prefix", "")
    output = Path(workdir) / "merged.safetensors"
    manifest = merge_checkpoint_files(
        params["method"], params["pretrained"], experts, output, parameters=params.get("parameters") or {},
        alpha=float(params.get("alpha", 1.0)), prefix=prefix, device=params.get("device"),
    )
    pretrained = {k: v for k, v in load_safetensors(params["pretrained"]).items()
                  if k.startswith(prefix) and v.is_floating_point()}

    def distance(state: Mapping[str, Any]) -> float:  # ||state - pretrained|| over the merged tensors
        return math.sqrt(sum(float((state[k].double() - v.double()).square().sum()) for k, v in pretrained.items()))

    return {
        "merged_file": str(output.resolve()),
        "merged_sha256": manifest["sha256"],
        "method": params["method"],
        "n_experts": len(experts),
        "n_tensors": len(pretrained),
        "expert_task_vector_norms": [distance(load_safetensors(path)) for path in experts],
        "merged_update_norm": distance(load_safetensors(output)),
    }
