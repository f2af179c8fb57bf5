"""Measure fine-tuning throughput (images per second, seconds per optimizer step) of a backbone.

The backbone's image tower is built with ``weights=None`` (a random initialisation of the real
architecture: no network needed, and throughput does not depend on the weights' values), given a
frozen head, and trained with mergelib's own training step (``mergelib.models.finetune.TrainingStep``:
AdamW, warm-up then cosine, clipping at 1.0, autocast) on random batches already on the device,
so the figures are those of the model and optimizer, not of an input pipeline. Untimed warm-up
steps come first; on CUDA each timed step ends with ``torch.cuda.synchronize`` and the peak
memory is ``torch.cuda.max_memory_allocated`` (not measured on the CPU). The script prints a
table with the bf16/fp32 ratio and writes JSON with provenance (commit, versions, parameters,
device) to ``results/benchmarks/finetune-<cpu|cuda>-<backbone>.json``.

    python benchmarks/finetune_throughput.py                                   # ViT-B-32, batch 128, fp32 + bf16
    python benchmarks/finetune_throughput.py --backbone tiny-clip --batch-size 32 --steps 3   # a quick CPU check
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from mergelib.models.backbones import BACKBONES, create_clip
from mergelib.experiments.benchmarking import check_precision, device_description, finetune_throughput, resolve_benchmark_device
from mergelib.errors import MergelibError
from mergelib.models.evaluation import PRECISIONS
from mergelib.io.provenance import REPO_ROOT, git_state, provenance, write_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="ViT-B-32", choices=list(BACKBONES))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=PRECISIONS,
                        help="autocast precisions to measure, one after the other (default fp32 bf16)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per precision")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps before them")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file (default results/benchmarks/finetune-<device>-<backbone>.json)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    precisions = list(dict.fromkeys(args.precisions))
    try:  # every argument is checked before the first (long) measurement starts
        device = resolve_benchmark_device(args.device)
        for precision in precisions:
            check_precision(precision, device)
    except MergelibError as error:
        parser.error(str(error))

    described = device_description(device)
    started_at = git_state()
    output = args.output or REPO_ROOT / "results" / "benchmarks" / f"finetune-{device.type}-{args.backbone.lower()}.json"
    parameters = {"backbone": args.backbone, "batch_size": args.batch_size, "precisions": precisions,
                  "steps": args.steps, "warmup": args.warmup, "device": str(device), "threads": torch.get_num_threads(),
                  "weights": None}
    build = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    print(f"[throughput] {args.backbone}, batch {args.batch_size}, {args.steps} timed steps after {args.warmup} "
          f"untimed, on {described} (torch {torch.__version__})", flush=True)
    clip = create_clip(args.backbone, weights=None)  # once; each precision trains a fresh copy of its tower
    # the machine's 1-minute load average around each measurement: other work on a shared CPU slows it
    load = {"cpus": os.cpu_count(), "before": {}, "after": {}}
    results = []
    for precision in precisions:
        print(f"[throughput] {precision} ...", end=" ", flush=True)
        load["before"][precision] = _load_average()
        try:
            record = finetune_throughput(args.backbone, batch_size=args.batch_size, precision=precision,
                                         steps=args.steps, warmup=args.warmup, device=device, clip=clip)
        except torch.OutOfMemoryError as error:
            print(f"out of memory: {error}", file=sys.stderr)
            return 1
        load["after"][precision] = _load_average()
        print(f"{record['images_per_second']:.1f} images/s", flush=True)
        results.append(record)
        # written after every precision, so an interrupted run keeps what it finished
        write_json(output, provenance(parameters, git=started_at, device_description=described, torch_build=build,
                                      load_average=load, results=results, ratios=ratios(results),
                                      complete=len(results) == len(precisions)))
    print_summary(results, described)
    print(f"  1-minute load average before/after each precision ({load['cpus']} CPUs): "
          + ", ".join(f"{p} {load['before'][p]}/{load['after'][p]}" for p in load["after"]))
    print(f"[throughput] written to {output}")
    return 0


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def ratios(results) -> dict[str, float]:
    """Throughput of each precision other than fp32 divided by fp32's (``"bf16/fp32"``: ...)."""
    by = {r["precision"]: r["images_per_second"] for r in results}
    return {f"{p}/fp32": v / by["fp32"] for p, v in by.items() if p != "fp32" and "fp32" in by}


def print_summary(results, described: str) -> None:
    first = results[0]
    print(f"\n{first['backbone']} fine-tuning, batch {first['batch_size']} ({first['image_size']} px), "
          f"{first['encoder_parameters'] / 1e6:.1f} M parameters, on {described}")
    print(f"  {'precision':9s} {'images/s':>10s} {'s/step':>9s} {'median':>9s} {'peak MiB':>9s}")
    for r in results:
        peak = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        print(f"  {r['precision']:9s} {r['images_per_second']:10.1f} {r['seconds_per_step']:9.4f} "
              f"{r['seconds_per_step_median']:9.4f} {peak:>9s}")
    for name, value in ratios(results).items():
        print(f"  throughput {name}: {value:.2f}")
    if first["peak_memory_bytes"] is None:
        print(f"  peak memory: {first['peak_memory_note']}")


if __name__ == "__main__":
    sys.exit(main())
