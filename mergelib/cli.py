"""The ``mergelib`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import MergelibError


def _book(args: argparse.Namespace) -> int:
    from .book import build_book, execute_notebooks

    start = time.perf_counter()
    if not args.skip_notebooks:
        execute_notebooks()
    build_book()
    print(f"[mergelib] book built in {time.perf_counter() - start:.0f} s: _build/html/index.html", flush=True)
    return 0


def _notebooks(args: argparse.Namespace) -> int:
    from .book import execute_notebooks

    execute_notebooks()
    return 0


def _recipe_study(args: argparse.Namespace) -> int:
    from .miniature import STUDY_DIR, run_recipe_study

    run_recipe_study()
    print(f"[mergelib] recipe study written to {STUDY_DIR}", flush=True)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .merge_files import merge_checkpoint_files, parse_parameters

    manifest = merge_checkpoint_files(
        args.method, args.pretrained, args.experts, args.output, parameters=parse_parameters(args.param),
        alpha=args.alpha, prefix=args.prefix, device=args.device)
    print(f"[mergelib] {args.method} of {len(args.experts)} experts written to {args.output} "
          f"(sha256 {manifest['sha256'][:12]}…, manifest {args.output.with_suffix('.json')})", flush=True)
    return 0


def _replicate_dg(args: argparse.Namespace) -> int:
    from .replication import PAPER_DG_METHODS, run_domain_generalization

    for dataset in args.datasets:
        results, _ = run_domain_generalization(
            args.backbone, dataset, data_root=args.data_root, checkpoint_dir=args.checkpoint_dir,
            results_dir=args.results_dir, methods=args.methods or PAPER_DG_METHODS, weights=args.weights,
            device=args.device, precision=args.precision, epochs=args.epochs, batch_size=args.batch_size,
            accumulation_steps=args.accumulation_steps, num_workers=args.workers)
        means = results.groupby("method")["score"].mean().mul(100).sort_values(ascending=False)
        print(f"[mergelib] {args.backbone} {dataset}: mean over held-out domains (%)\n{means.round(2).to_string()}", flush=True)
    return 0


def _methods(args: argparse.Namespace) -> int:
    from .methods import METHODS

    for method in METHODS.values():
        arxiv = f"arXiv {method.arxiv}" if method.arxiv else ""
        defaults = ", ".join(f"{k}={v!r}" for k, v in method.defaults.items()) or "no parameters"
        print(f"{method.name:18s} {arxiv:16s} {defaults}\n{'':18s} {method.summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mergelib", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    book = commands.add_parser("book", help="execute the notebooks with papermill and build the Jupyter Book")
    book.add_argument("--skip-notebooks", action="store_true", help="build from the notebooks already executed")
    book.set_defaults(run=_book)
    commands.add_parser("notebooks", help="execute the notebooks with papermill only").set_defaults(run=_notebooks)
    commands.add_parser("recipe-study", help="rerun the miniature recipe study (results/studies/miniature_recipe)").set_defaults(run=_recipe_study)
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
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (MergelibError, ValueError, KeyError, TypeError, FileNotFoundError) as error:
        print(f"mergelib {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
