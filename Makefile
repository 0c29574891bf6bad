# `make demo` and `make test` each set up .venv when it is missing or stale, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
READY := $(VENV)/.ready
BENCH_READY := $(VENV)/.bench-ready

.PHONY: demo test test-tools test-scheduler airflow images bench-train bench-dags bench-serve bench-prepare \
	constraints clean

# PYTHON (which makes .venv and the constraints' venv) must be 3.11 or newer: say which one was found, and how to
# pass another.
define check_python
	@found=$$($(PYTHON) -c 'import sys; print(".".join(map(str, sys.version_info[:3])))' 2>/dev/null) \
	  || found="not found"; \
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "make: this project needs Python 3.11 or newer; PYTHON=$(PYTHON) is $$found." >&2; \
	  echo "make: pass another, e.g.: make $(or $(MAKECMDGOALS),test) PYTHON=python3.11" >&2; exit 1; }
endef

$(READY): pyproject.toml constraints.txt
	$(check_python)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: $(READY)
	$(BIN)/sdxl-lora-ops demo --workdir outputs/demo

# The last demo's runs and reports (outputs/demo) when there is one, else a fresh outputs/airflow.
airflow: $(READY)
	$(BIN)/sdxl-lora-ops airflow

# Build and push the job images to ECR: make images REGION=eu-west-1 ACCOUNT=111122223333 [PREFIX=sdxl-lora] [TAG=...]
images: $(READY)
	PYTHON=$(BIN)/python containers/build_and_push.sh --region "$(REGION)" --account "$(ACCOUNT)" \
	  $(if $(PREFIX),--prefix "$(PREFIX)") $(if $(TAG),--tag "$(TAG)")

# Two pytest-xdist workers (TEST_WORKERS=0: one process); each test module runs whole in one of them, the
# real-scheduler modules together (tests/conftest.py: pytest_xdist_make_scheduler).
# --durations=25: the slowest 25 tests, printed at the end, so that drift is visible in CI's output.
TEST_WORKERS ?= 2
test: $(READY) test-tools
	$(BIN)/python -m pytest --durations=25 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

# What the tests need from Debian besides the venv, installed when missing (nothing runs when both are there):
# chromium for the headless-browser tests (the trigger form, the Grid report view), docker-compose for the Compose
# files' `config` validation. apt-get as root, else through sudo; without either, say what to install.
TEST_TOOLS := chromium docker-compose
test-tools:
	@missing=""; for tool in $(TEST_TOOLS); do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; \
	  elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; \
	  else echo "make test: the tests need$$missing (Debian packages); not root and no sudo here:" \
	    "install them (apt-get install -y$$missing) and run make test again" >&2; exit 1; fi; \
	  echo "make test: installing$$missing (apt-get)"; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q$$missing \
	  || { echo "make test: apt-get could not install$$missing: install them and run make test again" >&2; exit 1; }; \
	fi

# Only the tests under a real Airflow (api-server, scheduler, dag-processor, triggerer; PostgreSQL, Redis).
test-scheduler: $(READY)
	$(BIN)/python -m pytest -m scheduler -s

# The training benchmark's yardstick (diffusers' own script) also needs the `bench` extra.
$(BENCH_READY): $(READY)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	touch $@

bench-train: $(BENCH_READY)
	$(BIN)/python benchmarks/bench_train.py $(ARGS)

bench-dags: $(READY)
	$(BIN)/python benchmarks/bench_dags.py $(ARGS)

bench-serve: $(READY)
	$(BIN)/python benchmarks/bench_serve.py $(ARGS)

bench-prepare: $(READY)
	$(BIN)/python benchmarks/bench_prepare.py $(ARGS)

# Re-resolve the pinned set after changing pyproject.toml (needs a fresh venv).
constraints:
	$(check_python)
	rm -rf /tmp/sdxl-lora-constraints && $(PYTHON) -m venv /tmp/sdxl-lora-constraints
	/tmp/sdxl-lora-constraints/bin/pip install --quiet -e '.[dev,bench]'
	( sed -n 1,2p constraints.txt; /tmp/sdxl-lora-constraints/bin/pip freeze --exclude-editable \
	  | sed 's/^torch==\(.*\)+cpu/torch==\1/' ) > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) outputs .pytest_cache
