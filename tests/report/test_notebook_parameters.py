"""The notebooks' papermill parameters: one shared check (names, types, choices, ranges) before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mergelib.report.book import NOTEBOOK_DIR, NOTEBOOKS
from mergelib.errors import ParameterError, ParameterValueError, UnknownNameError
from mergelib.report.notebook_parameters import RULES, check_notebook_parameters, notebook_defaults, validate_notebook_parameters

ALL_NOTEBOOKS = sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))


@pytest.fixture(autouse=True)
def in_notebooks_dir(monkeypatch):
    monkeypatch.chdir(NOTEBOOK_DIR)  # papermill runs the notebooks there: relative paths start in notebooks/


def test_every_notebook_is_in_the_book_and_has_a_schema():
    assert ALL_NOTEBOOKS == sorted(entry.name for entry in NOTEBOOKS)
    for name in ALL_NOTEBOOKS:
        assert set(RULES.get(name, {})) <= set(notebook_defaults(name)), name


@pytest.mark.parametrize("entry", NOTEBOOKS, ids=lambda e: e.name)
def test_defaults_book_and_smoke_parameters_pass_the_check(entry):
    defaults = notebook_defaults(entry.name)
    assert validate_notebook_parameters(entry.name, {}) == defaults
    validate_notebook_parameters(entry.name, entry.parameters)
    validate_notebook_parameters(entry.name, entry.smoke)


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_the_first_code_cell_checks_the_parameters_before_anything_else(name):
    cells = [c for c in json.loads((NOTEBOOK_DIR / f"{name}.ipynb").read_text())["cells"] if c["cell_type"] == "code"]
    assert "parameters" in cells[0]["metadata"].get("tags", [])
    code = [line for line in "".join(cells[1]["source"]).splitlines() if line.strip()]
    assert code[0].startswith("from mergelib.report.notebook_parameters import check_notebook_parameters")
    assert code[1].startswith(f'params = check_notebook_parameters("{name}", globals())')


@pytest.mark.parametrize("notebook, values, message", [
    ("benchmark_dg", {"method": ["score"]}, r"has no parameter\(s\) 'method' \(did you mean 'methods'\?\); its parameters are: "
                                            r"backbone, datasets, methods"),
    ("benchmark_dg", {"epochs": "3"}, "parameter 'epochs' must be int, got str '3'"),
    ("benchmark_dg", {"batch_size": 0}, "parameter 'batch_size' must be at least 1"),
    ("benchmark_dg", {"precision": "fp8"}, "precision must be one of fp32, bf16, fp16"),
    ("benchmark_dg", {"data_root": "/nonexistent/dg"}, "no folder '/nonexistent/dg'"),
    ("benchmark_dg", {"weights": "missing.safetensors"}, "'published', 'random' or an existing weights file"),
    ("benchmark_dg", {"methods": "score[zz=1]"}, r"has no parameter\(s\) \['zz'\]"),
    ("benchmark_multitask", {"normalize_with": "expert"}, "must be one of '', 'published', 'experts'"),
    ("benchmark_multitask", {"tasks": ["SVHN"]}, "no stand-in for SVHN"),
    ("score_derived", {"held_out": "cubism"}, "'held_out' of notebook score_derived must be one of domains"),
    ("esm_derived", {"expert": "mnist"}, "'expert' of notebook esm_derived must be one of tasks"),
    ("esm_derived", {"rank_fractions": [0.5, 1.5]}, r"'rank_fractions\[1\]' must be in \(0, 1\]"),
    ("subspace_overlap", {"overrides": {"epoch": 2}}, "unknown parameter.*valid parameters: .*epochs"),
    ("domain_generalization", {"task_epochs": 1}, r"has no parameter\(s\) 'task_epochs'"),
    ("performance", {"layer_shape": [8, 4, 2]}, "'layer_shape' must have 2 items"),
])
def test_wrong_parameters_are_refused_with_a_sentence(notebook, values, message):
    with pytest.raises((ParameterError, ParameterValueError), match=message):
        validate_notebook_parameters(notebook, values)


@pytest.mark.parametrize("notebook, values, kind", [
    ("benchmark_dg", {"datasets": ["PACS", "Pacs"]}, "DG dataset"),
    ("benchmark_dg", {"backbone": "ViT-B-33"}, "backbone"),
    ("benchmark_multitask", {"tasks": "Mnist", "data_root": "."}, "task"),
    ("methods", {"methods": "scor"}, "merge method"),
    ("ablations", {"esm_decompositions": ["pca"]}, "ESM decomposition"),
    ("subspace_overlap", {"domains": ["photo", "cubism"]}, "domain"),
])
def test_unknown_names_list_the_valid_ones(notebook, values, kind):
    with pytest.raises(UnknownNameError, match=f"unknown {kind} .*; valid {kind} names: "):
        validate_notebook_parameters(notebook, values)


def test_a_single_value_for_a_list_parameter_is_a_one_element_list():
    checked = validate_notebook_parameters("benchmark_dg", {"datasets": "PACS", "methods": "score", "standin_lr": 1})
    assert checked["datasets"] == ["PACS"] and checked["methods"] == ["score"] and checked["standin_lr"] == 1.0
    assert validate_notebook_parameters("esm_derived", {"proxy_counts": 4})["proxy_counts"] == [4]
    assert validate_notebook_parameters("benchmark_multitask", {"tasks": 8, "data_root": "."})["tasks"] == 8
    assert validate_notebook_parameters("benchmark_multitask", {"tasks": "MNIST"})["tasks"] == ["MNIST"]


def _namespace(notebook: str, **injected):
    namespace = {"__name__": "__main__", "_": None, "_i1": "", "In": [""], "Out": {}, "get_ipython": print, "exit": None,
                 "quit": None, "json": json, "Path": Path, "check_notebook_parameters": check_notebook_parameters}
    namespace.update(notebook_defaults(notebook))  # the parameters cell
    namespace.update(injected)  # papermill's injected cell
    return namespace


def test_the_notebook_check_finds_injected_names_that_are_not_parameters():
    with pytest.raises(ParameterError, match=r"notebook methods has no parameter\(s\) 'method' \(did you mean 'methods'\?\); "
                                             "its parameters are: methods"):
        check_notebook_parameters("methods", _namespace("methods", method="score"))
    namespace = _namespace("results", backbones="ViT-B-32")
    checked = check_notebook_parameters("results", namespace)
    assert namespace["backbones"] == checked["backbones"] == ["ViT-B-32"]  # written back into the globals
    namespace["rows"] = []  # a later cell's global: an interactive rerun of the first cell checks values, not names
    assert check_notebook_parameters("results", namespace)["backbones"] == ["ViT-B-32"]


def _papermill(tmp_path, *parameters: str) -> subprocess.CompletedProcess:
    executable = Path(sys.executable).with_name("papermill")
    notebook = NOTEBOOK_DIR / "methods.ipynb"
    before = notebook.read_bytes()
    run = subprocess.run([str(executable), str(notebook), str(tmp_path / "out.ipynb"), "-k", "python3",
                          "--cwd", str(NOTEBOOK_DIR), *parameters], capture_output=True, text=True, timeout=300)
    assert notebook.read_bytes() == before
    return run


def test_papermill_with_a_misspelt_parameter_fails_at_once_naming_the_valid_ones(tmp_path):
    run = _papermill(tmp_path, "-p", "method", "score")
    assert run.returncode != 0
    assert "notebook methods has no parameter(s) 'method' (did you mean 'methods'?); its parameters are: methods" in run.stderr


def test_papermill_with_a_string_for_a_list_reads_one_name_not_its_letters(tmp_path):
    run = _papermill(tmp_path, "-p", "methods", "scor")
    assert run.returncode != 0
    assert "unknown merge method 'scor'; valid merge method names: " in run.stderr  # not 's', 'c', 'o', 'r'
