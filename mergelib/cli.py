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
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (MergelibError, ValueError, KeyError, TypeError, FileNotFoundError) as error:
        print(f"mergelib {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
