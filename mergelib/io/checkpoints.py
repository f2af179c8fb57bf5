"""Checkpoints as safetensors files that carry their own provenance, cached and verified by hash.

A checkpoint ``NAME.safetensors`` holds its manifest inside the file: the safetensors header's
``__metadata__`` maps the key ``"mergelib"`` (:data:`METADATA_KEY`) to one JSON string recording
what the weights are (backbone, dataset, domain, hyperparameters, seed, or a merge's method and
inputs), the hash of the configuration that produced them (``key``) and the SHA-256 of the
file's tensor data section (``data_sha256``: the bytes after the 8-byte header length and the
JSON header; a file cannot hold its own hash). Weights and provenance are therefore one file,
written by one atomic rename: after a kill at any moment the path holds either the complete new
file or the old one, never a manifest describing other weights. :func:`read_manifest` reads the
header alone (no tensors); :func:`load_state` also checks the data hash and returns the manifest
with ``"sha256"``, the whole file's SHA-256 computed on load (the identity of an expert).
:func:`cached_state` reuses a checkpoint only when the key matches and the data hash agrees; a
truncated or altered file is reported and rebuilt, never used.

What mergelib writes never replaces a file it did not write: :func:`check_replaceable` refuses an
existing path without mergelib's provenance unless ``overwrite=True`` (checkpoints of older
mergelib versions, with a ``.json`` manifest beside them, count as mergelib's; that manifest is
removed once the file is replaced). Writes go through :func:`atomic_write`: a temporary file in
the destination directory (named by :func:`temporary_name_pattern`), given the mode an ordinary
new file gets under the umask (:func:`new_file_mode`), synced, then renamed over the target;
temporaries left by a killed write of the same target are removed by the next write
(:func:`remove_stale_temporaries`). Checkpoint files that cannot be read (empty, truncated,
another format, a directory, a FIFO or other special file, which is never opened) raise a
:class:`~mergelib.errors.CorruptCheckpointError` naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file

from mergelib.errors import CorruptCheckpointError, OutputRefusedError, TensorError
from mergelib.methods.common import non_finite_count

if TYPE_CHECKING:
    import pandas as pd

#: Version of the provenance record written into the safetensors header (version 1 wrote a ``.json`` beside).
MANIFEST_VERSION = 2
#: The key of ``__metadata__`` in the safetensors header that holds mergelib's provenance (JSON).
METADATA_KEY = "mergelib"
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_PLACEHOLDER = "~" * 64  # stands for data_sha256 while the file is written; same length as the hex


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


# ---------------------------------------------------------------------------- atomic writes

_umask_lock = threading.Lock()


def new_file_mode() -> int:
    """The mode an ordinary new file gets under the current umask: ``0o666 & ~umask``.

    Read from ``/proc/self/status`` where the kernel reports it; otherwise by setting and
    restoring the umask (process-global, so under a lock and only here).
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.mergelib-{_host_tag()}-{os.getpid()}-"


def temporary_name_pattern(path: Path) -> re.Pattern:
    """The names of :func:`atomic_write`'s temporary files for ``path`` (in ``path``'s folder):
    ``.{name}.mergelib-{host}-{pid}-{random}.tmp``, and ``.{name}.{random}.tmp`` of older versions."""
    name = re.escape(Path(path).name)
    return re.compile(rf"\.{name}\.(?:mergelib-(?P<host>[A-Za-z0-9_]*)-(?P<pid>\d+)-)?[a-z0-9_]{{8}}\.tmp")


def _writer_gone(match: re.Match, entry: os.DirEntry, max_foreign_age: float) -> bool:
    """Whether the write that made this temporary is over (so the file is a leftover)."""
    if match.group("pid") is None:
        return True  # an older mergelib's name: no writer can be identified
    pid = int(match.group("pid"))
    if match.group("host") != _host_tag():  # written from another machine (shared file system)
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > max_foreign_age
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def remove_stale_temporaries(path: Path, *, max_foreign_age: float = 86400.0) -> list[Path]:
    """Delete the temporaries left by killed :func:`atomic_write` calls of ``path``; return them.

    Only files named by :func:`temporary_name_pattern` for this very target are considered, and
    only those whose writer is gone (its process no longer runs on this host; written from
    another host more than ``max_foreign_age`` seconds ago), so a concurrent write of the same
    target is never disturbed. Each removal is reported on stderr.
    """
    path = Path(path)
    pattern = temporary_name_pattern(path)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if _writer_gone(match, entry, max_foreign_age):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
                print(f"[mergelib] removed {entry.path}, left by an interrupted write of {path}", file=sys.stderr, flush=True)
        except FileNotFoundError:
            continue  # removed meanwhile by another cleanup
    return removed


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The temporary file gets the mode of an ordinary new file (:func:`new_file_mode`, not
    ``mkstemp``'s 0600) and is synced before the rename, so after a kill or a crash ``path`` is
    either the old file or the complete new one. Leftover temporaries of earlier killed writes of
    ``path`` are removed first (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, new_file_mode())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(path: Path) -> None:
    """Raise :class:`~mergelib.errors.OutputRefusedError` unless ``path`` can be written, before any work is done.

    Creates (and removes at once) a temporary file in ``path``'s folder, the way
    :func:`atomic_write` will, or, when that folder does not exist yet, in its nearest existing
    ancestor (nothing is created for good), so a read-only or special location (``/proc``,
    ``/sys``) fails early.
    """
    path = Path(path)
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    prefix = _temporary_prefix(path) if folder == path.parent else f".mergelib-probe-{_host_tag()}-{os.getpid()}-"
    try:
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{folder} is not a folder")
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as error:
        raise OutputRefusedError(
            f"cannot write {path}: creating a file in {folder} fails ({error.strerror or error}); "
            "choose an output in a writable folder"
        ) from None


# ---------------------------------------------------------------------------- reading headers

def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _regular_file(path: Path, what: str = "checkpoint") -> os.stat_result:
    """``stat`` of ``path`` if it is a regular file (followed through links); never opens it."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as error:
        raise CorruptCheckpointError(f"{what} {path}: cannot be read ({error.strerror or error})") from None
    if stat.S_ISDIR(info.st_mode):
        raise CorruptCheckpointError(f"{what} {path} is a directory, not a file; give the .safetensors file itself")
    if not stat.S_ISREG(info.st_mode):
        raise CorruptCheckpointError(
            f"{what} {path} is a {_file_kind(info.st_mode)}, not a regular file; mergelib reads checkpoints only "
            "from regular files (it does not open this one): give the path of a .safetensors file")
    return info


_REMEDY = ("write it again, or convert other formats once with `mergelib import` "
           "(pickled .pt/.bin files are never read as safetensors)")


def _raw_header(path: Path) -> tuple[Any, int, int]:
    """``(parsed JSON header, header length, file size)``, without checking the tensors' extents."""
    size = _regular_file(path).st_size
    if size < 8:
        what = "empty" if size == 0 else f"only {size} bytes long (truncated, or another format)"
        raise CorruptCheckpointError(f"checkpoint {path} is {what}, not a safetensors file; {_REMEDY}")
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(size - 8, _HEADER_LIMIT):
                raise ValueError(f"header length {length} does not fit the file of {size} bytes")
            header = json.loads(handle.read(length))
    except OSError as error:
        raise CorruptCheckpointError(f"checkpoint {path}: cannot be read ({error.strerror or error})") from None
    except (ValueError, UnicodeDecodeError, struct.error) as error:
        raise CorruptCheckpointError(
            f"checkpoint {path} is not a safetensors file (truncated, or another format such as a pickle "
            f"or text: {str(error)[:120]}); {_REMEDY}") from None
    return header, length, size


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and where its data section starts (8 + header length).

    Reads only the header; checks that the tensors' declared extents fill the file exactly. Raises
    :class:`~mergelib.errors.CorruptCheckpointError` naming the file when it is not a readable safetensors file.
    """
    path = Path(path)
    header, length, size = _raw_header(path)
    try:
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        ends = [int(info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise CorruptCheckpointError(f"checkpoint {path} is not a safetensors file ({error}); {_REMEDY}") from None
    data = size - 8 - length
    if max(ends, default=0) != data:
        what = "truncated" if max(ends, default=0) > data else "longer than its header says"
        raise CorruptCheckpointError(f"checkpoint {path} is {what} (tensor data {data} bytes, header declares "
                                     f"{max(ends, default=0)}); {_REMEDY}")
    return header, 8 + length


def _record(header: Mapping[str, Any]) -> dict[str, Any] | None:
    text = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if text is None:
        return None
    record = json.loads(text)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    return record


def legacy_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest an older mergelib (format 1) wrote beside ``path`` as ``NAME.json``, if the
    file there provably is one (its ``format``, ``file`` and ``sha256`` fields); else None.
    Only for recognising such checkpoints: their weights are never trusted from it."""
    sidecar = Path(path).with_suffix(".json")
    try:
        record = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    except (OSError, ValueError):
        return None
    provable = (isinstance(record, dict) and record.get("format") == 1 and record.get("file") == Path(path).name
                and isinstance(record.get("sha256"), str) and len(record["sha256"]) == 64)
    return record if provable else None


def _legacy_manifest(path: Path) -> Path | None:
    """The path of :func:`legacy_manifest`'s file, when there is one."""
    return Path(path).with_suffix(".json") if legacy_manifest(path) is not None else None


def read_manifest(path: Path) -> dict[str, Any]:
    """The provenance mergelib wrote into a checkpoint's header (no tensor is read, nothing hashed).

    Raises :class:`~mergelib.errors.CorruptCheckpointError` when the file is unreadable or carries no mergelib
    provenance (written by another program, or by an older mergelib with a ``.json`` beside it).
    """
    path = Path(path)
    header, _ = read_header(path)
    try:
        record = _record(header)
    except ValueError as error:
        raise CorruptCheckpointError(f"checkpoint {path}: mergelib's provenance in its header is unreadable ({error})") from None
    if record is None:
        older = _legacy_manifest(path)
        why = (f"it was written by an older mergelib, with the manifest {older.name} beside it; write it again "
               "(import it again, or let the cache rebuild it)" if older is not None else
               "it was not written by mergelib; write checkpoints with mergelib (mergelib import converts others)")
        raise CorruptCheckpointError(f"checkpoint {path} has no mergelib provenance in its header: {why}")
    return record


def is_mergelib_file(path: Path) -> bool:
    """Whether ``path`` is a checkpoint mergelib wrote (its header carries mergelib's provenance,
    or an older mergelib's ``.json`` manifest lies beside it). Reads the header only."""
    try:  # the header alone: a truncated or damaged file of mergelib's is still mergelib's
        header = _raw_header(Path(path))[0]
        return (isinstance(header, dict) and _record(header) is not None) or _legacy_manifest(path) is not None
    except (CorruptCheckpointError, FileNotFoundError, ValueError, AttributeError):
        return _legacy_manifest(path) is not None


# ---------------------------------------------------------------------------- output checks

def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (same device and inode: hard links and symlinks included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return Path(a).resolve() == Path(b).resolve()


def check_not_an_input(output: Path, inputs: Iterable[Path], *, what: str = "output") -> None:
    """Raise :class:`~mergelib.errors.OutputRefusedError` if ``output`` is one of ``inputs`` (compared as files)."""
    for source in inputs:
        if same_file(output, source):
            raise OutputRefusedError(
                f"{what} {output} is the input {source} (the same file); writing it would destroy an input: "
                f"choose another {what} path")


def check_replaceable(path: Path, *, overwrite: bool = False) -> None:
    """Raise :class:`~mergelib.errors.OutputRefusedError` unless writing ``path`` replaces nothing the user owns.

    A missing path or a checkpoint mergelib wrote may be replaced; any other file only with
    ``overwrite=True``; a directory or a special file never.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return
    try:
        info = os.stat(path)
    except OSError:  # a dangling symlink: the rename replaces the link itself
        info = os.lstat(path)
    if stat.S_ISDIR(info.st_mode):
        raise OutputRefusedError(f"output {path} is a directory; give a file path ending in .safetensors")
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
        raise OutputRefusedError(f"output {path} is a {_file_kind(info.st_mode)}; give the path of a regular file")
    if overwrite or is_mergelib_file(path):
        return
    raise OutputRefusedError(
        f"{path} exists and was not written by mergelib (no mergelib provenance in its header); mergelib does "
        "not replace files it did not write: choose another output path, or pass --overwrite "
        "(overwrite=True) to replace it")


def check_finite(state: Mapping[str, torch.Tensor], what: str, hint: str = "") -> None:
    """Raise :class:`~mergelib.errors.TensorError` naming the first floating-point tensor of
    ``state`` that holds NaN or Inf (``what`` names the output, ``hint`` the likely remedy)."""
    for name, tensor in state.items():
        bad = non_finite_count(tensor)
        if bad:
            raise TensorError(f"{what}: tensor {name!r} holds {bad} NaN or Inf values; nothing was written"
                              + (f" ({hint})" if hint else ""))


# ---------------------------------------------------------------------------- checkpoints

def _write_checkpoint(tmp: Path, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    """Write ``tensors`` with ``record`` in the header, its ``data_sha256`` filled in place."""
    text = json.dumps({**record, "data_sha256": _PLACEHOLDER}, sort_keys=True, separators=(",", ":"), default=str)
    save_file(tensors, str(tmp), metadata={METADATA_KEY: text})
    with open(tmp, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = handle.read(length)
        at = header.find(_PLACEHOLDER.encode())
        if at < 0 or header.count(_PLACEHOLDER.encode()) != 1:
            raise ValueError(f"a manifest field of {tmp} contains {_PLACEHOLDER[:8]}…; cannot record the data hash")
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        handle.seek(8 + at)  # same length: the header and every offset stay as they are
        handle.write(digest.hexdigest().encode())


def _data_and_file_sha256(path: Path, data_start: int) -> tuple[str, str]:
    data, whole = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as handle:
        whole.update(handle.read(data_start))
        for block in iter(lambda: handle.read(1 << 20), b""):
            data.update(block)
            whole.update(block)
    return data.hexdigest(), whole.hexdigest()


def save_state(
    path: Path, state: dict[str, torch.Tensor], manifest: dict[str, Any], *, overwrite: bool = False
) -> dict[str, Any]:
    """Write ``state`` to ``path`` (safetensors, ``manifest`` in its header); return the manifest.

    The manifest returned is the one :func:`load_state` will return (JSON types, ``format``,
    ``file``, ``data_sha256`` and the whole file's ``sha256``). Refuses (:func:`check_replaceable`)
    an existing file mergelib did not write unless ``overwrite``, and (:func:`check_finite`) any
    tensor with NaN or Inf; in both cases nothing is written.
    """
    path = Path(path)
    check_replaceable(path, overwrite=overwrite)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    check_finite(tensors, f"checkpoint {path}")
    older = _legacy_manifest(path)
    record = {**manifest, "format": MANIFEST_VERSION, "file": path.name}
    atomic_write(path, lambda tmp: _write_checkpoint(tmp, tensors, record))
    if older is not None:  # the weights it described are gone
        older.unlink(missing_ok=True)
    return verify_checkpoint(path)


def verify_checkpoint(path: Path, *, key: str | None = None) -> dict[str, Any]:
    """The manifest of a checkpoint after checking it (no tensors are loaded).

    Raises :class:`~mergelib.errors.CorruptCheckpointError` when the file is unreadable, carries no mergelib
    provenance, was made for another configuration than ``key``, or its tensor data do not hash
    to the recorded ``data_sha256`` (truncated or modified). The manifest returned has ``sha256``,
    the whole file's SHA-256.
    """
    path = Path(path)
    try:
        record = read_manifest(path)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"checkpoint {path}: file missing") from None
    if key is not None and record.get("key") != key:
        raise CorruptCheckpointError(f"checkpoint {path}: made for another configuration (key mismatch)")
    _, start = read_header(path)
    data_sha, file_sha = _data_and_file_sha256(path, start)
    if data_sha != record.get("data_sha256"):
        raise CorruptCheckpointError(
            f"checkpoint {path}: tensor data hash {data_sha[:12]}… does not match the recorded "
            f"{str(record.get('data_sha256'))[:12]}… (truncated or modified file)")
    return {**record, "sha256": file_sha}


def load_state(path: Path, *, key: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint after checking it against its provenance (:func:`verify_checkpoint`)."""
    path = Path(path)
    manifest = verify_checkpoint(path, key=key)
    try:
        return load_file(str(path)), manifest
    except Exception as error:  # pragma: no cover - the checks above catch these first
        raise CorruptCheckpointError(f"checkpoint {path}: unreadable ({error})") from error


def shape_problems(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """How ``state``'s keys and shapes differ from ``expected`` (empty when they fit)."""
    problems = []
    for key, shape in expected.items():
        if key not in state:
            problems.append(f"{key} missing (expected {tuple(shape)})")
        elif tuple(state[key].shape) != tuple(shape):
            problems.append(f"{key} has shape {tuple(state[key].shape)}, expected {tuple(shape)}")
    problems.extend(f"{key} unexpected (shape {tuple(state[key].shape)})" for key in state if key not in expected)
    return problems


def expect_shapes(expected: Mapping[str, tuple[int, ...]], what: str = "the architecture") -> Callable[[Mapping[str, torch.Tensor]], None]:
    """A ``check`` for :func:`cached_state`: :class:`~mergelib.errors.CorruptCheckpointError` unless the state has
    exactly the keys and shapes of ``expected``."""
    expected = {k: tuple(v) for k, v in expected.items()}

    def check(state: Mapping[str, torch.Tensor]) -> None:
        problems = shape_problems(state, expected)
        if problems:
            raise CorruptCheckpointError(f"its tensors do not fit {what} ({len(problems)} differences, first "
                                         f"{'; '.join(problems[:3])})")

    return check


def _unreadable_regular_file(path: Path) -> bool:
    """A regular file that is no readable safetensors file (truncated, emptied, overwritten): at
    a cache path, what an interrupted copy or a damaged disk leaves of an entry, not a user's file."""
    if not path.is_file():
        return False
    try:
        read_header(path)
    except CorruptCheckpointError:
        return True
    return False


def cached_state(
    path: Path,
    key: str,
    build: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]],
    *,
    check: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return the checkpoint at ``path`` if valid for ``key``; otherwise build, save and return it.

    ``build()`` returns ``(state, manifest fields)``. ``check(state)``, when given, raises
    :class:`~mergelib.errors.CorruptCheckpointError` for a cached state that cannot be used although its hash
    matches (e.g. :func:`expect_shapes`: tensors that do not fit the architecture). A corrupt or
    stale file is reported on stderr and rebuilt, as is a file at the cache path that is no
    readable safetensors file at all (a damaged entry); a readable checkpoint that mergelib did
    not write is never replaced (:class:`~mergelib.errors.OutputRefusedError`, before anything is built).
    """
    path = Path(path)
    if os.path.lexists(path):
        try:
            state, manifest = load_state(path, key=key)
            if check is not None:
                try:
                    check(state)
                except CorruptCheckpointError as error:
                    raise CorruptCheckpointError(f"checkpoint {path}: {error}") from None
            return state, manifest
        except CorruptCheckpointError as error:
            damaged = _unreadable_regular_file(path)  # a damaged cache entry is rebuilt; another's checkpoint never
            if not damaged:
                check_replaceable(path)
            print(f"[mergelib] {error}; rebuilding it", file=sys.stderr, flush=True)
    else:
        damaged = False
    state, fields = build()
    manifest = save_state(path, state, {**fields, "key": key}, overwrite=damaged)
    return state, manifest


def cached_tables(
    directory: Path, key: Any, compute: Callable[[], tuple["pd.DataFrame", ...]]
) -> tuple["pd.DataFrame", ...]:
    """Tables computed by ``compute()``, cached as CSV under ``directory`` by the hash of ``key``.

    Use for deterministic results (evaluations); include in ``key`` everything they depend on,
    :func:`mergelib.io.provenance.code_fingerprint` among it. The tables returned are always read
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
