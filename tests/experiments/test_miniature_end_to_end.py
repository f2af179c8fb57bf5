"""End to end on a very small budget: the pipeline, its cache, and the notebook through papermill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from mergelib.experiments.miniature import run_miniature_domain_generalization

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_pipeline_writes_results_with_provenance_and_reuses_its_cache(tiny_config, tmp_path):
    first = run_miniature_domain_generalization(tiny_config, results_dir=tmp_path / "a", progress=False)
    results = pd.read_csv(tmp_path / "a" / "results.csv")
    assert set(results.held_out) == set(tiny_config.domains)
    merges = results[results.coefficient.notna()]
    per_domain = len(tiny_config.methods) + len(tiny_config.sweep_methods) * (len(tiny_config.coefficients) - 1)
    assert len(merges) == len(tiny_config.domains) * per_domain
    assert set(merges.method) == set(tiny_config.methods)  # every registered method ran
    assert set(merges[merges.coefficient != 1.0].method) == set(tiny_config.sweep_methods)
    assert results.accuracy.between(0, 1).all() and results.balanced_accuracy.between(0, 1).all()
    record = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert record["parameters"]["domains"] == list(tiny_config.domains)
    assert {"commit", "dirty"} <= set(record["git"]) and record["seeds"]["data"] == tiny_config.seed
    assert set(record["experts"]) == set(tiny_config.domains)

    # second run: every expert and the evaluation come from the caches, and the results are identical
    second = run_miniature_domain_generalization(tiny_config, results_dir=tmp_path / "b", progress=False)
    assert second.timings["fine-tune experts"] < first.timings["fine-tune experts"] or first.timings["fine-tune experts"] < 1
    stage = "evaluate (leave-one-domain-out)"
    assert second.timings[stage] < 0.5 * first.timings[stage], (first.timings, second.timings)
    pd.testing.assert_frame_equal(first.results, second.results)

    # a truncated expert checkpoint is detected, rebuilt, and gives the same results again
    path = Path(tiny_config.cache_dir) / "experts" / "tiny-clip" / "fashion-domains"
    victim = sorted(path.glob("sketch-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    third = run_miniature_domain_generalization(tiny_config, results_dir=None, progress=False)
    pd.testing.assert_frame_equal(first.results, third.results)


def _papermill(tmp_path, **parameters):  # chapter 1
    import papermill

    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "domain_generalization.ipynb"), str(out),
                               parameters=parameters, cwd=str(ROOT / "notebooks"), progress_bar=False, kernel_name="python3")
    return out


def _files_under(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time (ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_notebook_runs_with_smoke_parameters_and_the_book_builds(tiny_config, tmp_path, monkeypatch):
    from mergelib.report.book import NOTEBOOKS, build_book, execute_notebooks

    monkeypatch.setenv("MERGELIB_CACHE", tiny_config.cache_dir)  # reuse the session's tiny CLIP
    book = tmp_path / "book"
    book.mkdir()
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, book / name)
    shutil.copytree(ROOT / "book", book / "book", ignore=shutil.ignore_patterns("_generated"))
    results, standin = tmp_path / "results", tmp_path / "standin"
    before = _files_under(ROOT / "results")
    execute_notebooks(book / "book" / "_generated", smoke=True, log_output=False,
                      extra={"domain_generalization": {"results_dir": str(results)},
                             "benchmark_dg": {"results_dir": str(standin)},
                             "benchmark_multitask": {"results_dir": str(standin)},
                             "results": {"miniature_results_dir": str(results)}})
    assert (results / "results.csv").exists()
    assert any(standin.glob("*/domain_generalization/*/provenance.json"))
    assert any(standin.glob("*/multitask/*/provenance.json"))
    assert _files_under(ROOT / "results") == before, "the smoke build changed the repository's results/"
    # with warnings as errors, so an unresolved glue key, reference or toc entry fails
    done = build_book(book, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for entry in NOTEBOOKS:
        page = book / "_build" / "html" / "book" / "_generated" / f"{entry.name}.html"
        assert page.exists(), page
    methods_page = (book / "_build" / "html" / "book" / "_generated" / "methods.html").read_text()
    assert all(f"<code class=\"docutils literal notranslate\"><span class=\"pre\">{name}</span></code>" in methods_page
               for name in ("score", "esm", "tsv_m", "ties"))


def test_notebook_rejects_a_parameter_of_the_wrong_type(tmp_path):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as info:
        _papermill(tmp_path, epochs="three")
    assert "'epochs' must be int, got str 'three'" in str(info.value)
