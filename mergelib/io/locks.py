"""Owner locks on files and folders: one process at a time, and a lock that survives a kill.

An :class:`OwnerLock` is a small JSON file (``*.lock``) that names its owner: host, pid, the
process's start time and boot id (from ``/proc`` where available), when the lock was taken, the
command line and what it is for. It is created atomically by hard-linking a complete temporary
file to the lock's name (``os.link`` fails when the name exists, also on NFS), so a reader never
sees a half-written lock.

A lock whose owner is gone is *stale* and is taken over, with a notice on stderr. mergelib can
tell that an owner is gone when it ran on this host: its pid no longer exists, is a zombie, or
belongs to a later process (another start time, or another boot). A process on another host
(a cluster node sharing the folder) cannot be checked, so every holder refreshes its lock file's
time every ``HEARTBEAT_SECONDS`` from a thread: another host's lock counts as held until it
has gone ``FOREIGN_STALE_SECONDS`` without a refresh (its owner killed, or its node gone),
and the messages say how to remove it sooner. A lock is released when its ``with`` block ends,
normally or by an exception; a killed owner leaves a stale lock, which the next run takes over.

Uses: :func:`mergelib.experiments.sweep.run_sweep` owns its results folder (a second sweep over it stops and
says who runs it), every sweep job runs under a lock of its own (a job is never run by two
workers at once), and every expert is fine-tuned under a lock beside its file (a second run
waits for it and loads it, :func:`mergelib.experiments.replication.cached_expert`).

Not from a paper: this is infrastructure.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mergelib.errors import MergelibError

#: How long a run waits by default for a lock held by another live process before it gives up:
#: long enough for the slowest fine-tuning of the papers' benchmarks.
DEFAULT_WAIT_SECONDS = 48 * 3600.0
#: Between two looks at a lock held by another process.
DEFAULT_POLL_SECONDS = 2.0
#: Between two "still waiting" notices.
NOTICE_SECONDS = 600.0
#: A holder refreshes its lock file's time this often (a thread), so that other hosts can tell
#: a live owner from a killed one ...
HEARTBEAT_SECONDS = 60.0
#: ... and the lock of an owner on another host that has not been refreshed for this long is stale.
FOREIGN_STALE_SECONDS = 600.0
#: A lock file's temporary is written in milliseconds: an unreadable one (cut off mid-write by a
#: kill) that is older than this was abandoned.
ABANDONED_TEMPORARY_SECONDS = 60.0


class LockHeldError(MergelibError, RuntimeError):
    """A lock is held by another process that is alive (or on another host, so it may be)."""

    def __init__(self, message: str, path: Path, owner: "LockOwner | None"):
        super().__init__(message)
        self.path, self.owner = path, owner


def _notice(message: str) -> None:
    print(f"[mergelib] {message}", file=sys.stderr, flush=True)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) of ``pid`` from /proc; None when unavailable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # after "pid (command name)"
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _command_line() -> str:
    """This process's command line, shortened to the program's name (``mergelib sweep dg ...``)."""
    program = sys.argv[0] if sys.argv and sys.argv[0] else ""
    head = ["python", program] if program in ("-c", "-m", "-", "") else [Path(program).name]
    return shlex.join([*head, *sys.argv[1:]]).strip()


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: written into the lock file by its owner."""

    host: str
    pid: int
    since: str  # when the lock was taken (UTC, ISO 8601)
    command: str
    purpose: str
    boot_id: str | None = None
    process_start: int | None = None  # /proc/<pid>/stat start time (clock ticks after boot)

    @classmethod
    def current(cls, purpose: str) -> "LockOwner":
        stat = _proc_stat(os.getpid())
        return cls(host=socket.gethostname(), pid=os.getpid(),
                   since=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   command=_command_line(),
                   purpose=purpose, boot_id=_boot_id(), process_start=stat[1] if stat else None)

    @classmethod
    def from_json(cls, text: str) -> "LockOwner":
        data = json.loads(text)
        return cls(host=str(data["host"]), pid=int(data["pid"]), since=str(data["since"]), command=str(data.get("command", "")),
                   purpose=str(data.get("purpose", "")), boot_id=data.get("boot_id"), process_start=data.get("process_start"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} (started {self.since}: {self.command})"

    def alive(self, refreshed: float | None = None) -> bool | None:
        """True or False for an owner on this host. For one on another host: False when its lock
        was last refreshed (``refreshed`` seconds ago) longer than ``FOREIGN_STALE_SECONDS``
        ago, else None (cannot tell: its lock counts as held)."""
        if self.host != socket.gethostname():
            return False if refreshed is not None and refreshed > FOREIGN_STALE_SECONDS else None
        boot = _boot_id()
        if self.boot_id and boot and self.boot_id != boot:
            return False  # the host rebooted since
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's process: it exists
        stat = _proc_stat(self.pid)
        if stat is not None and (stat[0] == "Z" or (self.process_start is not None and stat[1] != self.process_start)):
            return False  # a zombie, or the pid now belongs to a later process
        return True


def _refreshed(path: Path) -> float | None:
    """Seconds since lock file ``path`` was last written or refreshed; None if it is gone."""
    try:
        return max(0.0, time.time() - os.stat(path).st_mtime)
    except OSError:
        return None


def read_owner(path: str | Path) -> LockOwner | None:
    """The owner recorded in lock file ``path``; None when there is no lock. An unreadable lock
    file raises ``ValueError`` (lock files are written complete, so it was made by something else)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        return LockOwner.from_json(text)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"lock file {path} is unreadable ({error})") from None


def lock_holder(path: str | Path) -> LockOwner | None:
    """The owner of lock ``path`` if it holds it (alive, or on another host); None when the lock
    is free or stale. Read-only: for status displays."""
    try:
        owner = read_owner(path)
    except ValueError:
        return None
    return owner if owner is not None and owner.alive(_refreshed(Path(path))) is not False else None


class OwnerLock:
    """An exclusive lock on ``path`` (conventionally ``*.lock``) for ``purpose``.

    ``with OwnerLock(path, "a sweep"):`` takes it or raises :class:`LockHeldError` at once;
    ``with OwnerLock(...).acquire(wait=seconds):`` waits up to ``seconds`` for another live owner to release it (with a
    notice when it starts waiting and every ``NOTICE_SECONDS``). A stale lock is taken over
    with a notice. ``hint`` ends the messages: what to do when the lock is held.
    """

    def __init__(self, path: str | Path, purpose: str, *, hint: str = "", heartbeat: float = HEARTBEAT_SECONDS):
        self.path, self.purpose, self.hint, self.heartbeat = Path(path), purpose, hint, heartbeat
        self._mine: str | None = None  # the text of our lock file while we hold it
        self._stop: threading.Event | None = None  # stops the heartbeat thread

    @property
    def held(self) -> bool:
        return self._mine is not None

    def _create(self, text: str) -> bool:
        """Atomically create the lock file with ``text``; False if it exists."""
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _clear_abandoned_temporaries(self) -> None:
        """Remove the temporaries that a process killed inside :meth:`_create` (``.tmp``) or
        :meth:`_remove_stale` (``.stale``) left beside the lock: those whose owner is gone, and
        unreadable ones older than ``ABANDONED_TEMPORARY_SECONDS``. Only names of exactly that
        form are touched; a live owner's temporary stays."""
        own_name = re.compile(rf"\.{re.escape(self.path.name)}\.[0-9a-f]{{32}}\.(tmp|stale)")
        for leftover in self.path.parent.glob(f".{glob.escape(self.path.name)}.*"):
            if not own_name.fullmatch(leftover.name):
                continue
            try:
                text, age = leftover.read_text(), time.time() - leftover.stat().st_mtime
            except OSError:
                continue  # removed meanwhile
            try:
                abandoned = LockOwner.from_json(text).alive(age) is False
            except (ValueError, KeyError, TypeError):
                abandoned = age > ABANDONED_TEMPORARY_SECONDS
            if abandoned:
                leftover.unlink(missing_ok=True)

    def _remove_stale(self, text: str) -> None:
        """Remove the lock file if it still holds ``text`` (a stale owner's lock).

        Moving it aside first makes the removal exclusive: of several processes taking over the
        same stale lock, one moves it; one that moves a fresh lock instead puts it back.
        """
        aside = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process took it away first
        try:
            if aside.read_text() != text:  # a new owner's lock: put it back
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
        finally:
            aside.unlink(missing_ok=True)

    def clear_stale(self) -> bool:
        """Remove the lock file if its owner is gone (with the notice); True if it did."""
        try:
            text = self.path.read_text()
            owner = LockOwner.from_json(text)
        except (OSError, ValueError, KeyError, TypeError):
            return False  # no lock, or not one to judge: left alone
        return self._remove_if_stale(owner, text, "removing")

    def _remove_if_stale(self, owner: LockOwner, text: str, action: str) -> bool:
        """If ``owner`` (read from the lock file's ``text``) is gone, say so (``action``: what is done
        about it) and remove its lock; whether it was stale."""
        if owner.alive(_refreshed(self.path)) is not False:
            return False
        _notice(f"{action} stale lock {self.path} of pid {owner.pid} on host {owner.host} (started "
                f"{owner.since}), whose process is gone")
        self._remove_stale(text)
        return True

    def try_acquire(self) -> LockOwner | None:
        """Take the lock (taking over a stale one); return None, or the owner that holds it."""
        if self.held:
            raise RuntimeError(f"{self.path}: this OwnerLock is held already")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clear_abandoned_temporaries()
        mine = LockOwner.current(self.purpose).to_json()
        for _ in range(100):  # a few rounds at most, unless processes keep taking the lock in turn
            if self._create(mine):
                self._mine, self._stop = mine, threading.Event()
                threading.Thread(target=self._refresh, args=(self._stop,), daemon=True,
                                 name=f"mergelib lock heartbeat {self.path.name}").start()
                return None
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                continue  # released meanwhile
            try:
                owner = LockOwner.from_json(text)
            except (ValueError, KeyError, TypeError) as error:
                raise LockHeldError(
                    f"{self.path} is not a lock file mergelib can read ({error}); it blocks {self.purpose}. If no "
                    f"mergelib run uses this folder, delete {self.path} and rerun", self.path, None) from None
            if not self._remove_if_stale(owner, text, "taking over"):
                return owner
        raise LockHeldError(f"{self.path}: could not take the lock (it kept changing hands)", self.path, None)

    def message(self, owner: LockOwner) -> str:
        """What to tell the user when ``owner`` holds the lock."""
        text = f"{self.path} is held by {owner.describe()} for {owner.purpose}"
        if owner.alive(_refreshed(self.path)) is None:
            text += (f". mergelib cannot check a process on another host: the lock counts as held while its owner "
                     f"refreshes it (stale after {FOREIGN_STALE_SECONDS:.0f} s without); if host {owner.host} no longer "
                     f"runs pid {owner.pid}, delete {self.path} and rerun")
        return f"{text}. {self.hint}".rstrip(". ") + "."

    def acquire(self, *, wait: float = 0.0, poll: float = DEFAULT_POLL_SECONDS) -> "OwnerLock":
        """Take the lock, waiting up to ``wait`` seconds for another live owner to release it;
        :class:`LockHeldError` when it is still held then."""
        deadline = time.monotonic() + wait
        started = noticed = None
        while True:
            owner = self.try_acquire()
            if owner is None:
                if started is not None:
                    _notice(f"{self.path}: released after {time.monotonic() - started:.0f} s of waiting; going on")
                return self
            now = time.monotonic()
            if now >= deadline:
                waited = f" (waited {now - started:.0f} s)" if started is not None else ""
                raise LockHeldError(self.message(owner) + waited, self.path, owner)
            if noticed is None or now - noticed >= NOTICE_SECONDS:
                _notice(f"waiting for {self.path}: held by {owner.describe()} for {owner.purpose} (up to "
                        f"{deadline - now:.0f} s more)")
                noticed = now
                started = started if started is not None else now
            time.sleep(max(0.0, min(poll, deadline - now)))

    def _refresh(self, stop: threading.Event) -> None:
        """The heartbeat: touch the lock file every ``heartbeat`` seconds until ``stop`` is set."""
        while not stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError:
                pass  # gone or unreachable for a moment: the next beat tries again

    def release(self) -> None:
        """Delete the lock file if it is still ours (never another owner's)."""
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        if self._mine is None:
            return
        try:
            if self.path.read_text() == self._mine:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            self._mine = None

    def __enter__(self) -> "OwnerLock":
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


__all__ = ["DEFAULT_POLL_SECONDS", "DEFAULT_WAIT_SECONDS", "LockHeldError", "LockOwner", "OwnerLock", "lock_holder",
           "read_owner"]
