"""The ``mergelib`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mergelib.errors import MergelibError


def _book(args: argparse.Namespace) -> int:
    from mergelib.report.book import build_book, execute_notebooks

    start = time.perf_counter()
    if not args.skip_notebooks:
        execute_notebooks(force=args.force)
    sphinx = time.perf_counter()
    build_book()
    print(f"[mergelib] jupyter-book build: {time.perf_counter() - sphinx:.1f} s", flush=True)
    print(f"[mergelib] book built in {time.perf_counter() - start:.0f} s: _build/html/index.html", flush=True)
    return 0


def _notebooks(args: argparse.Namespace) -> int:
    from mergelib.report.book import execute_notebooks

    execute_notebooks(force=args.force)
    return 0


def _lab(args: argparse.Namespace) -> int:
    import os

    from mergelib.report.book import lab_command, lab_environment

    command = lab_command(port=args.port, open_browser=not args.no_browser, token=args.token)
    os.execve(command[0], command, lab_environment())  # JupyterLab takes this process over (Ctrl-C stops it)


def _recipe_study(args: argparse.Namespace) -> int:
    from mergelib.experiments.miniature import STUDY_DIR, run_recipe_study

    run_recipe_study()
    print(f"[mergelib] recipe study written to {STUDY_DIR}", flush=True)
    return 0


def _seeds_study(args: argparse.Namespace) -> int:
    from mergelib.experiments.seeds_study import SEEDS_STUDY_DIR, run_seeds_study

    run_seeds_study()
    print(f"[mergelib] seeds study written to {SEEDS_STUDY_DIR}", flush=True)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from mergelib.io.merge_files import merge_checkpoint_files, parse_parameters

    manifest = merge_checkpoint_files(
        args.method, args.pretrained, args.experts, args.output, parameters=parse_parameters(args.param),
        alpha=args.alpha, prefix=args.prefix, device=args.device, overwrite=args.overwrite)
    print(f"[mergelib] {args.method} of {len(args.experts)} experts written to {args.output} "
          f"(sha256 {manifest['sha256'][:12]}…, provenance in its header)", flush=True)
    return 0


def _replicate_dg(args: argparse.Namespace) -> int:
    from mergelib.experiments.replication import PAPER_DG_METHODS, check_dg_run, replicate_domain_generalization

    methods = args.methods or PAPER_DG_METHODS
    for dataset in args.datasets:  # every dataset's names checked before the first one's experts are fine-tuned
        check_dg_run(args.backbone, dataset, methods=methods, precision=args.precision)
    for dataset in args.datasets:
        results, _ = replicate_domain_generalization(
            args.backbone, dataset, data_root=args.data_root, checkpoint_dir=args.checkpoint_dir,
            results_dir=args.results_dir, methods=methods, weights=args.weights,
            device=args.device, precision=args.precision, epochs=args.epochs, batch_size=args.batch_size,
            accumulation_steps=args.accumulation_steps, num_workers=args.workers)
        means = results.groupby("method")["value"].mean().mul(100).sort_values(ascending=False)
        print(f"[mergelib] {args.backbone} {dataset}: mean over held-out domains (%)\n{means.round(2).to_string()}", flush=True)
    return 0


def _replicate_multitask(args: argparse.Namespace) -> int:
    from mergelib.experiments.replication import PAPER_MT_METHODS, check_multitask_run, finetune_task_experts, replicate_multitask

    # every name, and without --finetune every expert, checked before the backbone is loaded
    tasks = check_multitask_run(args.backbone, args.tasks, methods=args.methods or PAPER_MT_METHODS,
                                precision=args.precision, experts_dir=None if args.finetune else args.experts_dir)
    if args.finetune:
        finetune_task_experts(args.backbone, tasks, data_root=args.data_root, experts_dir=args.experts_dir,
                              weights=args.weights, device=args.device, precision=args.precision,
                              num_workers=args.workers, emnist_rotate_flip=args.emnist_rotate_flip)
    results = replicate_multitask(args.backbone, tasks, data_root=args.data_root, experts_dir=args.experts_dir,
                            results_dir=args.results_dir, methods=args.methods or PAPER_MT_METHODS, weights=args.weights,
                            device=args.device, precision=args.precision, num_workers=args.workers,
                            emnist_rotate_flip=args.emnist_rotate_flip)
    test = results[results["split"] == "test"].groupby("method")[["accuracy", "normalized_accuracy"]].mean().mul(100)
    print(f"[mergelib] {args.backbone}, {results['tasks'].iloc[0]} tasks (test, %):\n{test.round(2).to_string()}", flush=True)
    return 0


#: The exit status of ``mergelib sweep`` when another sweep runs over the same sweep directory.
EXIT_SWEEP_LOCKED = 3


def _sweep(args: argparse.Namespace) -> int:
    from mergelib.experiments.benchmark_sweeps import dg_sweep, multitask_sweep
    from mergelib.errors import ParameterValueError
    from mergelib.io.merge_files import parse_parameters
    from mergelib.io.locks import lock_holder
    from mergelib.experiments.sweep import SweepLockedError, check_executor, run_sweep, sweep_lock_path, sweep_status

    if not args.status:
        check_executor(args.executor)  # slurm without sbatch here: said at once, before anything is planned
    options = {"weights": args.weights, "device": args.device, "precision": args.precision, "num_workers": args.workers}
    for name in ("epochs", "batch_size", "accumulation_steps"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.setting == "dg":
        domains = {}
        for item in args.domains:
            dataset, sep, names = item.partition("=")
            if not sep or not names:
                raise ParameterValueError(f"--domains expects DATASET=domain,domain,..., got {item!r}")
            domains[dataset] = names.split(",")
        jobs = dg_sweep(args.backbones, args.datasets, data_root=args.data_root, checkpoint_dir=args.checkpoint_dir,
                        results_dir=args.results_dir, methods=args.methods, domains=domains, **options)
        sweep_dir = args.sweep_dir or args.checkpoint_dir / "sweep"
    else:
        tasks = args.tasks  # a suite size ("8") or task names: multitask_sweep checks them (replication.task_names)
        if args.emnist_rotate_flip:
            options["emnist_rotate_flip"] = True
        jobs = multitask_sweep(args.backbones, tasks, data_root=args.data_root, experts_dir=args.experts_dir,
                               results_dir=args.results_dir, methods=args.methods, finetune=args.finetune, **options)
        sweep_dir = args.sweep_dir or args.experts_dir / "sweep"
    if not args.status:
        try:
            report = run_sweep(jobs, sweep_dir, executor=args.executor, max_parallel=args.max_parallel,
                               executor_options=parse_parameters(args.executor_option))
        except SweepLockedError as error:  # another sweep runs there: say who, run nothing
            print(f"mergelib sweep: {error}", file=sys.stderr, flush=True)
            return EXIT_SWEEP_LOCKED
    status = sweep_status(jobs, sweep_dir)
    columns = [c for c in ("kind", "backbone", "dataset", "domain", "held_out", "task", "method", "state", "seconds", "error")
               if c in status.columns]
    print(status[columns].to_string(index=False), flush=True)
    print(f"[mergelib] sweep records in {sweep_dir}; results in {args.results_dir}", flush=True)
    holder = lock_holder(sweep_lock_path(sweep_dir)) if args.status else None
    if holder is not None:
        print(f"[mergelib] a sweep is running over {sweep_dir}: {holder.describe()}", flush=True)
    return 0 if args.status or report.ok else 1


def _import(args: argparse.Namespace) -> int:
    from mergelib.models.importers import is_model_folder, import_checkpoint, import_directory

    if args.source.is_dir() and not is_model_folder(args.source):  # a tall_masks-style tree, not one HF model
        done = import_directory(args.source, args.destination, backbone=args.backbone, trust_pickle=args.trust_pickle,
                                overwrite=args.overwrite)
        for item in done:
            print(f"[mergelib] {'imported' if item.imported else 'up to date'}: {item.name} -> {item.destination}", flush=True)
    else:
        manifest = import_checkpoint(args.source, args.destination, backbone=args.backbone, format=args.format,
                                     trust_pickle=args.trust_pickle, fill_from=args.fill_from, overwrite=args.overwrite)
        print(f"[mergelib] imported {args.source} -> {args.destination} (sha256 {manifest['sha256'][:12]}…)", flush=True)
    return 0


def _methods(args: argparse.Namespace) -> int:
    from mergelib.methods import METHODS

    for method in METHODS.values():
        arxiv = f"arXiv {method.arxiv}" if method.arxiv else ""
        defaults = ", ".join(f"{k}={v!r}" for k, v in method.defaults.items()) or "no parameters"
        print(f"{method.name:18s} {arxiv:16s} {defaults}\n{'':18s} {method.summary}")
        for key, valid in method.valid_values().items():
            print(f"{'':18s}   {key}: {valid}")
        for note in method.code_notes:  # where it follows the released code rather than the paper
            paper = f" (the paper's version: {note.switch})" if note.switch else ""
            print(f"{'':18s}   released code, not the paper: {note.topic}{paper}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mergelib", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    book = commands.add_parser("book", help="execute the notebooks with papermill and build the Jupyter Book")
    book.add_argument("--skip-notebooks", action="store_true", help="build from the notebooks already executed")
    notebooks = commands.add_parser("notebooks", help="execute the notebooks with papermill only")
    for sub, run in ((book, _book), (notebooks, _notebooks)):
        sub.add_argument("--force", action="store_true",
                         help="execute every notebook again (default: reuse those whose execution key is unchanged)")
        sub.set_defaults(run=run)
    lab = commands.add_parser("lab", help="JupyterLab on notebooks/ with the project's environment and caches")
    lab.add_argument("--port", type=int, default=None, help="default: JupyterLab's (8888, or the next free one)")
    lab.add_argument("--no-browser", action="store_true", help="do not open a browser")
    lab.add_argument("--token", default=None, help="the access token (default: a random one, printed in the link)")
    lab.set_defaults(run=_lab)
    commands.add_parser("recipe-study", help="rerun the miniature recipe study (results/studies/miniature_recipe)").set_defaults(run=_recipe_study)
    commands.add_parser("seeds-study", help="rerun the miniature with other fine-tuning and pretraining seeds "
                                            "(results/studies/miniature_seeds)").set_defaults(run=_seeds_study)
    commands.add_parser("methods", help="list the registered merging methods").set_defaults(run=_methods)
    merge = commands.add_parser("merge", help="merge expert checkpoints (safetensors) into a pretrained one")
    merge.add_argument("--method", required=True, help="a registered method (see `mergelib methods`)")
    merge.add_argument("--pretrained", required=True, type=Path, help="the pretrained state dict (.safetensors)")
    merge.add_argument("experts", nargs="+", type=Path, help="the fine-tuned state dicts (.safetensors)")
    merge.add_argument("-o", "--output", required=True, type=Path, help="the merged state dict to write (.safetensors)")
    merge.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a method parameter (repeatable)")
    merge.add_argument("--alpha", type=float, default=1.0, help="global coefficient (default 1.0, as in SCORE)")
    merge.add_argument("--prefix", default="", help="merge only tensors whose name starts with this (e.g. visual.)")
    merge.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace OUTPUT even if mergelib did not write it (never an input)")
    merge.set_defaults(run=_merge)
    dg = commands.add_parser("replicate-dg", help="SCORE's leave-one-domain-out benchmark on real backbones and datasets")
    dg.add_argument("--backbone", required=True, help="ViT-B-32, ViT-B-16, ViT-L-14 (or tiny-clip with --weights)")
    dg.add_argument("--datasets", nargs="+", required=True, help="names of mergelib.data.dg_datasets.DG_DATASETS")
    dg.add_argument("--data-root", required=True, type=Path, help="folder holding the datasets in their documented layouts")
    dg.add_argument("--checkpoint-dir", required=True, type=Path, help="where the experts are cached (safetensors)")
    dg.add_argument("--results-dir", type=Path, default=Path("results/replication"))
    dg.add_argument("--methods", nargs="*", default=None, help="method specs (default: SCORE's comparison)")
    dg.add_argument("--weights", default="published", help="'published' (open_clip's OpenAI weights) or a local file")
    dg.add_argument("--device", default="auto")
    dg.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    dg.add_argument("--epochs", type=int, default=None, help="override the dataset's released epochs")
    dg.add_argument("--batch-size", type=int, default=128)
    dg.add_argument("--accumulation-steps", type=int, default=1, help="e.g. 2 with --batch-size 64 for ViT-L-14")
    dg.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    dg.set_defaults(run=_replicate_dg)
    mt = commands.add_parser("replicate-multitask", help="the 8/14/20-task protocol of TSV, Iso and ESM on imported "
                                                         "(or, with --finetune, fine-tuned) experts")
    mt.add_argument("--backbone", required=True)
    mt.add_argument("--tasks", nargs="+", required=True, help="8, 14 or 20, or task names")
    mt.add_argument("--data-root", required=True, type=Path, help="folder holding the torchvision datasets")
    mt.add_argument("--experts-dir", required=True, type=Path, help="where `mergelib import` wrote {backbone}/{task}.safetensors")
    mt.add_argument("--results-dir", type=Path, default=Path("results/replication"))
    mt.add_argument("--methods", nargs="*", default=None)
    mt.add_argument("--weights", default="published", help="the backbone's weights (its text tower builds the heads)")
    mt.add_argument("--device", default="auto")
    mt.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    mt.add_argument("--workers", type=int, default=4)
    mt.add_argument("--emnist-rotate-flip", action="store_true", help="TSV/ESM's EMNIST orientation (off in tall_masks/Iso)")
    mt.add_argument("--finetune", action="store_true",
                    help="fine-tune the experts first with the released recipe and epochs (kept in --experts-dir)")
    mt.set_defaults(run=_replicate_multitask)
    sweep = commands.add_parser("sweep", help="the papers' benchmarks as resumable sweeps of fine-tuning and merge jobs "
                                              "(submitit: SLURM on a cluster, local subprocesses, or inline); "
                                              "one sweep at a time per --sweep-dir (exit status 3 if another runs there)")
    settings = sweep.add_subparsers(dest="setting", required=True)
    sweep_dg = settings.add_parser("dg", help="SCORE's leave-one-domain-out benchmark: backbones x datasets x domains")
    sweep_dg.add_argument("--datasets", nargs="+", required=True, help="names of mergelib.data.dg_datasets.DG_DATASETS")
    sweep_dg.add_argument("--checkpoint-dir", required=True, type=Path, help="where the experts are written (shared by the nodes)")
    sweep_dg.add_argument("--domains", nargs="*", default=[], metavar="DATASET=D1,D2",
                          help="restrict a dataset to some of its domains (default: all)")
    sweep_mt = settings.add_parser("multitask", help="the 8/14/20-task benchmark: fine-tune (or import) experts, merge per method")
    sweep_mt.add_argument("--tasks", nargs="+", required=True, help="8, 14 or 20, or task names")
    sweep_mt.add_argument("--experts-dir", required=True, type=Path, help="{backbone}/{task}.safetensors, imported or fine-tuned here")
    sweep_mt.add_argument("--finetune", action="store_true", help="fine-tune the experts (default: use imported ones)")
    sweep_mt.add_argument("--emnist-rotate-flip", action="store_true", help="TSV/ESM's EMNIST orientation")
    for sub in (sweep_dg, sweep_mt):
        sub.add_argument("--backbones", nargs="+", required=True, help="ViT-B-32, ViT-B-16, ViT-L-14 (tiny-clip with --weights)")
        sub.add_argument("--data-root", required=True, type=Path)
        sub.add_argument("--results-dir", type=Path, default=Path("results/replication"))
        sub.add_argument("--sweep-dir", type=Path, default=None,
                         help="job records and logs (default: <checkpoint-dir or experts-dir>/sweep)")
        sub.add_argument("--methods", nargs="*", default=None, help="method specs (default: the paper's comparison)")
        sub.add_argument("--weights", default="published")
        sub.add_argument("--device", default="auto")
        sub.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
        sub.add_argument("--epochs", type=int, default=None, help="override the released epochs")
        sub.add_argument("--batch-size", type=int, default=None)
        sub.add_argument("--accumulation-steps", type=int, default=None)
        sub.add_argument("--workers", type=int, default=4, help="DataLoader workers per job")
        sub.add_argument("--executor", default="local", choices=["inline", "local", "slurm", "auto"],
                         help="slurm on a cluster; local: subprocesses of this machine; inline: this process")
        sub.add_argument("--max-parallel", type=int, default=None, help="jobs running at once")
        sub.add_argument("--executor-option", action="append", default=[], metavar="NAME=VALUE",
                         help="a submitit parameter, e.g. slurm_partition=gpu, gpus_per_node=1, timeout_min=720 (repeatable)")
        sub.add_argument("--status", action="store_true",
                         help="print the jobs' states and run nothing (read-only: works while a sweep runs)")
        sub.set_defaults(run=_sweep)
    imp = commands.add_parser("import", help="import fine-tuned checkpoints (open_clip pickles/state dicts, Hugging Face "
                                             "CLIPVisionModel) into safetensors, once")
    imp.add_argument("source", type=Path, help="a checkpoint file, or a tall_masks-style folder {model}/{Task}Val/*.pt")
    imp.add_argument("destination", type=Path, help="the .safetensors file, or the folder for a directory import")
    imp.add_argument("--backbone", required=True)
    imp.add_argument("--format", default="auto", choices=["auto", "open_clip", "hf"])
    imp.add_argument("--trust-pickle", action="store_true",
                     help="allow unpickling whole pickled modules (only for files you trust: pickle runs code)")
    imp.add_argument("--fill-from", type=Path, default=None, help="pretrained state for keys the file lacks (HF visual.proj)")
    imp.add_argument("--overwrite", action="store_true",
                     help="replace destination files mergelib did not write (never the source)")
    imp.set_defaults(run=_import)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (MergelibError, ValueError, KeyError, TypeError, OSError) as error:
        # one line naming what is wrong and what to do, no traceback (OSError: disk full, a read-only folder, ...)
        print(f"mergelib {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
