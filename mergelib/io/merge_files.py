"""Merge checkpoint files without writing Python: ``mergelib merge --method NAME ...``.

The inputs are safetensors state dicts of one open_clip architecture (the pretrained model and
each expert; full CLIP models or image encoders alone, with open_clip's names). Task vectors are
taken over the pretrained file's floating-point tensors (optionally only those whose name starts
with ``prefix``), merged with a registered method, added to the pretrained weights with
``alpha``, and written as a safetensors state dict whose header records the method, its
parameters and the SHA-256 of every input (:mod:`mergelib.io.checkpoints`: one file, one atomic
rename). Pickled checkpoints are never loaded here: convert them once with the explicit import
step.

Everything that can be checked without the weights is checked before any checkpoint is loaded:
the method and its parameters (names and values), ``alpha`` (a finite number), every input's
safetensors header (missing, empty, truncated, another format, a directory or special file),
that the output is none of the inputs (compared as files: hard links and symlinks included),
that it replaces no file mergelib did not write (unless ``overwrite``) and that its folder is
writable. The merged tensors are checked before they are written: NaN or Inf (an overflowing
float16 sum, say) is an error naming the tensor, and nothing is written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file

from mergelib.io.checkpoints import (
    check_finite,
    check_not_an_input,
    check_replaceable,
    check_writable,
    read_header,
    save_state,
    sha256_file,
)
from mergelib.errors import ParameterError, ParameterValueError
from mergelib.methods import merge
from mergelib.methods.registry import parse_parameter_value
from mergelib.methods.registry import check_method_parameters
from mergelib.task_vectors import apply_task_vector, task_vector


def parse_parameters(pairs: Sequence[str]) -> dict[str, Any]:
    """``["keep=diagonal", "z=2e0"]`` -> ``{"keep": "diagonal", "z": 2.0}`` (values read by
    :func:`mergelib.methods.registry.parse_parameter_value`, as in method specs)."""
    parameters = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise ParameterError(f"--param expects NAME=VALUE, got {pair!r}")
        try:
            parameters[name.strip()] = parse_parameter_value(text)
        except ParameterValueError as error:
            raise ParameterValueError(f"--param {pair!r}: {error}") from None
    return parameters


def check_safetensors(path: str | Path) -> None:
    """Raise unless ``path`` is a readable safetensors file (header only; nothing is loaded):
    :class:`FileNotFoundError`, or :class:`~mergelib.errors.CorruptCheckpointError` naming the file."""
    path = Path(path)
    if path.suffix != ".safetensors" and not path.is_dir():
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        raise ParameterValueError(f"{path}: only safetensors state dicts are read here (no pickles); convert other "
                                  "formats once with mergelib's checkpoint import step (`mergelib import`)")
    read_header(path)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after :func:`check_safetensors`."""
    check_safetensors(path)
    return load_file(str(path))


def check_alpha(alpha: object) -> float:
    """``alpha`` as a float; :class:`~mergelib.errors.ParameterValueError` unless a finite number."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ParameterValueError(f"alpha must be a finite number, got {alpha!r}")
    return float(alpha)


def merge_checkpoint_files(
    method: str,
    pretrained: str | Path,
    experts: Sequence[str | Path],
    output: str | Path,
    *,
    parameters: Mapping[str, Any] | None = None,
    alpha: float = 1.0,
    prefix: str = "",
    device: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Merge ``experts`` into ``pretrained`` with ``method``; write ``output``; return its manifest.

    ``overwrite``: replace ``output`` even when it is a file mergelib did not write (an earlier
    output of mergelib is always replaced). See the module's docstring for what is checked first.
    """
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ParameterValueError(f"output must be a .safetensors file, got {output}")
    if not experts:
        raise ParameterValueError("give at least one expert checkpoint")
    alpha = check_alpha(alpha)
    check_method_parameters(method, dict(parameters or {}))  # names and values, before any weights are read
    inputs = [Path(pretrained), *map(Path, experts)]
    for path in inputs:
        check_safetensors(path)
    check_not_an_input(output, inputs)
    check_replaceable(output, overwrite=overwrite)
    check_writable(output)
    base = load_safetensors(pretrained)
    selected = {k: v for k, v in base.items() if k.startswith(prefix)}
    if not any(v.is_floating_point() for v in selected.values()):
        raise ValueError(f"{pretrained}: no floating-point tensor's name starts with {prefix!r}")
    vectors = []
    for path in experts:
        state = load_safetensors(path)
        try:
            vectors.append(task_vector(state, selected))
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path} does not match {pretrained}: {error}") from error
        del state
    merged = merge(method, vectors, device=device, **(parameters or {}))
    del vectors
    model = {**base, **apply_task_vector(selected, merged, alpha=alpha)}
    check_finite(model, f"merged output {output}", "an overflowing sum: merge float32 checkpoints, or lower alpha")
    return save_state(output, model, {
        "method": method, "parameters": dict(parameters or {}), "alpha": alpha, "prefix": prefix,
        "pretrained": {"file": str(pretrained), "sha256": sha256_file(Path(pretrained))},
        "experts": [{"file": str(p), "sha256": sha256_file(Path(p))} for p in experts],
    }, overwrite=overwrite)
