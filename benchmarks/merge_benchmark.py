"""Time every registered merging method and record its peak memory at real CLIP encoder shapes.

The task vectors are synthetic (low rank plus noise, with a component shared by all tasks, as
domain experts have) in the exact shapes of an open_clip image encoder, built with no weights.
SCORE and TSV-M are also computed by a straightforward reference written the obvious way: a
Python loop over tensors and tasks, ``torch.linalg.svd`` with its default full matrices,
polar factors by full SVDs, projections and trimming task by task. The script prints, for each
configuration, seconds and peak extra memory per method, the speed-up of mergelib's SCORE and
TSV-M over the reference, their agreement, and the peak memory as a fraction of what holding
all task vectors twice costs; it writes the same as JSON with provenance.

Agreement is measured twice. In float64 (on the first block, ``visual.proj`` and the
positional embedding) the two implementations compute the same function, so they must agree to
1e-5 or better. In float32 they need not: SCORE's entry-wise trimming acts in a basis of
singular vectors whose near-degenerate members rotate under round-off, so a 1e-7 change of
the input moves SCORE's output by about 1e-3 (the book's performance page shows this); the
float32 difference is reported, not asserted.

    python benchmarks/merge_benchmark.py                      # everything (long on a CPU)
    python benchmarks/merge_benchmark.py --backbones ViT-B-32 --tasks 3
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import mergelib
from mergelib.models.backbones import BACKBONES, create_clip
from mergelib.methods import METHODS
from mergelib.methods.reference import REFERENCE_RULES, reference_merge
from mergelib.io.provenance import REPO_ROOT, git_state, provenance, write_json

# Parameters a method needs to run on task vectors alone (ESM's activation subspaces need a model
# and data; its SVD variant times the same merging and scaling machinery).
BENCHMARK_PARAMS = {"esm": {"decomposition": "svd"}}


# ----------------------------------------------------------------------------- inputs
def encoder_shapes(backbone: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the floating-point tensors of the backbone's image encoder (``visual.*``)."""
    clip = create_clip(backbone, weights=None)
    shapes = {f"visual.{k}": tuple(v.shape) for k, v in clip.model.visual.state_dict().items() if v.is_floating_point()}
    del clip
    return shapes


def synthetic_task_vectors(shapes: dict[str, tuple[int, ...]], tasks: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Low-rank-plus-noise task vectors: for each matrix, a rank-8 part shared by every task, a
    rank-8 part of the task's own, and dense noise; other tensors are small dense noise."""
    generator = torch.Generator().manual_seed(seed)
    shared = {k: (torch.randn(s[0], 8, generator=generator), torch.randn(8, s[1], generator=generator))
              for k, s in shapes.items() if len(s) == 2}
    vectors = []
    for _ in range(tasks):
        vector = {}
        for key, shape in shapes.items():
            noise = torch.randn(shape, generator=generator)
            if len(shape) == 2:
                a, b = shared[key]
                own = torch.randn(shape[0], 8, generator=generator) @ torch.randn(8, shape[1], generator=generator)
                noise.mul_(0.1).add_(a @ b + own, alpha=0.3 / 8)
            vector[key] = noise.mul_(1e-3)
        vectors.append(vector)
    return vectors


def nbytes(vector: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in vector.values())


# ----------------------------------------------------------------------------- reference
# the straightforward full-SVD reference lives in mergelib.methods.reference (one copy, shared with the grid benchmark)
REFERENCES = REFERENCE_RULES


# ----------------------------------------------------------------------------- measurement
def _vm(field: str) -> int | None:
    try:
        match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def release_freed_memory() -> None:
    """Hand memory freed by earlier merges back to the OS (glibc keeps it otherwise), so the
    resident set before a merge counts only live data and its peak measures this merge."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def measured(device: torch.device, record: dict):
    """Record wall seconds, this process's CPU seconds (less sensitive than wall time to other
    processes on a shared machine) and the peak memory allocated beyond what was resident at entry."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        release_freed_memory()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (Linux)
        except OSError:
            pass
        base = _vm("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
    record["seconds"] = round(time.perf_counter() - start, 3)
    record["cpu_seconds"] = round(time.process_time() - cpu_start, 3)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _vm("VmHWM")
    record["peak_extra_bytes"] = None if peak is None or base is None else max(peak - base, 0)


def relative_difference(a: dict, b: dict, keys=None) -> float:
    keys = keys or list(a)
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
    den = sum(float(b[k].double().pow(2).sum()) for k in keys)
    return (num / den) ** 0.5


def run_configuration(backbone: str, tasks: int, methods, device, with_reference: bool) -> dict:
    shapes = encoder_shapes(backbone)
    vectors = synthetic_task_vectors(shapes, tasks)
    size = nbytes(vectors[0])
    result = {"backbone": backbone, "tasks": tasks, "task_vector_bytes": size,
              "all_task_vectors_twice_bytes": 2 * tasks * size, "methods": {}}
    outputs = {}
    for name in methods:
        record: dict = {}
        print(f"[benchmark] {backbone} T={tasks} {name} ...", end=" ", flush=True)
        with measured(device, record):
            merged = mergelib.merge(name, vectors, device=device, **BENCHMARK_PARAMS.get(name, {}))
        record["peak_fraction_of_twice"] = (record["peak_extra_bytes"] / result["all_task_vectors_twice_bytes"]
                                            if record["peak_extra_bytes"] is not None else None)
        print(f"{record['seconds']:.1f} s", flush=True)
        result["methods"][name] = record
        if name in REFERENCES:
            outputs[name] = merged
        del merged
    if with_reference:
        small_keys = [k for k in shapes if k.startswith("visual.transformer.resblocks.0.") or k in ("visual.proj", "visual.positional_embedding")]
        for name in REFERENCES:
            if name not in outputs:
                continue
            record = {}
            print(f"[benchmark] {backbone} T={tasks} reference {name} ...", end=" ", flush=True)
            with measured(torch.device("cpu"), record):
                reference = reference_merge(name, vectors)
            print(f"{record['seconds']:.1f} s", flush=True)
            record["speedup_of_mergelib"] = record["seconds"] / result["methods"][name]["seconds"]
            record["relative_difference_float32"] = relative_difference(outputs[name], reference)
            wide = [{k: tv[k].double() for k in small_keys} for tv in vectors]
            ours64, reference64 = mergelib.merge(name, wide, device="cpu"), reference_merge(name, wide)
            record["relative_difference_float64"] = relative_difference(ours64, reference64)
            # how far each float32 result is from the float64 one (same keys): the accuracy that matters
            record["float32_error_mergelib"] = relative_difference({k: outputs[name][k] for k in small_keys}, ours64)
            record["float32_error_reference"] = relative_difference({k: reference[k] for k in small_keys}, reference64)
            record["float64_keys"] = small_keys
            result[f"reference_{name}"] = record
    return result


def cpu_description() -> str:
    """The CPU's model name (Linux) or architecture, and the number of threads torch uses."""
    try:
        name = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        name = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return f"{name}, {threads} thread{'s' if threads > 1 else ''}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["ViT-B-32", "ViT-L-14"], choices=[b for b in BACKBONES if b != "tiny-clip"])
    parser.add_argument("--tasks", nargs="+", type=int, default=[3, 5])
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--reference-on", nargs="*", default=["ViT-B-32"],
                        help="backbones on which the full-SVD reference also runs (slow)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file (default results/benchmarks/merge-<device>-<backbones>.json)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    described = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    results, started_at = [], git_state()
    tag = "-".join(b.lower() for b in args.backbones)
    output = args.output or REPO_ROOT / "results" / "benchmarks" / f"merge-{device.type}-{tag}.json"
    parameters = {"backbones": args.backbones, "tasks": args.tasks, "methods": args.methods, "device": str(device),
                  "reference_on": args.reference_on, "threads": torch.get_num_threads()}
    planned = [(b, t) for b in args.backbones for t in args.tasks]
    for backbone, tasks in planned:
        results.append(run_configuration(backbone, tasks, args.methods, device, backbone in args.reference_on))
        # written after every configuration, so an interrupted run keeps what it finished
        write_json(output, provenance(parameters, git=started_at, device_description=described, results=results,
                                      complete=len(results) == len(planned)))
    print_summary(results, described)
    print(f"[benchmark] written to {output}")
    return 0


def print_summary(results, described: str) -> None:
    print(f"\nDevice: {described}")
    for config in results:
        print(f"\n{config['backbone']}, T = {config['tasks']}: task vector {config['task_vector_bytes'] / 2**20:.0f} MiB, "
              f"all task vectors twice {config['all_task_vectors_twice_bytes'] / 2**20:.0f} MiB")
        print(f"  {'method':16s} {'seconds':>9s} {'peak extra MiB':>15s} {'of twice':>9s}")
        for name, record in config["methods"].items():
            peak = record["peak_extra_bytes"]
            frac = record["peak_fraction_of_twice"]
            print(f"  {name:16s} {record['seconds']:9.2f} {peak / 2**20 if peak is not None else float('nan'):15.0f} "
                  f"{frac if frac is not None else float('nan'):9.2f}")
        for name in REFERENCES:
            ref = config.get(f"reference_{name}")
            if ref:
                print(f"  reference {name}: {ref['seconds']:.1f} s -> mergelib {ref['speedup_of_mergelib']:.1f}x faster; "
                      f"relative difference float64 {ref['relative_difference_float64']:.1e}, "
                      f"float32 {ref['relative_difference_float32']:.1e}; float32 error vs float64: mergelib "
                      f"{ref['float32_error_mergelib']:.1e}, reference {ref['float32_error_reference']:.1e}")


if __name__ == "__main__":
    sys.exit(main())
