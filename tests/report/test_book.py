"""The book's execution cache: which chapters are executed again, and why (mergelib.report.book).

Tiny synthetic notebooks in a temporary "repository" stand in for the book's chapters: ``writer``
writes ``results/mini/out.txt`` from its parameter, ``reader`` reads it and a stored input
``results/stored/*.json``, ``plain`` reads nothing. The dependency logic runs them in-process
(fast); one test runs the real papermill path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mergelib.report import book
from mergelib.report.book import BookNotebook, execute_notebooks, source_fingerprint

CHAPTERS = (
    BookNotebook("writer", outputs=("results/mini/*",)),
    BookNotebook("reader", inputs=("results/mini/out.txt", "results/stored/*.json")),
    BookNotebook("plain"),
)


def _notebook(prose: str, parameters: str, *code: str) -> dict:
    cells = [{"cell_type": "markdown", "metadata": {}, "source": prose},
             {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": parameters,
              "execution_count": None, "outputs": []}]
    cells += [{"cell_type": "code", "metadata": {}, "source": source, "execution_count": None, "outputs": []}
              for source in code]
    for number, cell in enumerate(cells):
        cell["id"] = f"cell-{number}"
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


@pytest.fixture
def repo(tmp_path) -> Path:
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    sources = {
        "writer": _notebook("# Writer", "n = 1", "from pathlib import Path\n"
                            "Path('../results/mini').mkdir(parents=True, exist_ok=True)\n"
                            "Path('../results/mini/out.txt').write_text(str(n))"),
        "reader": _notebook("# Reader", "x = 0", "from pathlib import Path\n"
                            "print(Path('../results/mini/out.txt').read_text())"),
        "plain": _notebook("# Plain", "y = 0", "print(y + 1)"),
    }
    for name, notebook in sources.items():
        (notebooks / f"{name}.ipynb").write_text(json.dumps(notebook))
    (tmp_path / "results" / "stored").mkdir(parents=True)
    (tmp_path / "results" / "stored" / "a.json").write_text('{"score": 1}')
    return tmp_path


@pytest.fixture
def executed(monkeypatch) -> list[str]:
    """Replace papermill by an in-process run of the code cells (parameters injected after the
    ``parameters`` cell, in the notebook's folder); record which chapters ran."""
    names: list[str] = []

    def run(source: Path, output: Path, parameters=None, *, log_output=True):
        notebook, namespace, cwd = json.loads(source.read_text()), {}, os.getcwd()
        os.chdir(source.parent)
        try:
            for cell in notebook["cells"]:
                if cell["cell_type"] == "code":
                    exec(cell["source"], namespace)
                    if "parameters" in cell["metadata"].get("tags", []):
                        namespace.update(parameters or {})
        finally:
            os.chdir(cwd)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(notebook))
        names.append(source.stem)
        return output

    monkeypatch.setattr(book, "execute_notebook", run)
    return names


def _build(repo: Path, **options) -> list[book.ChapterRun]:
    return execute_notebooks(repo / "out", notebooks=CHAPTERS, notebook_dir=repo / "notebooks", root=repo, **options)


def _edit(path: Path, change) -> None:
    notebook = json.loads(path.read_text())
    change(notebook)
    path.write_text(json.dumps(notebook))


def test_an_unchanged_build_reuses_every_chapter_and_leaves_its_files_alone(repo, executed, capsys):
    first = _build(repo)
    assert executed == ["writer", "reader", "plain"] and all(run.executed for run in first)
    assert first[0].reasons == ("no executed copy",)
    stamps = {path: path.stat().st_mtime_ns for path in (repo / "out").rglob("*") if path.is_file()}
    assert {path.name for path in stamps} == {"writer.ipynb", "reader.ipynb", "plain.ipynb",
                                              "writer.json", "reader.json", "plain.json"}
    record = json.loads((repo / "out" / ".cache" / "reader.json").read_text())
    assert set(record["key"]) == {"source", "parameters", "code", "environment", "inputs"}
    assert record["key"]["inputs"] == {"results/mini/out.txt": book._sha256(b"1"),
                                       "results/stored/a.json": book._sha256(b'{"score": 1}')}
    capsys.readouterr()

    executed.clear()
    second = _build(repo)
    assert executed == [] and not any(run.executed for run in second)
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps  # Sphinx sees nothing new
    out = capsys.readouterr().out
    assert out.count("reused (key unchanged") == 3 and "0 executed, 3 reused" in out


def test_each_change_reexecutes_exactly_the_chapters_that_depend_on_it(repo, executed, monkeypatch, capsys):
    _build(repo)

    def rebuild(**options) -> dict[str, tuple[str, ...]]:
        executed.clear()
        return {run.name: run.reasons for run in _build(repo, **options) if run.executed}

    # the prose of one chapter
    _edit(repo / "notebooks" / "plain.ipynb", lambda nb: nb["cells"][0].update(source="# Plain, reworded"))
    assert rebuild() == {"plain": ("notebook source changed",)}
    # a parameter that changes what the writer stores: the reader of that file follows
    assert rebuild(extra={"writer": {"n": 2}}) == {
        "writer": ("parameters changed: n \"<default>\" -> 2",),
        "reader": ("input results/mini/out.txt changed",)}
    # a parameter whose output is identical to the stored one: only that chapter
    assert rebuild(extra={"writer": {"n": 2}, "plain": {"y": 5}}) == {"plain": ('parameters changed: y "<default>" -> 5',)}
    # a stored input: changed, then a new file matching the glob
    (repo / "results" / "stored" / "a.json").write_text('{"score": 2}')
    assert rebuild(extra={"writer": {"n": 2}, "plain": {"y": 5}}) == {"reader": ("input results/stored/a.json changed",)}
    (repo / "results" / "stored" / "b.json").write_text("{}")
    assert rebuild(extra={"writer": {"n": 2}, "plain": {"y": 5}}) == {"reader": ("input results/stored/b.json appeared",)}
    # a chapter's output deleted behind its back: it runs again and rewrites the same file
    (repo / "results" / "mini" / "out.txt").unlink()
    assert rebuild(extra={"writer": {"n": 2}, "plain": {"y": 5}}) == {"writer": ("output results/mini/out.txt is missing",)}
    # mergelib's code: every chapter
    monkeypatch.setattr(book, "code_fingerprint", lambda: "edited")
    reasons = rebuild(extra={"writer": {"n": 2}, "plain": {"y": 5}})
    assert set(reasons) == {"writer", "reader", "plain"}
    assert all(r == ("mergelib's code changed (code fingerprint)",) for r in reasons.values())
    # --force
    assert rebuild(extra={"writer": {"n": 2}, "plain": {"y": 5}}, force=True) == {
        name: ("--force",) for name in ("writer", "reader", "plain")}
    # back to the defaults, nothing else changed
    assert rebuild(extra={"writer": {"n": 2}, "plain": {"y": 5}}) == {}


def test_an_interrupted_execution_leaves_no_key(repo, executed, monkeypatch):
    _build(repo)
    fake = book.execute_notebook

    def fail(source, output, parameters=None, *, log_output=True):
        output.write_text("{}")  # papermill leaves the partly executed notebook behind
        raise RuntimeError("a cell raised")

    monkeypatch.setattr(book, "execute_notebook", fail)
    with pytest.raises(RuntimeError):
        _build(repo, force=True)
    assert not (repo / "out" / ".cache" / "writer.json").exists()
    monkeypatch.setattr(book, "execute_notebook", fake)
    executed.clear()
    runs = _build(repo)
    assert runs[0].reasons == ("no stored execution key (first build, or the last execution did not finish)",)


def test_the_source_fingerprint_ignores_outputs_and_interface_state(repo):
    path = repo / "notebooks" / "plain.ipynb"
    before = source_fingerprint(path)

    def run_in_lab(notebook):  # what running the cells and saving in JupyterLab writes
        cell = notebook["cells"][2]
        cell.update(execution_count=1, outputs=[{"output_type": "stream", "name": "stdout", "text": "1\n"}])
        cell["metadata"].update(execution={"iopub.status.busy": "2026-12-02T16:00:00Z"}, scrolled=True)
        notebook["metadata"]["language_info"] = {"name": "python", "version": "3.12.3"}

    _edit(path, run_in_lab)
    assert source_fingerprint(path) == before
    _edit(path, lambda nb: nb["cells"][2]["metadata"].update(tags=["hide-input"]))  # the book reads tags
    assert source_fingerprint(path) != before


def test_input_globs_reach_files_in_subfolders_and_name_what_is_absent(tmp_path):
    (tmp_path / "results" / "replication" / "ViT-B-32" / "dg").mkdir(parents=True)
    (tmp_path / "results" / "replication" / "ViT-B-32" / "dg" / "score.csv").write_text("a")
    (tmp_path / "results" / "replication" / "top.json").write_text("b")
    found = book.files_fingerprint(("results/replication/**", "results/benchmarks/*.json"), tmp_path)
    assert found == {"results/replication/ViT-B-32/dg/score.csv": book._sha256(b"a"),
                     "results/replication/top.json": book._sha256(b"b"), "results/benchmarks/*.json": "absent"}


def test_an_unknown_chapter_in_extra_is_refused(repo):
    with pytest.raises(ValueError, match="no book notebook named"):
        _build(repo, extra={"writr": {"n": 2}})


def test_every_book_chapter_has_its_notebook_and_declares_existing_folders():
    for entry in book.NOTEBOOKS:
        assert (book.NOTEBOOK_DIR / f"{entry.name}.ipynb").exists()
        for pattern in entry.inputs + entry.outputs:
            assert not Path(pattern).is_absolute() and ".." not in Path(pattern).parts, pattern


@pytest.mark.slow
def test_papermill_executions_are_reused_by_the_next_build(repo, capsys):
    """The real path: papermill executes, the key is stored, the next build reuses the file untouched."""
    chapters = CHAPTERS[:2]
    first = execute_notebooks(repo / "out", notebooks=chapters, notebook_dir=repo / "notebooks", root=repo,
                              log_output=False)
    assert [run.executed for run in first] == [True, True]
    executed = json.loads((repo / "out" / "reader.ipynb").read_text())
    assert "".join(executed["cells"][-1]["outputs"][0]["text"]) == "1\n"
    stamp = (repo / "out" / "reader.ipynb").stat().st_mtime_ns
    second = execute_notebooks(repo / "out", notebooks=chapters, notebook_dir=repo / "notebooks", root=repo,
                               log_output=False)
    assert [run.executed for run in second] == [False, False]
    assert (repo / "out" / "reader.ipynb").stat().st_mtime_ns == stamp


def test_mergelib_book_and_notebooks_pass_force(monkeypatch):
    from mergelib.cli import main

    calls = []
    monkeypatch.setattr(book, "execute_notebooks", lambda **options: calls.append(options))
    monkeypatch.setattr(book, "build_book", lambda: calls.append("build"))
    assert main(["notebooks", "--force"]) == 0 and main(["notebooks"]) == 0
    assert main(["book", "--force"]) == 0
    assert calls == [{"force": True}, {"force": False}, {"force": True}, "build"]


HIDDEN_INPUT = {"hide-input", "remove-input", "hide-cell", "remove-cell"}


def test_visible_code_fits_the_page_width():
    """Code a reader sees (cells without a hide or remove tag) stays within 88 columns, so it reads
    as written; at the theme's default width a code cell holds about 75, and longer lines wrap
    (book/_static/wrap-code.css) instead of scrolling sideways."""
    import json

    from mergelib.report.book import NOTEBOOK_DIR

    too_long = []
    for path in sorted(NOTEBOOK_DIR.glob("*.ipynb")):
        for index, cell in enumerate(json.loads(path.read_text())["cells"]):
            if cell["cell_type"] != "code" or HIDDEN_INPUT & set(cell.get("metadata", {}).get("tags", [])):
                continue
            too_long += [f"{path.name} cell {index}: {len(line)} columns: {line[:60]}..."
                         for line in "".join(cell["source"]).splitlines() if len(line) > 88]
    assert not too_long, "\n".join(too_long)


def test_every_notebook_cell_has_a_unique_id():
    """nbformat 4.5 cell ids: a copied cell keeps its id, and nbformat then renames the duplicate
    at every execution (a warning today, an error in later nbformat versions)."""
    import json
    from collections import Counter

    from mergelib.report.book import NOTEBOOK_DIR

    problems = []
    for path in sorted(NOTEBOOK_DIR.glob("*.ipynb")):
        ids = [cell.get("id") for cell in json.loads(path.read_text())["cells"]]
        problems += [f"{path.name}: cell {index} has no id" for index, i in enumerate(ids) if not i]
        problems += [f"{path.name}: id {i!r} on {n} cells" for i, n in Counter(ids).items() if i and n > 1]
    assert not problems, "\n".join(problems)
