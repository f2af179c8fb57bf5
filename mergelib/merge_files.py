"""Merge checkpoint files without writing Python: ``mergelib merge --method NAME ...``.

The inputs are safetensors state dicts of one open_clip architecture (the pretrained model and
each expert; full CLIP models or image encoders alone, with open_clip's names). Task vectors are
taken over the pretrained file's floating-point tensors (optionally only those whose name starts
with ``prefix``), merged with a registered method, added to the pretrained weights with
``alpha``, and written as a safetensors state dict with a JSON manifest beside it recording the
method, its parameters and the SHA-256 of every input. Pickled checkpoints are never loaded
here: convert them once with the explicit import step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file

from .checkpoints import save_state, sha256_file
from .errors import ParameterError, ParameterValueError
from .methods import merge
from .methods.registry import parse_parameter_value
from .task_vectors import apply_task_vector, task_vector


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


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only safetensors state dicts are read here (no pickles); convert other "
                         "formats once with mergelib's checkpoint import step")
    return load_file(str(path))


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
) -> dict[str, Any]:
    """Merge ``experts`` into ``pretrained`` with ``method``; write ``output``; return its manifest."""
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"output must be a .safetensors file, got {output}")
    if not experts:
        raise ValueError("give at least one expert checkpoint")
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
    return save_state(output, model, {
        "method": method, "parameters": dict(parameters or {}), "alpha": alpha, "prefix": prefix,
        "pretrained": {"file": str(pretrained), "sha256": sha256_file(Path(pretrained))},
        "experts": [{"file": str(p), "sha256": sha256_file(Path(p))} for p in experts],
    })
