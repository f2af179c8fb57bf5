"""Bookkeeping of the book's chapters, kept out of the notebooks so that they read like text.

A chapter calls into ``mergelib`` for what it computes, and into this module for everything
around it: where results live (:func:`results_location`), which pretrained weights a benchmark
chapter starts from (:func:`backbone_weights`, one meaning of ``weights="random"`` for both
benchmark chapters), the parsers of the benchmark files that the performance chapter shows
(``results/benchmarks/merge-*.json`` and ``finetune-*.json``) and the synthetic layer of its
stability measurements.

Every comparison a chapter states between two of the book's accuracies goes through
:class:`Evidence` (the per-example correctness of the models compared): its sentences are
:func:`mergelib.analysis.stats.verdict` of the paired interval, "the best" is the set not
distinguishable from the top, and an ordering says how many of its steps are resolved.
:func:`seeds_beside` puts the seeds study's spread beside a chapter's single-run numbers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from mergelib.analysis import stats
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
        runs.setdefault(torch.device(record["parameters"].get("device", "cpu")).type, []).append(record)
    return runs


def grid_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per run of ``benchmarks/grid_benchmark.py``: the merges of SCORE's ablation grid
    (leave-one-out folds x methods), the grid's and one-at-a-time seconds, the speed-ups over
    ``mergelib.merge`` and over the float32 reference, the grid's peak memory as a fraction of
    all task vectors held twice, and whether every grid result was bitwise that of ``merge``."""
    rows = []
    for record in records:
        result = record["results"]
        grid = result["merge_grid"]
        rows.append({
            "run": run_label(record), "backbone": result["backbone"], "layers": result["layers"],
            "folds x methods": f"{result['folds']} x {len(result['methods'])}", "T": result["tasks_per_fold"],
            "grid (s)": grid["seconds"], "one at a time (s)": result["merge_one_at_a_time"]["seconds"],
            "vs merge": result["speedup_over_merge"], "vs reference": result["speedup_over_reference_estimated"],
            "peak / (task vectors x 2)": grid["peak_fraction_of_twice"],
            "bitwise equal": f"{grid['bitwise_identical_to_merge']} of {result['merges']}",
            "load before": result["load_average"]["before"][0], "load after": result["load_average"]["after"][0],
        })
    return pd.DataFrame(rows)


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


# ----------------------------------------------------------------------------- comparisons
def joined(names: Sequence[str]) -> str:
    """``"a"``, ``"a and b"``, ``"a, b and c"``."""
    names = [str(n) for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1] if names else ""


@dataclass(frozen=True)
class Evidence:
    """The per-example correctness of the models a chapter compares, and the sentences it may
    state about them.

    ``correct`` is ``{method: correctness}`` in the structures of :mod:`mergelib.analysis.stats`
    (e.g. :func:`mergelib.experiments.ablations.domain_correctness`); ``labels`` gives balanced
    accuracy. Every interval is the paired percentile bootstrap of
    :func:`mergelib.analysis.stats.paired_bootstrap_ci` with these options; numbers are fractions
    unless a method says points or percent.
    """

    correct: Mapping[str, Any]
    labels: Any = None
    confidence: float = 0.95
    n_resamples: int = 2000
    seed: int = 0

    @property
    def options(self) -> dict[str, Any]:
        return dict(labels=self.labels, confidence=self.confidence, n_resamples=self.n_resamples, seed=self.seed)

    def restricted(self, methods: Sequence[str]) -> "Evidence":
        """The same evidence for ``methods`` only (in that order)."""
        missing = [m for m in methods if m not in self.correct]
        if missing:
            raise KeyError(f"no per-example correctness for {missing}; there is for {list(self.correct)}")
        return Evidence({m: self.correct[m] for m in methods}, **{k: v for k, v in self.options.items()})

    def accuracy(self, method: str) -> float:
        return stats.accuracy(self.correct[method], labels=self.labels)

    def interval(self, a: str, b: str) -> stats.Interval:
        """The difference ``a - b`` and its paired interval."""
        return stats.paired_bootstrap_ci(self.correct[a], self.correct[b], **self.options)

    def versus(self, a: str, b: str) -> str:
        """The book's sentence for ``a`` against ``b``: "higher (+0.9 points, 95 % CI +0.4 to
        +1.4)", "lower (...)" or "indistinguishable at this scale (...)"."""
        return stats.verdict(*self.interval(a, b), confidence=self.confidence)

    def direction(self, a: str, b: str) -> int:
        return stats.direction(*self.interval(a, b)[1:])

    def best(self, methods: Sequence[str] | None = None) -> list[str]:
        """The methods (of ``methods``) not distinguishable from the top one, the top first."""
        return stats.indistinguishable_from_best(self.restricted(methods or list(self.correct)).correct,
                                                 **self.options)

    def best_sentence(self, methods: Sequence[str] | None = None, name: Callable[[str], str] = str) -> str:
        """"X has the highest mean (45.9 %); not distinguishable from it at this scale: Y and Z"
        or "...; every other method is resolved below it"."""
        best = self.best(methods)
        text = f"{name(best[0])} has the highest mean ({100 * self.accuracy(best[0]):.1f} %)"
        if len(best) == 1:
            return text + "; every other one is resolved below it"
        return text + f"; not distinguishable from it at this scale: {joined([name(m) for m in best[1:]])}"

    def tally(self, reference: str, methods: Sequence[str]) -> dict[int, list[str]]:
        """``{+1: [...], -1: [...], 0: [...]}``: the methods resolved above ``reference``, below
        it, and not distinguishable from it."""
        found: dict[int, list[str]] = {1: [], -1: [], 0: []}
        for method in methods:
            found[self.direction(method, reference)].append(method)
        return found

    def tally_sentence(self, reference: str, methods: Sequence[str], *, reference_name: str | None = None,
                       noun: str = "methods") -> str:
        """E.g. "3 of the 12 methods are resolved above zero-shot, 2 below it and 7 are
        indistinguishable from it at this scale"."""
        found = self.tally(reference, methods)
        return (f"{len(found[1])} of the {len(methods)} {noun} {'is' if len(found[1]) == 1 else 'are'} resolved above "
                f"{reference_name or reference}, "
                f"{len(found[-1])} below it and {len(found[0])} {'is' if len(found[0]) == 1 else 'are'} "
                f"indistinguishable from it at this scale")

    def folds(self, a: str, b: str) -> dict[int, int]:
        """On how many held-out domains (tasks) ``a`` is resolved above ``b`` (+1), below (-1) or
        neither (0), each domain judged by its own paired interval."""
        directions = stats.per_group_differences(self.correct[a], self.correct[b], **self.options)["direction"]
        return {d: int((directions == d).sum()) for d in (1, -1, 0)}

    def folds_sentence(self, a: str, b: str, b_name: str | None = None) -> str:
        """E.g. "resolved above zero-shot on 2 of the 6 held-out domains and below it on 1"."""
        counts = self.folds(a, b)
        total = sum(counts.values())
        return (f"resolved above {b_name or b} on {counts[1]} of the {total} held-out domains and below it on "
                f"{counts[-1]}")

    def differences(self, reference: str | None = None, pairs: Sequence[tuple[str, str]] | None = None,
                    name: Callable[[str], str] = str) -> pd.DataFrame:
        """The paired differences (:func:`mergelib.analysis.stats.pairwise_differences`) as a
        table to show: ``method, versus, difference, low, high`` in points and ``verdict``."""
        table = stats.pairwise_differences(self.correct, reference=reference, pairs=pairs, **self.options)
        table[["difference", "low", "high"]] *= 100
        table["method"], table["versus"] = table["method"].map(name), table["versus"].map(name)
        return table[["method", "versus", "difference", "low", "high", "verdict"]]

    def error_bars(self, methods: Sequence[str] | None = None) -> pd.DataFrame:
        """:func:`mergelib.analysis.stats.error_bars` in percent (``estimate, low, high, below,
        above``), for ``ax.bar(..., yerr=bars[["below", "above"]].T.to_numpy())``."""
        return 100 * stats.error_bars(self.restricted(methods or list(self.correct)).correct, **self.options)

    def group_error_bars(self, method: str) -> pd.DataFrame:
        """Per held-out domain (or task) of ``method``: ``estimate, low, high, below, above`` in
        percent, from :func:`mergelib.analysis.stats.bootstrap_ci` of that group alone; indexed by
        the group's keys (``held_out``, or ``(benchmark, held_out)`` when nested so)."""
        rows: dict[Any, dict[str, float]] = {}

        def walk(node: Any, labels: Any, path: tuple) -> None:
            if isinstance(node, Mapping):
                for key, child in node.items():
                    walk(child, labels.get(key) if isinstance(labels, Mapping) else labels, path + (key,))
                return
            estimate, low, high = stats.bootstrap_ci(node, labels=labels, confidence=self.confidence,
                                                     n_resamples=self.n_resamples, seed=self.seed)
            rows[path[0] if len(path) == 1 else path] = {
                "estimate": 100 * estimate, "low": 100 * low, "high": 100 * high,
                "below": 100 * max(0.0, estimate - low), "above": 100 * max(0.0, high - estimate)}

        walk(self.correct[method], self.labels, ())
        return pd.DataFrame.from_dict(rows, orient="index")

    def ordering(self, order: Sequence[str]) -> stats.Ordering:
        """How many steps of a claimed ordering (best first) the evidence resolves."""
        return stats.ordering_steps(self.correct, order, **self.options)


def unpaired_sentence(difference: float, low: float, high: float, confidence: float = 0.95) -> str:
    """:func:`mergelib.analysis.stats.verdict` of an interval computed without per-example data
    (:func:`mergelib.analysis.stats.unpaired_normal_ci`), saying so."""
    return stats.verdict(difference, low, high, confidence=confidence)[:-1] + ", unpaired normal approximation)"


# ----------------------------------------------------------------------------- the seeds study
#: Configuration fields that do not change what a seeds-study run measures for a chapter.
SEEDS_IGNORED_FIELDS = ("methods", "sweep_methods", "coefficients", "cache_dir", "device", "finetune_seed",
                        "pretrain_seed", "batch_size", "esm_proxy_count")
#: What a chapter says in place of the seeds study's spread when the study has not been run.
SEEDS_MISSING = "not available in this build: run `make seeds-study`"


@dataclass(frozen=True)
class SeedsBeside:
    """The seeds study's spread beside a chapter's single-run numbers (:func:`seeds_beside`)."""

    table: pd.DataFrame  # per method: this run and the study's mean, sd, min, max (percent), seeds
    sentence: str        # what the study is, and the spread in words; or SEEDS_MISSING
    available: bool


def _normalized(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


def seeds_beside(single: pd.Series, setting: str, *, config: Mapping[str, Any] | None = None,
                 study_dir: str | Path | None = None, factor: str = "fine-tuning",
                 name: Callable[[str], str] = str) -> SeedsBeside:
    """The mean and spread across seeds (:func:`mergelib.experiments.seeds_study.seed_spread`)
    beside ``single`` (this run's mean per method, in percent), for the methods of both, in the
    order of ``single``.

    ``study_dir`` defaults to ``results/studies/miniature_seeds``; ``setting`` is
    ``"domain_generalization"`` or ``"multitask"``. When the study is absent, the table holds one
    note and the sentence is ``SEEDS_MISSING``. With ``config`` (the chapter's
    ``MiniatureConfig.as_dict()``) the sentence says when the study ran another configuration.
    """
    from mergelib.experiments.seeds_study import SEEDS_STUDY_DIR, seed_spread
    from mergelib.protocols.results import load_results

    directory = Path(study_dir) if study_dir else SEEDS_STUDY_DIR
    missing = SeedsBeside(pd.DataFrame({"note": [f"no seeds study in {directory}: run `make seeds-study`"]}),
                          SEEDS_MISSING, False)
    if not (directory / "results.csv").exists():
        return missing
    study = load_results(directory / "results.csv")
    if "factor" not in study or not (study["factor"] == factor).any() or not (study["setting"] == setting).any():
        return missing
    spread = seed_spread(study, factor=factor)
    spread = spread[spread["setting"] == setting].set_index("method")
    methods = [m for m in single.index if m in spread.index]
    if not methods:
        return missing
    table = pd.DataFrame({"this run (%)": single[methods], "seeds: mean (%)": spread.loc[methods, "mean"],
                          "sd (points)": spread.loc[methods, "std"], "min (%)": spread.loc[methods, "min"],
                          "max (%)": spread.loc[methods, "max"], "seeds": spread.loc[methods, "seeds"].astype(int)})
    table.index = [name(m) for m in methods]
    table.index.name = "method"
    record = json.loads((directory / "provenance.json").read_text()) if (directory / "provenance.json").exists() else {}
    when = (f"a run of {str(record.get('created', ''))[:10]} at commit {str(record.get('git', {}).get('commit'))[:10]}"
            if record else "no provenance record")
    seeds = int(table["seeds"].max())
    sd = table["sd (points)"].dropna()
    moving, fixed = sd[sd > 0], [str(m) for m in sd.index[sd == 0]]
    sentence = (f"Across {seeds} {factor} seeds (the seeds study, {when}), the mean accuracy of a method moves "
                f"with a standard deviation of {moving.min():.1f} to {moving.max():.1f} points (median "
                f"{moving.median():.1f})" if len(moving) else
                f"The seeds study ({when}) shows no spread across its {factor} seeds")
    if len(moving) and fixed:
        sentence += f"; {joined(fixed)} {'does' if len(fixed) == 1 else 'do'} not depend on these seeds"
    if config is not None and record.get("parameters"):
        study_parameters, own = _normalized(record["parameters"]), _normalized(dict(config))
        differing = sorted(k for k in study_parameters if k in own and k not in SEEDS_IGNORED_FIELDS
                           and study_parameters[k] != own[k])
        if differing:
            sentence += (f"; the study ran another configuration than this build (it differs in "
                         f"{', '.join(differing)}), so its numbers are not this run's reruns")
    return SeedsBeside(table, sentence, True)
