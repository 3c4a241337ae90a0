# Two commands do all set-up:  `make train`  and  `make test`.
# Both create .venv if missing, install the pinned dependency set and the
# project (compiling lafs_kernels._C), and are fast when nothing changed.

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMPS      := $(VENV)/.stamps
CUDA_HOME   ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
MAX_JOBS    ?= 2
export CUDA_HOME MAX_JOBS

EXT_SOURCES := setup.py $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cpp csrc/*.h csrc/*/*.h csrc/*/*.cuh)

.PHONY: setup train test test-fast bench bench-smoke info clean

setup: $(STAMPS)/project

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMPS)/deps: $(PY) requirements.txt constraints.txt
	$(PIP) install --upgrade pip -c constraints.txt
	$(PIP) install -r requirements.txt -c constraints.txt
	@mkdir -p $(STAMPS) && touch $@

# --no-build-isolation: the extension must be compiled against the torch in .venv.
$(STAMPS)/project: $(STAMPS)/deps pyproject.toml $(EXT_SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e . -c constraints.txt
	@mkdir -p $(STAMPS) && touch $@

train: setup
	$(PY) -m lafs.train

# ruff (configured in pyproject.toml) checks the formatting and lints the whole tree first: a finding fails
# the target (`ruff format .` fixes the formatting).
test: setup
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m pytest tests -q --durations=15

info: setup
	$(PY) -m lafs_kernels.info

# Run on an idle machine: every benchmark (ours and its baselines interleaved), then report.py writes
# benchmarks/RESULTS.md, the charts and the README's tables (between its benchmarks:begin/end markers, and the
# default run's from docs/default_run/summary.json between demo:begin/end).
bench: setup
	$(PY) -m pytest benchmarks --benchmark-only
	$(PY) benchmarks/report.py --readme README.md --demo --summary

# The same plumbing in about a minute: tiny shapes, two rounds, report into build/bench-smoke/ (nothing published).
bench-smoke: setup
	mkdir -p build/bench-smoke
	LAFS_BENCH_SMOKE=1 $(PY) -m pytest benchmarks --benchmark-only -q --benchmark-json build/bench-smoke/smoke.json
	$(PY) benchmarks/report.py build/bench-smoke/smoke.json --out build/bench-smoke/RESULTS.md --charts none --summary

clean:
	rm -rf build *.egg-info lafs_kernels/_C*.so lafs_kernels/_build_info.json $(STAMPS)
