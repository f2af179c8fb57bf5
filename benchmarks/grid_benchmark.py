"""Time SCORE's ablation grid under leave-one-domain-out: merge_grid against one merge at a time.

At real encoder shapes (default ViT-B-32, synthetic low-rank-plus-noise task vectors as in
``merge_benchmark.py``), D experts (default 6) and the D leave-one-out folds (T = D - 1), the
methods are the ablation chapter's SCORE variants (``ablations.score_ablation_specs`` with the
chapter's defaults: z = 4, no extra rank fractions, the paper's rank r/D: nine variants) plus
TSV-M. Three implementations of the same grid are timed in one run:

* ``merge_grid``: :func:`mergelib.merge_grid` (each expert decomposed once, each fold's basis
  and projections shared);
* ``merge``: :func:`mergelib.merge` once per (fold, method);
* ``reference``: the straightforward float32 implementation of :mod:`mergelib.methods.reference`, one
  (fold, method) at a time. It is slow (full SVDs), so it is timed on ``--reference-merges``
  (fold, method) pairs of the first fold and its grid time is *estimated* as their mean time
  per merge times the number of merges (every merge of the grid does the same SVD work); the
  output says so.

The merge_grid results are checked bitwise against the one-at-a-time merges (a digest of every
output), and both against the reference (float32 relative difference). Peak extra resident
memory of the grid is compared with holding all task vectors twice, twice: as this process sees it
(glibc's default allocator, whose dynamic mmap threshold keeps freed blocks of up to 32 MiB in the
heap, so the resident set also counts memory that earlier merges freed) and, on Linux, in a child
process that runs the grid alone with ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB, where every
freed block of that size goes back to the system at once: the peak of what the merges hold.
A single SCORE merge at T = 3 (all the selected layers) is also timed against the reference,
interleaved, with the float32 difference and a float64 difference on the first block.

Wall time on a shared machine depends on its load: the output records the load average before
and after, and each timing's CPU seconds besides its wall seconds (with one thread, CPU seconds
are less sensitive to other processes); the ratios are final only when measured on a quiet machine.

A full ViT-B/32 grid takes long on a CPU: ``--layers N`` keeps the first N residual blocks
(all their tensors); the output states it.

    python benchmarks/grid_benchmark.py --layers 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import mergelib
from mergelib.experiments.ablations import score_ablation_specs
from mergelib.methods import parse_method_spec
from mergelib.io.provenance import REPO_ROOT, git_state, provenance, write_json
from mergelib.methods.reference import reference_merge

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_benchmark import (  # noqa: E402  (the benchmark's shared helpers)
    cpu_description, encoder_shapes, measured, nbytes, relative_difference, synthetic_task_vectors)


def digest(vector: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(vector):
        h.update(key.encode())
        h.update(vector[key].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def block_shapes(backbone: str, layers: int) -> dict[str, tuple[int, ...]]:
    """The tensors of the first ``layers`` residual blocks of the backbone's image encoder."""
    prefixes = tuple(f"visual.transformer.resblocks.{i}." for i in range(layers))
    return {k: s for k, s in encoder_shapes(backbone).items() if k.startswith(prefixes)}


def grid_inputs(backbone: str, experts: int, layers: int):
    """The experts' task vectors (by name), the leave-one-out folds and the methods of the grid."""
    shapes = block_shapes(backbone, layers)
    names = [f"domain{i}" for i in range(experts)]
    vectors = dict(zip(names, synthetic_task_vectors(shapes, experts)))
    folds = [[n for n in names if n != held] for held in names]
    variants = score_ablation_specs(z_values=[4.0], rank_fractions=[], n_domains=experts)
    return shapes, vectors, folds, [v.spec for v in variants] + ["tsv_m"]


LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # freed blocks of 1 MiB or more go back at once


def live_grid_peak(args) -> dict | None:
    """The grid's peak extra resident memory in a child process with LIVE_MEMORY_ENV (Linux only)."""
    if not Path("/proc/self/status").exists():
        return None
    command = [sys.executable, str(Path(__file__).resolve()), "--grid-memory-only", "--backbone", args.backbone,
               "--experts", str(args.experts), "--layers", str(args.layers)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, env={**os.environ, **LIVE_MEMORY_ENV}, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"[grid] the live-memory pass failed:\n{done.stderr[-2000:]}", flush=True)
        return None
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "environment": LIVE_MEMORY_ENV}


def one_at_a_time(vectors, folds, methods):
    for fold in folds:
        for method in methods:
            spec = parse_method_spec(method)
            yield fold, method, mergelib.merge(spec.name, [vectors[n] for n in fold], **spec.params)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="ViT-B-32")
    parser.add_argument("--experts", type=int, default=6)
    parser.add_argument("--layers", type=int, default=1, help="time the first N residual blocks (ViT-B-32 has 12)")
    parser.add_argument("--reference-merges", type=int, default=2,
                        help="(fold, method) pairs of the first fold on which the slow reference is timed")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 on a shared, oversubscribed machine, where "
                             "OpenMP's spinning threads slow every implementation by an order of magnitude")
    parser.add_argument("--output", type=Path, default=None)
    # the child process of live_grid_peak: run the grid alone, print its measurement as JSON
    parser.add_argument("--grid-memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    if args.grid_memory_only:
        _, vectors, folds, methods = grid_inputs(args.backbone, args.experts, args.layers)
        record = {}
        with measured(cpu, record):
            for _, _, merged in mergelib.merge_grid(vectors, folds, methods):
                del merged
        print(json.dumps(record))
        return 0
    started = git_state()
    load_before = os.getloadavg()
    shapes, vectors, folds, methods = grid_inputs(args.backbone, args.experts, args.layers)
    names = list(vectors)
    merges = len(folds) * len(methods)
    size = nbytes(vectors[names[0]])
    twice = 2 * len(names) * size
    print(f"[grid] {args.backbone}, first {args.layers} block(s): {len(shapes)} tensors, task vector "
          f"{size / 2**20:.1f} MiB; {len(names)} experts, {len(folds)} folds (T = {len(names) - 1}), "
          f"{len(methods)} methods: {merges} merges; {cpu_description()}", flush=True)

    # 1. one merge at a time (kept as digests), 2. the grid, 3. the reference on a sample; interleaved
    record_merge, record_grid, record_reference = {}, {}, {}
    digests, sample = {}, {}
    reference_pairs = [(folds[0], m) for m in (["score", "tsv_m"] + methods)[: args.reference_merges]]
    reference_pairs = list(dict.fromkeys((tuple(f), m) for f, m in reference_pairs))
    with measured(cpu, record_merge):
        for fold, method, merged in one_at_a_time(vectors, folds, methods):
            digests[tuple(fold), method] = digest(merged)
            if (tuple(fold), method) in reference_pairs:
                sample[tuple(fold), method] = merged
    print(f"[grid] merge one at a time: {record_merge['seconds']:.1f} s", flush=True)
    identical = 0
    with measured(cpu, record_grid):
        for fold, method, merged in mergelib.merge_grid(vectors, folds, methods):
            identical += digest(merged) == digests[tuple(fold), method]
            del merged
    print(f"[grid] merge_grid: {record_grid['seconds']:.1f} s; {identical}/{merges} bitwise identical", flush=True)
    differences = {}
    timed, timed_cpu = [], []
    for fold, method in reference_pairs:
        record = {}
        with measured(cpu, record):
            reference = reference_merge(method, [vectors[n] for n in fold])
        timed.append(record["seconds"])
        timed_cpu.append(record["cpu_seconds"])
        differences[method] = relative_difference(sample[fold, method], reference)
        print(f"[grid] reference {method}: {record['seconds']:.1f} s, relative difference {differences[method]:.1e}", flush=True)
    record_reference = {"timed_merges": len(timed), "seconds_per_merge": sum(timed) / len(timed),
                        "estimated_grid_seconds": sum(timed) / len(timed) * merges,
                        "estimated_grid_cpu_seconds": sum(timed_cpu) / len(timed_cpu) * merges,
                        "relative_difference_float32": differences,
                        "how": "timed on the listed (fold, method) pairs of the first fold; grid time = mean per merge x merges"}

    # a single SCORE merge at T = 3, interleaved with the reference (two rounds each)
    three = [vectors[n] for n in names[:3]]
    single = {"mergelib": [], "reference": []}
    for _ in range(2):
        for which in ("mergelib", "reference"):
            start = time.perf_counter()
            out = mergelib.merge("score", three) if which == "mergelib" else reference_merge("score", three)
            single[which].append(time.perf_counter() - start)
            if which == "mergelib":
                ours = out
            else:
                theirs = out
    first_block = [k for k in shapes if k.startswith("visual.transformer.resblocks.0.")]
    wide = [{k: v[k].double() for k in first_block} for v in three]
    single_record = {
        "seconds_mergelib": min(single["mergelib"]), "seconds_reference": min(single["reference"]),
        "speedup": min(single["reference"]) / min(single["mergelib"]),
        "relative_difference_float32": relative_difference(ours, theirs),
        "relative_difference_float64_first_block": relative_difference(mergelib.merge("score", wide), reference_merge("score", wide)),
        "rounds": single,
    }
    print("[grid] the grid's live memory, in a child process ...", flush=True)
    live = live_grid_peak(args)
    if live is not None:
        live["peak_fraction_of_twice"] = live["peak_extra_bytes"] / twice
    result = {
        "backbone": args.backbone, "layers": args.layers, "experts": len(names), "folds": len(folds),
        "tasks_per_fold": len(names) - 1, "methods": methods, "merges": merges, "task_vector_bytes": size,
        "all_task_vectors_twice_bytes": twice,
        "merge_grid": {**record_grid, "bitwise_identical_to_merge": identical, "peak_fraction_of_twice": (
            record_grid["peak_extra_bytes"] / twice if record_grid.get("peak_extra_bytes") is not None else None),
            "live_memory": live},
        "merge_one_at_a_time": {**record_merge, "peak_fraction_of_twice": (
            record_merge["peak_extra_bytes"] / twice if record_merge.get("peak_extra_bytes") is not None else None)},
        "reference": record_reference,
        "speedup_over_merge": record_merge["seconds"] / record_grid["seconds"],
        "speedup_over_reference_estimated": record_reference["estimated_grid_seconds"] / record_grid["seconds"],
        "speedup_over_merge_cpu_seconds": record_merge["cpu_seconds"] / record_grid["cpu_seconds"],
        "speedup_over_reference_estimated_cpu_seconds": (
            record_reference["estimated_grid_cpu_seconds"] / record_grid["cpu_seconds"]),
        "single_score_merge_T3": single_record,
        "load_average": {"before": load_before, "after": os.getloadavg(), "cpus": os.cpu_count()},
    }
    print(f"\n{args.backbone}, first {args.layers} block(s), {merges} merges:")
    print(f"  merge_grid {record_grid['seconds']:.1f} s (peak extra {record_grid['peak_extra_bytes'] / 2**20:.0f} MiB, "
          f"{result['merge_grid']['peak_fraction_of_twice']:.2f} of all task vectors twice), "
          f"{identical}/{merges} bitwise equal to merge")
    if live is not None:
        print(f"  merge_grid live memory (child process, {LIVE_MEMORY_ENV}): peak extra "
              f"{live['peak_extra_bytes'] / 2**20:.0f} MiB, {live['peak_fraction_of_twice']:.2f} of all task "
              "vectors twice")
    if record_merge.get("peak_extra_bytes") is not None:
        print(f"  merge one at a time: peak extra {record_merge['peak_extra_bytes'] / 2**20:.0f} MiB "
              f"({result['merge_one_at_a_time']['peak_fraction_of_twice']:.2f} of all task vectors twice)")
    print(f"  merge one at a time {record_merge['seconds']:.1f} s -> grid {result['speedup_over_merge']:.1f}x faster "
          f"({result['speedup_over_merge_cpu_seconds']:.1f}x in CPU seconds)")
    print(f"  reference (estimated from {len(timed)} merges) {record_reference['estimated_grid_seconds']:.0f} s -> "
          f"grid {result['speedup_over_reference_estimated']:.1f}x faster "
          f"({result['speedup_over_reference_estimated_cpu_seconds']:.1f}x in CPU seconds)")
    print(f"  load average before {load_before[0]:.1f}, after {result['load_average']['after'][0]:.1f} "
          f"({os.cpu_count()} CPUs); final only on a quiet machine")
    print(f"  single SCORE merge, T = 3: mergelib {single_record['seconds_mergelib']:.1f} s, reference "
          f"{single_record['seconds_reference']:.1f} s -> {single_record['speedup']:.1f}x; relative difference float32 "
          f"{single_record['relative_difference_float32']:.1e}, float64 {single_record['relative_difference_float64_first_block']:.1e}")
    output = args.output or REPO_ROOT / "results" / "benchmarks" / f"grid-cpu-{args.backbone.lower()}-{args.layers}layers.json"
    parameters = {"backbone": args.backbone, "experts": args.experts, "layers": args.layers,
                  "reference_merges": args.reference_merges, "threads": torch.get_num_threads()}
    write_json(output, provenance(parameters, git=started, device_description=cpu_description(), results=result))
    print(f"[grid] written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
