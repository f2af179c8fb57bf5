# The two commands of the README:  make book  (build the book on the embedded miniature)
#                                   make test  (run the test suite)
# and an optional third:            make lab   (JupyterLab on notebooks/, to run a chapter cell by cell)
# Both start from a fresh clone: they create .venv, install the pinned dependencies and the
# Fashion-MNIST Debian package when missing, then do their job.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export MERGELIB_CACHE ?= $(CURDIR)/.cache/mergelib
export PYTHONUNBUFFERED := 1
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: book test lab setup data notebooks recipe-study seeds-study clean

# Reuses every chapter whose execution key (source, parameters, mergelib's code, stored inputs) is
# unchanged; `$(BIN)/mergelib book --force` executes them all again.
book: setup data
	$(BIN)/mergelib book

test: setup data
	$(BIN)/python -m pytest

# JupyterLab on notebooks/ with this environment and the caches of `make book` (Ctrl-C stops it).
lab: setup data
	$(BIN)/mergelib lab

setup: $(VENV)/.installed

# Reinstall when the dependency pins change.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# animal-mnist is a data-only wheel whose metadata pulls in TensorFlow; we only read its files.
	$(BIN)/python -m pip install --quiet --no-deps animal-mnist==0.4
	touch $@

data:
	@if [ ! -f $(FASHION_MNIST) ] && [ -z "$$MERGELIB_FASHION_MNIST" ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing Debian's dataset-fashion-mnist"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing and apt-get is unavailable: download the four IDX .gz files and set MERGELIB_FASHION_MNIST to their folder" >&2; exit 1; \
	  fi; \
	fi

notebooks: setup data
	$(BIN)/mergelib notebooks

# Slow (about 20 minutes from empty caches): the recipe variants compared in the first chapter.
recipe-study: setup data
	$(BIN)/mergelib recipe-study

# 6.5 minutes on 2 quiet cores after `make book` (11 from empty caches with 1,000 test images per domain):
# the miniature rerun with 3 fine-tuning seeds and 2 pretraining seeds, read by the chapters for the
# spread across seeds.
seeds-study: setup data
	$(BIN)/mergelib seeds-study

# Also clears the notebooks' execution keys (book/_generated/.cache); the caches of .cache/mergelib stay.
clean:
	rm -rf _build book/_generated results/miniature
