"""Sweeps: job ids, grids, dependency waves, idempotent inline runs, and kill/resume through submitit."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelib
from mergelib.errors import ParameterValueError, UnknownNameError
from mergelib.experiments.sweep import (
    JOB_KINDS,
    Job,
    SweepFailedError,
    SweepPlanError,
    check_record,
    dependency_waves,
    execute_job,
    grid,
    load_record,
    plan_sweep,
    register_job_kind,
    run_sweep,
    sweep_results,
    sweep_status,
)
from mergelib.task_vectors import task_vector
from sweep_jobs import executions, square_jobs


def sum_of_inputs(params, workdir, *, inputs):
    """Test kind: the sum of the squares computed by the jobs it depends on."""
    return {"total": sum(record["outputs"]["square"] for record in inputs.values()), "n_inputs": len(inputs)}


register_job_kind("test-sum-of-inputs", sum_of_inputs)


# ------------------------------------------------------------------------------ ids and planning


def test_job_ids_are_stable_distinct_and_independent_of_key_order_and_dependencies():
    job = Job("train", {"backbone": "ViT-B-32", "domains": ("photo", "sketch"), "lr": 1e-5})
    text = json.dumps({"kind": "train", "params": {"backbone": "ViT-B-32", "domains": ["photo", "sketch"], "lr": 1e-5}},
                      sort_keys=True, separators=(",", ":"))
    assert job.id == "train-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    same = Job("train", {"lr": 1e-5, "domains": ["photo", "sketch"], "backbone": "ViT-B-32"}, after=("x-1",))
    assert same.id == job.id and same.params == {"backbone": "ViT-B-32", "domains": ["photo", "sketch"], "lr": 1e-5}
    others = [Job("train", {**job.params, "lr": 2e-5}), Job("merge", dict(job.params)),
              Job("train", {**job.params, "domains": ["sketch", "photo"]})]
    assert len({job.id, *(o.id for o in others)}) == 4
    assert Job("pkg.mod:fn", {}).id.startswith("pkg.mod_fn-")
    assert Job("b", {}, after=[job, "a-0", job.id]).after == (job.id, "a-0")
    with pytest.raises(ParameterValueError, match="params of job kind 'train' must be JSON-serialisable"):
        Job("train", {"weights": torch.zeros(2)})


def test_grid_expands_the_product_of_axes_with_fixed_parameters_and_dependencies():
    jobs = grid("finetune", backbone=["ViT-B-32", "ViT-B-16"], domain=["photo", "art", "sketch"],
                fixed={"dataset": "PACS", "epochs": 2})
    assert len(jobs) == 6 and len({j.id for j in jobs}) == 6
    assert [(j.params["backbone"], j.params["domain"]) for j in jobs] == [
        (b, d) for b in ("ViT-B-32", "ViT-B-16") for d in ("photo", "art", "sketch")]
    assert all(j.params["dataset"] == "PACS" and j.params["epochs"] == 2 and j.kind == "finetune" for j in jobs)
    # leave-one-domain-out merges, each after the fine-tuning jobs of the other domains
    merges = grid("lodo-merge", backbone=["ViT-B-32"], held_out=["photo", "art", "sketch"],
                  after=lambda p: [j for j in jobs if j.params["backbone"] == p["backbone"]
                                   and j.params["domain"] != p["held_out"]])
    assert [sorted(m.after) for m in merges] == [
        sorted(j.id for j in jobs[:3] if j.params["domain"] != held) for held in ("photo", "art", "sketch")]
    with pytest.raises(ParameterValueError, match=r"axis 'dataset' must be a list.*fixed="):
        grid("finetune", dataset="PACS")
    with pytest.raises(ParameterValueError, match=r"\['dataset'\] are given both"):
        grid("finetune", dataset=["PACS"], fixed={"dataset": "VLCS"})


def test_dependency_waves_are_topological_levels_and_plan_sweep_orders_and_deduplicates():
    a, e = Job("k", {"n": "a"}), Job("k", {"n": "e"})
    b, c = Job("k", {"n": "b"}, after=[a]), Job("k", {"n": "c"}, after=[a])
    d = Job("k", {"n": "d"}, after=[b, c])
    f = Job("k", {"n": "f"}, after=[d, e])
    waves = dependency_waves([f, d, c, b, e, a, a])
    assert [[j.params["n"] for j in w] for w in waves] == [["e", "a"], ["c", "b"], ["d"], ["f"]]
    order = [j.id for j in plan_sweep([f, d], [c, b, e, a], [a])]
    assert len(order) == 6
    assert all(order.index(dep) < order.index(j.id) for j in (a, b, c, d, e, f) for dep in j.after)


def test_cycles_unknown_dependencies_and_conflicting_duplicates_raise_clear_errors():
    a = Job("k", {"n": "a"}, after=("k-bbbbbbbbbbbb",))
    with pytest.raises(SweepPlanError, match=rf"job {a.id} \(k\) depends on \['k-bbbbbbbbbbbb'\], which are not in"):
        dependency_waves([a])
    x0 = Job("k", {"n": "x"})
    y = Job("k", {"n": "y"}, after=[x0])
    z = Job("k", {"n": "z"}, after=[y])
    x = Job("k", {"n": "x"}, after=[z])  # same id as x0: closes the cycle x -> z -> y -> x
    with pytest.raises(SweepPlanError, match="dependency cycle among jobs") as caught:
        dependency_waves([x, y, z, Job("k", {"n": "free"})])
    assert all(j.id in str(caught.value) for j in (x, y, z)) and Job("k", {"n": "free"}).id not in str(caught.value)
    with pytest.raises(SweepPlanError, match="listed twice with different dependencies"):
        dependency_waves([x0, x])


def test_unknown_kinds_are_rejected_before_anything_runs(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown job kind 'no-such-kind'; valid job kind names: .*merge-files.*sleep-and-square"):
        run_sweep([*square_jobs(tmp_path / "log", [1]), Job("no-such-kind", {})], tmp_path / "results")
    assert not (tmp_path / "results").exists() and not (tmp_path / "log").exists()
    with pytest.raises(ParameterValueError, match="cannot import 'f' from module 'no_such_module_xyz'"):
        run_sweep([Job("no_such_module_xyz:f", {})], tmp_path / "results")
    with pytest.raises(ParameterValueError, match="unknown executor 'sge'; valid executors: inline, local"):
        run_sweep([], tmp_path / "results", executor="sge")


def test_kinds_defined_in_main_are_refused_for_submitit_workers(tmp_path):
    def job_in_a_script(params, workdir):
        return {}

    job_in_a_script.__module__ = "__main__"
    register_job_kind("test-defined-in-main", job_in_a_script)
    try:
        with pytest.raises(SweepPlanError, match="defined in __main__.*importable module"):
            run_sweep([Job("test-defined-in-main", {})], tmp_path, executor="local")
    finally:
        JOB_KINDS.pop("test-defined-in-main")

    def job_in_a_lost_module(params, workdir):
        return {}

    job_in_a_lost_module.__module__ = "no_such_module_abc"  # as if its module were not importable on the worker
    register_job_kind("test-lost-module", job_in_a_lost_module)
    try:
        report = run_sweep([Job("test-lost-module", {})], tmp_path)
    finally:
        JOB_KINDS.pop("test-lost-module")
    assert report.failed[0].error.startswith("ParameterValueError: job test-lost-module-")
    assert "cannot import module 'no_such_module_abc', which defines job kind 'test-lost-module'" in report.failed[0].error
    with pytest.raises(ParameterValueError, match="already registered to sweep_jobs:sleep_and_square"):
        register_job_kind("sleep-and-square", sum_of_inputs)


# ------------------------------------------------------------------------------------- inline


def test_inline_sweep_writes_records_and_a_rerun_calls_nothing(tmp_path):
    log, results = tmp_path / "log", tmp_path / "results"
    jobs = square_jobs(log, range(4))
    report = run_sweep(jobs, results)
    assert report.ok and report.completed == [j.id for j in jobs] and report.skipped == []
    for job in jobs:
        record = json.loads((results / "sleep-and-square" / f"{job.id}.json").read_text())
        assert record["outputs"] == {"square": job.params["x"] ** 2}
        assert record["params"] == job.params and record["job_id"] == job.id and record["kind"] == "sleep-and-square"
        assert record["provenance"]["parameters"] == job.params and "git" in record["provenance"]
        assert record["timings"]["seconds"] >= 0 and (results / "sleep-and-square" / job.id).is_dir()
    assert executions(log) == {0: 1, 1: 1, 2: 1, 3: 1}
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*.json")}

    again = run_sweep(jobs, results)
    assert again.skipped == [j.id for j in jobs] and again.completed == [] and again.ok
    assert executions(log) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*.json")} == before
    assert (sweep_status(jobs, results)["state"] == "done").all()
    table = sweep_results([*jobs, *square_jobs(log, [9])], results)  # x=9 never ran: left out
    assert table["x"].tolist() == [0, 1, 2, 3] and table["square"].tolist() == [0, 1, 4, 9]
    assert not (results / "submitit").exists()  # inline: submitit is never involved


def test_a_corrupt_or_foreign_record_reruns_that_job_only(tmp_path, capsys):
    log, results = tmp_path / "log", tmp_path / "results"
    jobs = square_jobs(log, range(4))
    run_sweep(jobs, results)
    truncated, foreign = jobs[1].record_path(results), jobs[2].record_path(results)
    truncated.write_text(truncated.read_text()[:40])
    other = json.loads(foreign.read_text())
    other["params"]["x"] = 99
    foreign.write_text(json.dumps(other))
    assert check_record(jobs[1], results)[0] == "corrupt" and "unparseable JSON" in check_record(jobs[1], results)[1]
    assert check_record(jobs[2], results) == ("corrupt", "params differ from the job's")
    assert sweep_status(jobs, results)["state"].tolist() == ["done", "corrupt", "corrupt", "done"]

    report = run_sweep(jobs, results)
    assert report.completed == [jobs[1].id, jobs[2].id] and report.skipped == [jobs[0].id, jobs[3].id]
    assert set(report.rerun_corrupt) == {jobs[1].id, jobs[2].id}
    assert f"record {truncated} is corrupt (unparseable JSON" in capsys.readouterr().err
    assert executions(log) == {0: 1, 1: 2, 2: 2, 3: 1}
    assert [load_record(j, results)["outputs"]["square"] for j in jobs] == [0, 1, 4, 9]


def test_a_failing_job_keeps_the_other_results_and_blocks_its_dependants(tmp_path):
    log, results = tmp_path / "log", tmp_path / "results"
    good = square_jobs(log, [1, 2, 3])
    bad = Job("sleep-and-square", {"x": 7, "seconds": 0.0, "log_dir": str(log), "fail": True})
    total_good = Job("test-sum-of-inputs", {"of": "good"}, after=good)
    total_bad = Job("test-sum-of-inputs", {"of": "bad"}, after=[good[0], bad])
    downstream = Job("test-sum-of-inputs", {"of": "downstream"}, after=[total_bad])
    jobs = [*good, bad, total_good, total_bad, downstream]

    report = run_sweep(jobs, results)
    assert report.completed == [*(j.id for j in good), total_good.id]
    assert [(f.job_id, f.error) for f in report.failed] == [(bad.id, "ValueError: sleep-and-square asked to fail for x=7")]
    assert "Traceback" in report.failed[0].details and report.failed[0].log is None
    assert [(b.job_id, b.blocked_by) for b in report.blocked] == [(total_bad.id, (bad.id,)), (downstream.id, (total_bad.id,))]
    assert load_record(total_good, results)["outputs"] == {"total": 1 + 4 + 9, "n_inputs": 3}
    assert not total_bad.record_path(results).exists() and not bad.record_path(results).exists()
    status = sweep_status(jobs, results).set_index("job_id")
    assert status["state"].to_dict() == {**{j.id: "done" for j in (*good, total_good)}, bad.id: "failed",
                                         total_bad.id: "blocked", downstream.id: "blocked"}
    assert status.loc[bad.id, "error"] == "ValueError: sleep-and-square asked to fail for x=7"
    assert status.loc[good[1].id, "x"] == 2
    with pytest.raises(SweepFailedError, match=rf"1 failed, 2 blocked(.|\n)*FAILED {bad.id}"):
        report.raise_on_failure()

    rerun = run_sweep(jobs, results)  # retries the failed job only; the done ones are not redone
    assert rerun.skipped == [*(j.id for j in good), total_good.id] and [f.job_id for f in rerun.failed] == [bad.id]
    assert executions(log) == {1: 1, 2: 1, 3: 1, 7: 2}


def test_kinds_named_by_import_path_run_without_registration(tmp_path):
    job = Job("sweep_jobs:sleep_and_square", {"x": 5, "seconds": 0.0})
    report = run_sweep([job], tmp_path)
    assert report.completed == [job.id] and job.record_path(tmp_path).parent.name == "sweep_jobs_sleep_and_square"
    assert load_record(job, tmp_path)["outputs"] == {"square": 25}
    assert execute_job(job, tmp_path)["timings"] == load_record(job, tmp_path)["timings"]  # done: not rerun


# ------------------------------------------------------------------------- merge-files (submitit)


def test_merge_files_job_through_submitit_debug_matches_a_direct_merge(tmp_path):
    g = torch.Generator().manual_seed(0)
    pretrained = {"visual.proj": torch.randn(6, 4, generator=g), "visual.ln.bias": torch.randn(4, generator=g),
                  "text.embedding": torch.randn(5, 4, generator=g), "buffer": torch.arange(3)}
    save_file(pretrained, tmp_path / "pretrained.safetensors")
    experts = []
    for i in range(2):
        expert = {k: v + 0.1 * torch.randn(v.shape, generator=g) if k.startswith("visual") else v.clone()
                  for k, v in pretrained.items()}
        save_file(expert, tmp_path / f"e{i}.safetensors")
        experts.append(expert)
    job = Job("merge-files", {"method": "task_arithmetic", "pretrained": str(tmp_path / "pretrained.safetensors"),
                              "experts": [str(tmp_path / f"e{i}.safetensors") for i in range(2)],
                              "alpha": 0.5, "prefix": "visual.", "device": "cpu"})
    report = run_sweep([job], tmp_path / "results", executor="debug")
    assert report.ok and report.completed == [job.id] and report.submitit_ids[job.id].startswith("DEBUG_")

    outputs = load_record(job, tmp_path / "results")["outputs"]
    merged = load_file(outputs["merged_file"])
    visual = {k: v for k, v in pretrained.items() if k.startswith("visual.")}
    vectors = [task_vector(e, visual) for e in experts]
    expected = {**pretrained, **mergelib.apply(visual, mergelib.merge("task_arithmetic", vectors), alpha=0.5)}
    assert merged.keys() == expected.keys()
    for key in merged:
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=1e-6)

    def norm(state):
        return math.sqrt(sum(float((state[k].double() - visual[k].double()).square().sum()) for k in visual))

    assert outputs["expert_task_vector_norms"] == pytest.approx([norm(e) for e in experts], rel=1e-12)
    direct_update = math.sqrt(sum(float((0.5 * (vectors[0][k] + vectors[1][k])).double().square().sum()) for k in visual))
    assert outputs["merged_update_norm"] == pytest.approx(direct_update, rel=1e-5)
    assert outputs["n_experts"] == 2 and outputs["n_tensors"] == 2
    assert Path(outputs["merged_file"]).parent == job.workdir((tmp_path / "results").resolve())

    with pytest.raises(ParameterValueError, match=r"unknown parameters \['coef'\], missing \['experts'\]"):
        execute_job(Job("merge-files", {"method": "ties", "pretrained": "p", "coef": 1}), tmp_path / "results")


def test_built_in_kinds_are_found_by_name_in_a_fresh_interpreter():
    """A worker (or a script) that imported only the sweep module still knows ``merge-files``."""
    script = ("from mergelib.experiments.sweep import JOB_KINDS, resolve_job_kind; "
              "assert 'merge-files' not in JOB_KINDS; print(resolve_job_kind('merge-files').__module__)")
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "mergelib.experiments.jobs"


# ------------------------------------------------------------------ submitit local: kill, resume

SWEEP_SCRIPT = textwrap.dedent("""
    import sys
    import sweep_jobs  # registers the kind sleep-and-square (tests/ is on PYTHONPATH)
    from mergelib.experiments.sweep import Job, run_sweep
    results, log = sys.argv[1], sys.argv[2]
    jobs = [Job("sleep-and-square", {"x": x, "seconds": 1.0, "log_dir": log}) for x in range(6)]
    run_sweep(jobs, results, executor="local", max_parallel=2)
""")


def test_local_submitit_sweep_killed_and_resumed_runs_every_job_exactly_once(tmp_path):
    results, log = tmp_path / "results", tmp_path / "log"
    jobs = [Job("sleep-and-square", {"x": x, "seconds": 1.0, "log_dir": str(log)}) for x in range(6)]
    records = results / "sleep-and-square"

    def done_ids() -> set[str]:
        return {j.id for j in jobs if j.record_path(results).exists()}

    def in_flight() -> set[int]:  # executions started whose job has no record yet
        return set(executions(log)) - {j.params["x"] for j in jobs if j.id in done_ids()} if log.exists() else set()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen([sys.executable, "-c", SWEEP_SCRIPT, str(results), str(log)], env=env,
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill when 2 jobs are done and, if possible, another is running (its worker dies mid-job)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and sweep.poll() is None:
            if len(done_ids()) >= 2 and (in_flight() or time.monotonic() > deadline - 15):
                break
            time.sleep(0.05)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)  # the sweep, its submitit controllers and workers: one group
        sweep.wait()
    finished = done_ids()
    assert 2 <= len(finished) < 6, f"the kill should interrupt the sweep; {len(finished)} jobs were done"
    snapshot = {i: (record_path.stat().st_mtime_ns, record_path.read_bytes())
                for i in finished for record_path in [records / f"{i}.json"]}
    interrupted = in_flight()

    report = run_sweep(jobs, results, executor="local", max_parallel=4)
    assert report.ok and sorted(report.skipped) == sorted(finished)
    assert sorted(report.completed) == sorted(j.id for j in jobs if j.id not in finished)
    assert sorted(p.name for p in records.glob("*.json")) == sorted(f"{j.id}.json" for j in jobs)
    assert not list(records.glob(".*.tmp")), "a stale temporary record was left behind"
    for job in jobs:
        assert check_record(job, results) == ("done", None)
        assert load_record(job, results)["outputs"] == {"square": job.params["x"] ** 2}
    for job_id, (mtime, content) in snapshot.items():  # finished jobs were not recomputed
        path = records / f"{job_id}.json"
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content
    counts = executions(log)
    x_of = {j.id: j.params["x"] for j in jobs}
    assert all(counts[x_of[i]] == 1 for i in finished)
    assert all(counts[x] == 2 for x in interrupted)  # killed mid-job, then run again
    assert all(counts[x] == 1 for x in range(6) if x not in interrupted and x not in {x_of[i] for i in finished})
    assert report.submitit_ids.keys() == set(report.completed)
    assert run_sweep(jobs, results).skipped == [j.id for j in jobs]  # a third run does nothing
