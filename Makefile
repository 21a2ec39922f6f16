# kd_det: `make demo` (set up + main job on the synthetic data), `make test` (set up + tests).
# Everything installs into ./.venv; a second `make` re-installs nothing.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kd_det_installed
TORCH  ?= torch==2.14.1 torchvision==0.29.1
TEST_WORKERS ?= 2

.PHONY: install demo test test-fast test-numeric-matrix lint format docs bench clean-output

install: $(STAMP)

$(STAMP): setup.py tools/install_detectron2.py kd_det/checkpoint/safe_pickle.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q setuptools wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install -q --no-build-isolation -e ".[test,lint]"
	touch $(STAMP)

demo: install
	$(PY) tools/run_demo.py

# the tests in TEST_WORKERS processes of one thread each (pytest-xdist); TEST_WORKERS=0: one process
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15 tests

# the tests without the slow integration ones (training, export, evaluation): a developer's loop
test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" tests

# the numeric tests again with other CPU kernels than this machine's own (CI runs it after `test`)
test-numeric-matrix: install
	PY=$(PY) .ci/numeric_matrix

# black, isort and flake8 at 100 columns, as Detectron2 (settings: setup.cfg, pyproject.toml);
# `make format` rewrites the files, `make lint` (run by CI) only checks them
LINT_PATHS := kd_det tools tests benchmarks configs setup.py

lint: install
	$(PY) -m black --check -q $(LINT_PATHS)
	$(PY) -m isort --check-only -q $(LINT_PATHS)
	$(PY) -m flake8 $(LINT_PATHS)

format: install
	$(PY) -m black -q $(LINT_PATHS)
	$(PY) -m isort -q $(LINT_PATHS)

# docs/config_keys.md from kd_det/config/defaults.py's comments (tests/test_docs.py checks it)
docs: install
	$(PY) tools/gen_config_docs.py

clean-output:
	rm -rf output demo_report
