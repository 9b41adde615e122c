# Everything a fresh clone needs: `make run` serves the default model set, `make test` tests.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
ADDR ?= 127.0.0.1:50051
STUBS := backend_pb2.py backend_pb2_grpc.py backend_pb2.pyi

.PHONY: install install-dev models run test lint clean soak soak-reload bench bench-store

# The server's runtime (requirements.txt) and the generated stubs: all `make run` and run.sh need.
install: $(VENV)/.installed $(STUBS)

# Tests and linters on top: requirements-dev.txt (it includes the runtime and the operator tools).
install-dev: install $(VENV)/.dev-installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements-dev.txt requirements-tools.txt $(VENV)/.installed
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@

# The stubs are generated from backend.proto, never edited by hand (the .pyi is for the type checker).
$(STUBS) &: backend.proto $(VENV)/.installed
	$(PYTHON) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. backend.proto

# Installs the catalog's `test` group into models/ from MODELS_MIRROR (default ../shared/models)
# or the canonical URLs, checking every sha256.
models: install
	$(PYTHON) -m catalog.install

run: install models
	$(PYTHON) backend.py --addr $(ADDR) --preload-default models

test: install-dev models
	bash test.sh

# The lint gate `.ci/run` runs before the tests: ruff (lint and format) and mypy, configured in
# pyproject.toml.
lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# 30 s of mixed traffic from 8 clients against the real server (bench/soak.py); fails on any
# unexpected status or RSS growth beyond the stated bound; writes bench/results/soak.json.
# SOAK_ARGS passes options through (e.g. SOAK_ARGS=--reload-churn).
soak: install models
	$(PYTHON) bench/soak.py $(SOAK_ARGS)

# The reload churn (an operator's run, 300 s): 6 clients while LoadModel swaps the default set and
# buffalo_sc every 2 s; fails on any error, a peak RSS over 400 MB or memory a reload left behind;
# writes bench/results/soak-reload.json.
soak-reload: install models
	$(PYTHON) bench/soak.py --reload-churn $(SOAK_ARGS)

# Speed, side by side with an in-process insightface script (bench/bench.py): prints a table and
# PASS/FAIL per target, writes bench/results/bench.json, fails on a missed target. Its packages
# (bench/requirements.txt, a fully pinned closure) go in with --no-deps so that insightface cannot
# pull the GUI opencv-python next to opencv-python-headless. BENCH_ARGS passes options through.
bench: install models $(VENV)/.bench-installed
	$(PYTHON) bench/bench.py $(BENCH_ARGS)
	$(PYTHON) bench/store_bench.py

# The store role's scaling (bench/store_bench.py): Set/s, Find p50/p95 and RSS at 10k, 100k and 1M
# stored 512-d keys, PASS/FAIL at 1M; writes bench/results/store_bench.json. Needs ~2.5 GB of
# memory and of temporary disk.
bench-store: install
	$(PYTHON) bench/store_bench.py

$(VENV)/.bench-installed: bench/requirements.txt $(VENV)/.installed
	$(VENV)/bin/pip install --quiet --no-deps -r bench/requirements.txt
	@if $(VENV)/bin/pip show --quiet opencv-python 2>/dev/null; then \
		echo "opencv-python is installed; only opencv-python-headless may provide cv2" >&2; exit 1; fi
	$(PYTHON) -c "import cv2, insightface.model_zoo; print('cv2', cv2.__version__, 'from', cv2.__file__)"
	touch $@

clean:
	rm -rf $(VENV) models $(STUBS) .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
