"""The ``mergelib`` command line."""

from __future__ import annotations

import argparse
import sys
import time


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
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
