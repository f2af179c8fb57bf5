"""Checkpoints as safetensors files with a JSON manifest, cached and verified by content hash.

A checkpoint ``NAME.safetensors`` has a manifest ``NAME.json`` beside it that records what the
weights are (backbone, dataset, domain, hyperparameters, seed), the hash of the configuration
that produced them (``key``) and the SHA-256 of the safetensors file. :func:`cached_state` reuses
a checkpoint only when the key matches and the file hashes to the recorded value; a truncated or
altered file is reported, deleted and rebuilt, never used. Writes are atomic (temporary file,
then rename), so an interrupted run leaves no half-written checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CorruptCheckpointError

if TYPE_CHECKING:
    import pandas as pd

MANIFEST_VERSION = 1


def config_hash(obj: Any) -> str:
    """Stable SHA-256 of a JSON-serialisable configuration (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def manifest_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def save_state(path: Path, state: dict[str, torch.Tensor], manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``state`` to ``path`` (safetensors) and its manifest; return the manifest written."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    full = {**manifest, "format": MANIFEST_VERSION, "file": path.name, "sha256": sha256_file(path)}
    text = json.dumps(full, indent=2, sort_keys=True, default=str)
    atomic_write(manifest_path(path), lambda tmp: tmp.write_text(text))
    return full


def load_state(path: Path, *, key: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint after checking it against its manifest.

    Raises :class:`mergelib.errors.CorruptCheckpointError` when the manifest is missing or unreadable, the key
    differs from ``key``, or the file's hash does not match (truncated or modified file).
    """
    path = Path(path)
    try:
        manifest = json.loads(manifest_path(path).read_text())
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(f"checkpoint {path}: manifest missing or unreadable ({error})") from error
    if key is not None and manifest.get("key") != key:
        raise CorruptCheckpointError(f"checkpoint {path}: made for another configuration (key mismatch)")
    if not path.is_file():
        raise CorruptCheckpointError(f"checkpoint {path}: weights file missing")
    actual = sha256_file(path)
    if actual != manifest.get("sha256"):
        raise CorruptCheckpointError(
            f"checkpoint {path}: content hash {actual[:12]}… does not match the manifest's "
            f"{str(manifest.get('sha256'))[:12]}… (truncated or modified file)"
        )
    try:
        return load_file(str(path)), manifest
    except (SafetensorError, OSError) as error:  # pragma: no cover - the hash check catches these first
        raise CorruptCheckpointError(f"checkpoint {path}: unreadable ({error})") from error


def cached_state(
    path: Path,
    key: str,
    build: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return the checkpoint at ``path`` if valid for ``key``; otherwise build, save and return it.

    ``build()`` returns ``(state, manifest fields)``. A corrupt file is reported on stderr, removed
    and rebuilt.
    """
    path = Path(path)
    if path.exists() or manifest_path(path).exists():
        try:
            return load_state(path, key=key)
        except CorruptCheckpointError as error:
            print(f"[mergelib] {error}; rebuilding it", file=sys.stderr, flush=True)
            for stale in (path, manifest_path(path)):
                stale.unlink(missing_ok=True)
    state, fields = build()
    manifest = save_state(path, state, {**fields, "key": key})
    return state, manifest


def cached_tables(
    directory: Path, key: Any, compute: Callable[[], tuple["pd.DataFrame", ...]]
) -> tuple["pd.DataFrame", ...]:
    """Tables computed by ``compute()``, cached as CSV under ``directory`` by the hash of ``key``.

    Use for deterministic results (evaluations); include in ``key`` everything they depend on,
    :func:`mergelib.provenance.code_fingerprint` among it. The tables returned are always read
    back from the CSV files, so a first and a cached call give identical frames.
    """
    import pandas as pd

    directory = Path(directory)
    digest = config_hash(key)
    manifest = directory / f"{digest[:20]}.json"
    if manifest.exists():
        try:
            record = json.loads(manifest.read_text())
            return tuple(pd.read_csv(directory / name) for name in record["tables"])
        except (OSError, ValueError, KeyError) as error:
            print(f"[mergelib] cached results {manifest} unreadable ({error}); recomputing", file=sys.stderr, flush=True)
    tables = compute()
    names = [f"{digest[:20]}-{i}.csv" for i in range(len(tables))]
    for name, table in zip(names, tables):
        atomic_write(directory / name, lambda tmp, t=table: t.to_csv(tmp, index=False))
    text = json.dumps({"key": key, "tables": names}, indent=2, sort_keys=True, default=str)
    atomic_write(manifest, lambda tmp: tmp.write_text(text))  # written last: marks the entry complete
    return tuple(pd.read_csv(directory / name) for name in names)
