"""Owner locks: one sweep per folder, one execution per job, one fine-tuning per expert, and
locks left by killed processes taken over; kills inside a record write."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mergelib.io.locks import ABANDONED_TEMPORARY_SECONDS, FOREIGN_STALE_SECONDS, LockHeldError, LockOwner, OwnerLock, lock_holder, read_owner
from mergelib.experiments.sweep import Job, check_record, execute_job, load_record, run_sweep, sweep_lock_path, sweep_status
from sweep_jobs import executions, square_jobs

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the other process"
        time.sleep(0.02)


HOLD = textwrap.dedent("""
    import sys, time
    from mergelib.io.locks import OwnerLock
    with OwnerLock(sys.argv[1], "a test holder"):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def hold_in_subprocess(path: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


# ------------------------------------------------------------------------------- the primitive


def test_a_lock_is_exclusive_names_its_owner_and_is_released_after_the_block(tmp_path):
    path = tmp_path / "sub" / "x.lock"
    with OwnerLock(path, "the first user") as lock:
        assert lock.held and not list(path.parent.glob(".*.tmp"))  # created by link of a complete file
        owner = read_owner(path)
        assert (owner.host, owner.pid, owner.purpose) == (socket.gethostname(), os.getpid(), "the first user")
        assert lock_holder(path) == owner
        second = OwnerLock(path, "the second user", hint="Wait for it")
        assert second.try_acquire() == owner and not second.held
        with pytest.raises(LockHeldError) as caught:
            second.acquire()
        message = str(caught.value)
        assert message.startswith(f"{path} is held by pid {os.getpid()} on host {socket.gethostname()} (started ")
        assert "for the first user. Wait for it." in message and caught.value.owner == owner
    assert not path.exists() and lock_holder(path) is None
    with pytest.raises(ZeroDivisionError):
        with OwnerLock(path, "a failing user"):
            1 / 0
    assert not path.exists()  # released on an exception too


def test_a_lock_of_a_sigkilled_process_is_taken_over_with_a_notice(tmp_path, capsys):
    path = tmp_path / "x.lock"
    holder = hold_in_subprocess(path, 60)
    owner = read_owner(path)
    assert owner.pid == holder.pid and owner.alive() is True
    assert OwnerLock(path, "me").try_acquire() == owner  # alive: held
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert owner.alive() is False and lock_holder(path) is None
    with OwnerLock(path, "me"):
        assert read_owner(path).pid == os.getpid()
    assert (f"taking over stale lock {path} of pid {holder.pid} on host {socket.gethostname()} "
            f"(started {owner.since}), whose process is gone") in capsys.readouterr().err


def test_a_reused_pid_a_foreign_host_and_an_unreadable_file_are_told_apart(tmp_path, capsys):
    path = tmp_path / "x.lock"
    me = LockOwner.current("a test")
    if me.process_start is not None:  # Linux: the pid is ours, but the process that took the lock started earlier
        path.write_text(LockOwner(**{**me.__dict__, "process_start": me.process_start - 1}).to_json())
        assert read_owner(path).alive() is False
        with OwnerLock(path, "me"):
            pass
        assert "taking over stale lock" in capsys.readouterr().err
    path.write_text(LockOwner(**{**me.__dict__, "host": "node-that-is-gone"}).to_json())  # refreshed just now
    assert read_owner(path).alive() is None and lock_holder(path).host == "node-that-is-gone"
    with pytest.raises(LockHeldError, match=(r"cannot check a process on another host: the lock counts as held while "
                                             r"its owner refreshes it \(stale after 600 s without\); if host "
                                             rf"node-that-is-gone no longer runs pid {os.getpid()}, delete {path}")):
        OwnerLock(path, "me").acquire()
    old = time.time() - FOREIGN_STALE_SECONDS - 5  # its owner stopped refreshing it: killed, or its node is gone
    os.utime(path, (old, old))
    assert lock_holder(path) is None
    with OwnerLock(path, "me"):
        assert read_owner(path).host == socket.gethostname()
    assert f"taking over stale lock {path} of pid {os.getpid()} on host node-that-is-gone" in capsys.readouterr().err
    path.write_text("not json")
    with pytest.raises(LockHeldError, match=rf"{path} is not a lock file mergelib can read.*delete {path} and rerun"):
        OwnerLock(path, "me").acquire()


def test_temporaries_left_by_a_kill_inside_create_are_cleared_but_not_a_live_owners_or_a_users_file(tmp_path):
    path = tmp_path / "x.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    me = LockOwner.current("a test")
    dead_owner = LockOwner(**{**me.__dict__, "pid": int(dead.stdout), "process_start": None})
    assert dead_owner.alive() is False
    names = {kind: f".x.lock.{kind[0] * 32}.{suffix}" for kind, suffix in
             (("a-dead-owner", "tmp"), ("b-cut-off-long-ago", "tmp"), ("c-cut-off-just-now", "tmp"),
              ("d-live-owner", "tmp"), ("e-dead-aside", "stale"))}
    (tmp_path / names["a-dead-owner"]).write_text(dead_owner.to_json())
    (tmp_path / names["b-cut-off-long-ago"]).write_text('{"host": "')
    old = time.time() - ABANDONED_TEMPORARY_SECONDS - 5
    os.utime(tmp_path / names["b-cut-off-long-ago"], (old, old))
    (tmp_path / names["c-cut-off-just-now"]).write_text('{"host": "')  # maybe still being written
    (tmp_path / names["d-live-owner"]).write_text(me.to_json())
    (tmp_path / names["e-dead-aside"]).write_text(dead_owner.to_json())
    users = [tmp_path / ".x.lock.notes.tmp", tmp_path / "x.lock.backup"]
    for user_file in users:
        user_file.write_text("mine")
    with OwnerLock(path, "me"):
        left = sorted(p.name for p in tmp_path.iterdir() if p != path)
    assert left == sorted([names["c-cut-off-just-now"], names["d-live-owner"], *(u.name for u in users)])
    assert all(u.read_text() == "mine" for u in users)


def test_a_holder_refreshes_its_lock_until_it_releases_it(tmp_path):
    path = tmp_path / "x.lock"
    with OwnerLock(path, "me", heartbeat=0.05):
        os.utime(path, (1.0, 1.0))  # as if last refreshed long ago
        wait_for(lambda: path.stat().st_mtime > time.time() - 60, seconds=10)
    assert not path.exists()


def test_acquire_waits_for_a_live_owner_then_takes_the_lock_or_gives_up(tmp_path, capsys):
    path = tmp_path / "x.lock"
    holder = hold_in_subprocess(path, 1.0)
    with pytest.raises(LockHeldError, match=r"held by pid \d+ .* for a test holder.*\(waited 0 s\)"):
        OwnerLock(path, "me").acquire(wait=0.2, poll=0.05)
    with OwnerLock(path, "me").acquire(wait=30, poll=0.05):
        assert read_owner(path).pid == os.getpid()
    assert holder.wait() == 0
    err = capsys.readouterr().err
    assert f"waiting for {path}: held by pid {holder.pid}" in err and "released after" in err


# ---------------------------------------------------------------------- one build per expert

RACE = textwrap.dedent("""
    import os, sys, time, torch
    from pathlib import Path
    from mergelib.experiments.replication import cached_expert
    path, builds, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.002)

    def build():  # stands for a fine-tuning: slow, and counted
        (builds / f"{os.getpid()}.built").touch()
        time.sleep(1.0)
        return {"w": torch.arange(6.0)}, {"domain": "photo"}

    print(cached_expert(path, "key-1", build, what="the test expert", poll=0.05)[1]["sha256"], flush=True)
""")


def test_two_processes_racing_for_one_expert_build_it_once(tmp_path, capsys):
    import torch

    from mergelib.experiments.replication import cached_expert

    path, builds, go = tmp_path / "experts" / "photo.safetensors", tmp_path / "builds", tmp_path / "go"
    builds.mkdir()
    other = subprocess.Popen([sys.executable, "-c", RACE, str(path), str(builds), str(go)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "ready"

    def build():
        (builds / f"{os.getpid()}.built").touch()
        time.sleep(1.0)
        return {"w": torch.arange(6.0)}, {"domain": "photo"}

    go.touch()  # both start at once: one builds, the other waits for it and loads its file
    mine = cached_expert(path, "key-1", build, what="the test expert", poll=0.05)[1]["sha256"]
    out, err = other.communicate(timeout=120)
    assert other.returncode == 0, err
    assert len(list(builds.glob("*.built"))) == 1
    assert out.strip() == mine and len(mine) == 64  # the same file
    assert not path.with_suffix(".lock").exists()
    waited = [e for e in (err, capsys.readouterr().err) if "waiting for" in e]  # the loser's notice (unless it
    assert len(waited) <= 1 and all("for fine-tuning the test expert" in e for e in waited)  # came after the build)


def test_an_expert_lock_left_by_a_killed_fine_tuning_is_taken_over_or_cleared(tmp_path, capsys):
    import torch

    from mergelib.experiments.replication import cached_expert

    path = tmp_path / "photo.safetensors"
    builds = []

    def build():
        builds.append(1)
        return {"w": torch.ones(3)}, {}

    for expert_exists in (False, True):  # killed while fine-tuning; killed after writing the expert
        holder = hold_in_subprocess(path.with_suffix(".lock"), 60)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        cached_expert(path, "key-1", build, what="the test expert", lock_timeout=0)
        notice = "taking over" if not expert_exists else "removing"
        assert f"{notice} stale lock {path.with_suffix('.lock')} of pid {holder.pid}" in capsys.readouterr().err
        assert len(builds) == 1 and not path.with_suffix(".lock").exists()


# ----------------------------------------------------------------------- one run per job


def test_a_job_run_by_another_live_process_is_waited_for_not_run_again(tmp_path):
    results, log = tmp_path / "results", tmp_path / "log"
    job = square_jobs(log, [3], seconds=1.5)[0]
    script = ("import sys, json, sweep_jobs; from mergelib.experiments.sweep import Job, execute_job; "
              "execute_job(Job('sleep-and-square', json.loads(sys.argv[1])), sys.argv[2])")
    other = subprocess.Popen([sys.executable, "-c", script, json.dumps(job.params), str(results)], env=ENV)
    lock = job.record_path(results).with_suffix(".lock")
    wait_for(lock.exists)
    assert sweep_status([job], results)["state"].tolist() == ["running"]
    record = execute_job(job, results, wait=60)  # waits for the other process, then returns its record
    assert other.wait() == 0 and record["provenance"]["pid"] == other.pid
    assert executions(log) == {3: 1} and load_record(job, results) == record


CONCURRENT = textwrap.dedent("""
    import sys
    import sweep_jobs  # registers the kind sleep-and-square (tests/ is on PYTHONPATH)
    from mergelib.experiments.sweep import Job, SweepLockedError, run_sweep
    results, log, go = sys.argv[1:4]
    jobs = [Job("sleep-and-square", {"x": x, "seconds": 0.5, "log_dir": log}) for x in range(3)]
    import pathlib, time
    print("ready", flush=True)
    while not pathlib.Path(go).exists():
        time.sleep(0.002)
    try:
        report = run_sweep(jobs, results, executor="local", max_parallel=3)
    except SweepLockedError as error:
        print(f"mergelib sweep: {error}", file=sys.stderr)
        sys.exit(3)
    sys.exit(0 if report.ok else 1)
""")


def test_two_concurrent_local_sweeps_run_each_job_once_and_the_second_says_why_it_stops(tmp_path):
    results, log, go = tmp_path / "results", tmp_path / "log", tmp_path / "go"
    jobs = square_jobs(log, range(3), seconds=0.5)
    sweeps = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(results), str(log), str(go)], env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [sweep.stdout.readline().strip() for sweep in sweeps] == ["ready", "ready"]
    go.touch()  # both start at once
    wait_for(lambda: sweep_lock_path(results).exists())
    status = sweep_status(jobs, results)  # read-only: works while a sweep runs
    assert set(status["state"]) <= {"pending", "running", "done"}
    outputs = [sweep.communicate(timeout=120) for sweep in sweeps]
    codes = sorted(sweep.returncode for sweep in sweeps)
    assert codes == [0, 3], outputs
    winner, loser = (0, 1) if sweeps[0].returncode == 0 else (1, 0)
    assert "sweep in " in outputs[winner][1] and "3 run, 0 skipped" in outputs[winner][1]  # the summary
    message = outputs[loser][1]
    assert f"sweep directory {results} is in use: {sweep_lock_path(results)} is held by pid {sweeps[winner].pid}" in message
    assert "for a sweep of 3 job(s)" in message and "--status" in message and "stops without running anything" in message
    assert executions(log) == {0: 1, 1: 1, 2: 1}
    assert all(check_record(job, results) == ("done", None) for job in jobs)
    assert not sweep_lock_path(results).exists() and not list(results.rglob("*.lock"))  # all released


def test_the_cli_refuses_a_second_sweep_with_exit_status_3_and_status_still_works(tmp_path, capsys):
    from mergelib.cli import EXIT_SWEEP_LOCKED, main
    from mergelib.data.standins import make_dg_standin

    root = make_dg_standin("PACS", tmp_path / "data", images_per_class=1, domains=["photo", "sketch"])
    (tmp_path / "tiny.safetensors").write_bytes(b"never read: the sweep stops first")
    arguments = ["sweep", "dg", "--backbones", "tiny-clip", "--datasets", "PACS", "--data-root", str(root),
                 "--domains", "PACS=photo,sketch", "--checkpoint-dir", str(tmp_path / "ckpt"), "--methods", "task_arithmetic",
                 "--weights", str(tmp_path / "tiny.safetensors"), "--device", "cpu", "--executor", "inline"]
    lock = sweep_lock_path((tmp_path / "ckpt" / "sweep").resolve())
    with OwnerLock(lock, "a test sweep"):  # held by a live process (this one)
        assert main(arguments) == EXIT_SWEEP_LOCKED == 3
        captured = capsys.readouterr()
        assert captured.err.startswith(f"mergelib sweep: sweep directory {lock.parent} is in use: {lock} is held by "
                                       f"pid {os.getpid()} on host {socket.gethostname()}")
        assert "--status" in captured.err and captured.out == ""  # nothing ran, no table
        assert main([*arguments, "--status"]) == 0
        out = capsys.readouterr().out
        assert out.count("pending") == 2 + 2 + 1 and f"a sweep is running over {lock.parent}: pid {os.getpid()}" in out
    assert not (tmp_path / "ckpt" / "sweep" / "dg-finetune").exists()


# ------------------------------------------------------------------- kills inside a write

KILL_AT_RENAME = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import sweep_jobs  # registers the kind sleep-and-square (tests/ is on PYTHONPATH)
    from mergelib.experiments.sweep import Job, run_sweep
    results, log, when = sys.argv[1], sys.argv[2], sys.argv[3]
    real_replace, real_rename, seen = os.replace, os.rename, []

    def fault(real):  # SIGKILL at the rename that publishes the 2nd record: just before or just after
        def rename(src, dst, *args, **kwargs):
            if str(dst).endswith(".json") and Path(dst).parent.name == "sleep-and-square":
                seen.append(dst)
                if len(seen) == 2 and when == "before":
                    os.kill(os.getpid(), signal.SIGKILL)
                real(src, dst, *args, **kwargs)
                if len(seen) == 2 and when == "after":
                    os.kill(os.getpid(), signal.SIGKILL)
                return
            real(src, dst, *args, **kwargs)
        return rename

    os.replace, os.rename = fault(real_replace), fault(real_rename)
    run_sweep([Job("sleep-and-square", {"x": x, "seconds": 0.0, "log_dir": log}) for x in range(3)], results)
""")


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_kill_inside_a_record_write_leaves_all_or_nothing_and_the_rerun_completes(tmp_path, capsys, when):
    results, log = tmp_path / "results", tmp_path / "log"
    jobs = square_jobs(log, range(3))
    killed = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, str(results), str(log), when], env=ENV)
    assert killed.returncode == -signal.SIGKILL
    records = results / "sleep-and-square"
    first = jobs[0].record_path(results).read_bytes()
    assert check_record(jobs[0], results) == ("done", None)
    if when == "before":  # the record was never published: none, and its temporary is left over
        assert not jobs[1].record_path(results).exists() and list(records.glob(f".{jobs[1].id}.json.*.tmp"))
    else:  # published whole
        assert check_record(jobs[1], results) == ("done", None)
    assert not jobs[2].record_path(results).exists()
    stale = read_owner(sweep_lock_path(results))
    assert stale is not None and stale.alive() is False  # left by the killed sweep

    report = run_sweep(jobs, results)
    err = capsys.readouterr().err
    assert f"taking over stale lock {sweep_lock_path(results)} of pid {stale.pid}" in err
    assert report.ok and sorted(report.completed + report.skipped) == sorted(j.id for j in jobs)
    assert jobs[0].record_path(results).read_bytes() == first  # finished: untouched
    assert executions(log) == ({0: 1, 1: 2, 2: 1} if when == "before" else {0: 1, 1: 1, 2: 1})
    assert [load_record(j, results)["outputs"]["square"] for j in jobs] == [0, 1, 4]
    assert not list(records.glob(".*.tmp")) and not list(results.rglob("*.lock"))
