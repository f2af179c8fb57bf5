"""Bookkeeping of the book's chapters, kept out of the notebooks so that they read like text.

A chapter calls into ``mergelib`` for what it computes, and into this module for everything
around it: where results live (:func:`results_location`), which pretrained weights a benchmark
chapter starts from (:func:`backbone_weights`, one meaning of ``weights="random"`` for both
benchmark chapters), the parsers of the benchmark files that the performance chapter shows
(``results/benchmarks/merge-*.json`` and ``finetune-*.json``) and the synthetic layer of its
stability measurements.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from mergelib.io.provenance import REPO_ROOT

RANDOM_INIT_SEED = 0  # the seed of the untrained initialisation that weights="random" means


# ----------------------------------------------------------------------------- locations and weights
def results_location(results_dir: str | Path = "", *, standin: bool) -> Path:
    """Where a benchmark chapter stores its runs: ``results_dir`` when given, else the
    repository's ``results/standin`` (stand-in code checks) or ``results/replication``."""
    if results_dir:
        return Path(results_dir)
    return REPO_ROOT / "results" / ("standin" if standin else "replication")


def benchmark_location(benchmark_dir: str | Path = "") -> Path:
    """Where the benchmark scripts wrote their JSON files: ``benchmark_dir`` when given, else the
    repository's ``results/benchmarks``."""
    return Path(benchmark_dir) if benchmark_dir else REPO_ROOT / "results" / "benchmarks"


def backbone_weights(backbone: str, weights: str | Path, cache_dir: str | Path | None = None) -> str | Path:
    """The ``weights`` argument of the replication functions for a chapter's ``weights`` parameter.

    ``"published"`` on ``tiny-clip``: the miniature's pretrained weights
    (``mergelib.experiments.replication.miniature_weights``). ``"random"``: one untrained initialisation
    of the backbone's architecture, seeded with ``RANDOM_INIT_SEED`` and saved as
    ``<cache_dir>/<backbone>-random-init.safetensors`` (default cache: the repository's
    ``.cache/replication``), so that fine-tuning and merging, in one run or the next, start from
    the same weights. Anything else (``"published"`` on a real backbone, a file) is returned as is.
    """
    if weights == "random":
        import torch
        from safetensors.torch import save_file

        from mergelib.models.backbones import create_clip

        path = Path(cache_dir or REPO_ROOT / ".cache" / "replication") / f"{backbone}-random-init.safetensors"
        if not path.exists():
            with torch.random.fork_rng():
                torch.manual_seed(RANDOM_INIT_SEED)
                state = create_clip(backbone, weights=None).model.state_dict()
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            save_file({k: v.contiguous() for k, v in state.items()}, str(partial))
            partial.replace(path)
        return path
    if backbone == "tiny-clip" and weights == "published":
        from mergelib.experiments.replication import miniature_weights

        return miniature_weights(progress=False)
    return weights


# ----------------------------------------------------------------------------- benchmark files
def load_benchmark_records(benchmark_dir: str | Path, kind: str = "merge") -> dict[str, list[dict[str, Any]]]:
    """The records of ``<benchmark_dir>/<kind>-*.json`` (``kind``: ``"merge"`` for
    ``benchmarks/merge_benchmark.py``, ``"finetune"`` for ``benchmarks/finetune_throughput.py``),
    grouped by device type (``"cpu"``, ``"cuda"``), in file-name order."""
    import torch

    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(Path(benchmark_dir).glob(f"{kind}-*.json")):
        record = json.loads(path.read_text())
        runs.setdefault(torch.device(record["parameters"]["device"]).type, []).append(record)
    return runs


def benchmark_configurations(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every configuration (backbone, number of tasks) of merge-benchmark records, in order."""
    return [config for record in records for config in record["results"]]


def merge_method_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per (backbone, T, method) of merge-benchmark records: seconds, peak extra memory
    (MiB, ``None`` where not measured) and its fraction of two copies of the task vectors."""
    rows = []
    for config in benchmark_configurations(records):
        for name, rec in config["methods"].items():
            peak = rec["peak_extra_bytes"]
            rows.append({"backbone": config["backbone"], "T": config["tasks"], "method": name,
                         "seconds": rec["seconds"], "peak extra (MiB)": None if peak is None else peak / 2**20,
                         "of twice": rec["peak_fraction_of_twice"]})
    return pd.DataFrame(rows)


def reference_table(records: Sequence[dict[str, Any]], methods: Sequence[str] = ("score", "tsv_m")) -> pd.DataFrame:
    """SCORE and TSV-M against the straightforward reference, per configuration that measured it:
    both times, the speed-up, and the float64 and float32 differences and errors."""
    rows = []
    for config in benchmark_configurations(records):
        for name in methods:
            ref = config.get(f"reference_{name}")
            if ref:
                rows.append({"backbone": config["backbone"], "T": config["tasks"], "method": name,
                             "reference (s)": ref["seconds"], "mergelib (s)": config["methods"][name]["seconds"],
                             "speed-up": ref["speedup_of_mergelib"],
                             "difference, float64": ref["relative_difference_float64"],
                             "difference, float32": ref["relative_difference_float32"],
                             "float32 error, mergelib": ref["float32_error_mergelib"],
                             "float32 error, reference": ref["float32_error_reference"]})
    return pd.DataFrame(rows)


def run_label(record: dict[str, Any]) -> str:
    """``"<device>, <date> at commit <sha>"``, with uncommitted changes or an interruption said."""
    git = record["git"]
    return (f"{record['device_description']}, {record['created'][:10]} at commit {(git['commit'] or 'unknown')[:10]}"
            + (" with uncommitted changes" if git.get("dirty") else "")
            + ("" if record.get("complete", True) else " (interrupted)"))


def runs_sentence(records: Sequence[dict[str, Any]]) -> str:
    """The date and commit of each record, ``"; "``-separated."""
    return "; ".join(f"{r['created'][:10]} at commit {(r['git']['commit'] or 'unknown')[:10]}"
                     + ("" if r.get("complete", True) else " (interrupted)") for r in records)


def gpu_checks_budget(script: str | Path | None = None) -> int:
    """The time budget (seconds) of ``benchmarks/gpu_checks.sh``, read from the script."""
    text = Path(script or REPO_ROOT / "benchmarks" / "gpu_checks.sh").read_text()
    return int(re.search(r"GPU_CHECKS_BUDGET:-(\d+)", text).group(1))


def gpu_status(throughput: dict[str, list], merges: dict[str, list], budget: int) -> str:
    """Markdown saying which GPU measurements exist (fine-tuning throughput, merge timings), and
    how to produce the missing ones."""
    gpu_records = {"fine-tuning throughput": throughput.get("cuda", []), "merge timings": merges.get("cuda", [])}
    measured = {kind: records for kind, records in gpu_records.items() if records}
    missing = [kind for kind, records in gpu_records.items() if not records]
    if measured:
        status = "Measured on a GPU: " + "; ".join(f"{kind} on {', '.join(run_label(r) for r in records)}"
                                                 for kind, records in measured.items()) + "."
        if missing:
            status += f" Not measured yet: {' and '.join(missing)} (`bash benchmarks/gpu_checks.sh` measures both)."
        return status
    return ("**No GPU figures have been measured yet**: no machine with a GPU was available to the runs behind "
            "this build, so this section reports none. One command on a machine with CUDA produces them: "
            f"`bash benchmarks/gpu_checks.sh`, which needs no network, stops within a budget of {budget} s, "
            "and writes `finetune-cuda-vit-b-32.json` and `merge-cuda-vit-l-14.json` to `results/benchmarks/`; "
            "this section shows them at the next build.")


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def throughput_sentence(record: dict[str, Any]) -> str:
    """One fine-tuning-throughput record in words: images per second and ms per step per
    precision, the bf16/fp32 ratio, and (on a CPU) the load average when it started."""
    by = {r["precision"]: r for r in record["results"]}
    first = record["results"][0]
    parts = [f"{_rate(r['images_per_second'])} images per second in {p}{' autocast' if p != 'fp32' else ''} "
             f"({1e3 * r['seconds_per_step']:.1f} ms per optimizer step"
             + (f", peak memory {r['peak_memory_bytes'] / 2**30:.1f} GiB)" if r["peak_memory_bytes"] is not None else ")")
             for p, r in by.items()]
    text = (f"{first['backbone']} at batch {first['batch_size']} ({first['image_size']} px images) trains at "
            + " and ".join(parts))
    if "fp32" in by and "bf16" in by:
        ratio = by["bf16"]["images_per_second"] / by["fp32"]["images_per_second"]
        text += f"; bf16 autocast gives {ratio:.2f} times the fp32 throughput"
    load = record.get("load_average")
    if first["device"] == "cpu" and load and None not in load["before"].values():
        return text + (f" (run on {run_label(record)}; the 1-minute load average was "
                       f"{max(load['before'].values()):.1f} on its {load['cpus']} CPUs as the measurements started)")
    return text + f" (run on {run_label(record)})"


def throughput_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Fine-tuning-throughput records as a table indexed by device, backbone, batch and precision."""
    rows = [{"device": r["device_description"], "backbone": r["backbone"], "batch": r["batch_size"],
             "precision": r["precision"], "images/s": r["images_per_second"], "ms/step": 1e3 * r["seconds_per_step"],
             "median ms/step": 1e3 * r["seconds_per_step_median"],
             "peak memory (GiB)": None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**30}
            for record in records for r in record["results"]]
    return pd.DataFrame(rows).set_index(["device", "backbone", "batch", "precision"])


def merge_sentence(records: Sequence[dict[str, Any]]) -> str:
    """Per configuration of merge-benchmark records: SCORE's, TSV-M's and ESM's seconds and the slowest method."""
    parts = []
    for config in benchmark_configurations(records):
        seconds = {name: rec["seconds"] for name, rec in config["methods"].items()}
        slowest = max(seconds, key=seconds.get)
        parts.append(f"{config['backbone']} with T = {config['tasks']}: "
                     + ", ".join(f"{name} {seconds[name]:.2f} s" for name in ("score", "tsv_m", "esm") if name in seconds)
                     + f", the slowest method {slowest} {seconds[slowest]:.2f} s")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- a synthetic layer
SYNTHETIC_KEY = "visual.transformer.resblocks.0.mlp.c_fc.weight"


def synthetic_task_layers(shape: Sequence[int], tasks: int, *, seed: int = 0, rank: int = 8) -> list[dict[str, Any]]:
    """``tasks`` float64 task vectors of one layer (key ``SYNTHETIC_KEY``) of the given
    shape: a low rank shared by all tasks, plus each task's own low rank, plus noise, at a
    fine-tuning update's scale (about 1e-3)."""
    import torch

    m, n = shape
    generator = torch.Generator().manual_seed(seed)

    def low_rank():
        return (torch.randn(m, rank, generator=generator, dtype=torch.float64)
                @ torch.randn(rank, n, generator=generator, dtype=torch.float64))

    shared = low_rank()
    vectors = []
    for _ in range(tasks):
        own = low_rank()
        noise = torch.randn(m, n, generator=generator, dtype=torch.float64)
        vectors.append({SYNTHETIC_KEY: 1e-3 * (0.3 * (shared + own) / rank + 0.1 * noise)})
    return vectors
